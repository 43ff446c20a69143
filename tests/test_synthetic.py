"""The synthetic market (ranges, regimes, determinism) and its oracle (true conditional law)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from scipy import stats

from engine.config import SyntheticConfig
from engine.data.panel import Panel
from engine.data.synthetic import MATURITY_DAYS, MONEYNESS, SyntheticMarket, transition
from engine.errors import ConfigError, DataError
from engine.samplers import make_sampler
from tests.conftest import tiny_config, toy_panel
from tests.contract import SamplerContract

ATM, SHORT, LONG = 2, 0, 4


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    """A long history (6000 business days, default seed)."""
    start = time.perf_counter()
    m = SyntheticMarket(SyntheticConfig(n_days=6000)).simulate()
    print(f"simulated 6000 days in {time.perf_counter() - start:.3f} s")
    return m


def test_hidden_state_shapes(market):
    T = 6000
    assert market.regime_.shape == (T,) and market.regime_.dtype == np.int8
    assert set(np.unique(market.regime_)) == {0, 1}
    assert market.log_vol_.shape == (T,)
    assert market.factors_.shape == (T, 3)
    assert market.log_surface_.shape == (T, 5, 5)
    assert np.isfinite(market.log_surface_).all()


def test_realistic_ranges(market):
    iv = np.exp(market.log_surface_)
    atm = iv[:, ATM, SHORT]
    q05, q50, q95 = np.percentile(atm, [5, 50, 95])
    print(f"30d ATM q05 {q05:.3f} q50 {q50:.3f} q95 {q95:.3f} max {atm.max():.3f}")
    assert 0.08 <= q05 and q95 <= 0.40
    assert ((atm > 0.10) & (atm < 0.35)).mean() > 0.9
    assert atm.max() > 0.6
    # Negative skew: the 0.8 put wing above the 1.2 call wing, on (almost) every day.
    skew = iv[:, 0, SHORT] - iv[:, -1, SHORT]
    assert skew.mean() > 0 and (skew > 0).mean() > 0.99


def test_regime_effects(market):
    iv = np.exp(market.log_surface_)
    stressed = market.regime_ == 1
    print(f"stressed share {stressed.mean():.3f}")
    assert 0.01 < stressed.mean() < 0.3
    atm_short, atm_long = iv[:, ATM, SHORT], iv[:, ATM, LONG]
    assert atm_short[stressed].mean() > 1.5 * atm_short[~stressed].mean()
    # Term structure inverts in stress, slopes up in calm.
    assert atm_short[stressed].mean() > atm_long[stressed].mean()
    assert atm_short[~stressed].mean() < atm_long[~stressed].mean()
    # Larger daily moves in stress (the hidden vol of the factors rises).
    move = np.abs(np.diff(market.log_surface_[:, ATM, SHORT]))
    assert move[stressed[1:]].mean() > 1.3 * move[~stressed[1:]].mean()
    assert market.log_vol_[stressed].mean() > market.log_vol_[~stressed].mean()


def test_calendar_violations_rare(market):
    iv = np.exp(market.log_surface_)
    total_var = iv**2 * MATURITY_DAYS  # (T, n_m, n_tau)
    bad_days = (np.diff(total_var, axis=2) < 0).any(axis=(1, 2))
    stressed = market.regime_ == 1
    assert bad_days.mean() < 0.02
    assert bad_days[stressed].mean() < 0.05


def test_deterministic_per_seed():
    a = SyntheticMarket(SyntheticConfig(n_days=300, seed=3)).panel()
    b = SyntheticMarket(SyntheticConfig(n_days=300, seed=3)).panel()
    c = SyntheticMarket(SyntheticConfig(n_days=300, seed=4)).panel()
    assert a.surface.tobytes() == b.surface.tobytes()
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_test_extension_continues_the_history_unchanged():
    """``extra_days`` (evaluate's test extension) leave the history's bytes alone and carry on
    from its last hidden state, not from a fresh start."""
    cfg = SyntheticConfig(n_days=400, seed=3)
    plain = SyntheticMarket(cfg).panel()
    long = SyntheticMarket(cfg, extra_days=600).panel()
    assert (plain.n_days, long.n_days, long.history_days) == (400, 1000, 400)
    assert long.surface[:400].tobytes() == plain.surface.tobytes()
    assert long.history_fingerprint == plain.fingerprint == plain.history_fingerprint
    assert long.fingerprint != plain.fingerprint
    np.testing.assert_array_equal(long.dates[:400], plain.dates)
    assert (np.diff(long.dates).astype(int) > 0).all()
    # The seam is an ordinary day: its level move is within the spread of the others.
    moves = np.abs(np.diff(long.log_surface[:, ATM, SHORT]))
    assert moves[399] < np.quantile(moves, 0.999)
    m = long.market
    assert len(m.regime_) == len(m.log_vol_) == len(m.factors_) == 1000
    # One step from day 399's state reaches day 400's factors with an ordinary shock.
    assert np.abs(m.factors_[400] - m.factors_[399]).max() < 0.5


def test_panel():
    market = SyntheticMarket(SyntheticConfig(n_days=250, start_date="2001-06-01"))
    panel = market.panel()
    assert isinstance(panel, Panel) and panel.source == "synthetic" and panel.market is market
    assert panel.surface.shape == (250, 5, 5) and (panel.surface > 0).all()
    np.testing.assert_array_equal(panel.moneyness, MONEYNESS)
    np.testing.assert_array_equal(panel.maturity_days, MATURITY_DAYS)
    assert panel.dates[0] == np.datetime64("2001-06-01")
    assert np.is_busday(panel.dates).all() and (np.diff(panel.dates).astype(int) > 0).all()
    np.testing.assert_allclose(panel.log_surface, market.log_surface_, atol=1e-12)
    assert panel.slice_days(0, 100).market is market


def test_transition_batch_matches_one_path():
    """The vectorized step gives each path what a one-path step gives it (history == oracle)."""
    p = SyntheticMarket(SyntheticConfig(n_days=200)).params
    rng = np.random.default_rng(0)
    n = 7
    regime = rng.integers(0, 2, n).astype(np.int8)
    log_vol, factors = rng.normal(0, 0.3, n), rng.normal(0, 0.3, (n, 3))
    u, z = rng.random(n), rng.standard_normal((n, 4))
    batch = transition(p, regime, log_vol, factors, u, z)
    for i in range(n):
        one = transition(p, regime[i:i + 1], log_vol[i:i + 1], factors[i:i + 1], u[i:i + 1],
                         z[i:i + 1])
        for a, b in zip(batch, one):
            np.testing.assert_allclose(a[i:i + 1], b, rtol=0, atol=1e-15)


def test_oracle_shape_past_history_end():
    market = SyntheticMarket(SyntheticConfig(n_days=300))
    out = market.oracle(299, 5, 630, np.random.default_rng(1))
    assert out.shape == (5, 630, 5, 5) and np.isfinite(out).all() and (out > 0).all()
    np.testing.assert_array_equal(out, np.exp(market.log_oracle(299, 5, 630, 1)))
    with pytest.raises(DataError, match="outside the simulated history"):
        market.oracle(300, 5, 10, 0)


@pytest.mark.parametrize("h", [1, 20])
@pytest.mark.parametrize("point", [(ATM, SHORT), (0, 3)])
def test_oracle_pit_uniform(market, h, point):
    """The realised value at t + h is a uniform draw under the oracle's law at t."""
    i, j = point
    days = np.arange(50, market.n_days - h, 40)  # 40 apart: 20-day windows do not overlap
    pit, oracle_change, real_change = [], [], []
    for k, t in enumerate(days):
        paths = market.log_oracle(t, 400, h, np.random.default_rng([11, h, k]))[:, -1, i, j]
        realised = market.log_surface_[t + h, i, j]
        pit.append(((paths < realised).mean() + (paths <= realised).mean()) / 2)
        oracle_change.append(paths - market.log_surface_[t, i, j])
        real_change.append(realised - market.log_surface_[t, i, j])
    p_value = stats.kstest(pit, "uniform").pvalue
    print(f"h={h} point={point} n={len(days)} KS p={p_value:.3f}")
    assert p_value > 0.01
    oracle_change, real_change = np.concatenate(oracle_change), np.array(real_change)
    scale = real_change.std()
    assert abs(oracle_change.mean() - real_change.mean()) < 0.25 * scale
    assert 0.8 < oracle_change.std() / scale < 1.25


def _pit_and_z2(market, days, h, seed):
    """PIT and squared standardised error of the realised 30d ATM log-IV at t + h."""
    pit, z2 = np.empty(len(days)), np.empty(len(days))
    for k, t in enumerate(days):
        paths = market.log_oracle(t, 200, h, np.random.default_rng([seed, h, k]))[:, -1, ATM, SHORT]
        realised = market.log_surface_[t + h, ATM, SHORT]
        pit[k] = ((paths < realised).mean() + (paths <= realised).mean()) / 2
        z2[k] = (realised - paths.mean()) ** 2 / paths.var()
    return pit, z2


def test_oracle_calibrated_where_hidden_state_matters(market):
    """PITs stay uniform and errors the right size on stressed and high-vol days.

    Checked by hand on the default history: an oracle that ignores the hidden vol, or
    uses yesterday's factors, fails the one-day part; one that ignores the regime
    fails the 20-day part (mean z^2 about 3 on stressed days).
    """
    days = np.arange(50, market.n_days - 1, 2)
    pit, z2 = _pit_and_z2(market, days, 1, 12)
    stressed = market.regime_[days] == 1
    high_vol = market.log_vol_[days] > np.quantile(market.log_vol_, 0.9)
    for name, rows in [("all", slice(None)), ("stressed", stressed), ("high vol", high_vol)]:
        p_value = stats.kstest(pit[rows], "uniform").pvalue
        print(f"h=1 {name}: n={len(pit[rows])} KS p={p_value:.3f} mean z^2={z2[rows].mean():.2f}")
        assert p_value > 0.01
        assert 0.7 < z2[rows].mean() < 1.4
    # 20 days ahead the regime's pull shows; windows overlap, so only the error size is checked.
    days = np.flatnonzero(market.regime_[: market.n_days - 20] == 1)[::2]
    _, z2 = _pit_and_z2(market, days, 20, 13)
    print(f"h=20 stressed: n={len(days)} mean z^2={z2.mean():.2f}")
    assert 0.6 < z2.mean() < 1.6


def test_market_pickles():
    market = SyntheticMarket(SyntheticConfig(n_days=200)).simulate()
    clone = pickle.loads(pickle.dumps(market))
    np.testing.assert_array_equal(clone.log_oracle(10, 3, 4, 0), market.log_oracle(10, 3, 4, 0))


class TestOracleContract(SamplerContract):
    name = "oracle"

    def make_panel(self):
        return SyntheticMarket(SyntheticConfig(n_days=400)).panel()


def test_oracle_sampler_matches_market():
    config = tiny_config()
    panel = SyntheticMarket(SyntheticConfig(n_days=400)).panel()
    sampler = make_sampler("oracle", config).fit(panel.slice_days(0, 200))
    # Contexts after the fitted slice are found too: the oracle indexes the whole history.
    anchors = np.array([30, 250, 399])
    ctx = panel.contexts_at(anchors, config.data.context, log=False)
    np.testing.assert_array_equal(sampler.locate(np.log(ctx)), anchors)
    rngs = [np.random.default_rng(s) for s in range(3)]
    out = sampler.sample(ctx, 6, rngs)
    expect = panel.market.oracle(250, 6, config.data.horizon, np.random.default_rng(1))
    np.testing.assert_allclose(out[1], expect, rtol=1e-12)


def test_oracle_sampler_refuses_real_data():
    with pytest.raises(ConfigError, match="needs the synthetic market"):
        make_sampler("oracle", tiny_config()).fit(toy_panel())


def test_oracle_sampler_refuses_foreign_context():
    config = tiny_config()
    panel = SyntheticMarket(SyntheticConfig(n_days=400)).panel()
    sampler = make_sampler("oracle", config).fit(panel)
    ctx = panel.contexts_at(np.array([50, 100]), config.data.context, log=False)
    ctx[1, -1] *= 1.001
    with pytest.raises(DataError, match="context row 1 is not a window"):
        sampler.sample(ctx, 4, 0)
    other = SyntheticMarket(SyntheticConfig(n_days=400, seed=99)).panel()
    with pytest.raises(DataError, match="not a window"):
        sampler.sample(other.contexts_at(np.array([50]), config.data.context, log=False), 4, 0)
