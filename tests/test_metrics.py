"""engine.metrics against reference libraries, plain-loop twins and known answers."""

from __future__ import annotations

import math

import numpy as np
import properscoring as ps
import pytest
import scoringrules as sr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from engine import metrics as mt
from engine.errors import DataError


def _random_set(w=7, m=40, g=5, seed=0, dtype=np.float64):
    """Positive iv-like samples (W, M, G) and realised (W, G) with a window-level offset."""
    rng = np.random.default_rng(seed)
    level = 0.2 + 0.05 * rng.standard_normal((w, 1, 1))
    samples = np.abs(level + 0.03 * rng.standard_normal((w, m, g))) + 0.01
    realised = np.abs(level[:, 0] + 0.04 * rng.standard_normal((w, g))) + 0.01
    return samples.astype(dtype), realised.astype(dtype)


# ----------------------------------------------------------------------------- proper scores


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_crps_matches_properscoring_and_scoringrules(dtype):
    samples, realised = _random_set(w=9, m=51, g=6, seed=1, dtype=dtype)
    got = mt.crps_ensemble(samples, realised)
    assert got.shape == (9, 6) and got.dtype == np.float64
    x64, y64 = samples.astype(np.float64), realised.astype(np.float64)
    ref_ps = ps.crps_ensemble(y64, x64, axis=1)
    # "nrg" is the energy form E|X-y| - 1/2 E|X-X'| with 1/M^2, the same estimator.
    ref_sr = sr.crps_ensemble(y64, x64, m_axis=1, estimator="nrg", backend="numpy")
    np.testing.assert_allclose(got, ref_ps, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, ref_sr, atol=1e-6, rtol=0)


