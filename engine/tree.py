"""Tree numerics: representative children, their weights, contexts, pruning and marginals.

Pure functions over arrays, batched over nodes; no Ray, no I/O. Shapes:
    N  nodes of a frontier batch     M  sampled paths per node (n_samples)
    K  children per node (branching) H  horizon of a sampled path
    S  days a child keeps (stride)   C  context length
    n_m, n_tau  the surface grid (moneyness, maturity)

One step of the tree, from the M sampled paths of each node (log-IV, ``(N, M, H, n_m, n_tau)``):
  1. a scalar score per path (default: mean log-IV over the grid on day S-1, the last kept day);
  2. K real sample paths chosen from the score distribution (``selection``):
     ``"quantize"``  optimal 1-D quantization (Lloyd-Max) into K contiguous cells; the path
                     nearest each cell's centroid represents the cell;
     ``"quadrature"`` the paths nearest the nodes of the K-point Gaussian quadrature rule of
                     the node's score distribution (exact for polynomials of degree 2K - 1:
                     the tails reach further than quantization cells);
     ``"quantiles"`` the seed's fixed levels (q10, q25, q50, q75, q90 for K = 5);
  3. conditional weights (``weights``): ``"equal"`` 1/K; ``"stratum"`` the probability of the
     cell (quantize), the rule's weight (quadrature) or of the stratum between midpoints of
     the levels (quantiles);
     ``"moment"`` the stratum weights changed as little as possible (least squares) so that the
     K-point distribution keeps the node's sample mean and variance of the score, with every
     weight at least ``weight_floor`` (see ``project_weights``; the floor applies to
     ``"moment"`` only: equal and stratum weights are taken as they are).

The long-horizon marginals are not read off the K children: ``MarginalAccumulator`` mixes, with
the node probabilities, the FULL M-sample distributions drawn at each level.

Lookahead (``tree.lookahead``, the driver's part): before choosing, each node draws one level on
from each of its candidate children (its distinct sampled paths: a kNN law has only about k of
them; or score strata), and ``select_children(..., next_scores=...)`` then represents each
quantization cell by the path whose next-level law is most typical of the cell (its mean score
nearest the cell's mean) instead of the path nearest the centroid; those draws also make the
next level's marginals. Why: a cell's paths lead to different next-level laws, and the child
nearest the centroid can lead to an untypical one.

Randomness: only ``resample_frontier`` draws; the driver passes it a stream derived from
``engine.rng.node_rng`` and the whole frontier's weights, so the draw never depends on batching.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from engine.config import TreeConfig
from engine.errors import ConfigError, DataError
from engine.rng import SeedLike, as_generator

__all__ = [
    "SCORES",
    "MarginalAccumulator",
    "Selection",
    "child_contexts",
    "child_weights",
    "kept_paths",
    "project_weights",
    "project_weights_loop",
    "prune_min_weight",
    "quantile_levels",
    "resample_frontier",
    "resolve_score",
    "select_children",
    "select_children_loop",
    "stride_days",
    "weighted_quantile",
]

ScoreFn = Callable[[np.ndarray], np.ndarray]

# Lloyd iterations per node; 1-D Lloyd from quantile starts settles in a few dozen at most.
_LLOYD_MAX_ITER = 100
# Semismooth-Newton iterations of the weight projection (it usually stops after 1-3).
_NEWTON_MAX_ITER = 60
# Moment residual (in standardised score units) below which the moments count as matched.
_MOMENT_TOL = 1e-10
# Slack of the KKT sign checks and of the geometric feasibility test.
_KKT_TOL = 1e-13
_FEAS_TOL = 1e-12
# Largest K for which the loop reference enumerates every active set (2^K systems).
_ENUM_MAX_K = 12
# Elements per temporary block of MarginalAccumulator.add.
_ADD_CHUNK = 1 << 22


# ============================================================================ scores


def _last_day_mean(kept: np.ndarray) -> np.ndarray:
    last = np.ascontiguousarray(kept[:, :, -1], dtype=np.float64)  # (N, M, n_m, n_tau)
    return last.reshape(last.shape[0], last.shape[1], -1).mean(axis=-1)


def _kept_mean(kept: np.ndarray) -> np.ndarray:
    k = np.ascontiguousarray(kept, dtype=np.float64)  # (N, M, S, n_m, n_tau)
    return k.reshape(k.shape[0], k.shape[1], -1).mean(axis=-1)


SCORES: dict[str, ScoreFn] = {
    "last_day_mean": _last_day_mean,  # mean log-IV over the grid on the last kept day
    "kept_mean": _kept_mean,  # mean log-IV over the grid and every kept day
}


def resolve_score(score: str | ScoreFn | None) -> ScoreFn:
    """A score by name (``SCORES``), a callable ``(N, M, S, n_m, n_tau) -> (N, M)``, or the default."""
    if score is None:
        return _last_day_mean
    if callable(score):
        return score
    if score in SCORES:
        return SCORES[score]
    raise ConfigError(f"unknown path score {score!r}; use one of {sorted(SCORES)} or a callable "
                      "mapping kept log-IV paths (N, M, S, n_m, n_tau) to scores (N, M)")


def stride_days(stride: int, horizon: int) -> int:
    """Days S a child keeps: ``stride``, or the whole horizon when 0."""
    s = horizon if stride == 0 else int(stride)
    if not 1 <= s <= horizon:
        raise ConfigError(f"tree.stride = {stride} but the horizon is {horizon} days; "
                          "set 0 (whole horizon) or a value in 1..horizon")
    return s


def quantile_levels(k: int) -> np.ndarray:
    """Fixed levels of ``selection='quantiles'``: the seed's q10..q90 for K=5, else evenly spaced
    in [0.1, 0.9]."""
    if k == 5:
        return np.array([0.10, 0.25, 0.50, 0.75, 0.90])
    return np.linspace(0.1, 0.9, k)


def _stratum_mass(levels: np.ndarray) -> np.ndarray:
    """Probability of the stratum each level represents (cells bounded by midpoints of levels)."""
    edges = np.concatenate([[0.0], (levels[:-1] + levels[1:]) / 2, [1.0]])
    return np.diff(edges)


# ============================================================================ the selection


@dataclass(frozen=True)
class Selection:
    """K representative sample paths per node.

    index   (N, K) int64    which of the node's M samples each child is (ascending score)
    weight  (N, K) float64  conditional probability of each child; rows sum to 1
    exact   (N,)   bool     the K-point distribution has the node's sample mean and variance
                            of the score (to 1e-10 of the score's standard deviation)
    """

    index: np.ndarray
    weight: np.ndarray
    exact: np.ndarray

    @property
    def n_nodes(self) -> int:
        return self.index.shape[0]

    @property
    def branching(self) -> int:
        return self.index.shape[1]


def _check_log_paths(log_paths: ArrayLike, cfg: TreeConfig) -> tuple[np.ndarray, int]:
    # No float64 copy of the whole (N, M, H, ...) block (GBs for big batches): the score
    # reads only the kept days, and its output is what gets validated.
    x = np.asarray(log_paths)
    if x.ndim != 5 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"log_paths must be a float array (N, M, H, n_m, n_tau), got {x.dtype} "
                        f"{x.shape}; add the missing axes (a 1x4 term structure is (N, M, H, 1, 4))")
    k = cfg.branching
    if x.shape[1] < k:
        raise ConfigError(f"each node has M = {x.shape[1]} sampled paths but branching K = {k}; "
                          "raise tree.n_samples or lower tree.branching")
    return x, stride_days(cfg.stride, x.shape[2])


def _node_scores(x: np.ndarray, s: int, score: str | ScoreFn | None) -> np.ndarray:
    fn = resolve_score(score)
    scores = np.asarray(fn(x[:, :, :s]), dtype=np.float64)
    if scores.shape != x.shape[:2]:
        raise DataError(f"the score function returned shape {scores.shape}, expected "
                        f"(N, M) = {x.shape[:2]}")
    if not np.all(np.isfinite(scores)):
        raise DataError("path scores hold NaN or inf: the sampled log-IV paths must be finite "
                        "(log of positive vols)")
    return scores


def _score_moments(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and standard deviation (ddof=0) per row; row-wise, so batch-invariant."""
    mean = scores.mean(axis=-1)
    sd = np.sqrt(((scores - mean[..., None]) ** 2).mean(axis=-1))
    return mean, sd


def _standardise(sel_scores: np.ndarray, mean: np.ndarray, sd: np.ndarray):
    """z = (s - mean) / sd, and which nodes are degenerate (all scores equal: z = 0)."""
    flat = sd <= 1e-12 * (1.0 + np.abs(mean))
    safe = np.where(flat, 1.0, sd)
    z = np.where(flat[:, None], 0.0, (sel_scores - mean[:, None]) / safe[:, None])
    return z, flat


def _count_less(s_sorted: np.ndarray, t: np.ndarray) -> np.ndarray:
    """#(s < t) per row: s (N, M) sorted, t (N, J) -> (N, J) int. Exact comparisons, O(N M J)."""
    return (s_sorted[:, :, None] < t[:, None, :]).sum(axis=1)


def _strictly_increasing(pos: np.ndarray, m: int) -> np.ndarray:
    """Nudge nondecreasing positions (N, J) into strictly increasing ones within 0..m-J+j, so
    every cell / level owns a distinct sample (only matters with tied scores)."""
    j = np.arange(pos.shape[1])
    g = np.maximum.accumulate(pos - j, axis=1)
    return np.clip(g, 0, m - pos.shape[1]) + j


def _tie_tol(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Scores closer than this count as tied (N,): two-sample cells put their centroid exactly
    midway, so rounding alone must not decide which path represents the cell."""
    return 1e-9 * (sd + np.abs(mean))


def _nearest_position(s: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                      tol: np.ndarray) -> np.ndarray:
    """Position in sorted rows s (N, M) nearest to t (N, J), searched in lo..hi: the first
    position whose distance is within tol (N,) of the smallest (``argmin`` with ties)."""
    rows = np.arange(s.shape[0])[:, None]
    p = _count_less(s, t)
    a = np.clip(p - 1, lo, hi)
    b = np.clip(p, lo, hi)
    dmin = np.minimum(np.abs(s[rows, a] - t), np.abs(s[rows, b] - t))
    return np.clip(_count_less(s, t - dmin - tol[:, None]), lo, hi)


def _quantize_edges(s: np.ndarray, mean: np.ndarray, tol: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max on sorted rows s (N, M): cell edges (N, K+1) and centroids (N, K).

    Cells are contiguous ranges of sorted positions, boundaries the midpoints of centroids (a
    score within tol of a boundary goes to the upper cell), started at the (k+0.5)/K quantiles
    (linear interpolation); every cell keeps >= 1 sample. Nodes stop when their edges stop
    changing (a fixed point), at most _LLOYD_MAX_ITER rounds.
    """
    n, m = s.shape
    cs = np.zeros((n, m + 1))
    cs[:, 1:] = np.cumsum(s - mean[:, None], axis=1)  # centred: cell sums by differences
    pos = (np.arange(k) + 0.5) / k * (m - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    frac = pos - lo
    cent = s[:, lo] + frac * (s[:, hi] - s[:, lo])
    edges = np.zeros((n, k + 1), dtype=np.int64)
    edges[:, -1] = m
    todo = np.arange(n)
    for it in range(_LLOYD_MAX_ITER):
        st, c = s[todo], cent[todo]
        inner = _count_less(st, (c[:, :-1] + c[:, 1:]) / 2 - tol[todo, None])
        e = np.concatenate([np.zeros((len(todo), 1), np.int64), inner,
                            np.full((len(todo), 1), m)], axis=1)
        e = _strictly_increasing(e[:, :-1], m)  # first K edges; the last stays m
        e = np.concatenate([e, np.full((len(todo), 1), m)], axis=1)
        moved = np.any(e != edges[todo], axis=1) | (it == 0)
        edges[todo] = e
        rows = np.arange(len(todo))[:, None]
        sums = cs[todo][rows, e[:, 1:]] - cs[todo][rows, e[:, :-1]]
        cent[todo] = mean[todo, None] + sums / np.diff(e, axis=1)
        todo = todo[moved]
        if todo.size == 0:
            break
    return edges, cent


def _select_quantize(scores: np.ndarray, mean: np.ndarray, sd: np.ndarray, k: int,
                     next_scores: np.ndarray | None = None):
    """Sorted order (N, M), chosen sorted positions (N, K), stratum weights (N, K)."""
    m = scores.shape[1]
    tol = _tie_tol(mean, sd)
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    edges, cent = _quantize_edges(s, mean, tol, k)
    if next_scores is None:
        pos = _nearest_position(s, cent, edges[:, :-1], edges[:, 1:] - 1, tol)
    else:
        pos = _typical_next(np.take_along_axis(next_scores, order, axis=1), edges, s, cent, tol)
    return order, pos, np.diff(edges, axis=1) / m


def _typical_next(nx: np.ndarray, edges: np.ndarray, s: np.ndarray, cent: np.ndarray,
                  tol: np.ndarray) -> np.ndarray:
    """Per cell [edges_j, edges_j+1) of sorted rows, the position whose next-level score nx
    (N, M) is nearest the cell's mean of nx; ties (samples sharing a lookahead stratum share
    its score) go to the one nearest the cell's centroid ``cent`` (N, K) of the sorted scores
    s, then to the first."""
    n, m = nx.shape
    posn = np.arange(m)
    pos = np.zeros((n, edges.shape[1] - 1), np.int64)
    tol_n = 1e-9 * (1.0 + np.abs(nx).max(axis=1))
    for j in range(edges.shape[1] - 1):
        inside = (posn >= edges[:, j:j + 1]) & (posn < edges[:, j + 1:j + 2])
        target = np.where(inside, nx, 0.0).sum(axis=1) / inside.sum(axis=1)
        d = np.where(inside, np.abs(nx - target[:, None]), np.inf)
        best = d <= d.min(axis=1, keepdims=True) + tol_n[:, None]
        dc = np.where(best, np.abs(s - cent[:, j:j + 1]), np.inf)
        pos[:, j] = np.argmax(dc <= dc.min(axis=1, keepdims=True) + tol[:, None], axis=1)
    return pos


def _gauss_rule(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K-point Gaussian quadrature rule of each row's empirical distribution (z (N, M),
    equal masses): nodes (N, K) ascending, weights (N, K), and which rows have one (at least
    K distinct values). Lanczos on diag(z) from the constant vector, fully re-orthogonalised,
    gives the Jacobi matrix; its eigenvalues are the nodes, the squared first components of
    its eigenvectors the weights. The rule integrates polynomials of degree 2K - 1 exactly."""
    n, m = z.shape
    q = np.full((n, m), 1.0 / math.sqrt(m))
    basis, alpha, beta = [q], [], []
    ok = np.ones(n, bool)
    for j in range(k):
        v = z * basis[j]
        alpha.append((basis[j] * v).sum(axis=1))
        for _ in range(2):  # full re-orthogonalisation (twice is enough)
            for b in basis:
                v = v - (b * v).sum(axis=1, keepdims=True) * b
        if j == k - 1:
            break
        nb = np.sqrt((v * v).sum(axis=1))
        ok &= nb > 1e-8
        beta.append(np.where(ok, nb, 1.0))
        basis.append(v / beta[-1][:, None])
    jac = np.zeros((n, k, k))
    idx = np.arange(k)
    jac[:, idx, idx] = np.stack(alpha, axis=1)
    if k > 1:
        off = np.stack(beta, axis=1)
        jac[:, idx[:-1], idx[1:]] = off
        jac[:, idx[1:], idx[:-1]] = off
    nodes, vecs = np.linalg.eigh(jac)
    return nodes, vecs[:, 0, :] ** 2, ok


def _select_quadrature(scores: np.ndarray, mean: np.ndarray, sd: np.ndarray, k: int):
    """Sorted order, positions and weights: the real samples nearest to the nodes of the
    node's Gaussian quadrature rule (``_gauss_rule``), with its weights. Rows without a rule
    (fewer than K distinct scores) fall back to quantization."""
    n, m = scores.shape
    z, flat = _standardise(scores, mean, sd)
    nodes, w, ok = _gauss_rule(z, k)
    use = ok & ~flat
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    t = mean[:, None] + sd[:, None] * nodes
    pos = _strictly_increasing(_nearest_position(s, t, np.zeros((n, k), np.int64),
                                                 np.full((n, k), m - 1), _tie_tol(mean, sd)), m)
    w_stratum = w / w.sum(axis=1, keepdims=True)
    if not use.all():  # quantize only the rows without a rule (row-wise: same bytes)
        _, pos[~use], w_stratum[~use] = _select_quantize(scores[~use], mean[~use], sd[~use], k)
    return order, pos, w_stratum


def _select_quantiles(scores: np.ndarray, mean: np.ndarray, sd: np.ndarray, k: int):
    n, m = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    levels = quantile_levels(k)
    p = levels * (m - 1)
    lo = np.floor(p).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    t = s[:, lo] + (p - lo) * (s[:, hi] - s[:, lo])
    pos = _nearest_position(s, t, np.zeros((n, k), np.int64), np.full((n, k), m - 1),
                            _tie_tol(mean, sd))
    pos = _strictly_increasing(pos, m)
    return order, pos, np.broadcast_to(_stratum_mass(levels), (n, k)).copy()


def _finish(scores, order, pos, w_stratum, mean, sd, cfg: TreeConfig,
            project: Callable) -> Selection:
    """Indices, weights by ``cfg.weights``, and the exact-moment flag."""
    rows = np.arange(scores.shape[0])[:, None]
    index = order[rows, pos].astype(np.int64)
    z, flat = _standardise(scores[rows, index], mean, sd)
    k = index.shape[1]
    if cfg.weights == "moment":
        weight, exact = project(w_stratum, z, cfg.weight_floor, flat)
    else:
        weight = np.full_like(w_stratum, 1.0 / k) if cfg.weights == "equal" else w_stratum
        exact = flat | _moments_matched(weight, z)
    return Selection(index=index, weight=weight, exact=exact)


def _check_next(next_scores, shape) -> np.ndarray | None:
    if next_scores is None:
        return None
    nx = np.asarray(next_scores, dtype=np.float64)
    if nx.shape != shape or not np.all(np.isfinite(nx)):
        raise DataError(f"next_scores must be finite and (N, M) = {shape}, got {nx.shape}")
    return nx


def select_children(log_paths: ArrayLike, cfg: TreeConfig,
                    score: str | ScoreFn | None = None,
                    next_scores: ArrayLike | None = None) -> Selection:
    """K representative real sample paths per node and their conditional weights (batched).

    log_paths: (N, M, H, n_m, n_tau) log-IV. ``score``: a name from ``SCORES``, a callable on the
    kept paths (N, M, S, n_m, n_tau) -> (N, M), or None for ``cfg.score``. ``next_scores``
    (N, M), quantize only: the mean score of each sample's own next-level law (the driver's
    lookahead); a cell is then represented by its path whose next-level law is most typical
    of the cell's (nearest the cell's mean of next_scores; among ties, the one nearest the
    centroid) instead of the path nearest the centroid. A node's result does not depend on
    the other nodes of the batch (same bytes for any batch size).
    """
    x, s = _check_log_paths(log_paths, cfg)
    scores = _node_scores(x, s, cfg.score if score is None else score)
    nx = _check_next(next_scores, scores.shape)
    mean, sd = _score_moments(scores)
    k = cfg.branching
    if cfg.selection == "quantize":
        order, pos, w_stratum = _select_quantize(scores, mean, sd, k, nx)
    elif cfg.selection == "quadrature":
        order, pos, w_stratum = _select_quadrature(scores, mean, sd, k)
    else:
        order, pos, w_stratum = _select_quantiles(scores, mean, sd, k)
    return _finish(scores, order, pos, w_stratum, mean, sd, cfg, project_weights)


def select_children_loop(log_paths: ArrayLike, cfg: TreeConfig,
                         score: str | ScoreFn | None = None,
                         next_scores: ArrayLike | None = None) -> Selection:
    """Slow per-node reference of ``select_children``: plain Lloyd and searches per node, and
    ``project_weights_loop`` (active sets by enumeration). Shares only the score function, the
    score moments and the final linear solve on the identified free set, so indices, weights and
    flags agree exactly with the batched path whenever both identify the same cells and active
    set (always, bar exact ties)."""
    x, s = _check_log_paths(log_paths, cfg)
    scores = _node_scores(x, s, cfg.score if score is None else score)
    nx = _check_next(next_scores, scores.shape)
    mean, sd = _score_moments(scores)
    n, m = scores.shape
    k = cfg.branching
    order = np.argsort(scores, axis=1, kind="stable")
    pos = np.zeros((n, k), np.int64)
    w_stratum = np.zeros((n, k))
    levels = quantile_levels(k)
    tols = _tie_tol(mean, sd)
    for i in range(n):
        si, tol = scores[i, order[i]], tols[i]

        def nearest(vals, t, tol=tol):  # first index within tol of the smallest distance
            d = np.abs(vals - t)
            return int(np.flatnonzero(d <= d.min() + tol)[0])

        if cfg.selection == "quantize":
            cent = np.quantile(si, (np.arange(k) + 0.5) / k)
            edges = None
            for _ in range(_LLOYD_MAX_ITER):
                bnd = (cent[:-1] + cent[1:]) / 2 - tol
                e = [0, *np.searchsorted(si, bnd, side="left").tolist(), m]
                for j in range(1, k):  # every cell keeps at least one sample
                    e[j] = max(e[j], e[j - 1] + 1)
                for j in range(k - 1, 0, -1):
                    e[j] = min(e[j], e[j + 1] - 1)
                if e == edges:
                    break
                edges = e
                cent = np.array([si[edges[j]:edges[j + 1]].mean() for j in range(k)])
            for j in range(k):
                a, b = edges[j], edges[j + 1]
                if nx is None:
                    pos[i, j] = a + nearest(si[a:b], cent[j])
                else:  # the most typical next-level law; ties: nearest the centroid
                    cell = nx[i, order[i, a:b]]
                    d = np.abs(cell - cell.mean())
                    tol_n = 1e-9 * (1.0 + np.abs(nx[i]).max())
                    best = np.flatnonzero(d <= d.min() + tol_n)
                    pos[i, j] = a + int(best[nearest(si[a:b][best], cent[j])])
                w_stratum[i, j] = (b - a) / m
        elif cfg.selection == "quadrature":  # row by row (the rule itself is tested apart)
            _, p_i, w_i = _select_quadrature(scores[i:i + 1], mean[i:i + 1], sd[i:i + 1], k)
            pos[i], w_stratum[i] = p_i[0], w_i[0]
        else:
            targets = np.quantile(si, levels)
            prev = -1
            for j, t in enumerate(targets):
                p = nearest(si, t)
                p = min(max(p, prev + 1), m - k + j)
                pos[i, j] = prev = p
            w_stratum[i] = _stratum_mass(levels)
    return _finish(scores, order, pos, w_stratum, mean, sd, cfg, project_weights_loop)


def kept_paths(paths: np.ndarray, selection: Selection, stride: int) -> np.ndarray:
    """The chosen children's first S days: paths (N, M, H, ...) -> (N, K, S, ...)."""
    s = stride_days(stride, paths.shape[2])
    rows = np.arange(paths.shape[0])[:, None]
    return paths[rows, selection.index, :s]


def child_weights(parent_weights: ArrayLike, selection: Selection) -> np.ndarray:
    """Absolute child probabilities (N*K,), node-major (child = parent*K + branch)."""
    pw = np.asarray(parent_weights, dtype=np.float64)
    return (pw[:, None] * selection.weight).reshape(-1)


def child_contexts(parent_contexts: ArrayLike, kept: ArrayLike) -> np.ndarray:
    """Contexts of the children: the last C days of (parent context + the child's S kept days).

    parent_contexts (N, C, ...), kept (N, K, S, ...) -> (N*K, C, ...), node-major order
    (child index = parent * K + branch).
    """
    ctx = np.asarray(parent_contexts)
    kp = np.asarray(kept)
    if kp.ndim != ctx.ndim + 1 or kp.shape[0] != ctx.shape[0] or kp.shape[3:] != ctx.shape[2:]:
        raise DataError(f"parent_contexts {ctx.shape} and kept paths {kp.shape} do not match; "
                        "expected (N, C, ...) and (N, K, S, ...) with the same N and grid")
    n, c = ctx.shape[:2]
    k, s = kp.shape[1:3]
    if s >= c:
        out = kp[:, :, s - c:]
    else:
        parents = np.broadcast_to(ctx[:, None, s:], (n, k, c - s) + ctx.shape[2:])
        out = np.concatenate([parents, kp.astype(np.result_type(ctx, kp), copy=False)], axis=2)
    return np.ascontiguousarray(out).reshape((n * k, c) + ctx.shape[2:])


# ============================================================================ the weight QP
#
#   minimise ||w - w0||^2  subject to  sum w = 1,  sum w z = 0,  sum w z^2 = 1,  w >= floor
#
# in standardised score units z = (s - mean) / sd (the three moment equalities are linear in w).
# Dual: w(lam) = max(floor, w0 + lam0 + lam1 z + lam2 z^2), and the optimum is the lam with
# A w(lam) = b. w(lam) always meets the box and complementary slackness, so a lam with zero
# residual is a KKT point, i.e. THE optimum (strictly convex): that is the certificate behind
# `exact`. Semismooth Newton on lam: each step solves the 3x3 system of the current free set
# exactly, so it ends as soon as the free set is right (usually at once).
# Infeasible nodes (geometric test below) fall back to keeping sum and mean, else sum only.


def _effective_floor(floor: float, k: int) -> float:
    # K * floor >= 1 leaves only w = 1/K: cap the floor there rather than fail.
    return min(float(floor), 1.0 / k)


def _powers(z: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(z), z, z * z])  # (3, N, K)


