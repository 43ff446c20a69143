"""engine.tree: representative children, the moment QP, contexts, pruning and marginals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from engine import tree
from engine.config import TreeConfig
from engine.errors import ConfigError, DataError
from engine.rng import node_rng

# ----------------------------------------------------------------------------- helpers

KINDS = ["normal", "uniform", "bimodal", "lognormal", "student2", "cauchy", "discrete"]


def _scores(kind: str, n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(N, M) scores from families with skew, heavy tails, several modes and ties."""
    if kind == "normal":
        return -1.6 + 0.1 * rng.standard_normal((n, m))
    if kind == "uniform":
        return rng.random((n, m))
    if kind == "bimodal":
        return rng.standard_normal((n, m)) + 4.0 * (rng.random((n, m)) < 0.25)
    if kind == "lognormal":
        return np.exp(rng.uniform(0.2, 1.2, (n, 1)) * rng.standard_normal((n, m)))
    if kind == "student2":
        return rng.standard_t(2, (n, m))
    if kind == "cauchy":
        return rng.standard_cauchy((n, m))
    return rng.integers(0, 5, (n, m)).astype(float)  # many ties


def _as_paths(scores: np.ndarray, h: int = 3, grid=(1, 1)) -> np.ndarray:
    """Log-IV paths (N, M, H, n_m, n_tau) whose default score (grid mean on day S-1) is scores."""
    return np.broadcast_to(scores[:, :, None, None, None], scores.shape + (h,) + grid).copy()


def _lp_feasible(z: np.ndarray, floor: float, margin: float) -> bool:
    """Independent check: is there w >= floor + margin with sum 1, mean 0 and variance 1?"""
    k = z.size
    a_eq = np.stack([np.ones(k), z, z * z])
    res = optimize.linprog(np.zeros(k), A_eq=a_eq, b_eq=[1.0, 0.0, 1.0],
                           bounds=[(floor + margin, None)] * k, method="highs")
    return res.status == 0


def _kkt_certificate(w, w0, z, floor, tol=1e-9) -> bool:
    """w solves min ||w - w0||^2 s.t. sum w = 1, sum w z = 0, sum w z^2 = 1, w >= floor:
    feasible, and some multipliers lam give w - w0 = A^T lam + mu with mu >= 0 on the weights
    at the floor and mu = 0 elsewhere (an LP in lam: degenerate vertices have many)."""
    a = np.stack([np.ones_like(z), z, z * z])  # (3, K)
    if np.abs(a @ w - [1.0, 0.0, 1.0]).max() > tol or np.any(w < floor):
        return False
    d = w - w0
    free = w > floor + 1e-12
    at = a.T  # (K, 3)
    a_ub = np.concatenate([at[free], -at[free], at[~free]])
    b_ub = np.concatenate([d[free] + tol, -d[free] + tol, d[~free] + tol])
    res = optimize.linprog(np.zeros(3), A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 3,
                           method="highs")
    return res.status == 0


def _standardised(scores: np.ndarray, sel: tree.Selection) -> np.ndarray:
    mean = scores.mean(1, keepdims=True)
    sd = scores.std(1, keepdims=True)
    return (np.take_along_axis(scores, sel.index, 1) - mean) / sd


# ----------------------------------------------------------------------------- selection


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), m=st.integers(20, 600), n=st.integers(1, 3),
       k=st.sampled_from([3, 5, 7]), floor=st.sampled_from([0.0, 0.02, 0.05]),
       seed=st.integers(0, 2**31 - 1))
