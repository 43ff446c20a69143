"""The built-in synthetic market: log-IV surfaces with hidden stochastic volatility and regimes.

The market knows its hidden state, so it can draw the *true* conditional distribution
of any future window (the oracle), which real data never gives.

Grid: moneyness m_i in (0.8, 0.9, 1.0, 1.1, 1.2), maturities d_j in (30, 91, 182, 365, 730)
days. Hidden state on day t: regime r_t in {0 calm, 1 stressed}, log-vol h_t, and the
factors F_t = (L_t, S_t, U_t): level (log-IV at 30 days ATM), skew, term slope
(log-IV at 730 days minus 30 days, ATM). One day's transition, shared by the history
and the oracle (``transition``), with u ~ U(0, 1), z ~ N(0, I_4) fresh each day:

    regime    r_{t+1} = 1 - r_t  if u < p_enter (r_t = 0) or u < p_exit (r_t = 1), else r_t
    entry     e_{t+1} = 1[r_t = 0 and r_{t+1} = 1]
    shocks    eps = chol(R) z[:3]                  (correlated level / skew / slope)
              eta = rho * eps_L + sqrt(1 - rho^2) z[3]   (vol rises with the level)
    factors   F_{t+1} = F_t + kappa[r_{t+1}] * (mu_F[r_{t+1}] - F_t) + e_{t+1} * jump_F
                        + exp(h_t) * sigma_F * eps
    log-vol   h_{t+1} = mu_h[r_{t+1}] + phi_h * (h_t - mu_h[r_{t+1}]) + sigma_h[r_{t+1}] * eta

The observed surface adds iid measurement noise to a linear map of the factors:

    log iv_t(m_i, d_j) = L_t + S_t * x_i * (30 / d_j)^skew_decay + U_t * phi_j
                         + curvature * x_i^2 * (30 / d_j)^0.5 + noise * xi_{t,i,j}
    x_i = ln m_i,  phi_j = ln(d_j / 30) / ln(730 / 30),  xi ~ N(0, 1)

In the stressed regime the level mean rises (with a jump on entry), the term slope
inverts (short maturities above long) and the factors' volatility exp(h) grows.
Every parameter is a field of ``MarketParams`` (defaults below). The history starts
after ``BURN_IN`` discarded days, so day 0 is drawn from (near) the stationary law.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.config import SyntheticConfig
from engine.data.panel import Panel
from engine.errors import DataError
from engine.rng import SeedLike, as_generator

MONEYNESS = np.array([0.8, 0.9, 1.0, 1.1, 1.2])
MATURITY_DAYS = np.array([30.0, 91.0, 182.0, 365.0, 730.0])
FACTORS = ("level", "skew", "term_slope")
BURN_IN = 500


@dataclass(frozen=True)
class MarketParams:
    """Parameters of the synthetic market; index [0] is calm, [1] stressed."""

    p_enter: float = 1 / 400  # calm -> stressed per day (mean calm spell 400 days)
    p_exit: float = 1 / 50  # stressed -> calm per day (mean stress spell 50 days)
    # Mean reversion of (L, S, U) per day; faster in stress (spikes decay quickly).
    kappa: tuple[tuple[float, float, float], ...] = ((0.02, 0.03, 0.03), (0.05, 0.03, 0.05))
    mu_level: tuple[float, float] = (float(np.log(0.165)), float(np.log(0.36)))
    mu_skew: tuple[float, float] = (-2.0, -1.8)
    mu_slope: tuple[float, float] = (0.18, -0.45)
    jump: tuple[float, float, float] = (0.35, 0.0, -0.3)  # factor jump on entering stress
    sigma: tuple[float, float, float] = (0.04, 0.04, 0.02)  # daily factor vol at h = 0
    corr: tuple[float, float, float] = (0.2, -0.7, -0.1)  # corr(L,S), corr(L,U), corr(S,U)
    rho_vol: float = 0.3  # corr(level shock, log-vol shock)
    mu_log_vol: tuple[float, float] = (0.0, float(np.log(2.0)))  # stress doubles factor vol
    phi_log_vol: float = 0.95
    sigma_log_vol: tuple[float, float] = (0.07, 0.09)
    skew_decay: float = 0.4
    curvature: float = 1.0
    noise: float = 0.01  # iid measurement noise of log-IV

    # Derived arrays, built once (numpy-friendly views of the tuples above).
    factor_mean: np.ndarray = field(init=False, repr=False, compare=False)  # (2, 3)
    chol: np.ndarray = field(init=False, repr=False, compare=False)  # (3, 3)
    base: np.ndarray = field(init=False, repr=False, compare=False)  # (5, 5)
    loadings: np.ndarray = field(init=False, repr=False, compare=False)  # (3, 5, 5)

    def __post_init__(self):
        mean = np.array([[self.mu_level[r], self.mu_skew[r], self.mu_slope[r]] for r in (0, 1)])
        c_ls, c_lu, c_su = self.corr
        corr = np.array([[1.0, c_ls, c_lu], [c_ls, 1.0, c_su], [c_lu, c_su, 1.0]])
        x = np.log(MONEYNESS)[:, None]  # (n_m, 1)
        short = (MATURITY_DAYS[0] / MATURITY_DAYS)[None, :]  # (1, n_tau)
        phi = np.log(MATURITY_DAYS / MATURITY_DAYS[0]) / np.log(MATURITY_DAYS[-1] / MATURITY_DAYS[0])
        loadings = np.stack([np.ones((5, 5)), x * short ** self.skew_decay,
                             np.broadcast_to(phi[None, :], (5, 5))])
        object.__setattr__(self, "factor_mean", mean)
        object.__setattr__(self, "chol", np.linalg.cholesky(corr))
        object.__setattr__(self, "base", self.curvature * x**2 * short**0.5)
        object.__setattr__(self, "loadings", loadings)


def transition(p: MarketParams, regime: np.ndarray, log_vol: np.ndarray, factors: np.ndarray,
               u: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One day of the hidden state for n paths at once.

    regime (n,) int8, log_vol (n,), factors (n, 3), u (n,) uniforms, z (n, 4) std normals
    -> the next (regime, log_vol, factors).
    """
    flip = np.where(regime == 0, u < p.p_enter, u < p.p_exit)
    new_regime = np.where(flip, 1 - regime, regime).astype(np.int8)
    entry = ((regime == 0) & (new_regime == 1)).astype(np.float64)  # (n,)
    eps = z[:, :3] @ p.chol.T  # (n, 3)
    eta = p.rho_vol * eps[:, 0] + np.sqrt(1.0 - p.rho_vol**2) * z[:, 3]
    kappa = np.asarray(p.kappa)[new_regime]  # (n, 3)
    new_factors = (factors + kappa * (p.factor_mean[new_regime] - factors)
                   + entry[:, None] * np.asarray(p.jump)
                   + np.exp(log_vol)[:, None] * np.asarray(p.sigma) * eps)
    mu_h = np.asarray(p.mu_log_vol)[new_regime]
    # No jump in h on entry: a stress spell re-entered while h is still high would
    # compound it into daily level moves of 25%+, far beyond any real surface.
    new_log_vol = mu_h + p.phi_log_vol * (log_vol - mu_h) + np.asarray(p.sigma_log_vol)[new_regime] * eta
    return new_regime, new_log_vol, new_factors


