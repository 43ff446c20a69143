"""PCA-AR factor model: AR(1) factor scores + bootstrapped innovations + resampled residuals.

Fit: the log-IV surfaces are flattened to G grid points, de-meaned and reduced to
k = min(n_factors, G) principal components. Each factor score follows an AR(1) with
intercept fitted by OLS, f_{t+1} = c + phi f_t + e_{t+1}. Sample: from the last
context day's scores, each simulated day takes one historical innovation vector
(all factors of the same day, so their correlation is kept) and one historical PCA
reconstruction residual surface (the idiosyncratic part the factors miss), both
drawn iid. ``mean_path`` gives the analytic conditional mean, which is also the
point forecast other samplers can wrap; ``fit_days`` fits on a subset of days so a
caller can cross-fit it leaving out time blocks.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from engine.data.panel import Panel
from engine.errors import DataError, not_fitted
from engine.samplers.base import ConditionalSampler

# AR coefficients are clipped to [-PHI_MAX, PHI_MAX]: a unit root would let the mean
# path drift and the spread grow without bound over long horizons.
PHI_MAX = 0.999


def ar1_paths(drive: np.ndarray, start: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """f_h = phi * f_{h-1} + drive_h for h = 1..H, with f_0 = start, per factor.

    ``drive`` (..., H, k), ``start`` broadcastable to (..., k), ``phi`` (k,) -> (..., H, k).
    One linear filter per factor runs over every path and day at once (k is small).
    """
    out = np.empty(drive.shape, dtype=np.float64)
    batch = drive.shape[:-2]
    for j, p in enumerate(phi):
        zi = np.broadcast_to(p * start[..., j], batch)[..., None]  # (..., 1): p * f_0
        out[..., j], _ = lfilter([1.0], [1.0, -p], drive[..., j], axis=-1, zi=zi)
    return out


def ar1_ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column OLS of y = c + phi x; ``x``, ``y`` (N, k) -> (c, phi), each (k,)."""
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    vx = np.sum((x - xm) ** 2, axis=0)
    cxy = np.sum((x - xm) * (y - ym), axis=0)
    phi = np.divide(cxy, vx, out=np.zeros_like(vx), where=vx > 0)
    phi = np.clip(phi, -PHI_MAX, PHI_MAX)
    # The intercept is refitted after clipping, so the innovations keep a zero mean.
    return ym - phi * xm, phi


