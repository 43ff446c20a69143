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


# Report name -> (registry sampler, sampler-config overrides), for `backfill evaluate`: the
# kNN samplers around the pca-ar mean path next to the CVAE p50, so the report shows both
# point forecasts, the online conformal scale next to the split one, and the hand-made
# feature keys next to the CVAE embedding.
ALIASES: dict[str, tuple[str, dict]] = {
    "knn-pca": ("knn", {"point": "pca-ar"}),
    "knn-conformal-pca": ("knn-conformal", {"point": "pca-ar"}),
    "knn-conformal-online": ("knn-conformal", {"conformal": "online"}),
    "knn-conformal-features": ("knn-conformal", {"embedding": "features"}),
}


def known_methods() -> list[str]:
    """What `evaluate.methods` may name: the samplers and their report aliases."""
    return [*REGISTRY, *ALIASES]


def make_sampler(name: str, config):
    if name not in REGISTRY:
        raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(config)


def is_knn(name: str) -> bool:
    """Whether the sampler ``name`` draws its neighbours' residual paths (the kNN samplers:
    a cross-fitted bank to fit, and a law of few distinct paths per context)."""
    if name not in REGISTRY:
        return False
    from engine.samplers.knn import KnnResidualSampler

    module, cls = REGISTRY[name]
    return issubclass(getattr(importlib.import_module(module), cls), KnnResidualSampler)