def factor_surface(p: MarketParams, factors: np.ndarray) -> np.ndarray:
    """Noise-free log-IV of factors (..., 3) -> (..., 5, 5)."""
    return p.base + np.tensordot(factors, p.loadings, axes=([-1], [0]))


def _chain(p: MarketParams, state, u: np.ndarray, z: np.ndarray, burn_in: int):
    """Run one path of the hidden state over the days of ``u`` / ``z`` from ``state``;
    returns (regimes, log_vols, factors) of the days after the first ``burn_in``."""
    regime, log_vol, factors = state
    T = len(u) - burn_in
    regimes, log_vols, factor_path = np.empty(T, dtype=np.int8), np.empty(T), np.empty((T, 3))
    for s in range(len(u)):
        regime, log_vol, factors = transition(p, regime, log_vol, factors, u[s:s + 1], z[s:s + 1])
        t = s - burn_in
        if t >= 0:
            regimes[t], log_vols[t], factor_path[t] = regime[0], log_vol[0], factors[0]
    return regimes, log_vols, factor_path


class SyntheticMarket:
    """A simulated history of 5x5 surfaces whose hidden state is kept for the oracle."""

    moneyness = MONEYNESS
    maturity_days = MATURITY_DAYS

    def __init__(self, cfg: SyntheticConfig, params: MarketParams | None = None,
                 extra_days: int = 0):
        self.cfg = cfg
        self.params = params if params is not None else MarketParams()
        self.extra_days = int(extra_days)

    @property
    def history_days(self) -> int:
        """The ``n_days`` history: the same bytes whatever ``extra_days`` follow it."""
        return self.cfg.n_days

    @property
    def n_days(self) -> int:
        return self.cfg.n_days + self.extra_days

    def simulate(self) -> SyntheticMarket:
        """Simulate the history once; sets regime_, log_vol_, factors_, log_surface_.

        ``extra_days`` continue the same chain from the history's last state with a
        stream of their own, so the history is unchanged by them.
        """
        if hasattr(self, "log_surface_"):
            return self
        p, T = self.params, self.cfg.n_days
        rng = np.random.default_rng(np.random.SeedSequence([int(self.cfg.seed), 0x5E7]))
        n_steps = BURN_IN + T
        u = rng.random(n_steps)
        z = rng.standard_normal((n_steps, 4))
        noise = rng.standard_normal((T, 5, 5))
        state = (np.zeros(1, dtype=np.int8), np.zeros(1), p.factor_mean[0][None, :].copy())
        parts = [_chain(p, state, u, z, BURN_IN)]
        surfaces = [factor_surface(p, parts[0][2]) + p.noise * noise]
        if self.extra_days:
            rng = np.random.default_rng(np.random.SeedSequence([int(self.cfg.seed), 0x5E7, 1]))
            E = self.extra_days
            u, z, noise = rng.random(E), rng.standard_normal((E, 4)), rng.standard_normal((E, 5, 5))
            last = tuple(a[-1:] for a in parts[0])
            parts.append(_chain(p, last, u, z, 0))
            surfaces.append(factor_surface(p, parts[1][2]) + p.noise * noise)
        self.regime_, self.log_vol_, self.factors_ = (np.concatenate(a) for a in zip(*parts))
        self.log_surface_ = np.concatenate(surfaces)
        return self

    def panel(self) -> Panel:
        self.simulate()
        start = np.datetime64(self.cfg.start_date, "D")
        dates = np.busday_offset(start, np.arange(self.n_days), roll="forward")
        return Panel(np.exp(self.log_surface_), dates, MONEYNESS.copy(), MATURITY_DAYS.copy(),
                     source="synthetic", market=self)

    def log_oracle(self, t: int, n_paths: int, horizon: int, rng: SeedLike) -> np.ndarray:
        """True conditional law of log-IV on days t+1..t+horizon given the hidden state at t.

        Returns (n_paths, horizon, 5, 5); the horizon may run past the simulated history.
        """
        self.simulate()
        t, n_paths, horizon = int(t), int(n_paths), int(horizon)
        if not 0 <= t < self.n_days:
            raise DataError(f"oracle day t = {t} is outside the simulated history "
                            f"[0, {self.n_days}); pick a day of the history")
        if n_paths < 1 or horizon < 1:
            raise DataError(f"oracle needs n_paths >= 1 and horizon >= 1, got {n_paths}, {horizon}")
        p, gen = self.params, as_generator(rng)
        regime = np.full(n_paths, self.regime_[t], dtype=np.int8)
        log_vol = np.full(n_paths, self.log_vol_[t])
        factors = np.repeat(self.factors_[t][None, :], n_paths, axis=0)
        out = np.empty((n_paths, horizon, 3))
        for h in range(horizon):
            regime, log_vol, factors = transition(p, regime, log_vol, factors,
                                                  gen.random(n_paths),
                                                  gen.standard_normal((n_paths, 4)))
            out[:, h] = factors
        noise = gen.standard_normal((n_paths, horizon, 5, 5))
        return factor_surface(p, out) + p.noise * noise  # (n_paths, H, 5, 5)

    def oracle(self, t: int, n_paths: int, horizon: int, rng: SeedLike) -> np.ndarray:
        """As ``log_oracle`` in iv units, (n_paths, horizon, 5, 5)."""
        return np.exp(self.log_oracle(t, n_paths, horizon, rng))
