"""Decoder actors and GPUs, on a real Ray that advertises one GPU (this machine's torch has
no CUDA): a decoder granted a GPU it cannot use is refused in one line, and
``engine.decoder_gpus = 0`` keeps the decoders on the CPU whatever the cluster has."""

from __future__ import annotations

import os

# Ray reads this when it is imported: bind the local cluster to the loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from engine import driver
from engine.config import EngineConfig
from engine.errors import ConfigError
from tests.test_driver import fitted_sampler

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")]


@pytest.fixture(scope="module", autouse=True)
def ray_with_a_gpu():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def granted(**engine) -> tuple[list[list[int]], set[str] | ConfigError]:
    """The decoders' granted GPU ids, and their devices (or the refusal)."""
    _, sampler = fitted_sampler()
    pool = driver._RayPool(sampler, EngineConfig(n_knn=1, **engine))
    try:
        ids = [info["gpu_ids"] for info in ray.get([d.shared_info.remote()
                                                    for d in pool.decoders])]
        try:
            return ids, pool.devices()
        except ConfigError as err:
            return ids, err
    finally:
        pool.close()


@pytest.mark.parametrize("engine", [{}, {"decoder_gpus": 0.5}, {"decoder_gpus": 1}])
def test_a_decoder_granted_a_gpu_without_cuda_is_refused(engine):
    # unset: the decoder takes the cluster's one GPU; or asks for a share, or for one
    ids, err = granted(**engine)
    assert ids == [[0]]
    assert isinstance(err, ConfigError), err
    assert "granted GPU 0, but its torch" in str(err) and "cannot use CUDA" in str(err)
    assert "engine.decoder_gpus = 0" in str(err) and "\n" not in str(err)


def test_decoder_gpus_zero_decodes_on_the_cpu():
    assert granted(decoder_gpus=0) == ([[]], {"cpu"})


@pytest.mark.parametrize("gpus", [1.5, -1, 0.00005, 0.12345])
def test_decoder_gpus_must_be_a_share_or_whole_gpus(gpus):
    with pytest.raises(ValueError, match="decoder_gpus"):
        EngineConfig(decoder_gpus=gpus)
