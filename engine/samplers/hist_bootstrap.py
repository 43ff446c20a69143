"""Historical bootstrap: a random walk of resampled daily whole-surface log-IV changes.

A path is the last context day plus the cumulative sum of H daily change surfaces
drawn iid (with replacement) from the fit history. Whole surfaces are drawn, so a
simulated day keeps the cross-grid correlation of a real day; the context only sets
the starting point, so the spread does not depend on recent volatility.
"""

from __future__ import annotations

import numpy as np

from engine.data.panel import Panel
from engine.samplers.base import ConditionalSampler


class HistBootstrapSampler(ConditionalSampler):
    """Last context day + cumsum of H iid resampled historical daily change surfaces."""

    name = "hist-bootstrap"

    def _fit(self, panel: Panel, model) -> None:
        # Raw changes, drift included: over a stationary history their mean is
        # (last - first) / (T - 1), negligible next to their spread.
        self.changes_ = np.diff(panel.log_surface, axis=0)  # (T-1, n_m, n_tau)

    def _sample(self, log_contexts: np.ndarray, n_samples: int,
                rngs: list[np.random.Generator]) -> np.ndarray:
        n_changes = self.changes_.shape[0]
        idx = np.stack([rng.integers(0, n_changes, size=(n_samples, self.horizon))
                        for rng in rngs])  # (B, M, H), row b from rngs[b] only
        steps = self.changes_[idx]  # (B, M, H, n_m, n_tau)
        last = log_contexts[:, -1][:, None, None]  # (B, 1, 1, n_m, n_tau)
        return last + np.cumsum(steps, axis=2)
