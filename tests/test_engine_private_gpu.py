"""A fixed GPU request on the Ray a run starts for itself, on a machine without GPUs: no GPU
will ever come, so the run refuses at once (one line) instead of waiting forever, and the
Ray it started is gone again."""

from __future__ import annotations

import os

# Ray reads this when it is imported: bind the local cluster to the loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

ray = pytest.importorskip("ray")

from engine import driver
from engine.config import EngineConfig
from engine.errors import ConfigError
from tests.test_driver import fitted_sampler

pytestmark = pytest.mark.ray


def test_decoder_gpus_on_a_private_ray_without_gpus_is_refused():
    if ray.is_initialized():
        ray.shutdown()
    _, sampler = fitted_sampler()
    with pytest.raises(ConfigError, match=r"decoder_gpus = 1 asks for 2 GPUs for 2 decoder\(s\)"
                       r", but this machine's Ray has 0") as info:
        driver._RayPool(sampler, EngineConfig(n_decoders=2, n_knn=1, decoder_gpus=1))
    assert "\n" not in str(info.value)
    assert not ray.is_initialized()  # the pool shut down the Ray it started
