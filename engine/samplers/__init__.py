"""Conditional samplers, one per file; ``make_sampler(name, config)`` builds one by name."""

from __future__ import annotations

import importlib

from engine.errors import ConfigError

# name -> (module, class); imported lazily so a sampler's dependencies load only when used.
REGISTRY: dict[str, tuple[str, str]] = {
    "cvae-prior": ("engine.samplers.cvae_prior", "CvaePriorSampler"),
    "cvae-scaled": ("engine.samplers.cvae_scaled", "CvaeScaledSampler"),
    "knn": ("engine.samplers.knn", "KnnResidualSampler"),
    "knn-conformal": ("engine.samplers.knn_conformal", "KnnConformalSampler"),
    "hist-bootstrap": ("engine.samplers.hist_bootstrap", "HistBootstrapSampler"),
    "fhs": ("engine.samplers.fhs", "FilteredHistoricalSampler"),
    "pca-ar": ("engine.samplers.pca_ar", "PcaArSampler"),
    "oracle": ("engine.samplers.oracle", "OracleSampler"),
}


def make_sampler(name: str, config):
    if name not in REGISTRY:
        raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(config)