def test_crps_with_ties_and_single_member():
    samples = np.array([[[0.2], [0.2], [0.3], [0.2]]])  # (1, 4, 1) with ties
    realised = np.array([[0.25]])
    np.testing.assert_allclose(mt.crps_ensemble(samples, realised),
                               ps.crps_ensemble(realised, samples, axis=1), atol=1e-12)
    one = np.array([[[0.2, 0.4]]])  # M = 1: CRPS is the absolute error
    np.testing.assert_allclose(mt.crps_ensemble(one, np.array([[0.25, 0.3]])), [[0.05, 0.1]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_energy_score_exact_matches_scoringrules(dtype):
    samples, realised = _random_set(w=6, m=60, g=8, seed=2, dtype=dtype)
    got = mt.energy_score(samples, realised)
    ref = sr.es_ensemble(realised.astype(np.float64), samples.astype(np.float64),
                         m_axis=-2, v_axis=-1, backend="numpy")
    assert got.shape == (6,)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_energy_score_exact_with_duplicate_samples():
    samples, realised = _random_set(w=3, m=20, g=4, seed=3)
    samples[:, 10:] = samples[:, :10]  # bootstrap-like repeats: zero distances must stay zero
    ref = sr.es_ensemble(realised, samples, m_axis=-2, v_axis=-1, backend="numpy")
    np.testing.assert_allclose(mt.energy_score(samples, realised), ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("g", [1, 25])
def test_energy_score_approximation_close_to_exact(g):
    rng = np.random.default_rng(4)
    w, m = 12, 600
    mix = rng.standard_normal((g, g)) / math.sqrt(g)
    samples = 0.2 + 0.03 * rng.standard_normal((w, m, g)) @ mix
    realised = 0.2 + 0.03 * rng.standard_normal((w, g))
    exact = mt.energy_score(samples, realised, exact_max_m=m)
    approx = mt.energy_score(samples, realised)  # M = 600 > 256: 16 cyclic shifts
    np.testing.assert_allclose(approx, exact, rtol=0.03)
    assert abs(approx.mean() / exact.mean() - 1) < 0.01


@pytest.mark.parametrize("m", [300, 301])
def test_energy_score_all_shifts_is_exact(m):
    samples, realised = _random_set(w=3, m=m, g=4, seed=5)
    exact = mt.energy_score(samples, realised, exact_max_m=m)
    every_pair = mt.energy_score(samples, realised, exact_max_m=1, n_shifts=m // 2)
    np.testing.assert_allclose(every_pair, exact, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- bands


def _loop_band(samples, level):
    w, _, g = samples.shape
    lo, hi = np.empty((w, g)), np.empty((w, g))
    for i in range(w):
        for j in range(g):
            lo[i, j] = np.quantile(samples[i, :, j], (1 - level) / 2)
            hi[i, j] = np.quantile(samples[i, :, j], (1 + level) / 2)
    return lo, hi


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_band_coverage_width_match_loops(level):
    samples, realised = _random_set(w=8, m=33, g=4, seed=6)
    lo_ref, hi_ref = _loop_band(samples, level)
    lo, hi = mt.band(samples, level)
    np.testing.assert_allclose(lo, lo_ref, atol=1e-14)
    np.testing.assert_allclose(hi, hi_ref, atol=1e-14)

    inside, total, widths = 0, 0, []
    for i in range(samples.shape[0]):
        for j in range(samples.shape[2]):
            inside += lo_ref[i, j] <= realised[i, j] <= hi_ref[i, j]
            total += 1
            widths.append(hi_ref[i, j] - lo_ref[i, j])
    assert mt.coverage(samples, realised, level) == pytest.approx(inside / total, abs=1e-15)
    assert mt.width(samples, level) == pytest.approx(np.mean(widths), abs=1e-14)


def test_band_chunking_is_invisible(monkeypatch):
    samples, realised = _random_set(w=10, m=20, g=3, seed=7)
    whole = mt.band(samples, 0.9), mt.crps_ensemble(samples, realised)
    monkeypatch.setattr(mt._chunks, "__defaults__", (50,))  # ~one window a chunk
    chunked = mt.band(samples, 0.9), mt.crps_ensemble(samples, realised)
    np.testing.assert_array_equal(whole[0][0], chunked[0][0])
    np.testing.assert_allclose(whole[1], chunked[1], atol=1e-15)


def test_coverage_by_group_matches_loop_and_marks_empty_groups():
    samples, realised = _random_set(w=9, m=30, g=4, seed=8)
    groups = np.array([0, 2, 0, 2, 2, 0, 3, 3, 0])
    lo, hi = _loop_band(samples, 0.8)
    expected = []
    for k in range(4):
        hits = [lo[i, j] <= realised[i, j] <= hi[i, j]
                for i in range(9) if groups[i] == k for j in range(4)]
        expected.append(np.mean(hits) if hits else np.nan)
    got = mt.coverage_by_group(samples, realised, 0.8, groups, 4)
    np.testing.assert_allclose(got, expected, atol=1e-15)
    assert np.isnan(got[1])
    with pytest.raises(DataError, match="groups must lie"):
        mt.coverage_by_group(samples, realised, 0.8, groups, 3)


def test_true_distribution_is_calibrated():
    rng = np.random.default_rng(9)
    w, m, g = 400, 400, 3
    mu = 0.2 + 0.05 * rng.random((w, 1, g))
    sigma = 0.01 + 0.02 * rng.random((w, 1, g))
    samples = mu + sigma * rng.standard_normal((w, m, g))
    realised = mu[:, 0] + sigma[:, 0] * rng.standard_normal((w, g))
    assert mt.coverage(samples, realised, 0.9) == pytest.approx(0.9, abs=0.03)
    assert mt.coverage(samples, realised, 0.5) == pytest.approx(0.5, abs=0.04)
    assert mt.pit_ks(mt.pit(samples, realised)) < 0.06  # 1% KS critical value: 0.047
    # An overconfident sampler (a third of the spread) is caught by both.
    tight = mu + sigma / 3 * rng.standard_normal((w, m, g))
    assert mt.coverage(tight, realised, 0.9) < 0.5
    assert mt.pit_ks(mt.pit(tight, realised)) > 0.2


# ----------------------------------------------------------------------------- calibration


def test_pit_matches_loop_and_ks_matches_scipy():
    samples, realised = _random_set(w=5, m=17, g=3, seed=10)
    samples[0, :5, 0] = realised[0, 0]  # ties count as <=
    ref = np.empty((5, 3))
    for i in range(5):
        for j in range(3):
            ref[i, j] = sum(s <= realised[i, j] for s in samples[i, :, j]) / 17
    got = mt.pit(samples, realised)
    np.testing.assert_allclose(got, ref, atol=1e-15)
    assert mt.pit_ks(got) == pytest.approx(stats.kstest(ref.ravel(), "uniform").statistic)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, (3, 9, 2), elements=st.floats(0.05, 1.0)),
       arrays(np.float64, (3, 2), elements=st.floats(0.05, 1.0)))
def test_scores_properties(samples, realised):
    crps = mt.crps_ensemble(samples, realised)
    np.testing.assert_allclose(crps, ps.crps_ensemble(realised, samples, axis=1), atol=1e-9)
    assert np.all(crps >= -1e-12)
    assert np.all(mt.energy_score(samples, realised) >= -1e-12)
    p = mt.pit(samples, realised)
    assert np.all((p >= 0) & (p <= 1))
    lo, hi = mt.band(samples, 0.9)
    assert np.all(lo <= hi)


# ----------------------------------------------------------------------------- variance


def test_variance_budget_and_std_ratio_match_loops():
    samples, realised = _random_set(w=6, m=25, g=4, seed=11)
    w, m, g = samples.shape
    within_shares, between_shares, ratios = [], [], []
    for j in range(g):
        var_x = np.var([realised[i, j] for i in range(w)])
        within = np.mean([np.var(samples[i, :, j]) for i in range(w)])
        between = np.var([np.mean(samples[i, :, j]) for i in range(w)])
        within_shares.append(within / var_x)
        between_shares.append(between / var_x)
        pooled = [samples[i, k, j] for i in range(w) for k in range(m)]
        ratios.append(np.std(pooled) / np.sqrt(var_x))
    budget = mt.variance_budget(samples, realised)
    assert budget["within_var_share"] == pytest.approx(np.mean(within_shares), rel=1e-12)
    assert budget["between_var_share"] == pytest.approx(np.mean(between_shares), rel=1e-12)
    assert mt.marginal_std_ratio(samples, realised) == pytest.approx(np.mean(ratios), rel=1e-12)


def test_variance_budget_known_answers():
    rng = np.random.default_rng(12)
    realised = 0.2 + 0.03 * rng.standard_normal((200, 3))
    # A point forecast repeated M times: no variance inside a context.
    deterministic = np.repeat(realised[:, None, :], 10, axis=1)
    budget = mt.variance_budget(deterministic, realised)
    assert budget["within_var_share"] == 0.0
    assert budget["between_var_share"] == pytest.approx(1.0)
    # Unconditional draws from the true marginal: all variance within, ratio ~ 1.
    uncond = 0.2 + 0.03 * rng.standard_normal((200, 500, 3))
    budget = mt.variance_budget(uncond, realised)
    assert budget["within_var_share"] == pytest.approx(1.0, abs=0.25)
    assert budget["between_var_share"] < 0.01
    assert mt.marginal_std_ratio(uncond, realised) == pytest.approx(1.0, abs=0.12)


def test_roughness_ratio_matches_loop_and_chunks(monkeypatch):
    rng = np.random.default_rng(13)
    w, m, h, g = 4, 6, 5, 3
    sample_paths = 0.2 + np.cumsum(0.01 * rng.standard_normal((w, m, h, g)), axis=2)
    realised_paths = 0.2 + np.cumsum(0.02 * rng.standard_normal((w, h, g)), axis=1)
    sample_changes = [sample_paths[i, k, d + 1, j] - sample_paths[i, k, d, j]
                      for i in range(w) for k in range(m) for d in range(h - 1) for j in range(g)]
    real_changes = [realised_paths[i, d + 1, j] - realised_paths[i, d, j]
                    for i in range(w) for d in range(h - 1) for j in range(g)]
    expected = np.std(sample_changes) / np.std(real_changes)
    assert mt.roughness_ratio(sample_paths, realised_paths) == pytest.approx(expected, rel=1e-12)
    # Rows larger than the budget: split along samples, one window at a time.
    monkeypatch.setattr(mt._block_chunks, "__defaults__", (2 * h * g,))
    assert mt.roughness_ratio(sample_paths, realised_paths) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(mt._block_chunks, "__defaults__", (2 * m * h * g,))
    assert mt.roughness_ratio(sample_paths, realised_paths) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- arbitrage


def test_calendar_violations_matches_loop():
    rng = np.random.default_rng(14)
    days = np.array([30.0, 91.0, 182.0, 365.0])
    surfaces = 0.2 + 0.06 * rng.standard_normal((300, 2, 4)) ** 2
    bad = 0
    for s in surfaces:
        w = s**2 * days / 365.0
        bad += any(w[r, c] - w[r, c + 1] > 1e-6 * abs(w[r, c])
                   for r in range(2) for c in range(3))
    got = mt.calendar_violations(surfaces, days)
    assert got == bad / 300
    assert 0 < got < 1


def test_calendar_violations_known_answers():
    days = np.array([30.0, 60.0, 120.0])
    # Flat total variance (iv^2 T constant) is not an arbitrage, even after rounding.
    flat = np.sqrt(0.004 / (days / 365.0))[None, None, :].repeat(2, axis=1)
    assert mt.calendar_violations(flat, days) == 0.0
    decreasing = flat.copy()
    decreasing[0, 1, 2] *= 0.99
    assert mt.calendar_violations(np.concatenate([flat, decreasing]), days) == 0.5
    with pytest.raises(DataError, match="strictly increasing"):
        mt.calendar_violations(flat, days[::-1])


# ----------------------------------------------------------------------------- risk


def test_kupiec_known_answers():
    assert mt.kupiec_pof(5, 100, 0.05) == pytest.approx(1.0, abs=1e-12)
    assert mt.kupiec_pof(10, 1000, 0.01) == pytest.approx(1.0, abs=1e-12)
    assert mt.kupiec_pof(30, 250, 0.01) < 1e-10
    # Hand computation: x = 8, n = 250, p = 0.01.
    x, n, p = 8, 250, 0.01
    log_null = (n - x) * math.log(1 - p) + x * math.log(p)
    log_alt = (n - x) * math.log(1 - x / n) + x * math.log(x / n)
    lr = -2 * (log_null - log_alt)
    assert mt.kupiec_pof(x, n, p) == pytest.approx(stats.chi2.sf(lr, 1), rel=1e-10)
    # Edges: no NaN; x = 0 gives LR = -2 n ln(1 - p), x = n gives LR = -2 n ln p.
    assert mt.kupiec_pof(0, 250, 0.01) == pytest.approx(
        stats.chi2.sf(-2 * 250 * math.log(0.99), 1), rel=1e-10)
    assert mt.kupiec_pof(250, 250, 0.01) == pytest.approx(
        stats.chi2.sf(-2 * 250 * math.log(0.01), 1), rel=1e-10)
    with pytest.raises(DataError):
        mt.kupiec_pof(3, 2, 0.01)


def test_var_backtest_matches_loop():
    rng = np.random.default_rng(15)
    w, m = 400, 200
    sample_pnl = rng.standard_normal((w, m))
    realised_pnl = rng.standard_normal(w)
    result = mt.var_backtest(sample_pnl, realised_pnl, 0.95)
    exceptions = sum(-realised_pnl[i] > np.quantile(-sample_pnl[i], 0.95) for i in range(w))
    assert result["exceptions"] == exceptions
    assert isinstance(result["exceptions"], int)
    assert result["expected"] == pytest.approx(20.0)
    assert result["kupiec_p"] == pytest.approx(mt.kupiec_pof(exceptions, w, 0.05))
    assert result["kupiec_p"] > 0.01  # samples from the true law pass
    # Scenarios with a tenth of the real spread fail badly.
    assert mt.var_backtest(0.1 * sample_pnl, realised_pnl, 0.99)["kupiec_p"] < 1e-6


def test_vega_pnl():
    rng = np.random.default_rng(16)
    start = 0.2 + 0.01 * rng.random((3, 4))
    paths = 0.2 + 0.01 * rng.random((3, 5, 7, 4)).astype(np.float32)
    got = mt.vega_pnl(start, paths)
    assert got.shape == (3, 5, 7)
    ref = np.array([[[sum(float(paths[i, k, d, j]) - start[i, j] for j in range(4))
                      for d in range(7)] for k in range(5)] for i in range(3)])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    np.testing.assert_allclose(mt.vega_pnl(start, start), np.zeros(3), atol=1e-15)
    vega = np.array([2.0, 0.0, -1.5, 0.25])  # a book's own vegas
    got = mt.vega_pnl(start, paths, vega)
    ref = np.array([[[sum(vega[j] * (float(paths[i, k, d, j]) - start[i, j]) for j in range(4))
                      for d in range(7)] for k in range(5)] for i in range(3)])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    np.testing.assert_array_equal(mt.vega_pnl(start, paths, np.ones(4)), mt.vega_pnl(start, paths))
    with pytest.raises(DataError, match="a vega per grid point"):
        mt.vega_pnl(start, paths, vega[:3])


def test_shape_errors_are_clear():
    samples, realised = _random_set(w=3, m=5, g=2)
    with pytest.raises(DataError, match=r"realised must have shape \(W, G\)"):
        mt.coverage(samples, realised[:2], 0.9)
    with pytest.raises(DataError, match="level must lie"):
        mt.band(samples, 90)
    with pytest.raises(DataError, match=r"\(W, M, G\)"):
        mt.pit(samples[0], realised)


def test_calendar_violations_ignore_float32_rounding_of_a_flat_total_variance():
    """Evaluation keeps samples as float32: a total variance flat in maturity must not count
    as falling by its rounding, while a real fall of 0.01% does."""
    days = np.array([30.0, 91.0, 182.0])
    flat = np.sqrt(0.04 * 30.0 / days)  # iv^2 * T the same at every maturity
    surfaces = np.broadcast_to(flat, (50, 2, 3)).astype(np.float32)
    assert mt.calendar_violations(surfaces, days) == 0.0
    falling = flat * np.array([1.0, 1.0, 1.0 - 1e-4])
    assert mt.calendar_violations(np.broadcast_to(falling, (4, 2, 3)), days) == 1.0
