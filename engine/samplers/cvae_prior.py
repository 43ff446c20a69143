"""The raw CVAE: z drawn from the conditional prior p(z | context), decoded to a p50 path.

This is the failure case the project starts from: the decoder learns E[X | C] and puts
almost no variance within a context, so its bands are far too narrow.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ConfigError
from engine.samplers.base import ConditionalSampler


class CvaePriorSampler(ConditionalSampler):
    name = "cvae-prior"
    uses_model = True

    def _fit(self, panel, model) -> None:
        if (model.context, model.horizon) != (self.context, self.horizon):
            raise ConfigError(f"model has context/horizon {model.context}/{model.horizon}, the "
                              f"config {self.context}/{self.horizon}; retrain the model")
        self.model_ = model

    def prior_paths(self, log_contexts, n_samples, rngs) -> np.ndarray:
        L = self.model_.cfg.latent_dim
        eps = np.stack([r.standard_normal((n_samples, L)) for r in rngs])  # (B, S, L)
        return self.model_.decode_prior(log_contexts, eps)  # (B, S, H, n_m, n_tau)

    def _sample(self, log_contexts, n_samples, rngs):
        return self.prior_paths(log_contexts, n_samples, rngs)