def _solve_free_set(w0: np.ndarray, z: np.ndarray, f: float, rows: np.ndarray,
                    free: np.ndarray):
    """Exact solution of the equality-constrained projection with the non-free weights at f.

    w0, z, free (N, K); rows (N, 3) which equalities apply. Returns w (N, K), lam (N, 3) and ok
    (N,): the KKT conditions hold (free weights >= f, the others have u <= f, residual small).
    Row-wise reductions and per-matrix solves only, so a node's bytes do not depend on the batch.
    """
    p = _powers(z)  # (3, N, K)
    zf = np.where(free, z, 0.0)
    mom = np.stack([np.where(free, 1.0, 0.0).sum(-1)] + [(zf ** q).sum(-1) for q in range(1, 5)])
    h = np.empty(z.shape[:1] + (3, 3))
    for i in range(3):
        for j in range(3):
            h[:, i, j] = mom[i + j]
    b = np.array([1.0, 0.0, 1.0])
    rhs = (b[:, None] - f * np.where(free, 0.0, p).sum(-1)
           - (np.where(free, w0, 0.0) * p).sum(-1)).T  # (N, 3)
    mask = rows[:, :, None] & rows[:, None, :]
    h = np.where(mask, h, 0.0) + np.where(~rows, 1.0, 0.0)[:, :, None] * np.eye(3)
    rhs = np.where(rows, rhs, 0.0)
    cond = np.linalg.cond(h)
    good = np.isfinite(cond) & (cond < 1e12)
    lam = np.zeros_like(rhs)
    if good.any():
        lam[good] = np.linalg.solve(h[good], rhs[good][:, :, None])[:, :, 0]
    if (~good).any():  # fewer than 3 distinct free scores: least-norm multipliers
        lam[~good] = (np.linalg.pinv(h[~good], rcond=1e-13) @ rhs[~good][:, :, None])[:, :, 0]
    u = w0 + (lam.T[:, :, None] * p).sum(0)
    w = np.where(free, np.maximum(u, f), f)  # u >= f - _KKT_TOL when ok: clamp the rounding
    kkt = np.all(np.where(free, u >= f - _KKT_TOL, u <= f + _KKT_TOL), axis=1)
    ok = kkt & (_residual(w, z, rows) <= _MOMENT_TOL)
    return w, lam, ok


