"""Scores for conditional scenario generators: pure numpy functions over batched arrays.

Conventions (one horizon unless stated):
    samples   (W, M, G)  W evaluation windows, M samples per window, G grid points (iv units)
    realised  (W, G)     the surface that happened, same grid, same units
Inputs may be float32 (or any real dtype); every computation runs in float64. Arrays as large
as W=500, M=1000, G=100 are processed in chunks of windows so that a temporary never holds
more than about ``_CHUNK_ELEMENTS`` float64 values, whatever W. The loops below run over
chunks (a handful for realistic sizes), never over single windows on the common path.

Variances and standard deviations use ddof=0 throughout.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

from engine.errors import DataError

__all__ = [
    "band",
    "calendar_violations",
    "coverage",
    "coverage_by_group",
    "crps_ensemble",
    "energy_score",
    "kupiec_pof",
    "marginal_std_ratio",
    "pit",
    "pit_ks",
    "roughness_ratio",
    "var_backtest",
    "variance_budget",
    "vega_pnl",
    "width",
]

# About 32 MiB of float64 per temporary; sorting and quantiles make a few such copies.
_CHUNK_ELEMENTS = 1 << 22

FloatArray = NDArray[np.float64]


# ----------------------------------------------------------------------------- helpers


def _chunks(n: int, per_item: int, budget: int = _CHUNK_ELEMENTS) -> Iterator[slice]:
    """Slices of ``range(n)`` holding at most ``budget`` elements (at least one item each)."""
    step = max(1, budget // max(1, per_item))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _block_chunks(n_outer: int, n_inner: int, per_item: int,
                  budget: int = _CHUNK_ELEMENTS) -> Iterator[tuple[slice, slice]]:
    """(outer, inner) slices of a 2-axis leading block, at most ``budget`` elements each.

    Whole outer rows go together when one row fits the budget; otherwise (huge rows, e.g.
    M * H * G > budget) one outer row at a time, split along the inner axis.
    """
    if n_inner * per_item <= budget:
        for outer in _chunks(n_outer, n_inner * per_item, budget):
            yield outer, slice(0, n_inner)
        return
    for w in range(n_outer):  # rows too big for the budget: the per-row cost dwarfs the loop
        for inner in _chunks(n_inner, per_item, budget):
            yield slice(w, w + 1), inner


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise DataError(f"level must lie strictly between 0 and 1, got {level}; "
                        "pass e.g. 0.9 for a 90% band")
    return level


def _check_samples(samples: ArrayLike) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 3:
        raise DataError(f"samples must have shape (W, M, G) = (windows, samples, grid points), "
                        f"got shape {samples.shape}; reshape the grid axes into one")
    if samples.shape[1] < 1:
        raise DataError("samples has no samples per window (M = 0); draw at least one")
    return samples


def _check_pair(samples: ArrayLike, realised: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    samples = _check_samples(samples)
    realised = np.asarray(realised)
    w, _, g = samples.shape
    if realised.shape != (w, g):
        raise DataError(f"realised must have shape (W, G) = {(w, g)} to match samples "
                        f"{samples.shape}, got {realised.shape}")
    return samples, realised


def _f64(a: np.ndarray) -> FloatArray:
    return np.asarray(a, dtype=np.float64)


def _window_moments(samples: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """Per window and grid point: mean and variance (ddof=0) over the M samples.

    samples (W, M, G) -> mean (W, G), var (W, G); two-pass per chunk, float64.
    """
    w, m, g = samples.shape
    mean = np.empty((w, g))
    var = np.empty((w, g))
    for sl in _chunks(w, m * g):
        x = _f64(samples[sl])  # (w', M, G)
        # Shift by the first sample: a window of identical samples gets a variance of exactly 0.
        first = x[:, :1, :]
        d = x - first
        mu = d.mean(axis=1)
        mean[sl] = mu + first[:, 0, :]
        var[sl] = ((d - mu[:, None, :]) ** 2).mean(axis=1)
    return mean, var


def _merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]
                   ) -> tuple[int, float, float]:
    """Chan et al. pairwise merge of (count, mean, sum of squared deviations)."""
    na, ma, sa = a
    nb, mb, sb = b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta * delta * na * nb / n


def _moments(x: FloatArray) -> tuple[int, float, float]:
    if x.size == 0:
        return 0, 0.0, 0.0
    mu = float(x.mean())
    return x.size, mu, float(((x - mu) ** 2).sum())


# ----------------------------------------------------------------------------- bands


def band(samples: ArrayLike, level: float) -> tuple[FloatArray, FloatArray]:
    """Central ``level`` band of each window's samples.

    samples (W, M, G) -> lo (W, G), hi (W, G): the (1 - level)/2 and (1 + level)/2 empirical
    quantiles over M (``np.quantile``, default linear interpolation).
    """
    samples = _check_samples(samples)
    level = _check_level(level)
    w, m, g = samples.shape
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    lo = np.empty((w, g))
    hi = np.empty((w, g))
    for sl in _chunks(w, m * g):
        lo[sl], hi[sl] = np.quantile(_f64(samples[sl]), q, axis=1)  # (2, w', G)
    return lo, hi


def _inside(samples: np.ndarray, realised: np.ndarray, level: float) -> NDArray[np.bool_]:
    lo, hi = band(samples, level)
    y = _f64(realised)
    return (lo <= y) & (y <= hi)  # (W, G)


def coverage(samples: ArrayLike, realised: ArrayLike, level: float) -> float:
    """Share of (window, grid point) pairs whose realised value lies in the ``level`` band.

    samples (W, M, G), realised (W, G) -> float; bounds inclusive (lo <= y <= hi).
    """
    samples, realised = _check_pair(samples, realised)
    return float(_inside(samples, realised, level).mean())


def coverage_by_group(samples: ArrayLike, realised: ArrayLike, level: float,
                      groups: ArrayLike, n_groups: int) -> FloatArray:
    """Coverage of the ``level`` band within each group of windows (e.g. volatility regime).

    samples (W, M, G), realised (W, G), groups (W,) ints in [0, n_groups) -> (n_groups,):
    the share of (window, grid point) pairs covered among the group's windows; NaN for a
    group with no window.
    """
    samples, realised = _check_pair(samples, realised)
    groups = np.asarray(groups)
    w = samples.shape[0]
    if groups.shape != (w,) or not np.issubdtype(groups.dtype, np.integer):
        raise DataError(f"groups must be an integer array of shape (W,) = ({w},), got "
                        f"dtype {groups.dtype} and shape {groups.shape}")
    if w and (groups.min() < 0 or groups.max() >= n_groups):
        raise DataError(f"groups must lie in [0, {n_groups}), found values from {groups.min()} "
                        f"to {groups.max()}; raise n_groups or relabel the groups")
    # Every window holds G pairs, so a group's pair share is the mean of its window shares.
    per_window = _inside(samples, realised, level).mean(axis=1)  # (W,)
    hits = np.bincount(groups, weights=per_window, minlength=n_groups)
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    out = np.full(n_groups, np.nan)
    np.divide(hits, counts, out=out, where=counts > 0)
    return out


def width(samples: ArrayLike, level: float) -> float:
    """Mean width hi - lo of the ``level`` band over windows and grid points (iv units)."""
    lo, hi = band(samples, level)
    return float((hi - lo).mean())


# ----------------------------------------------------------------------------- proper scores


def crps_ensemble(samples: ArrayLike, realised: ArrayLike) -> FloatArray:
    """CRPS of each window's ensemble at each grid point.

    samples (W, M, G), realised (W, G) -> (W, G). The standard (not "fair") ensemble estimator
        CRPS = E|X - y| - 1/2 E|X - X'|,   E over the empirical distribution (1/M, 1/M^2),
    which is ``properscoring.crps_ensemble`` and ``scoringrules.crps_ensemble`` with
    ``estimator="nrg"`` (its energy form; scoringrules' "qd" and "int" give the same number,
    while "fair" and "pwm" divide by M(M-1) instead of M^2). The pair term uses the sorted
    ensemble x_(1) <= ... <= x_(M):  1/2 E|X - X'| = 1/M^2 * sum_i (2i - M - 1) x_(i),
    so the cost is O(M log M), not O(M^2).
    """
    samples, realised = _check_pair(samples, realised)
    w, m, g = samples.shape
    i = np.arange(1, m + 1, dtype=np.float64)
    pair_weight = (2.0 * i - m - 1.0) / (m * m)  # (M,)
    out = np.empty((w, g))
    for sl in _chunks(w, m * g):
        x = _f64(samples[sl])  # (w', M, G)
        y = _f64(realised[sl])[:, None, :]  # (w', 1, G)
        abs_err = np.abs(x - y).mean(axis=1)
        x.sort(axis=1)
        out[sl] = abs_err - np.einsum("m,wmg->wg", pair_weight, x)
    return out


def _stratified_shifts(m: int, n_shifts: int) -> tuple[NDArray[np.int64], FloatArray]:
    """Cyclic shifts s in 1..M//2 at stratum midpoints, and the weight of each shift.

    Pairs (i, i + s mod M) for s = 1..M//2 cover every unordered pair of M samples once,
    except s = M/2 (M even), which lists each of its M/2 pairs twice and so weighs 1/2.
    """
    n_classes = m // 2
    k = min(n_shifts, n_classes)
    shifts = 1 + np.floor((np.arange(k) + 0.5) * n_classes / k).astype(np.int64)
    shifts = np.unique(np.clip(shifts, 1, n_classes))
    weights = np.where((m % 2 == 0) & (shifts == m // 2), 0.5, 1.0)
    return shifts, weights


def _cyclic_pair_mean(x: FloatArray, s: int) -> FloatArray:
    """Mean over i of ||x_i - x_(i+s mod M)||: x (W, M, G) -> (W,), without a rolled copy."""
    m = x.shape[1]
    head = x[:, s:] - x[:, : m - s]  # pairs (i, i + s), i < M - s
    tail = x[:, :s] - x[:, m - s:]  # the wrapped pairs
    total = np.sqrt(np.einsum("wmg,wmg->wm", head, head)).sum(axis=-1)
    total += np.sqrt(np.einsum("wmg,wmg->wm", tail, tail)).sum(axis=-1)
    return total / m


def energy_score(samples: ArrayLike, realised: ArrayLike, *, exact_max_m: int = 256,
                 n_shifts: int = 16) -> FloatArray:
    """Energy score of each window's ensemble over the whole surface vector (G dims).

    samples (W, M, G), realised (W, G) -> (W,):
        ES = E||X - y|| - 1/2 E||X - X'||   (Euclidean norm over G, empirical E with 1/M, 1/M^2)
    which is ``scoringrules.es_ensemble(realised, samples, m_axis=-2, v_axis=-1)`` with its
    default ``estimator="nrg"``.

    M <= ``exact_max_m``: all M^2 pairs, as one batched Gram product per chunk of windows,
    after centring each window (distances do not change; this keeps the cancellation in
    |a|^2 + |b|^2 - 2 a.b at the scale of the spread, not of the iv level).

    M > ``exact_max_m``: E||X - X'|| from the cyclic pairs (i, i + s mod M) for ``n_shifts``
    shifts s at stratum midpoints of 1..M//2, cost O(M * n_shifts * G) per window. Each shift
    pairs distinct samples, so for exchangeably ordered samples (i.i.d. draws) the pair mean is
    an unbiased estimate of the mean over distinct pairs; it is rescaled by (M - 1)/M to the
    1/M^2 form of the exact path. With ``n_shifts >= M // 2`` every pair is used and the result
    equals the exact path. Measured on correlated Gaussian ensembles (M = 1000, 16 shifts, worst
    of 40 windows): 0.1% off exact at G = 100, 0.3% at G = 25, 0.4% at G = 5, 1.2% at G = 1
    (distances concentrate as G grows); tests/test_metrics.py checks it.
    """
    samples, realised = _check_pair(samples, realised)
    w, m, g = samples.shape
    if n_shifts < 1:
        raise DataError(f"energy_score needs n_shifts >= 1, got {n_shifts}")
    exact = m <= max(exact_max_m, 2)  # fewer than 2 samples have no pair to subsample
    shifts, shift_weights = (None, None) if exact else _stratified_shifts(m, n_shifts)
    per_window = m * m if exact else m * g
    out = np.empty(w)
    for sl in _chunks(w, max(per_window, m * g)):
        x = _f64(samples[sl])  # (w', M, G)
        centre = x.mean(axis=1, keepdims=True)
        x = x - centre
        y = _f64(realised[sl])[:, None, :] - centre  # (w', 1, G)
        obs_term = np.sqrt(((x - y) ** 2).sum(axis=-1)).mean(axis=-1)  # (w',)
        if exact:
            sq = (x * x).sum(axis=-1)  # (w', M)
            d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(0, 2, 1))  # (w', M, M)
            np.maximum(d2, 0.0, out=d2)
            idx = np.arange(m)
            d2[:, idx, idx] = 0.0
            pair_term = np.sqrt(d2).sum(axis=(1, 2)) / (m * m)
        else:
            pair_means = np.stack([_cyclic_pair_mean(x, int(s)) for s in shifts], axis=-1)  # (w', k)
            pair_term = (pair_means @ shift_weights) / shift_weights.sum() * (m - 1) / m
        out[sl] = obs_term - 0.5 * pair_term
    return out


# ----------------------------------------------------------------------------- calibration


def pit(samples: ArrayLike, realised: ArrayLike) -> FloatArray:
    """Probability integral transform: share of samples <= realised (no tie randomisation).

    samples (W, M, G), realised (W, G) -> (W, G) in [0, 1], multiples of 1/M.
    """
    samples, realised = _check_pair(samples, realised)
    w, m, g = samples.shape
    out = np.empty((w, g))
    for sl in _chunks(w, m * g):
        y = _f64(realised[sl])[:, None, :]
        out[sl] = (_f64(samples[sl]) <= y).mean(axis=1)
    return out


def pit_ks(pit_values: ArrayLike) -> float:
    """Kolmogorov-Smirnov statistic of the pooled PIT values against Uniform(0, 1).

    pit_values (...) -> float (``scipy.stats.kstest(values, "uniform").statistic``); 0 is a
    perfectly uniform PIT, larger is worse. PIT values are multiples of 1/M, so even a perfect
    sampler scores about 1/M or more.
    """
    values = np.asarray(pit_values, dtype=np.float64).ravel()
    if values.size == 0:
        raise DataError("pit_ks got no PIT values; pass the output of pit()")
    return float(stats.kstest(values, "uniform").statistic)


# ----------------------------------------------------------------------------- variance


def variance_budget(samples: ArrayLike, realised: ArrayLike) -> dict[str, float]:
    """Law-of-total-variance budget of the conditional samples against what happened.

    samples (W, M, G), realised (W, G). Per grid point g (ddof=0 everywhere):
        Var(X)        variance of realised[:, g] over windows
        E[Var(X|C)]   mean over windows of the variance of samples[w, :, g] over M
        Var(E[X|C])   variance over windows of the mean of samples[w, :, g] over M
    Shares are E[Var(X|C)] / Var(X) and Var(E[X|C]) / Var(X) per grid point, then averaged
    over grid points (grid points with Var(X) = 0 are left out; NaN if all are). A calibrated
    sampler has shares summing to about 1; a near-deterministic one has within share ~ 0.

    Returns ``within_var_share``, ``between_var_share`` and, for reporting, the grid-averaged
    ``var_x``, ``within_var`` and ``between_var`` (iv units squared).
    """
    samples, realised = _check_pair(samples, realised)
    mean, var = _window_moments(samples)  # (W, G) each
    within = var.mean(axis=0)  # (G,)
    between = mean.var(axis=0)
    var_x = _f64(realised).var(axis=0)
    ok = var_x > 0
    if ok.any():
        within_share = float((within[ok] / var_x[ok]).mean())
        between_share = float((between[ok] / var_x[ok]).mean())
    else:
        within_share = between_share = float("nan")
    return {
        "within_var_share": within_share,
        "between_var_share": between_share,
        "var_x": float(var_x.mean()),
        "within_var": float(within.mean()),
        "between_var": float(between.mean()),
    }


def marginal_std_ratio(samples: ArrayLike, realised: ArrayLike) -> float:
    """Std of the samples pooled over windows and samples over the std of realised, per grid
    point, averaged over the grid (ddof=0; grid points with constant realised are left out).

    samples (W, M, G), realised (W, G) -> float; 1 means the pooled marginal has the spread
    of the real unconditional distribution. Pooled variance = E[Var(X|C)] + Var(E[X|C]) over
    the samples, exact because every window holds the same M samples.
    """
    samples, realised = _check_pair(samples, realised)
    mean, var = _window_moments(samples)
    pooled_std = np.sqrt(var.mean(axis=0) + mean.var(axis=0))  # (G,)
    real_std = _f64(realised).std(axis=0)
    ok = real_std > 0
    return float((pooled_std[ok] / real_std[ok]).mean()) if ok.any() else float("nan")


def roughness_ratio(sample_paths: ArrayLike, realised_paths: ArrayLike) -> float:
    """Std of daily changes of sample paths over that of realised paths.

    sample_paths (W, M, H, G), realised_paths (W, H, G) -> float. Daily changes are
    differences along the horizon axis H (H >= 2); each std pools every window, sample, day
    and grid point (ddof=0). Computed chunk by chunk with a pairwise (Chan) merge of moments,
    so the (W, M, H-1, G) array of changes never exists whole.
    """
    sample_paths = np.asarray(sample_paths)
    realised_paths = np.asarray(realised_paths)
    if sample_paths.ndim != 4 or realised_paths.ndim != 3:
        raise DataError(f"roughness_ratio needs sample_paths (W, M, H, G) and realised_paths "
                        f"(W, H, G), got {sample_paths.shape} and {realised_paths.shape}")
    w, m, h, g = sample_paths.shape
    if h < 2 or realised_paths.shape[1] < 2:
        raise DataError(f"roughness_ratio needs at least 2 days per path to take daily changes, "
                        f"got H = {h} (samples) and {realised_paths.shape[1]} (realised)")
    acc: tuple[int, float, float] = (0, 0.0, 0.0)
    for ws, ms in _block_chunks(w, m, h * g):
        acc = _merge_moments(acc, _moments(np.diff(_f64(sample_paths[ws, ms]), axis=2)))
    real = _moments(np.diff(_f64(realised_paths), axis=1))
    sample_std = np.sqrt(acc[2] / acc[0])
    real_std = np.sqrt(real[2] / real[0])
    return float(sample_std / real_std) if real_std > 0 else float("nan")


# ----------------------------------------------------------------------------- arbitrage


def calendar_violations(sample_surfaces: ArrayLike, maturity_days: ArrayLike) -> float:
    """Share of surfaces with a calendar-spread arbitrage.

    sample_surfaces (N, n_m, n_tau) iv, maturity_days (n_tau,) strictly increasing -> float.
    Total variance w = iv^2 * T, T = days / 365, must not decrease with maturity along any
    moneyness row; a surface violates if some step has w[j] - w[j+1] > 1e-6 * |w[j]| (a
    relative tolerance, so float32 rounding of equal total variances is not an arbitrage).
    Flatten any extra leading axes (windows, samples, days) into N first.
    """
    surfaces = np.asarray(sample_surfaces)
    days = np.asarray(maturity_days, dtype=np.float64)
    if surfaces.ndim != 3 or days.shape != (surfaces.shape[-1],):
        raise DataError(f"calendar_violations needs sample_surfaces (N, n_m, n_tau) and "
                        f"maturity_days (n_tau,), got {surfaces.shape} and {days.shape}")
    if np.any(np.diff(days) <= 0):
        raise DataError(f"maturity_days must be strictly increasing, got {days.tolist()}; "
                        "sort the maturity axis of the surfaces and the days together")
    n, n_m, n_tau = surfaces.shape
    if n == 0:
        return float("nan")
    t = days / 365.0
    bad = 0
    for sl in _chunks(n, n_m * n_tau):
        iv = _f64(surfaces[sl])
        total = iv * iv * t  # (n', n_m, n_tau)
        drop = total[..., :-1] - total[..., 1:]
        # relative 1e-6: samples may come stored as float32 (7 digits), and a flat total
        # variance must not count as falling by its rounding
        bad += int(np.any(drop > 1e-6 * np.abs(total[..., :-1]), axis=(1, 2)).sum())
    return bad / n


# ----------------------------------------------------------------------------- risk


def kupiec_pof(exceptions: int, n: int, p: float) -> float:
    """Kupiec proportion-of-failures test: p-value of ``exceptions`` in ``n`` trials at rate p.

    LR = 2 [x ln(x / (n p)) + (n - x) ln((n - x) / (n (1 - p)))] ~ chi2(1) under H0, the
    usual likelihood ratio written as n times a Bernoulli KL divergence, with 0 ln 0 = 0, so
    x = 0 and x = n give finite values. Returns P(chi2_1 >= LR); 1 when x = n p exactly.
    """
    x, n, p = int(exceptions), int(n), float(p)
    if n <= 0 or not 0 <= x <= n:
        raise DataError(f"kupiec_pof needs n > 0 and 0 <= exceptions <= n, got exceptions = {x}, "
                        f"n = {n}")
    if not 0.0 < p < 1.0:
        raise DataError(f"kupiec_pof needs an exception probability 0 < p < 1, got {p}")
    lr = 2.0 * (special.xlogy(x, x / (n * p)) + special.xlogy(n - x, (n - x) / (n * (1.0 - p))))
    return float(stats.chi2.sf(max(lr, 0.0), df=1))


def var_backtest(sample_pnl: ArrayLike, realised_pnl: ArrayLike, level: float
                 ) -> dict[str, float | int]:
    """Value-at-risk backtest of scenario P&L.

    sample_pnl (W, M), realised_pnl (W,). Per window, VaR at ``level`` (0.95, 0.99) is the
    ``level`` quantile (linear) of the sampled loss = -pnl; an exception is a realised loss
    above it. Returns ``exceptions`` (int), ``expected`` = W (1 - level) and ``kupiec_p``.
    """
    level = _check_level(level)
    pnl = np.asarray(sample_pnl)
    real = np.asarray(realised_pnl, dtype=np.float64)
    if pnl.ndim != 2 or real.shape != (pnl.shape[0],):
        raise DataError(f"var_backtest needs sample_pnl (W, M) and realised_pnl (W,), got "
                        f"{pnl.shape} and {real.shape}")
    w = pnl.shape[0]
    var = np.quantile(-_f64(pnl), level, axis=1)  # (W,)
    exceptions = int((-real > var).sum())
    return {
        "exceptions": exceptions,
        "expected": w * (1.0 - level),
        "kupiec_p": kupiec_pof(exceptions, w, 1.0 - level) if w else float("nan"),
    }


# The reference position of the VaR figures when no book is given (``vega_pnl``'s default).
LONG_VEGA = "long 1 vega per grid point"


def vega_pnl(start_surface: ArrayLike, paths: ArrayLike, vega: ArrayLike | None = None
             ) -> FloatArray:
    """P&L of a vega position: by default long one unit of vega at every grid point.

    start_surface (W, G), paths (W, ..., G) (e.g. end surfaces (W, M, G) or paths
    (W, M, H, G)) -> (W, ...): sum over g of vega_g (iv_end - iv_start), in iv units, i.e. a
    vega of 1 per unit of iv at each point by default (multiply by 100 for a vega of 1 per
    vol point); ``vega`` (G,) a position's own (``driver.read_position``, flattened).
    Computed as a difference of weighted grid sums, so no temporary of the size of
    ``paths`` is made.
    """
    start = np.asarray(start_surface, dtype=np.float64)
    paths = np.asarray(paths)
    if start.ndim != 2 or paths.ndim < 2 or paths.shape[0] != start.shape[0] \
            or paths.shape[-1] != start.shape[1]:
        raise DataError(f"vega_pnl needs start_surface (W, G) and paths (W, ..., G), got "
                        f"{start.shape} and {paths.shape}")
    if vega is None:
        end_sum = paths.sum(axis=-1, dtype=np.float64)  # (W, ...)
        start_sum = start.sum(axis=-1)
    else:
        vega = np.asarray(vega, dtype=np.float64)
        if vega.shape != start.shape[1:]:
            raise DataError(f"vega_pnl needs a vega per grid point ({start.shape[1]},), got "
                            f"{vega.shape}")
        end_sum = np.einsum("...g,g->...", paths, vega, dtype=np.float64)
        start_sum = start @ vega
    return end_sum - start_sum.reshape((-1,) + (1,) * (paths.ndim - 2))