@example(kind="cauchy", m=120, n=3, k=3, floor=0.02, seed=120)  # Newton stalled here once
def test_quantize_moment_keeps_mean_and_variance(kind, m, n, k, floor, seed):
    scores = _scores(kind, n, m, np.random.default_rng(seed))
    cfg = TreeConfig(branching=k, weight_floor=floor, n_samples=8)
    sel = tree.select_children(_as_paths(scores), cfg)
    assert sel.index.shape == sel.weight.shape == (n, k) and sel.exact.shape == (n,)
    np.testing.assert_allclose(sel.weight.sum(1), 1.0, atol=1e-12)
    assert np.all(sel.weight >= floor)
    assert all(len(set(row)) == k for row in sel.index.tolist())  # K distinct real paths
    chosen = np.take_along_axis(scores, sel.index, 1)
    assert np.all(np.diff(chosen, axis=1) >= 0)  # ascending score
    z = _standardised(scores, sel)
    for i in range(n):
        if sel.exact[i]:
            mean = (sel.weight[i] * chosen[i]).sum()
            var = (sel.weight[i] * (chosen[i] - scores[i].mean()) ** 2).sum()
            assert abs(mean - scores[i].mean()) <= 1e-9 * (scores[i].std() + abs(mean))
            assert var == pytest.approx(scores[i].var(), rel=1e-9)
            # and it is THE least-squares change of the cell probabilities
            assert _kkt_certificate(sel.weight[i], _cell_probs(scores[i], chosen[i]), z[i], floor)
        else:  # the moments could not be kept: no weighting with the floor does it
            assert not _lp_feasible(z[i], floor, margin=1e-7)
            assert abs((sel.weight[i] * z[i]).sum()) < 1e-9 or not _lp_mean(z[i], floor)