def _residual(w: np.ndarray, z: np.ndarray, rows: np.ndarray) -> np.ndarray:
    r = np.abs(np.stack([w.sum(-1) - 1.0, (w * z).sum(-1), (w * z * z).sum(-1) - 1.0], axis=-1))
    return np.where(rows, r, 0.0).max(-1)


def _moments_matched(w: np.ndarray, z: np.ndarray) -> np.ndarray:
    return _residual(w, z, np.ones(w.shape[:1] + (3,), bool)) <= _MOMENT_TOL


def _moment_feasible(z: np.ndarray, f: float, n_rows: int) -> np.ndarray:
    """Is {w >= f, sum w = 1, (sum w z = 0), (sum w z^2 = 1)} non-empty? Closed form.

    With w = f + r p, r = 1 - K f, p a probability vector: (sum p z, sum p z^2) must lie in the
    convex hull of the points (z_k, z_k^2) on a parabola: between the chords of consecutive
    sorted z (below) and the chord z_min..z_max (above).
    """
    n, k = z.shape
    r = 1.0 - k * f
    if n_rows == 1:
        return np.ones(n, bool)
    if r <= 1e-12:
        return _moments_matched(np.full_like(z, 1.0 / k), z) if n_rows == 3 else \
            np.abs((z / k).sum(-1)) <= _MOMENT_TOL
    zs = np.sort(z, axis=1)
    m1 = -f * z.sum(-1) / r
    zmin, zmax = zs[:, 0], zs[:, -1]
    ok = (m1 >= zmin - _FEAS_TOL) & (m1 <= zmax + _FEAS_TOL)
    if n_rows == 2:
        return ok
    m2 = (1.0 - f * (z * z).sum(-1)) / r
    upper = (zmin + zmax) * m1 - zmin * zmax
    j = np.clip((zs <= m1[:, None]).sum(1) - 1, 0, k - 2)
    rows = np.arange(n)
    za, zb = zs[rows, j], zs[rows, j + 1]
    width = zb - za
    t = np.where(width > 0, (m1 - za) / np.where(width > 0, width, 1.0), 0.0)
    lower = za * za + t * (zb * zb - za * za)
    return ok & (m2 <= upper + _FEAS_TOL) & (m2 >= lower - _FEAS_TOL)


