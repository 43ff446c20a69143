"""The oracle: the synthetic market's true conditional distribution, a ceiling for every method.

A context is located in the market's simulated history by its last two days; the
paths are then drawn from the hidden state (regime, log-vol, factors) of that day,
with the same transition that simulated the history. Real data has no hidden state,
so the oracle exists only on the synthetic market.
"""

from __future__ import annotations

import numpy as np

from engine.data.panel import Panel
from engine.data.synthetic import SyntheticMarket
from engine.errors import ConfigError, DataError
from engine.samplers.base import ConditionalSampler

MATCH_TOL = 1e-8  # max |log-IV| difference for a context day to count as a history day


class OracleSampler(ConditionalSampler):
    """Paths from ``SyntheticMarket.log_oracle`` at the day each context ends on."""

    name = "oracle"

    def _fit(self, panel: Panel, model) -> None:
        market = panel.market
        if not isinstance(market, SyntheticMarket):
            raise ConfigError(f"sampler 'oracle' needs the synthetic market (data.source = "
                              f"'synthetic'); {panel.source} is real data and has no hidden state")
        market.simulate()
        # The whole history is indexed, not only the fitted panel's days: the oracle
        # knows the hidden state of every day, and it is asked about later windows.
        log_surface = market.log_surface_  # (T, n_m, n_tau)
        self.market_ = market
        # Sorted key (the ATM short-maturity point) to find candidate days by bisection.
        key = log_surface[:, log_surface.shape[1] // 2, 0]
        self.key_order_ = np.argsort(key, kind="stable")
        self.sorted_key_ = key[self.key_order_]

    def locate(self, log_contexts: np.ndarray) -> np.ndarray:
        """The history day t on which each context (B, C, n_m, n_tau) in log-IV ends, (B,)."""
        log_surface = self.market_.log_surface_
        mid = log_surface.shape[1] // 2
        days = np.empty(len(log_contexts), dtype=np.int64)
        for b, ctx in enumerate(log_contexts):
            lo, hi = np.searchsorted(self.sorted_key_, [ctx[-1, mid, 0] - MATCH_TOL,
                                                        ctx[-1, mid, 0] + MATCH_TOL])
            found = -1
            for t in self.key_order_[lo:hi]:
                n_back = min(2, len(ctx), t + 1)  # the last two days, or fewer at day 0
                if np.abs(log_surface[t - n_back + 1:t + 1] - ctx[-n_back:]).max() <= MATCH_TOL:
                    found = int(t)
                    break
            if found < 0:
                raise DataError(f"context row {b} is not a window of the synthetic market's "
                                "history; the oracle only forecasts days it simulated")
            days[b] = found
        return days

    def _sample(self, log_contexts: np.ndarray, n_samples: int,
                rngs: list[np.random.Generator]) -> np.ndarray:
        days = self.locate(log_contexts)
        out = np.empty((len(days), n_samples, self.horizon, *self.grid_))  # (B, M, H, n_m, n_tau)
        for b, t in enumerate(days):
            out[b] = self.market_.log_oracle(t, n_samples, self.horizon, rngs[b])
        return out
