"""The residual bank: out-of-sample residual paths of a point forecast, by blocked cross-fitting.

Overlapping 90-day windows of one calibration split hold only a handful of independent
episodes, so the bank covers all the history the sampler may learn from: the anchors
are cut into ``n_folds`` contiguous time blocks (fewer on a short history: ``fold_plan``);
for each block the point model is fit without that block's windows and an embargo of one
horizon on each side, and scores the block. Every residual is therefore out of sample for
the model that made it.

The fold models are kept (``ResidualBank.models``): a new context's residual drawn from
block b rides on block b's model, as in CV+ (Barber et al., 2021). A residual is a
model's own out-of-sample error, so adding it to another model's forecast (one trained
on other days, better or worse) would misstate the spread: on the synthetic market a
model trained on the train split alone made 90-day errors 13% larger than the bank's.

Keys (what the kNN index searches) are standardised context embeddings: the CVAE's
``embed`` or a hand-made feature space (level, slope, skew, recent realised vol,
recent change).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import Config
from engine.data.panel import Panel
from engine.errors import DataError
from engine.samplers.pca_ar import PcaArSampler

RV_DAYS = 20


@dataclass
class ResidualBank:
    anchors: np.ndarray  # (N,) last context day of each window
    residuals: np.ndarray  # (N, H, n_m, n_tau) float32, realised minus point, log-IV
    fold: np.ndarray  # (N,) the time block of each window
    models: list  # the point model of each block (a CVAE, or a fitted PcaArSampler)


def context_features(log_ctx: np.ndarray) -> np.ndarray:
    """Hand-made context features (B, 5): level, term slope, skew, realised vol, 20-day change."""
    last = log_ctx[:, -1]  # (B, n_m, n_tau)
    level = last.mean(axis=(1, 2))
    slope = (last[:, :, -1] - last[:, :, 0]).mean(axis=1)
    skew = (last[:, 0, :] - last[:, -1, :]).mean(axis=1)
    mean_path = log_ctx.mean(axis=(2, 3))  # (B, C)
    n = min(RV_DAYS, log_ctx.shape[1] - 1)
    rv = np.diff(mean_path[:, -n - 1 :], axis=1).std(axis=1)
    change = mean_path[:, -1] - mean_path[:, -n - 1]
    return np.stack([level, slope, skew, np.log(rv + 1e-4), change], axis=1)


class KeySpace:
    """Maps log contexts to standardised keys, fitted on the bank's contexts."""

    def __init__(self, embedding: str, model=None):
        self.embedding, self.model = embedding, model

    def raw(self, log_ctx: np.ndarray) -> np.ndarray:
        if self.embedding == "cvae":
            return self.model.embed(log_ctx)
        return context_features(log_ctx)

    def fit(self, log_ctx: np.ndarray) -> np.ndarray:
        raw = self.raw(log_ctx)
        self.mean_ = raw.mean(axis=0)
        std = raw.std(axis=0)
        # A constant feature (e.g. skew on a 1 x n grid) carries no distance information.
        self.std_ = np.where(std > 1e-12, std, np.inf)
        return self.transform_raw(raw)

    def transform_raw(self, raw: np.ndarray) -> np.ndarray:
        return (raw - self.mean_) / self.std_

    def __call__(self, log_ctx: np.ndarray) -> np.ndarray:
        return self.transform_raw(self.raw(log_ctx))


def block_train_mask(anchors: np.ndarray, block: np.ndarray, horizon: int, embargo: int) -> np.ndarray:
    """Windows whose targets stay at least ``embargo`` days clear of the block's target days.

    Only targets are kept clear: with an embargo shorter than the context (the default is one
    horizon, longer than the 60-day context) a window just after the block reads some of the
    block's target days as context, so the fold model sees them as inputs (never as outcomes).
    """
    lo, hi = block[0] + 1, block[-1] + horizon
    return (anchors + horizon < lo - embargo) | (anchors + 1 > hi + embargo)


def bank_anchors(n_days: int, context: int, horizon: int) -> np.ndarray:
    """The anchor day of every complete window (context, then horizon) of ``n_days``."""
    return np.arange(context - 1, n_days - horizon, dtype=np.int64)


def training_windows(anchors: np.ndarray, blocks: list[np.ndarray], horizon: int,
                     embargo: int) -> list[int]:
    """How many of ``anchors`` each block's fold model may train on (``block_train_mask``)."""
    return [int(block_train_mask(anchors, b, horizon, embargo).sum()) for b in blocks]


