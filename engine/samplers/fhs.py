"""Filtered historical simulation (FHS): resampled standardized changes rescaled by EWMA vol.

Fit: each grid point's daily log-IV changes r_t get a RiskMetrics EWMA variance
(zero mean), sigma2_{t+1} = lam * sigma2_t + (1 - lam) * r_t^2, started from the
point's unconditional variance; z_t = r_t / sigma_t are the standardized changes.
Sample: the same recursion run over the context's own changes gives today's
variance; each simulated day draws one historical z surface (whole surfaces, so
cross-grid correlation is kept) and takes r = sigma * z with today's sigma, the
EWMA's own (flat) forecast for every day of the path. Paths are the last context day + cumsum(r). Unlike the plain bootstrap, the
spread follows the context's recent volatility.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from engine.data.panel import Panel
from engine.samplers.base import ConditionalSampler

# Variance floor: a grid point that never moves gets z = 0 instead of 0 / 0.
_VAR_FLOOR = 1e-20
# An EWMA variance under 1% of the point's long-run one (its vol under a tenth) is a stale
# quote, not a calm market: after n unchanged days the EWMA is 0.94**n of what it was, and
# the next real move would become a z of thousands, to be drawn into any later path. The
# real and synthetic histories stay above 8% of their long-run variance.
_STALE_SHARE = 0.01


def ewma_variance(resids: np.ndarray, lam: float, sigma2_0: np.ndarray | float,
                  axis: int = 0) -> np.ndarray:
    """EWMA conditional variances along ``axis``: T residuals -> T + 1 variances.

    ``out[0] = sigma2_0`` and ``out[t + 1] = lam * out[t] + (1 - lam) * resids[t]**2``, so
    ``out[t]`` is the variance of ``resids[t]`` given ``resids[:t]`` and ``out[T]`` the
    next-day forecast. ``out[:T]`` equals arch's ``EWMAVariance(lam).compute_variance``
    with ``backcast = sigma2_0`` (checked in the tests); this version runs over any
    number of series at once. ``sigma2_0`` broadcasts against ``resids`` without ``axis``.
    """
    r2 = np.moveaxis(np.asarray(resids, dtype=np.float64), axis, 0) ** 2  # (T, ...)
    s0 = np.broadcast_to(np.asarray(sigma2_0, dtype=np.float64), r2.shape[1:])
    # y[n] = (1 - lam) r2[n] + lam y[n - 1], y[-1] = sigma2_0, so y[n] = out[n + 1].
    y, _ = lfilter([1.0 - lam], [1.0, -lam], r2, axis=0, zi=lam * s0[None])
    return np.moveaxis(np.concatenate([s0[None], y], axis=0), 0, axis)


class FilteredHistoricalSampler(ConditionalSampler):
    """Last context day + cumsum of EWMA-vol-scaled, resampled standardized change surfaces."""

    name = "fhs"

    def _fit(self, panel: Panel, model) -> None:
        lam = float(self.config.sampler.ewma_lambda)
        changes = np.diff(panel.log_surface, axis=0)  # (T-1, n_m, n_tau)
        uncond = np.maximum(np.mean(changes**2, axis=0), _VAR_FLOOR)  # (n_m, n_tau), zero mean
        self.lam_ = lam
        self.uncond_var_ = uncond
        sigma2 = self._floored(ewma_variance(changes, lam, uncond)[:-1])  # (T-1, n_m, n_tau)
        self.std_changes_ = changes / np.sqrt(sigma2)  # (T-1, n_m, n_tau)

    def _floored(self, sigma2: np.ndarray) -> np.ndarray:
        return np.maximum(sigma2, np.maximum(_STALE_SHARE * self.uncond_var_, _VAR_FLOOR))

    def current_variance(self, log_contexts: np.ndarray) -> np.ndarray:
        """Next-day EWMA variance of each context, (B, C, n_m, n_tau) -> (B, n_m, n_tau)."""
        changes = np.diff(log_contexts, axis=1)  # (B, C-1, n_m, n_tau)
        return self._floored(ewma_variance(changes, self.lam_, self.uncond_var_, axis=1)[:, -1])

    def _sample(self, log_contexts: np.ndarray, n_samples: int,
                rngs: list[np.random.Generator]) -> np.ndarray:
        H = self.horizon
        n_days = self.std_changes_.shape[0]
        idx = np.stack([rng.integers(0, n_days, size=(n_samples, H))
                        for rng in rngs])  # (B, M, H), row b from rngs[b] only
        z = self.std_changes_[idx]  # (B, M, H, n_m, n_tau)
        # The EWMA's own variance forecast is flat: every day of the path is scaled by today's
        # vol. (Feeding simulated shocks back into the EWMA makes the variance a product of
        # heavy-tailed factors with no mean reversion; over 90 days some paths explode.)
        sigma2 = self.current_variance(log_contexts)[:, None, None]  # (B, 1, 1, n_m, n_tau)
        last = log_contexts[:, -1][:, None, None]  # (B, 1, 1, n_m, n_tau)
        return last + np.cumsum(np.sqrt(sigma2) * z, axis=2)
