"""kNN residual bootstrap: borrow variance from similar contexts.

For a context: its key in the kNN space, the K nearest contexts of the cross-fitted
residual bank (FAISS), and ``n_samples`` of their residual *paths*, drawn with
distance-kernel weights, each added to the point forecast (the CVAE's p50, or the
pca-ar mean) of the fold model that made that residual (CV+: see ``bank``). Residual
paths are real errors, so samples keep the roughness and the cross-grid correlation of
real surfaces.

The work splits in two so that the engine can place each half on its own actor:
``point_and_keys`` (the decoder's part) and ``draw`` (the kNN part).
"""

from __future__ import annotations

import copy

import numpy as np

from engine.data.panel import Panel
from engine.errors import ConfigError, DataError, not_fitted
from engine.knn import KnnIndex, kernel_weights
from engine.samplers.bank import (
    KeySpace,
    bank_anchors,
    build_bank,
    fold_plan,
    fold_training_windows,
    point_forecast,
)
from engine.samplers.base import ConditionalSampler

# fewer distinct residual paths than this cannot hold both tails of a 90% band
MIN_EPISODES = 10


def check_episodes(n_days: int, config) -> int:
    """The days of an episode (``sampler.episode_days``, or a third of the horizon); refuse
    a history of ``n_days`` whose bank windows fall in fewer than MIN_EPISODES of them."""
    episode = config.sampler.episode_days or max(1, config.data.horizon // 3)
    anchors = bank_anchors(n_days, config.data.context, config.data.horizon)
    n = len(np.unique(anchors // episode))
    if n < MIN_EPISODES:
        raise DataError(
            f"the history holds {n} episodes of {episode} days (sampler.episode_days), too "
            f"few for a kNN law: a 90% band needs at least {MIN_EPISODES} distinct residual "
            "paths; lower sampler.episode_days (0 = a third of the horizon) or give more "
            "history")
    return episode


def check_history(n_days: int, config, point: str) -> None:
    """Refuse, before anything trains, a history of ``n_days`` too short for the residual
    bank of a ``point`` forecast (``fold_plan``) or for MIN_EPISODES episodes."""
    C, H = config.data.context, config.data.horizon
    fold_plan(bank_anchors(n_days, C, H), config, point)
    check_episodes(n_days, config)


def min_history(config, point: str) -> int:
    """The fewest days of history that ``check_history`` accepts."""
    n = config.data.context + config.data.horizon
    while True:  # a few hundred steps at most: every day adds a window
        try:
            check_history(n, config, point)
            return n
        except DataError:
            n += 1


class KnnResidualSampler(ConditionalSampler):
    name = "knn"

    @property
    def uses_model(self) -> bool:
        """Only the CVAE embedding needs the main CVAE: the point forecasts come from the
        bank's own fold models (CV+), which it trains itself."""
        return self.config.sampler.embedding == "cvae"

    progress = None  # a rich Progress for the cross-fitting, set by the caller if wanted

    def _fit(self, panel: Panel, model) -> None:
        cfg = self.config.sampler
        self._check_model(model)
        # One neighbour per episode (a block of `episode` days): windows a few days apart
        # share most of their target days, so their residual paths are near copies.
        self.episode_ = check_episodes(panel.n_days, self.config)  # before the bank's
        # cross-fitting, which trains models
        self.bank_ = build_bank(panel, self.config, cfg.point, progress=self.progress)
        self.groups_ = self.bank_.anchors // self.episode_
        # A quarter of the episodes: local, yet >= 20 so a 90% band has two draws per tail.
        self.k_ = cfg.k if cfg.k else int(np.clip(self.n_episodes // 4, 20, 100))
        self.k_ = min(self.k_, self.n_episodes)
        self.point_models_ = list(self.bank_.models)
        self._fit_keys(panel, model)

    def _check_model(self, model) -> None:
        if self.config.sampler.embedding == "cvae" and (model.context, model.horizon) != (
                self.context, self.horizon):
            raise ConfigError(f"model has context/horizon {model.context}/{model.horizon}, the "
                              f"config {self.context}/{self.horizon}; retrain the model")

    def _fit_keys(self, panel: Panel, model) -> None:
        """The key space and its index over the bank's contexts (and, in subclasses, what
        depends on the neighbours: the conformal scores)."""
        embedding = self.config.sampler.embedding
        self.keys_ = KeySpace(embedding, model if embedding == "cvae" else None)
        self.index_ = KnnIndex(self.keys_.fit(panel.contexts_at(self.bank_.anchors,
                                                                self.context)))

    def rekeyed(self, config, panel: Panel, model):
        """This fitted sampler searching the key space of ``config`` (only
        ``sampler.embedding`` and the conformal settings may differ), on the same bank:
        it samples as one fitted from scratch under ``config`` would, without training the
        fold models again. ``panel`` is the fitted history."""
        same = ("point", "k", "episode_days", "kernel", "n_folds")
        if config.data != self.config.data or config.seed != self.config.seed or \
                config.model != self.config.model or config.train != self.config.train or \
                any(getattr(config.sampler, f) != getattr(self.config.sampler, f) for f in same):
            raise ConfigError("rekeyed() may change only sampler.embedding and the conformal "
                              "settings")
        if not self.is_fitted():
            raise not_fitted(self)
        other = copy.copy(self)
        other.config = config
        if other.uses_model and model is None:
            raise ConfigError("the CVAE embedding needs the trained model; pass it")
        other.__dict__.pop("scale_path_", None)  # an online path of the old keys' scores
        other._check_model(model)
        other._fit_keys(panel, model)
        return other

    @property
    def n_episodes(self) -> int:
        return len(np.unique(self.groups_))

    def bank_summary(self) -> str:
        return (f"residual bank of {len(self.bank_.anchors)} windows in {self.n_episodes} "
                f"episodes of {self.episode_} days, k = {self.k_} neighbours")

    def locality_note(self, label: str | None = None) -> str | None:
        """A warning when the neighbours are most of the bank (a short history): the law
        is then close to the pooled one, not conditional on the context. ``label`` names
        the sampler in it (default: its name)."""
        if 2 * self.k_ <= self.n_episodes:
            return None
        return (f"{label or self.name} takes k = {self.k_} neighbours out of only {self.n_episodes} "
                f"episodes of history, so they are hardly local and its law is close to the "
                f"pooled one; more history, or a smaller sampler.k, makes it conditional")

    def notes(self, label: str | None = None) -> list[str]:
        """The warnings a caller prints after the fit: locality, then the fold models."""
        return [n for n in (self.locality_note(label), self.fold_note(label)) if n is not None]

    def fold_note(self, label: str | None = None) -> str | None:
        """A warning when the embargo took more than half of the windows outside a CVAE fold
        model's block (a short history): that model, whose errors are the residuals drawn
        around every context, was fit on far less than the history. (pca-ar fold models fit
        on days.)"""
        if self.config.sampler.point != "cvae":
            return None
        kept, outside = min(fold_training_windows(self.bank_, self.config),
                            key=lambda ko: ko[0] / ko[1])
        if 2 * kept >= outside:
            return None
        return (f"{label or self.name}'s cross-fitted bank leaves a fold model only {kept} of the "
                f"{outside} windows outside its block to train on (the rest have targets within "
                f"data.embargo of the block's), so its residuals are wider than a model of "
                f"the whole history would make; more history or a smaller data.embargo "
                f"helps")

    # --- the decoder's half -------------------------------------------------------------------
    def point_forecast(self, log_ctx: np.ndarray) -> np.ndarray:
        """(B, F, H, n_m, n_tau) log-IV: the point path of each of the F fold models."""
        return np.stack([point_forecast(m, log_ctx) for m in self.point_models_], axis=1)

    def point_and_keys(self, log_ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.point_forecast(log_ctx), self.keys_(log_ctx)

    # --- the kNN half -------------------------------------------------------------------------
    def neighbours(self, keys: np.ndarray, exclude_fn=None, extra: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Ids (B, k) and kernel weights (B, k) of the nearest episodes."""
        d2, ids = self.index_.search(keys, self.k_, exclude_fn=exclude_fn, groups=self.groups_,
                                     n_candidates=self.k_ * self.episode_ + extra)
        return ids, kernel_weights(d2, self.config.sampler.kernel)

    def residual_draw(self, ids: np.ndarray, weights: np.ndarray, n_samples: int,
                      rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
        """Bank rows drawn (B, n_samples) and their residual paths (B, n_samples, H, n_m,
        n_tau); row b draws with rngs[b] only."""
        picks = np.stack([ids[b, rngs[b].choice(ids.shape[1], n_samples, p=weights[b])]
                          for b in range(len(ids))])
        return picks, self.bank_.residuals[picks].astype(np.float64)

    def draw(self, point: np.ndarray, keys: np.ndarray, n_samples: int,
             rngs: list[np.random.Generator], **adjust_args) -> np.ndarray:
        """point (B, F, H, n_m, n_tau) from ``point_forecast``, keys (B, D) -> log-IV paths
        (B, n_samples, H, n_m, n_tau)."""
        ids, w = self.neighbours(keys)
        picks, res = self.residual_draw(ids, w, n_samples, rngs)
        out = self.adjust(res, ids, w, **adjust_args)
        rows = np.arange(len(picks))[:, None]
        out += point[rows, self.bank_.fold[picks]]  # each residual on its own fold's forecast
        return out

    def adjust(self, res: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Hook for calibration (identity here); may work in place on ``res``, the draw's own
        float64 array."""
        return res

    def _sample(self, log_contexts, n_samples, rngs):
        point, keys = self.point_and_keys(log_contexts)
        return self.draw(point, keys, n_samples, rngs)