def _dual_value(lam: np.ndarray, w0: np.ndarray, p: np.ndarray, f: float,
                b: np.ndarray) -> np.ndarray:
    """g(lam) = sum_k [(w_k - w0_k)^2 / 2 - (A^T lam)_k w_k] + lam . b, concave; its gradient is
    b - A w(lam). lam (n, T, 3), w0 (n, K), p (3, n, K) -> (n, T)."""
    a = (lam[..., 0:1] * p[0][:, None] + lam[..., 1:2] * p[1][:, None]
         + lam[..., 2:3] * p[2][:, None])  # (n, T, K)
    w = np.maximum(w0[:, None] + a, f)
    return (0.5 * (w - w0[:, None]) ** 2 - a * w).sum(-1) + (lam * b).sum(-1)


def _newton_project(w0: np.ndarray, z: np.ndarray, f: float, rows: np.ndarray):
    """Batched semismooth Newton on the dual with an Armijo line search. Returns the free set
    (N, K) found and ok (N,)."""
    n, k = z.shape
    p = _powers(z)
    b = np.array([1.0, 0.0, 1.0])
    lam = np.zeros((n, 3))
    free = np.zeros((n, k), bool)
    done = np.zeros(n, bool)
    ts = 0.5 ** np.arange(40)
    for _ in range(_NEWTON_MAX_ITER):
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            break
        lt, w0t, zt, rt, pt = lam[todo], w0[todo], z[todo], rows[todo], p[:, todo]
        u = w0t + (lt.T[:, :, None] * pt).sum(0)
        ft = u > f
        _, lam_star, ok = _solve_free_set(w0t, zt, f, rt, ft)
        free[todo] = ft
        done[todo[ok]] = True
        go = ~ok
        if not go.any():
            break
        lt, w0t, zt, rt, pt, ft, ls = lt[go], w0t[go], zt[go], rt[go], pt[:, go], ft[go], \
            lam_star[go]
        u = w0t + (lt.T[:, :, None] * pt).sum(0)
        grad = np.where(rt, b - (np.maximum(u, f) * pt).sum(-1).T, 0.0)
        step = ls - lt
        slope = (grad * step).sum(-1)
        # where the Newton system was singular or not an ascent direction: a Levenberg step
        bad = ~(slope > 0) | ~np.all(np.isfinite(step), axis=1)
        if bad.any():
            zf = np.where(ft[bad], zt[bad], 0.0)
            mom = np.stack([ft[bad].sum(-1).astype(float)]
                           + [(zf ** q).sum(-1) for q in (1, 2, 3, 4)])
            h = np.stack([np.stack([mom[i + j] for j in range(3)], -1) for i in range(3)], -2)
            mu = np.linalg.norm(grad[bad], axis=1) + 1e-14
            rb = rt[bad]
            h = np.where(rb[:, :, None] & rb[:, None, :], h, 0.0) + \
                np.where(rb, mu[:, None], 1.0)[:, :, None] * np.eye(3)
            step[bad] = np.linalg.solve(h, grad[bad][:, :, None])[:, :, 0]
            slope[bad] = (grad[bad] * step[bad]).sum(-1)
        g0 = _dual_value(lt[:, None], w0t, pt, f, b)[:, 0]
        cand = lt[:, None, :] + ts[None, :, None] * step[:, None, :]  # (n', T, 3)
        gt = _dual_value(cand, w0t, pt, f, b)
        armijo = gt >= g0[:, None] + 1e-4 * ts[None, :] * slope[:, None]
        first = np.where(armijo.any(1), armijo.argmax(1), len(ts) - 1)
        lam[todo[go]] = cand[np.arange(len(first)), first]
    return free, done