def fold_plan(anchors: np.ndarray, config: Config, point: str = "cvae") -> list[np.ndarray]:
    """The time blocks of the bank: ``sampler.n_folds`` of them where the history allows.

    A CVAE fold model trains on the windows left when its own block and, on each side of
    it, the H + E - 1 windows whose targets come within the embargo of the block's are taken
    out, so on a short history a middle block can leave its model few windows or none. Of
    the block counts from 2 up to ``n_folds`` (at most one block per horizon of windows)
    this takes the one whose worst fold keeps the most training windows, the larger count
    on a tie. On a long history that is ``n_folds`` itself: an interior fold keeps
    N - (its block) - 2 (H + E - 1) windows, more as blocks shrink, and only two blocks
    (no interior fold) can do better, where N is under about 2F (H + E) / (F - 2). A history
    where every count leaves some fold without a window is refused. The pca-ar point model
    fits on days, not windows (its own fit refuses too few), so it keeps ``n_folds``
    capped by the history.
    """
    C, H, E = config.data.context, config.data.horizon, config.data.embargo_days
    cap = min(config.sampler.n_folds, max(2, len(anchors) // max(H, 1)))
    if point != "cvae":
        return np.array_split(anchors, cap)
    best, best_kept = None, -1
    for n_folds in range(min(cap, len(anchors)), 1, -1):  # no block left empty
        blocks = np.array_split(anchors, n_folds)
        kept = min(training_windows(anchors, blocks, H, E))
        if kept > best_kept:
            best, best_kept = blocks, kept
    if best_kept < 1:
        need = 2 * (H + E) + C + H - 1  # two blocks of H + E windows: each fold keeps one
        raise DataError(
            f"the history's {len(anchors)} windows ({len(anchors) + C + H - 1} days) cannot be "
            f"cut into time blocks whose fold models keep a training window: each loses its "
            f"block and the {H + E - 1} windows on each side whose targets come within "
            f"data.embargo = {E} days of its own; give at least {need} days of history "
            f"or a smaller data.embargo")
    return best


def fold_training_windows(bank: ResidualBank, config: Config) -> list[tuple[int, int]]:
    """Per fold: the windows its model trained on (before its validation tail) and the
    windows outside its block, of which the embargo took the rest."""
    blocks = [bank.anchors[bank.fold == b] for b in range(len(bank.models))]
    kept = training_windows(bank.anchors, blocks, config.data.horizon, config.data.embargo_days)
    return [(k, len(bank.anchors) - len(b)) for k, b in zip(kept, blocks, strict=True)]


def build_bank(panel: Panel, config: Config, point: str, progress=None) -> ResidualBank:
    """Cross-fitted residual paths over every complete window of ``panel``."""
    from engine.train import train_model

    C, H, E = config.data.context, config.data.horizon, config.data.embargo_days
    anchors = bank_anchors(panel.n_days, C, H)
    blocks = fold_plan(anchors, config, point)
    n_folds = len(blocks)
    residuals = np.empty((len(anchors), H, *panel.grid_shape), dtype=np.float32)
    fold = np.empty(len(anchors), dtype=np.int64)
    models = []
    task = progress.add_task(f"cross-fit {point}", total=n_folds, info="") if progress else None
    start = 0
    for b, block in enumerate(blocks):
        mask = block_train_mask(anchors, block, H, E)
        ctx = panel.contexts_at(block, C)
        if point == "cvae":
            model = train_model(panel, anchors[mask], config, seed=config.seed + 1000 + b).model
        else:
            days = np.arange(panel.n_days)
            usable = (days < block[0] + 1 - E) | (days > block[-1] + H + E)
            model = PcaArSampler(config).fit_days(panel.log_surface, usable)
        models.append(model)
        pred = point_forecast(model, ctx)
        residuals[start : start + len(block)] = panel.targets_at(block, H) - pred
        fold[start : start + len(block)] = b
        start += len(block)
        if progress is not None:
            progress.update(task, advance=1)
    return ResidualBank(anchors, residuals, fold, models)


def point_forecast(model, log_ctx: np.ndarray) -> np.ndarray:
    """A fold model's point path (B, H, n_m, n_tau) log-IV: the CVAE's p50 or the pca-ar mean."""
    return model.median(log_ctx) if hasattr(model, "median") else model.mean_path(log_ctx)
