"""The three baselines: historical bootstrap, filtered historical simulation, PCA-AR."""

from __future__ import annotations

import numpy as np
import pytest
from arch.univariate import EWMAVariance

from engine.data.panel import Panel
from engine.errors import DataError, NotFittedError
from engine.samplers import make_sampler
from engine.samplers.fhs import ewma_variance
from engine.samplers.pca_ar import PHI_MAX, PcaArSampler
from tests.conftest import tiny_config, toy_panel
from tests.contract import SamplerContract


class TestHistBootstrapContract(SamplerContract):
    name = "hist-bootstrap"


class TestFhsContract(SamplerContract):
    name = "fhs"


class TestPcaArContract(SamplerContract):
    name = "pca-ar"


def _one_context(config, panel, anchor=200):
    return panel.contexts_at(np.array([anchor]), config.data.context, log=False)


# --- historical bootstrap ---------------------------------------------------------------

def test_hist_bootstrap_variance_grows_linearly_and_matches_history():
    config, panel = tiny_config(**{"data.horizon": 10}), toy_panel()
    sampler = make_sampler("hist-bootstrap", config).fit(panel)
    ctx = _one_context(config, panel)
    log_paths = np.log(sampler.sample(ctx, 8000, 0))[0]  # (M, H, n_m, n_tau)
    moves = log_paths - np.log(ctx[0, -1])  # change from the last context day
    var = moves.var(axis=0)  # (H, n_m, n_tau)
    # iid steps: the h-day variance is h times the 1-day variance.
    for h in (5, 10):
        np.testing.assert_allclose(var[h - 1] / var[0], h, rtol=0.15)
    hist_std = np.diff(panel.log_surface, axis=0).std(axis=0)
    np.testing.assert_allclose(moves[:, 0].std(axis=0), hist_std, rtol=0.05)


def test_hist_bootstrap_keeps_whole_surfaces():
    """A 1-day move is one historical change surface, not a mix of days per grid point."""
    config, panel = tiny_config(), toy_panel()
    sampler = make_sampler("hist-bootstrap", config).fit(panel)
    ctx = _one_context(config, panel)
    moves = np.log(sampler.sample(ctx, 50, 1))[0, :, 0] - np.log(ctx[0, -1])  # (M, n_m, n_tau)
    flat_hist = sampler.changes_.reshape(len(sampler.changes_), -1)
    for m in moves.reshape(len(moves), -1):
        assert np.isclose(flat_hist, m, rtol=0, atol=1e-12).all(axis=1).any()


# --- filtered historical simulation -----------------------------------------------------

def test_ewma_recursion_matches_arch():
    rng = np.random.default_rng(3)
    r = rng.standard_normal(300) * np.exp(0.5 * np.sin(np.arange(300) / 20))
    lam, backcast = 0.94, 1.7
    ours = ewma_variance(r, lam, backcast)
    ref = EWMAVariance(lam).compute_variance(np.empty(0), r, np.empty(300), backcast,
                                            np.zeros((300, 2)))
    np.testing.assert_allclose(ours[:-1], ref, rtol=1e-12)
    assert np.isclose(ours[-1], lam * ref[-1] + (1 - lam) * r[-1] ** 2)
    # Many series at once, time on another axis, one start per series.
    many = rng.standard_normal((4, 300))
    starts = np.array([0.5, 1.0, 2.0, 3.0])
    out = ewma_variance(many, lam, starts, axis=1)
    for i in range(4):
        ref_i = EWMAVariance(lam).compute_variance(np.empty(0), many[i], np.empty(300),
                                                  starts[i], np.zeros((300, 2)))
        np.testing.assert_allclose(out[i, :-1], ref_i, rtol=1e-12)