def _project(w0, z, f, flat, newton: bool):
    n, k = w0.shape
    f = _effective_floor(f, k)
    w = np.empty_like(w0)
    exact = np.zeros(n, bool)
    pending = np.ones(n, bool)
    for n_rows in (3, 2, 1):
        rows = np.zeros((n, 3), bool)
        rows[:, :n_rows] = True
        if n_rows > 1:
            rows[flat] = [True, False, False]  # equal scores: every weighting keeps the moments
        cand = pending & (_moment_feasible(z, f, n_rows) | flat)
        idx = np.flatnonzero(cand)
        if idx.size == 0:
            continue
        if newton:
            free, ok = _newton_project(w0[idx], z[idx], f, rows[idx])
            stalled = np.flatnonzero(~ok)  # rare (a hypothesis test found one in a K = 3 node)
            if stalled.size:  # Newton stalled on a feasible node: the enumeration decides
                j = idx[stalled]
                free[stalled], ok[stalled] = _enumerate_project(w0[j], z[j], f, rows[j])
        else:
            free, ok = _enumerate_project(w0[idx], z[idx], f, rows[idx])
        wi, _, ok2 = _solve_free_set(w0[idx], z[idx], f, rows[idx], free)
        ok = ok & ok2
        w[idx[ok]] = wi[ok]
        pending[idx[ok]] = False
        if n_rows == 3:
            exact[idx[ok]] = True
        exact[idx[ok & flat[idx]]] = True
    if pending.any():  # not reached in practice: sum-only projection always succeeds
        w[pending] = np.full(k, 1.0 / k)
        exact[pending] = flat[pending]
    return w, exact


