"""The sampler protocol: ``fit(panel, model) -> self``, ``sample(contexts, n_samples, rng)``.

``fit`` receives only the history the sampler may learn from (the caller cuts the
panel before the test split and its embargo), so no test information can leak.
``sample`` takes contexts (B, C, n_m, n_tau) in iv units and returns paths
(B, n_samples, H, n_m, n_tau) in iv units, positive (the work happens in log-IV).
``rng`` is one Generator / seed, or one Generator per context row: rows drawn with
their own generator give the same values whatever the batch they sit in. ``days``
(optional, one per row) are the rows' anchor days in the panel last given to
``observe``: an online-calibrated sampler uses the state it had on each day; the others
ignore them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from engine.config import Config
from engine.data.panel import Panel
from engine.errors import ConfigError, DataError, not_fitted
from engine.rng import SeedLike, row_rngs


class ConditionalSampler(ABC):
    """Draws H-day surface paths given a C-day context."""

    name: ClassVar[str] = ""
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Config):
        self.config = config

    @property
    def context(self) -> int:
        return self.config.data.context

    @property
    def horizon(self) -> int:
        return self.config.data.horizon

    def fit(self, panel: Panel, model=None) -> ConditionalSampler:
        if self.uses_model and model is None:
            raise ConfigError(f"sampler '{self.name}' needs a trained model; pass --model or let "
                              "the command train one")
        if panel.n_days < self.context + self.horizon:
            raise DataError(f"sampler '{self.name}' got {panel.n_days} days of history but needs at "
                            f"least context + horizon = {self.context + self.horizon}")
        self._fit(panel, model)
        self.grid_ = panel.grid_shape
        return self

    def is_fitted(self) -> bool:
        return hasattr(self, "grid_")

    def sample(self, contexts: np.ndarray, n_samples: int,
               rng: SeedLike | Sequence[np.random.Generator] = None,
               days: np.ndarray | None = None) -> np.ndarray:
        return np.exp(self.sample_log(contexts, n_samples, rng, days))

    def sample_log(self, contexts: np.ndarray, n_samples: int,
                   rng: SeedLike | Sequence[np.random.Generator] = None,
                   days: np.ndarray | None = None) -> np.ndarray:
        """``sample`` in log-IV (its log, without the exp and log round trip: a caller that
        needs only some days in iv units exponentiates just those)."""
        if not self.is_fitted():
            raise not_fitted(self)
        contexts = np.asarray(contexts, dtype=np.float64)
        if contexts.ndim != 4 or contexts.shape[1] != self.context or contexts.shape[2:] != self.grid_:
            raise DataError(f"contexts have shape {contexts.shape}; sampler '{self.name}' needs "
                            f"(B, {self.context}, {self.grid_[0]}, {self.grid_[1]})")
        if not (np.isfinite(contexts).all() and (contexts > 0).all()):
            raise DataError("contexts must be finite and > 0 (iv units)")
        rngs = row_rngs(rng, contexts.shape[0])
        if days is None:
            log_paths = self._sample(np.log(contexts), int(n_samples), rngs)
        else:
            days = np.asarray(days, dtype=np.int64)
            if days.shape != (contexts.shape[0],):
                raise DataError(f"days has shape {days.shape}; it needs one anchor day per "
                                f"context ({contexts.shape[0]},)")
            log_paths = self._sample_at(np.log(contexts), int(n_samples), rngs, days)
        return log_paths

    def observe(self, panel: Panel) -> None:
        """Show the sampler the days after its fit (online samplers adapt; default: nothing)."""

    def _sample_at(self, log_contexts: np.ndarray, n_samples: int,
                   rngs: list[np.random.Generator], days: np.ndarray) -> np.ndarray:
        """``_sample`` for rows anchored at ``days``; samplers without a time state ignore them."""
        return self._sample(log_contexts, n_samples, rngs)

    @abstractmethod
    def _fit(self, panel: Panel, model) -> None:
        """Learn state from the panel (set attributes with a trailing underscore)."""

    @abstractmethod
    def _sample(self, log_contexts: np.ndarray, n_samples: int,
                rngs: list[np.random.Generator]) -> np.ndarray:
        """(B, C, n_m, n_tau) log-IV -> (B, n_samples, H, n_m, n_tau) log-IV; row b uses rngs[b]."""