def project(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``x`` (..., n) times ``basis`` (n, m) -> (..., m), summed one term at a time.

    Not ``x @ basis``: BLAS picks kernels by array shape, so a row's last bits would
    depend on the batch it sits in; a loop of elementwise products does not. n is k
    (small) for paths and G only for the (B, G) start scores.
    """
    out = x[..., 0, None] * basis[0]
    term = np.empty_like(out) if basis.shape[0] > 1 else None
    for i in range(1, basis.shape[0]):
        out += np.multiply(x[..., i, None], basis[i], out=term)  # no new array per term
    return out


class PcaArSampler(ConditionalSampler):
    """k PCA factors with AR(1) dynamics; innovations and residual surfaces bootstrapped."""

    name = "pca-ar"

    def _fit(self, panel: Panel, model) -> None:
        self.fit_days(panel.log_surface, np.ones(panel.n_days, dtype=bool))

    def fit_days(self, log_surface: np.ndarray, usable: np.ndarray) -> PcaArSampler:
        """Fit on the usable days only: PCA on usable days, AR(1) on usable (t, t+1) pairs.

        ``log_surface`` (T, n_m, n_tau) log-IV; ``usable`` (T,) bool. Values on days that
        are not usable never enter the arithmetic (they may be NaN).
        """
        log_surface = np.asarray(log_surface, dtype=np.float64)
        usable = np.asarray(usable)
        if log_surface.ndim != 3:
            raise DataError(f"log_surface has shape {log_surface.shape}; pca-ar needs "
                            "(T, n_m, n_tau)")
        T, n_m, n_tau = log_surface.shape
        if usable.dtype != bool or usable.shape != (T,):
            raise DataError(f"usable has dtype {usable.dtype} and shape {usable.shape}; pca-ar "
                            f"needs a bool mask of shape ({T},), one flag per day")
        pairs = np.flatnonzero(usable[:-1] & usable[1:])  # t with days t and t+1 usable
        if len(pairs) < 3:
            raise DataError(f"pca-ar got {len(pairs)} usable (t, t+1) day pairs and needs at "
                            "least 3 to fit the AR(1); unmask more days or give more history")
        X = log_surface.reshape(T, n_m * n_tau)  # (T, G)
        Xu = X[usable]  # (N, G)
        if not np.isfinite(Xu).all():
            raise DataError("pca-ar got non-finite log-IV on usable days; clean the data or "
                            "mark those days unusable")
        mean = Xu.mean(axis=0)  # (G,)
        _, _, vt = np.linalg.svd(Xu - mean, full_matrices=False)
        k = min(self.config.sampler.n_factors, vt.shape[0])
        components = vt[:k]  # (k, G)
        # Fix the SVD's arbitrary sign (loadings sum >= 0) so refits are comparable.
        components = components * np.where(components.sum(axis=1) < 0, -1.0, 1.0)[:, None]
        scores = np.zeros((T, k))
        scores[usable] = (Xu - mean) @ components.T  # (T, k); unusable days stay 0, unused
        intercept, phi = ar1_ols(scores[pairs], scores[pairs + 1])
        self.mean_ = mean
        self.components_ = components
        self.intercept_ = intercept
        self.phi_ = phi
        self.innovations_ = scores[pairs + 1] - intercept - phi * scores[pairs]  # (n_pairs, k)
        self.residuals_ = (Xu - mean) - scores[usable] @ components  # (N, G)
        self.grid_ = (n_m, n_tau)
        return self

    def _start_scores(self, log_contexts: np.ndarray) -> np.ndarray:
        """Factor scores of each context's last day, (B, C, n_m, n_tau) -> (B, k)."""
        last = log_contexts[:, -1].reshape(len(log_contexts), -1)  # (B, G)
        return project(last - self.mean_, self.components_.T)

    def mean_path(self, log_contexts: np.ndarray) -> np.ndarray:
        """Analytic conditional mean of log-IV, (B, C, n_m, n_tau) -> (B, H, n_m, n_tau)."""
        if not self.is_fitted():
            raise not_fitted(self)
        log_contexts = np.asarray(log_contexts, dtype=np.float64)
        if log_contexts.ndim != 4 or log_contexts.shape[2:] != self.grid_:
            raise DataError(f"log_contexts have shape {log_contexts.shape}; pca-ar needs "
                            f"(B, C, {self.grid_[0]}, {self.grid_[1]})")
        B, H = len(log_contexts), self.horizon
        drive = np.broadcast_to(self.intercept_, (B, H, len(self.phi_)))  # zero-mean shocks
        factors = ar1_paths(drive, self._start_scores(log_contexts), self.phi_)  # (B, H, k)
        return (self.mean_ + project(factors, self.components_)).reshape(B, H, *self.grid_)

    def _sample(self, log_contexts: np.ndarray, n_samples: int,
                rngs: list[np.random.Generator]) -> np.ndarray:
        B, H = len(log_contexts), self.horizon
        n_innov, n_resid = len(self.innovations_), len(self.residuals_)
        draws = [(rng.integers(0, n_innov, size=(n_samples, H)),
                  rng.integers(0, n_resid, size=(n_samples, H))) for rng in rngs]
        innov_idx = np.stack([d[0] for d in draws])  # (B, M, H), row b from rngs[b] only
        resid_idx = np.stack([d[1] for d in draws])  # (B, M, H)
        drive = self.intercept_ + self.innovations_[innov_idx]  # (B, M, H, k)
        start = self._start_scores(log_contexts)[:, None]  # (B, 1, k)
        factors = ar1_paths(drive, start, self.phi_)  # (B, M, H, k)
        # (B, M, H, G)
        paths = project(factors, self.components_)
        paths += self.mean_  # in place: the same sums as mean_ + project(...) + residuals
        paths += self.residuals_[resid_idx]
        return paths.reshape(B, n_samples, H, *self.grid_)