def project_weights(w0: ArrayLike, z: ArrayLike, floor: float,
                    flat: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares change of weights w0 (N, K) keeping the mean and variance of z (N, K).

    z are standardised scores (node mean 0, variance 1); the result w has sum 1, w >= floor
    (capped at 1/K), sum w z = 0 and sum w z^2 = 1 when that set is non-empty (``exact``);
    otherwise the projection keeping sum and mean, else sum only (``exact`` False). ``flat``
    marks nodes whose scores are all equal (any weights keep their moments).
    """
    w0 = np.asarray(w0, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    flat = np.zeros(w0.shape[0], bool) if flat is None else np.asarray(flat, bool)
    return _project(w0, z, floor, flat, newton=True)


def _enumerate_project(w0, z, f, rows):
    """Per-node reference: try every set of weights pinned at the floor (smallest first) and
    keep the first that satisfies the KKT conditions. K <= 12; beyond, Newton per node."""
    n, k = w0.shape
    free_out = np.ones((n, k), bool)
    ok_out = np.zeros(n, bool)
    for i in range(n):
        if k > _ENUM_MAX_K:
            fr, ok = _newton_project(w0[i:i + 1], z[i:i + 1], f, rows[i:i + 1])
            free_out[i], ok_out[i] = fr[0], ok[0]
            continue
        for size in range(k + 1):
            for pinned in itertools.combinations(range(k), size):
                fr = np.ones((1, k), bool)
                fr[0, list(pinned)] = False
                _, _, ok = _solve_free_set(w0[i:i + 1], z[i:i + 1], f, rows[i:i + 1], fr)
                if ok[0]:
                    free_out[i], ok_out[i] = fr[0], True
                    break
            if ok_out[i]:
                break
    return free_out, ok_out


def project_weights_loop(w0: ArrayLike, z: ArrayLike, floor: float,
                         flat: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference of ``project_weights``: one node at a time, active sets by enumeration."""
    w0 = np.asarray(w0, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    flat = np.zeros(w0.shape[0], bool) if flat is None else np.asarray(flat, bool)
    w = np.empty_like(w0)
    exact = np.zeros(w0.shape[0], bool)
    for i in range(w0.shape[0]):
        w[i:i + 1], exact[i:i + 1] = _project(w0[i:i + 1], z[i:i + 1], floor, flat[i:i + 1],
                                              newton=False)
    return w, exact


# ============================================================================ pruning


def _check_weights(weights: ArrayLike) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError("node weights must be a non-empty 1-D array of finite non-negative "
                        f"probabilities with a positive sum (got shape {w.shape})")
    return w


def resample_frontier(weights: ArrayLike, max_frontier: int,
                      rng: SeedLike) -> tuple[np.ndarray, np.ndarray]:
    """Systematic resampling of a frontier down to at most ``max_frontier`` nodes.

    Only when N > max_frontier > 0; otherwise every node is kept as is. Draws n = max_frontier
    equally spaced points u_j = (U + j) / n on the cumulative weights; node i is hit c_i times
    with E[c_i] = n w_i, and survives once with weight c_i / n, so the expected weight mass of
    every original node is its weight (unbiased) and the new weights sum to 1.
    Returns (indices (N',) ascending int64, new_weights (N',)).
    Call it once on the whole frontier's weights with a stream from ``node_rng`` (not per batch),
    so the result does not depend on batching.
    """
    w = _check_weights(weights)
    n = w.size
    if max_frontier <= 0 or n <= max_frontier:
        return np.arange(n), w / w.sum()
    cum = np.cumsum(w)
    cum /= cum[-1]
    cum[-1] = 1.0
    u = (as_generator(rng).random() + np.arange(max_frontier)) / max_frontier
    # U within an ulp of 1 rounds the last u to exactly 1: the last node, not one past it
    hits = np.minimum(np.searchsorted(cum, u, side="right"), n - 1)
    idx, counts = np.unique(hits, return_counts=True)
    return idx.astype(np.int64), counts / max_frontier


def prune_min_weight(weights: ArrayLike, min_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop nodes whose probability is below ``min_weight`` and renormalise the rest.

    BIASED: the dropped mass goes to the survivors in proportion, and light nodes are mostly the
    tail scenarios, so the pruned tree thins the tails (narrower marginals, lower VaR). Prefer
    ``resample_frontier`` (unbiased). If every node is below the threshold, the heaviest are kept.
    Returns (indices ascending, new weights summing to 1).
    """
    w = _check_weights(weights)
    keep = w >= min_weight if min_weight > 0 else np.ones(w.size, bool)
    if not keep.any():
        keep = w == w.max()
    idx = np.flatnonzero(keep)
    return idx, w[idx] / w[idx].sum()


# ============================================================================ marginals


def weighted_quantile(values: ArrayLike, weights: ArrayLike, levels: ArrayLike) -> np.ndarray:
    """Exact quantiles of a weighted sample (inverse CDF: the smallest x with F(x) >= q).

    values, weights (..., n) along the last axis; levels (n_q,) in [0, 1] -> (..., n_q).
    Equal weights give ``np.quantile(..., method="inverted_cdf")``.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape)
    q = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    order = np.argsort(v, axis=-1, kind="stable")
    vs = np.take_along_axis(v, order, axis=-1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=-1), axis=-1)
    target = q * cw[..., -1:]  # (..., n_q)
    j = np.minimum((cw[..., None, :] < target[..., :, None]).sum(-1), v.shape[-1] - 1)
    return np.take_along_axis(vs, j, axis=-1)


# Fixed-point units of MarginalAccumulator: every sum is an exact int64 sum, so any partition of
# the nodes into batches and any merge order gives the same bytes (integer addition is
# associative; float addition is not). Bounds that rule out overflow of int64 (< 2^63):
#   mass     units of 2^-60 of probability; at most MASS_LIMIT = 2 (probability 2^61 units)
#            is accepted per (day, grid point), so it never exceeds 2^61;
#   sum iv   units of 2^-56; iv counts at most IV_CAP = 32, so sum w iv <= 2 * 32 = 2^6 -> 2^62;
#   sum iv^2 units of 2^-51; sum w iv^2 <= 2 * 32^2 = 2^11 -> 2^62.
# Resolution: each node's contribution is rounded to the nearest unit, i.e. to 8.7e-19 of
# probability, 6.9e-18 (iv) and 2.2e-16 (iv^2) absolute in the weighted sums, below float64's
# own rounding of sums of vols near 0.2. Vols above IV_CAP (3200%) count as IV_CAP in mean and std
# only; the histogram (overflow mass) and the exact maximum still see them.
MASS_BITS, IV_BITS, IV2_BITS = 60, 56, 51
IV_CAP = 32.0
MASS_LIMIT = 2 << MASS_BITS
# Histogram mass is added in int64 (torch scatter_add_: exact in any order); at most 2^22
# samples per node.
_MAX_SAMPLES = 1 << 22
_STATE = ("mass", "vmin", "vmax", "total", "sum_iv", "sum_iv2")


class MarginalAccumulator:
    """Weighted marginal distribution of a block of days, per grid point, built while streaming.

    For the days of one level (S days: memory S x G x bins int64), every node adds its FULL
    M sampled paths, each with weight node_weight / M. Keeps a histogram of log-IV with ``bins``
    equal bins on [lo, hi] plus the mass, minimum and maximum outside that range, and weighted
    sums of iv and iv^2 (so ``mean`` and ``std`` are of iv, not of log-IV).
    Quantiles interpolate linearly in log-IV within a bin, clipped to the exact min and max.

    Every sum is int64 fixed point (units and bounds above ``MarginalAccumulator``): a sample's
    mass is round(node_weight / M * 2^60); a node's moment terms are round(mass * S1 * 2^-4)
    and round(mass * S2 * 2^-9), with S1 and S2 its samples' sums of iv and iv^2 (float64,
    summed along one contiguous row, so the same whatever else is in the block). Each term is
    a function of one node alone and the sums are exactly associative: ``add`` in any batches
    and ``merge`` in any order give the same bytes, which the driver's "same store for any
    batch size, actor count or completion order" promise rests on. Node weights are
    probabilities: more than MASS_LIMIT = 2 in total is refused (it could overflow).
    std uses E[x^2] - E[x]^2, which loses about log10((mean/std)^2) of 16 digits (2-3 for vols):
    fine for reporting.
    """

    def __init__(self, n_days: int, grid_shape: tuple[int, ...], bins: int = 512,
                 lo: float = math.log(0.005), hi: float = math.log(5.0)):
        if n_days < 1 or bins < 2 or not hi > lo:
            raise ConfigError(f"MarginalAccumulator needs n_days >= 1, bins >= 2 and hi > lo; got "
                              f"n_days={n_days}, bins={bins}, lo={lo}, hi={hi}")
        self.n_days = int(n_days)
        self.grid_shape = tuple(int(g) for g in grid_shape)
        self.bins = int(bins)
        self.lo, self.hi = float(lo), float(hi)
        g = math.prod(self.grid_shape)
        shape = (self.n_days, g)
        # (D, G, bins + 2) mass, 2^-60: cell 0 below lo, 1..bins the bins, bins + 1 at or above hi
        self.mass = np.zeros(shape + (self.bins + 2,), np.int64)
        self.vmin = np.full(shape, np.inf)  # log-IV
        self.vmax = np.full(shape, -np.inf)
        self.total = np.zeros(shape, np.int64)  # mass, 2^-60
        self.sum_iv = np.zeros(shape, np.int64)  # 2^-56
        self.sum_iv2 = np.zeros(shape, np.int64)  # 2^-51

    @property
    def bin_width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def counts(self) -> np.ndarray:
        """(D, G, bins) mass in each bin (a view)."""
        return self.mass[..., 1:-1]

    @property
    def under(self) -> np.ndarray:
        """(D, G) mass below lo (a view)."""
        return self.mass[..., 0]

    @property
    def over(self) -> np.ndarray:
        """(D, G) mass at or above hi (a view)."""
        return self.mass[..., -1]

    def add(self, day_offset: int, paths: ArrayLike, node_weights: ArrayLike,
            log: bool = True) -> MarginalAccumulator:
        """Add nodes' M sampled paths (N, M, S', n_m, n_tau) for days day_offset..+S'.

        ``log``: paths are log-IV (default) or iv. Each sample gets node_weight / M.
        """
        x = np.asarray(paths)
        nw = np.asarray(node_weights, dtype=np.float64)
        if x.ndim != 2 + 1 + len(self.grid_shape) or x.shape[3:] != self.grid_shape:
            raise DataError(f"paths must be (N, M, S, {', '.join(map(str, self.grid_shape))}), "
                            f"got {x.shape}")
        n, m, s = x.shape[:3]
        if not 1 <= m <= _MAX_SAMPLES:
            raise DataError(f"{m} samples per node; 1 to {_MAX_SAMPLES} can be added exactly")
        if nw.shape != (n,) or not 0 <= day_offset <= self.n_days - s:
            raise DataError(f"node_weights must be ({n},) (got {nw.shape}) and days "
                            f"{day_offset}..{day_offset + s - 1} must lie in 0..{self.n_days - 1}")
        if not np.all(np.isfinite(nw)) or np.any(nw < 0):
            raise DataError("node_weights must be finite probabilities >= 0")
        if not log and np.any(~(x > 0)):
            raise DataError("iv paths hold non-positive or NaN values; pass positive vols")
        # one mass per node: round(w / M * 2^60); every sample of the node carries it
        unit = np.rint(nw / m * 2.0 ** MASS_BITS).astype(np.int64)
        block_mass = int(unit.sum()) * m  # exact (Python int)
        sl = slice(day_offset, day_offset + s)
        if s and int(self.total[sl].max()) + block_mass > MASS_LIMIT:
            raise DataError("node weights add up to more than probability 2 in the marginals; "
                            "pass probabilities (a level's weights sum to 1)")
        if n == 0 or s == 0:
            return self
        g = self.mass.shape[1]
        x = x.reshape(n, m, s, g)
        # blocks of whole nodes (at most _MAX_SAMPLES samples) and ~_ADD_CHUNK values
        d_step = s if m * s * g <= _ADD_CHUNK else max(1, _ADD_CHUNK // (m * g))
        n_step = max(1, min(_MAX_SAMPLES // m, _ADD_CHUNK // (m * d_step * g)))
        for n0 in range(0, n, n_step):
            n1 = min(n, n0 + n_step)
            for d0 in range(0, s, d_step):
                d1 = min(s, d0 + d_step)
                self._add_block(day_offset + d0, x[n0:n1, :, d0:d1], unit[n0:n1], log)
        return self

    def _add_block(self, day0: int, paths: np.ndarray, unit: np.ndarray, log: bool) -> None:
        """paths (nodes, M, days, G) log-IV (or iv: ``log`` False), unit (nodes,) the mass of
        each of a node's samples."""
        import torch

        nb, m, s, g = paths.shape
        sl = slice(day0, day0 + s)
        # (days, G, nodes, M) float64: the samples of one (day, grid point) side by side, so
        # the reductions run along contiguous memory and the histogram adds hit one row of bins
        x = np.array(paths.transpose(2, 3, 0, 1), dtype=np.float64, order="C")  # a copy
        if not log:
            np.log(x, out=x)
        lo_v, hi_v = x.min(axis=(2, 3)), x.max(axis=(2, 3))
        if not (np.all(np.isfinite(lo_v)) and np.all(np.isfinite(hi_v))):  # NaN propagates
            raise DataError("paths hold NaN or inf; pass finite log-IV (or positive iv)")
        np.minimum(self.vmin[sl], lo_v, out=self.vmin[sl])
        np.maximum(self.vmax[sl], hi_v, out=self.vmax[sl])
        # moments: each node's M samples summed in float64 along one contiguous row (the
        # same order whatever else is in the block), then one rounding per node to int64
        # fixed point: a function of that node alone, so the int64 sums are exact in any order
        iv = np.minimum(np.exp(x), IV_CAP)
        fu = unit.astype(np.float64)  # (nodes,)
        s1 = iv.sum(axis=3)  # (s, g, nodes)
        self.sum_iv[sl] += np.rint(s1 * fu * 2.0 ** (IV_BITS - MASS_BITS)).astype(np.int64
                                                                                ).sum(axis=2)
        np.multiply(iv, iv, out=iv)
        s2 = iv.sum(axis=3)
        self.sum_iv2[sl] += np.rint(s2 * fu * 2.0 ** (IV2_BITS - MASS_BITS)).astype(np.int64
                                                                                  ).sum(axis=2)
        self.total[sl] += int(unit.sum()) * m
        # histogram: each sample's cell in its (day, grid point) row (0 below lo, bins + 1 at
        # or above hi), and its mass added there in int64 (exact, in any order) by torch's
        # scatter_add_, straight into this accumulator's memory
        t = np.subtract(x, self.lo, out=iv)
        np.divide(t, self.bin_width, out=t)
        np.floor(t, out=t)
        np.clip(t, -1, self.bins - 1, out=t)
        cell = t.astype(np.int64)
        cell += 1
        cell[x >= self.hi] = self.bins + 1
        width = self.bins + 2
        if not (self.mass.flags.c_contiguous and self.mass.flags.writeable):
            self.mass = np.array(self.mass, order="C")  # reshape below must be a view
        target = torch.from_numpy(self.mass[sl].reshape(s * g, width))  # a view
        src = torch.from_numpy(np.repeat(unit, m)).expand(s * g, nb * m)
        target.scatter_add_(1, torch.from_numpy(cell.reshape(s * g, nb * m)), src)

    def merge(self, other: MarginalAccumulator) -> MarginalAccumulator:
        """Add another accumulator of the same days, grid and bins (in place; returns self).

        Exact: merging in any order gives the same bytes."""
        if (other.n_days, other.grid_shape, other.bins, other.lo, other.hi) != \
                (self.n_days, self.grid_shape, self.bins, self.lo, self.hi):
            raise DataError("cannot merge marginal accumulators of different days, grid or bins")
        if np.any(self.total > MASS_LIMIT - other.total):
            raise DataError("merged marginals would hold more than probability 2; merge "
                            "accumulators of disjoint nodes of one level")
        for name in ("mass", "total", "sum_iv", "sum_iv2"):
            getattr(self, name).__iadd__(getattr(other, name))
        np.minimum(self.vmin, other.vmin, out=self.vmin)
        np.maximum(self.vmax, other.vmax, out=self.vmax)
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (for a checkpoint); ``from_arrays`` reads it back."""
        out = {name: getattr(self, name) for name in _STATE}
        out["spec"] = np.array([self.n_days, self.bins, *self.grid_shape], np.int64)
        out["range"] = np.array([self.lo, self.hi])
        return out

    @classmethod
    def from_arrays(cls, arrays) -> MarginalAccumulator:
        spec, rng = np.asarray(arrays["spec"]), np.asarray(arrays["range"])
        acc = cls(int(spec[0]), tuple(int(g) for g in spec[2:]), int(spec[1]), float(rng[0]),
                  float(rng[1]))
        for name in _STATE:
            value = np.asarray(arrays[name])
            want = getattr(acc, name)
            if value.shape != want.shape or value.dtype != want.dtype:
                raise DataError(f"accumulator state '{name}' has {value.dtype} {value.shape}, "
                                f"required {want.dtype} {want.shape}")
            setattr(acc, name, value.copy())
        return acc

    def _grid(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[:-1] + self.grid_shape)

    def mean(self) -> np.ndarray:
        """Weighted mean of iv (n_days, n_m, n_tau); NaN where nothing was added."""
        with np.errstate(invalid="ignore", divide="ignore"):
            total = self.total.astype(np.float64)
            return self._grid(self.sum_iv.astype(np.float64) / total
                              * 2.0 ** (MASS_BITS - IV_BITS))

    def std(self) -> np.ndarray:
        """Weighted standard deviation (ddof=0) of iv (n_days, n_m, n_tau)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            total = self.total.astype(np.float64)
            m = self.sum_iv.astype(np.float64) / total * 2.0 ** (MASS_BITS - IV_BITS)
            m2 = self.sum_iv2.astype(np.float64) / total * 2.0 ** (MASS_BITS - IV2_BITS)
            return self._grid(np.sqrt(np.maximum(m2 - m * m, 0.0)))

    def quantiles(self, levels: ArrayLike) -> np.ndarray:
        """Quantiles of iv (n_days, n_q, n_m, n_tau), from the histogram of log-IV."""
        q = np.atleast_1d(np.asarray(levels, dtype=np.float64))
        if np.any((q < 0) | (q > 1)):
            raise DataError(f"quantile levels must lie in [0, 1], got {q}")
        d, g, nb = self.counts.shape
        cum = np.cumsum(self.mass, axis=-1).astype(np.float64)  # (D, G, nb + 2), exact, rounded
        mass = self.mass.astype(np.float64)
        tot = cum[..., -1:]
        # cell c covers [left_c, left_c + width_c): underflow, bins, overflow
        left = np.concatenate([[0.0], self.lo + self.bin_width * np.arange(nb), [self.hi]])
        out = np.empty((d, q.size, g))
        for a, level in enumerate(q):
            t = level * tot  # (D, G, 1)
            c = np.minimum((cum < t).sum(-1), nb + 1)  # first cell with cum >= t
            before = np.take_along_axis(cum, c[..., None], -1)[..., 0] - \
                np.take_along_axis(mass, c[..., None], -1)[..., 0]
            cm = np.take_along_axis(mass, c[..., None], -1)[..., 0]
            frac = np.where(cm > 0, (t[..., 0] - before) / np.where(cm > 0, cm, 1.0), 0.0)
            lo_edge = np.where(c == 0, np.minimum(self.vmin, self.lo), left[c])
            hi_edge = np.where(c == 0, self.lo,
                               np.where(c == nb + 1, np.maximum(self.vmax, self.hi),
                                        left[np.minimum(c + 1, nb + 1)]))
            x = lo_edge + np.clip(frac, 0.0, 1.0) * (hi_edge - lo_edge)
            out[:, a] = np.clip(x, self.vmin, self.vmax)
        out = np.where(tot[:, None, :, 0] > 0, np.exp(out), np.nan)
        return out.reshape((d, q.size) + self.grid_shape)

    def finalize(self, levels: ArrayLike = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)) -> dict:
        """The level's marginals: quantiles (n_days, n_q, n_m, n_tau), mean and std (n_days,
        n_m, n_tau) of iv, the levels and the mass added per day (1 when the level is complete)."""
        q = np.atleast_1d(np.asarray(levels, dtype=np.float64))
        return {"levels": q, "quantiles": self.quantiles(q), "mean": self.mean(),
                "std": self.std(), "weight": self.total[:, 0] / 2.0 ** MASS_BITS}