def _cell_probs(scores_row: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Cell probabilities re-derived from the quantizer (the QP's starting point)."""
    s = np.sort(scores_row)
    mean = s.mean()
    tol = tree._tie_tol(np.array([mean]), np.array([s.std()]))
    edges, _ = tree._quantize_edges(s[None], np.array([mean]), tol, chosen.size)
    return np.diff(edges[0]) / s.size


def _lp_mean(z: np.ndarray, floor: float) -> bool:
    k = z.size
    res = optimize.linprog(np.zeros(k), A_eq=np.stack([np.ones(k), z]), b_eq=[1.0, 0.0],
                           bounds=[(floor + 1e-7, None)] * k, method="highs")
    return res.status == 0


def test_quantize_moment_is_exact_in_the_usual_cases():
    rng = np.random.default_rng(0)
    for kind in ("normal", "uniform", "bimodal"):
        for m in (20, 100, 512):
            scores = _scores(kind, 50, m, rng)
            sel = tree.select_children(_as_paths(scores), TreeConfig())
            assert sel.exact.all(), (kind, m)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), m=st.integers(10, 300), n=st.integers(1, 5),
       k=st.integers(2, 8), selection=st.sampled_from(["quantize", "quadrature", "quantiles"]),
       weights=st.sampled_from(["equal", "stratum", "moment"]),
       floor=st.sampled_from([0.0, 0.02, 0.1]), stride=st.integers(0, 4),
       lookahead=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_batched_step_equals_per_node_loop(kind, m, n, k, selection, weights, floor, stride,
                                           lookahead, seed):
    rng = np.random.default_rng(seed)
    x = _scores(kind, n, m, rng)[:, :, None, None, None] + \
        0.05 * rng.standard_normal((n, m, 4, 2, 3))
    cfg = TreeConfig(branching=k, n_samples=8, selection=selection, weights=weights,
                     weight_floor=floor, stride=stride)
    # next-level scores with ties (samples sharing a lookahead candidate share one)
    nxt = rng.integers(0, 6, (n, m)) * 0.25 + 1.0 if lookahead else None
    fast = tree.select_children(x, cfg, next_scores=nxt)
    slow = tree.select_children_loop(x, cfg, next_scores=nxt)
    np.testing.assert_array_equal(fast.index, slow.index)
    np.testing.assert_array_equal(fast.weight, slow.weight)
    np.testing.assert_array_equal(fast.exact, slow.exact)
    # one node's bytes do not depend on the batch around it
    for i in range(n):
        one = tree.select_children(x[i:i + 1], cfg,
                                   next_scores=None if nxt is None else nxt[i:i + 1])
        np.testing.assert_array_equal(one.index[0], fast.index[i])
        np.testing.assert_array_equal(one.weight[0], fast.weight[i])


def test_lookahead_represents_each_cell_by_its_most_typical_next_level_law():
    """With next_scores, quantize keeps its cells and weights but each cell's child is the
    sample whose next-level mean score is nearest the cell's mean of them; next_scores equal
    to the scores give back the centroid rule."""
    rng = np.random.default_rng(11)
    n, m = 6, 400
    scores = rng.standard_normal((n, m))
    x = _as_paths(scores)
    nxt = 0.5 * scores + rng.standard_normal((n, m))  # related to the score, not a function
    cfg = TreeConfig()
    plain = tree.select_children(x, cfg)
    look = tree.select_children(x, cfg, next_scores=nxt)
    assert np.any(look.index != plain.index)
    stratum = tree.select_children(x, TreeConfig(weights="stratum"))  # the cells' sizes
    for i in range(n):
        order = np.argsort(scores[i], kind="stable")
        cut = np.r_[0, np.cumsum(np.rint(stratum.weight[i] * m).astype(int))]
        for j in range(cfg.branching):
            members = order[cut[j]:cut[j + 1]]  # cell j: a block of the sorted samples
            best = members[np.argmin(np.abs(nxt[i, members] - nxt[i, members].mean()))]
            assert look.index[i, j] == best
    # tied next scores (samples of one lookahead stratum): the tied path nearest the centroid
    tied = np.round(nxt)
    look = tree.select_children(x, cfg, next_scores=tied)
    for i in range(n):
        order = np.argsort(scores[i], kind="stable")
        cut = np.r_[0, np.cumsum(np.rint(stratum.weight[i] * m).astype(int))]
        for j in range(cfg.branching):
            members = order[cut[j]:cut[j + 1]]
            d = np.abs(tied[i, members] - tied[i, members].mean())
            best = members[d == d.min()]
            cent = scores[i, members].mean()
            assert look.index[i, j] == best[np.argmin(np.abs(scores[i, best] - cent))]
    same = tree.select_children(x, cfg, next_scores=scores)
    np.testing.assert_array_equal(same.index, plain.index)
    np.testing.assert_array_equal(same.weight, plain.weight)
    with pytest.raises(DataError, match="next_scores"):
        tree.select_children(x, cfg, next_scores=nxt[:, :5])


@pytest.mark.parametrize("kind", ["normal", "uniform", "bimodal"])
def test_gauss_rule_integrates_polynomials_to_degree_2k_minus_1(kind):
    rng = np.random.default_rng(3)
    scores = _scores(kind, 3, 512, rng)
    z = (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)
    for k in (2, 5, 7):
        nodes, w, ok = tree._gauss_rule(z, k)
        assert ok.all() and np.all(np.diff(nodes, axis=1) > 0)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
        for p in range(2 * k):
            np.testing.assert_allclose((w * nodes ** p).sum(1), (z ** p).mean(1), rtol=1e-7,
                                       atol=1e-9)
    # fewer distinct values than K: no rule (the selection falls back to quantization)
    assert not tree._gauss_rule(np.tile([-1.0, 1.0], (1, 50)), 3)[2].any()


def test_quadrature_selection_reaches_further_into_the_tails_and_keeps_moments():
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((20, 512))
    quad = tree.select_children(_as_paths(scores), TreeConfig(selection="quadrature"))
    quant = tree.select_children(_as_paths(scores), TreeConfig())
    assert quad.exact.all()
    z_quad, z_quant = _standardised(scores, quad), _standardised(scores, quant)
    assert np.all(z_quad[:, -1] > z_quant[:, -1]) and np.all(z_quad[:, 0] < z_quant[:, 0])
    for sel, z in ((quad, z_quad), (quant, z_quant)):
        np.testing.assert_allclose((sel.weight * z).sum(1), 0.0, atol=1e-9)
        np.testing.assert_allclose((sel.weight * z ** 2).sum(1), 1.0, rtol=1e-9)
    # the fourth moment (tails) is kept far better by the quadrature rule
    kurt = (((scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)) ** 4).mean(1)
    err_quad = np.abs((quad.weight * z_quad ** 4).sum(1) - kurt)
    err_quant = np.abs((quant.weight * z_quant ** 4).sum(1) - kurt)
    assert np.median(err_quad) < 0.5 * np.median(err_quant)


def test_score_is_the_last_kept_day_and_configurable():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40, 6, 2, 2))
    cfg = TreeConfig(stride=3, n_samples=8)
    by_default = tree.select_children(x, cfg)
    only_day2 = x.copy()
    only_day2[:, :, [0, 1, 3, 4, 5]] = 0.0  # only day S-1 = 2 matters for the default
    np.testing.assert_array_equal(tree.select_children(only_day2, cfg).index, by_default.index)
    named = tree.select_children(x, cfg, score="kept_mean")
    own = tree.select_children(x, cfg, score=lambda kept: kept.mean(axis=(2, 3, 4)))
    np.testing.assert_array_equal(named.index, own.index)
    by_config = tree.select_children(x, cfg.model_copy(update={"score": "kept_mean"}))
    np.testing.assert_array_equal(by_config.index, named.index)
    np.testing.assert_array_equal(by_config.weight, named.weight)
    assert not np.array_equal(by_config.index, by_default.index)
    with pytest.raises(ConfigError, match="unknown path score"):
        tree.select_children(x, cfg, score="nope")
    with pytest.raises(ConfigError, match="stride"):
        tree.select_children(x, TreeConfig(stride=7, n_samples=8))
    with pytest.raises(ConfigError, match="n_samples"):
        tree.select_children(x[:, :4], cfg)
    bad = x.copy()
    bad[0, 0, 2, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        tree.select_children(bad, cfg)


def test_quantiles_equal_loses_variance_and_tails():
    scores = np.random.default_rng(2).standard_normal((1, 100_000))
    x = _as_paths(scores, h=1)
    q10, q90, q99 = np.quantile(scores[0], [0.10, 0.90, 0.99])
    seed = tree.select_children(x, TreeConfig(selection="quantiles", weights="equal"))
    chosen = scores[0, seed.index[0]]
    retained = (seed.weight[0] * (chosen - scores.mean()) ** 2).sum() / scores.var()
    assert 0.80 <= retained <= 0.92  # about 0.84 per level: 0.84^4 = 0.50 after 4 levels
    assert not seed.exact[0]
    spacing = 1e-3  # nearest sample to q10/q90 of 100k draws lies within this
    assert chosen.min() >= q10 - spacing and chosen.max() <= q90 + spacing
    var99 = tree.weighted_quantile(chosen, seed.weight[0], [0.99])[0]
    assert var99 <= q90 + spacing < q99 - 1.0  # a 99% VaR off the 5 points misses the tail
    np.testing.assert_allclose(tree.quantile_levels(5), [0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(tree.quantile_levels(3), [0.1, 0.5, 0.9])
    strat = tree.select_children(x, TreeConfig(selection="quantiles", weights="stratum"))
    np.testing.assert_allclose(strat.weight[0], [0.175, 0.2, 0.25, 0.2, 0.175])

    opt = tree.select_children(x, TreeConfig())  # quantize + moment
    chosen = scores[0, opt.index[0]]
    assert opt.exact[0]
    var = (opt.weight[0] * (chosen - scores.mean()) ** 2).sum()
    assert var == pytest.approx(scores.var(), rel=1e-10)
    assert chosen.max() > q90 + 0.3 and chosen.min() < q10 - 0.3  # Lloyd-Max: +-1.72


@settings(max_examples=20, deadline=None)
@given(k=st.integers(13, 30), floor=st.sampled_from([0.0, 0.01, 0.02]),
       seed=st.integers(0, 2**31 - 1))
def test_weight_projection_is_optimal_for_large_k(k, floor, seed):
    """Past the enumeration reference's reach: check the KKT certificate directly."""
    rng = np.random.default_rng(seed)
    z = np.sort(rng.standard_normal((4, k)), axis=1)
    z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
    w0 = rng.dirichlet(np.ones(k), size=4)
    w, exact = tree.project_weights(w0, z, floor)
    for i in range(4):
        if exact[i]:
            assert _kkt_certificate(w[i], w0[i], z[i], floor)
        else:
            assert not _lp_feasible(z[i], floor, margin=1e-7)


def test_infeasible_node_keeps_sum_floor_and_mean():
    z = np.array([[-0.5, -0.25, 0.0, 0.25, 0.5]])  # any weighting has variance <= 0.25 < 1
    w0 = np.full((1, 5), 0.2)
    w, exact = tree.project_weights(w0, z, 0.02)
    assert not exact[0]
    assert w.sum() == pytest.approx(1.0) and np.all(w >= 0.02)
    assert abs((w * z).sum()) < 1e-12
    # all scores equal: any weights keep the moments
    w, exact = tree.project_weights(w0, np.zeros((1, 5)), 0.02, flat=[True])
    assert exact[0] and np.allclose(w, 0.2)


# ----------------------------------------------------------------------------- contexts


@pytest.mark.parametrize("s", [2, 5, 8])
def test_child_contexts_order_and_content(s):
    n, k, c, grid = 3, 4, 5, (2, 1)
    ctx = np.arange(n)[:, None] * 1000.0 + np.arange(c)[None, :]  # (N, C)
    ctx = np.broadcast_to(ctx[:, :, None, None], (n, c) + grid).copy()
    kept = (1e6 + np.arange(n)[:, None, None] * 1000.0 + np.arange(k)[None, :, None] * 100.0
            + np.arange(s)[None, None, :])
    kept = np.broadcast_to(kept[..., None, None], (n, k, s) + grid).copy()
    out = tree.child_contexts(ctx, kept)
    assert out.shape == (n * k, c) + grid
    for parent in range(n):
        for branch in range(k):
            want = np.concatenate([ctx[parent], kept[parent, branch]])[-c:]
            np.testing.assert_array_equal(out[parent * k + branch], want)
    with pytest.raises(DataError):
        tree.child_contexts(ctx, kept[:, :, :, :1])


def test_kept_paths_and_child_weights_follow_the_selection():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 30, 6, 1, 2))
    sel = tree.select_children(x, TreeConfig(stride=4, n_samples=8))
    kept = tree.kept_paths(x, sel, 4)
    assert kept.shape == (2, 5, 4, 1, 2)
    np.testing.assert_array_equal(kept[1, 3], x[1, sel.index[1, 3], :4])
    cw = tree.child_weights([0.25, 0.75], sel)
    assert cw.shape == (10,) and cw.sum() == pytest.approx(1.0)
    assert cw[5 + 2] == pytest.approx(0.75 * sel.weight[1, 2])


# ----------------------------------------------------------------------------- pruning


def test_systematic_resampling_is_unbiased():
    w = np.random.default_rng(4).dirichlet(np.full(40, 0.5))
    mass = np.zeros(40)
    n_runs = 3000
    for seed in range(n_runs):
        idx, nw = tree.resample_frontier(w, 10, node_rng(seed, 3, 0))
        assert idx.size <= 10 and np.all(np.diff(idx) > 0)
        assert nw.sum() == pytest.approx(1.0, abs=1e-12)
        mass[idx] += nw
    # per-node std of the resampled mass is <= 1/(2n) = 0.05, so the mean's is <= 0.001
    np.testing.assert_allclose(mass / n_runs, w, atol=0.005)
    # same stream, same bytes; no resampling at or below the cap, or with cap 0
    a = tree.resample_frontier(w, 10, node_rng(7, 1, 0))
    b = tree.resample_frontier(w, 10, node_rng(7, 1, 0))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for cap in (0, 40, 100):
        idx, nw = tree.resample_frontier(w, cap, 0)
        np.testing.assert_array_equal(idx, np.arange(40))
        np.testing.assert_allclose(nw, w)


def test_resampling_with_u_an_ulp_below_one_stays_inside_the_frontier():
    """U = nextafter(1, 0) rounds the last point (U + n - 1) / n to exactly 1: it hits the
    last node, not one past the end."""

    class AlmostOne(np.random.Generator):
        def random(self, *args, **kwargs):
            return np.nextafter(1.0, 0.0)

    idx, nw = tree.resample_frontier(np.full(10, 0.1), 4, AlmostOne(np.random.PCG64(0)))
    assert idx.tolist() == [2, 4, 7, 9] and nw.tolist() == [0.25] * 4


def test_prune_min_weight_drops_and_renormalises():
    w = np.array([0.5, 0.001, 0.3, 0.009, 0.19])
    idx, nw = tree.prune_min_weight(w, 0.01)
    np.testing.assert_array_equal(idx, [0, 2, 4])
    np.testing.assert_allclose(nw, w[[0, 2, 4]] / 0.99)
    idx, nw = tree.prune_min_weight(np.full(4, 0.25), 0.5)  # nothing passes: keep the heaviest
    assert idx.size == 4 and nw.sum() == pytest.approx(1.0)
    with pytest.raises(DataError):
        tree.prune_min_weight([0.5, -0.1], 0.0)


# ----------------------------------------------------------------------------- marginals


def test_weighted_quantile_matches_numpy_inverted_cdf():
    rng = np.random.default_rng(5)
    v = rng.standard_normal((3, 101))
    lv = [0.0, 0.01, 0.3, 0.5, 0.99, 1.0]
    got = tree.weighted_quantile(v, np.ones_like(v), lv)
    np.testing.assert_array_equal(got, np.quantile(v, lv, axis=1, method="inverted_cdf").T)
    # weights act as repetitions
    w = rng.integers(1, 4, 101)
    np.testing.assert_array_equal(tree.weighted_quantile(v[0], w, lv),
                                  np.quantile(np.repeat(v[0], w), lv, method="inverted_cdf"))


def _batches(rng, n_batches=3, n=6, m=200, s=4, grid=(2, 3)):
    x = [np.log(0.2) + 0.3 * rng.standard_normal((n, 1, 1) + grid)
         + 0.25 * rng.standard_normal((n, m, s) + grid) for _ in range(n_batches)]
    w = rng.dirichlet(np.ones(n * n_batches)).reshape(n_batches, n)
    return x, w


def test_accumulator_mean_std_exact_and_quantiles_within_a_fraction_of_a_bin():
    x, w = _batches(np.random.default_rng(6), n=40, m=512)
    acc = tree.MarginalAccumulator(4, (2, 3), bins=512)
    for xb, wb in zip(x, w, strict=True):
        acc.add(0, xb, wb)
    vals = np.concatenate([np.moveaxis(xb, 2, 0).reshape(4, -1, 6) for xb in x], 1)  # (D, NM, G)
    wts = np.concatenate([np.repeat(wb / 512, 512) for wb in w])
    iv = np.exp(vals)
    mean = np.einsum("dng,n->dg", iv, wts)
    std = np.sqrt(np.einsum("dng,n->dg", (iv - mean[:, None]) ** 2, wts))
    np.testing.assert_allclose(acc.mean().reshape(4, 6), mean, rtol=1e-13)
    np.testing.assert_allclose(acc.std().reshape(4, 6), std, rtol=1e-10)
    lv = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    hist = np.log(acc.quantiles(lv)).reshape(4, len(lv), 6)
    exact = tree.weighted_quantile(np.moveaxis(vals, 1, 2), wts, lv)  # (D, G, n_q)
    err = np.abs(hist - np.moveaxis(exact, 2, 1)) / acc.bin_width
    assert np.median(err) < 0.1 and err.max() < 0.5  # in bin widths (0.0135 log-IV)
    out = acc.finalize(lv)
    assert out["quantiles"].shape == (4, 7, 2, 3)
    np.testing.assert_allclose(out["weight"], 1.0)
    # iv input gives the same histogram
    acc_iv = tree.MarginalAccumulator(4, (2, 3), bins=512)
    for xb, wb in zip(x, w, strict=True):
        acc_iv.add(0, np.exp(xb), wb, log=False)
    np.testing.assert_allclose(acc_iv.quantiles(lv), acc.quantiles(lv), rtol=1e-12)


def test_accumulator_merge_in_a_fixed_order():
    x, w = _batches(np.random.default_rng(7))

    def part(i, days=slice(None), offset=0):
        return tree.MarginalAccumulator(4, (2, 3), bins=256).add(offset, x[i][:, :, days], w[i])

    left = part(0).merge(part(1)).merge(part(2))
    right = part(0).merge(part(1).merge(part(2)))
    again = part(0).merge(part(1)).merge(part(2))
    for name in ("counts", "total", "sum_iv", "sum_iv2", "vmin", "vmax"):
        np.testing.assert_array_equal(getattr(left, name), getattr(again, name))  # same bytes
        np.testing.assert_allclose(getattr(left, name), getattr(right, name), rtol=1e-13)
    lv = [0.05, 0.5, 0.95]
    np.testing.assert_allclose(left.quantiles(lv), right.quantiles(lv), rtol=1e-12)
    # days streamed in pieces (day_offset) give the same as all at once
    pieces = tree.MarginalAccumulator(4, (2, 3), bins=256)
    for i in range(3):
        pieces.merge(part(i, slice(0, 1), 0)).merge(part(i, slice(1, 4), 1))
    np.testing.assert_allclose(pieces.quantiles(lv), left.quantiles(lv), rtol=1e-12)
    np.testing.assert_allclose(pieces.std(), left.std(), rtol=1e-12)
    with pytest.raises(DataError):
        left.merge(tree.MarginalAccumulator(4, (2, 3), bins=128))


def test_two_level_mixture_reproduces_known_quantiles():
    """Level 1: a root draws M paths and keeps K children; level 2: each child draws its own
    M-sample conditional N(child value, 0.1^2) in log-IV. The level-2 marginal is the mixture
    of those FULL conditionals weighted by the child probabilities, known in closed form."""
    m, sigma = 4000, 0.1
    strata = stats.norm.ppf((np.arange(m) + 0.5) / m)  # deterministic, exactly N(0, 1)-like
    root = np.log(0.2) + 0.2 * strata[np.random.default_rng(8).permutation(m)]
    sel = tree.select_children(root[None, :, None, None, None], TreeConfig())
    centres = root[sel.index[0]]  # (K,)
    level2 = centres[:, None] + sigma * strata[None, :]  # (K, M)
    acc = tree.MarginalAccumulator(1, (1, 1), bins=512)
    for b in range(5):  # one child per batch, as the driver streams them
        acc.add(0, level2[b:b + 1, :, None, None, None], sel.weight[0, b:b + 1])
    lv = np.array([0.01, 0.1, 0.5, 0.9, 0.99])

    def cdf(v):
        return (sel.weight[0] * stats.norm.cdf((v - centres) / sigma)).sum()

    truth = [optimize.brentq(lambda v, q=q: cdf(v) - q, -6.0, 3.0, xtol=1e-14) for q in lv]
    got = np.log(acc.quantiles(lv)[0, :, 0, 0])
    np.testing.assert_allclose(got, truth, atol=0.3 * acc.bin_width)
    # the K children alone would give a 5-point distribution: far off in the tails
    five = tree.weighted_quantile(centres, sel.weight[0], lv)
    assert abs(five[0] - truth[0]) > 5 * acc.bin_width
    assert math.isclose(acc.mean()[0, 0, 0], (sel.weight[0][:, None] / m
                                              * np.exp(level2)).sum(), rel_tol=1e-13)