def test_fhs_fit_standardizes_with_arch_ewma():
    config, panel = tiny_config(**{"sampler.ewma_lambda": 0.9}), toy_panel()
    sampler = make_sampler("fhs", config).fit(panel)
    changes = np.diff(panel.log_surface, axis=0)
    for i, j in [(0, 0), (1, 2)]:
        r = np.ascontiguousarray(changes[:, i, j])
        sigma2 = EWMAVariance(0.9).compute_variance(np.empty(0), r, np.empty(len(r)),
                                                    float(np.mean(r**2)), np.zeros((len(r), 2)))
        np.testing.assert_allclose(sampler.std_changes_[:, i, j], r / np.sqrt(sigma2), rtol=1e-10)


def test_a_stale_quote_neither_blows_up_fhs_nor_reaches_zero():
    """A grid point quoted unchanged for 400 days drove its EWMA to 0.94**400 of its level,
    so the next real move became a z of 4e5 that any later path could draw (iv 0.0). Its
    variance is floored at 1% of the long-run one; the other points keep their z exactly."""
    config, panel = tiny_config(), toy_panel(n_days=800)
    surface = panel.surface.copy()
    surface[100:500, 0, 2] = surface[100, 0, 2]
    stale = Panel(surface, panel.dates, panel.moneyness, panel.maturity_days)
    fhs = make_sampler("fhs", config).fit(stale)
    assert np.abs(fhs.std_changes_[:, 0, 2]).max() < 100
    fresh = make_sampler("fhs", config).fit(panel)
    np.testing.assert_array_equal(fhs.std_changes_[:, 1], fresh.std_changes_[:, 1])
    ctx = stale.contexts_at(np.array([700]), config.data.context, log=False)
    out = fhs.sample(ctx, 2000, 0)
    assert np.isfinite(out).all() and out.min() > 0.2 * ctx.min() and out.max() < 5 * ctx.max()


def test_fhs_spread_follows_recent_context_volatility():
    config, panel = tiny_config(), toy_panel()
    sampler = make_sampler("fhs", config).fit(panel)
    C = config.data.context
    base = np.log(panel.surface[200])
    calm = np.broadcast_to(base, (C, *base.shape))  # flat: no recent moves
    swings = 0.15 * (-1.0) ** np.arange(C)  # violent +-15% daily moves
    violent = base + swings[:, None, None]
    ctx = np.exp(np.stack([calm, violent]))  # (2, C, n_m, n_tau)
    one_day = np.log(sampler.sample(ctx, 4000, 0))[:, :, 0] - np.log(ctx[:, -1])[:, None]
    std = one_day.std(axis=1)  # (2, n_m, n_tau)
    assert (std[1] > 5 * std[0]).all()
    # The 1-day spread is the EWMA vol times the std of the standardized changes.
    expected = np.sqrt(sampler.current_variance(np.log(ctx))) * sampler.std_changes_.std(axis=0)
    np.testing.assert_allclose(std, expected, rtol=0.1)


# --- PCA-AR --------------------------------------------------------------------------------

def _factor_panel(phi=0.9, c=0.02, n_days=3000, seed=0):
    """Log-IV driven by one AR(1) factor on a fixed loading + small grid noise."""
    rng = np.random.default_rng(seed)
    f = np.empty(n_days)
    f[0] = c / (1 - phi)
    for t in range(1, n_days):
        f[t] = c + phi * f[t - 1] + 0.05 * rng.standard_normal()
    loading = np.linspace(0.5, 1.5, 6).reshape(2, 3)
    log_iv = np.log(0.2) + f[:, None, None] * loading + 0.002 * rng.standard_normal((n_days, 2, 3))
    dates = np.datetime64("2010-01-04") + np.arange(n_days)
    return Panel(np.exp(log_iv), dates, np.array([0.9, 1.1]), np.array([30.0, 91.0, 182.0]))


def test_pca_ar_recovers_ar1_coefficient():
    sampler = make_sampler("pca-ar", tiny_config(**{"sampler.n_factors": 1}))
    sampler.fit(_factor_panel(phi=0.9))
    assert sampler.components_.shape == (1, 6)
    assert abs(sampler.phi_[0] - 0.9) < 0.03
    # The first component is the loading direction (up to scale).
    loading = np.linspace(0.5, 1.5, 6)
    cos = sampler.components_[0] @ loading / np.linalg.norm(loading)
    assert cos > 0.999
    assert np.allclose(sampler.innovations_.mean(axis=0), 0, atol=1e-12)


def test_pca_ar_clips_unit_root():
    rng = np.random.default_rng(1)
    walk = np.cumsum(0.05 * rng.standard_normal(500)) + 0.5 * np.arange(500) / 500
    log_iv = np.log(0.2) + walk[:, None, None] * np.ones((1, 2, 3))
    log_iv += 1e-3 * rng.standard_normal(log_iv.shape)
    sampler = make_sampler("pca-ar", tiny_config(**{"data.horizon": 500}))
    sampler.fit_days(log_iv, np.ones(500, dtype=bool))
    assert (np.abs(sampler.phi_) <= PHI_MAX).all()
    paths = sampler.mean_path(log_iv[None, -12:])
    assert np.isfinite(paths).all() and np.abs(paths).max() < 10


def test_pca_ar_mean_path_is_the_sample_mean():
    config, panel = tiny_config(**{"data.horizon": 20}), toy_panel()
    sampler = make_sampler("pca-ar", config).fit(panel)
    anchors = np.array([50, 200, 350])
    log_ctx = panel.contexts_at(anchors, config.data.context)
    mean = sampler.mean_path(log_ctx)  # (B, H, n_m, n_tau)
    assert mean.shape == (3, 20, *panel.grid_shape)
    log_paths = np.log(sampler.sample(np.exp(log_ctx), 20000, 0))  # (B, M, H, n_m, n_tau)
    se = log_paths.std(axis=1) / np.sqrt(log_paths.shape[1])
    assert (np.abs(log_paths.mean(axis=1) - mean) < 5 * se).all()
    # The mean reverts: far out it is pulled toward the long-run mean of the history.
    assert np.abs(mean[:, -1] - mean[:, -1].mean(axis=0)).max() < np.abs(
        log_ctx[:, -1] - log_ctx[:, -1].mean(axis=0)).max()


def test_pca_ar_fit_days_ignores_masked_days():
    config, panel = tiny_config(), toy_panel()
    log_iv = panel.log_surface.copy()
    usable = np.ones(panel.n_days, dtype=bool)
    usable[100:160] = False
    usable[300:310] = False
    clean = PcaArSampler(config).fit_days(log_iv, usable)
    poisoned_iv = log_iv.copy()
    poisoned_iv[~usable] = 1e6
    poisoned = PcaArSampler(config).fit_days(poisoned_iv, usable)
    for attr in ("mean_", "components_", "intercept_", "phi_", "innovations_", "residuals_"):
        np.testing.assert_allclose(getattr(poisoned, attr), getattr(clean, attr),
                                   rtol=1e-10, atol=1e-12, err_msg=attr)
    poisoned_iv[~usable] = np.nan  # never touched, so NaN is fine too
    nan_fit = PcaArSampler(config).fit_days(poisoned_iv, usable)
    np.testing.assert_allclose(nan_fit.phi_, clean.phi_, rtol=1e-10)
    # Transitions that touch a masked day are dropped; the surface days on both sides remain.
    assert len(clean.innovations_) == panel.n_days - 1 - 61 - 11
    assert len(clean.residuals_) == usable.sum()
    # Without the mask the poison dominates the fit.
    everything = PcaArSampler(config).fit_days(np.where(np.isnan(poisoned_iv), 1e6, log_iv),
                                               np.ones(panel.n_days, dtype=bool))
    assert not np.allclose(everything.mean_, clean.mean_)


def test_pca_ar_refuses_bad_input():
    sampler = PcaArSampler(tiny_config())
    with pytest.raises(NotFittedError):
        sampler.mean_path(np.zeros((1, 12, 2, 3)))
    log_iv = toy_panel().log_surface
    with pytest.raises(DataError, match="bool mask"):
        sampler.fit_days(log_iv, np.ones(len(log_iv), dtype=int))
    with pytest.raises(DataError, match="usable"):
        sampler.fit_days(log_iv, np.zeros(len(log_iv), dtype=bool))
