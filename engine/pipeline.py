"""The steps that every command shares: load and split the data, get a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.data.io import load_panel
from engine.data.panel import Panel, Splits, make_splits
from engine.errors import CheckpointError, EmptySplitError, first_line
from engine.model import CVAE, load_checkpoint, save_checkpoint
from engine.train import pick_device, progress_bar, train_model


@dataclass
class Prepared:
    config: Config
    panel: Panel
    splits: Splits

    def fit_panel(self) -> Panel:
        """The history a sampler may learn from: everything before the test split's embargo."""
        return self.panel.slice_days(0, self.splits.pre_test_stop())


def prepare(config: Config, evaluation: bool = False, console=None,
            run: bool = False) -> Prepared:
    """Load and split the data; ``evaluation`` adds the synthetic market's test extension.
    ``console``: where notes go (``Panel.notes``: points data.fill filled, gaps in the data's
    calendar, repeated days; split shares that replaced the default ones on a short
    history). ``run``: for `run`, `mc` and `fit`, which use the train split alone, and only
    to train a CVAE: ``run_splits``, whose note the fit prints where it trains one."""
    panel = load_panel(config.data, evaluation=evaluation)
    for note in panel.notes():
        if console is not None:
            console.print(f"note: {note}", markup=False)  # a path may hold [brackets]
    splits = run_splits(panel, config.data) if run else make_splits(panel, config.data)
    if console is not None and splits.note is not None and not run:
        console.print(f"note: {splits.note}")
    return Prepared(config, panel, splits)


def run_splits(history: Panel, data_cfg) -> Splits:
    """The splits whose train split a run's CVAE learns from: the config's, or, where they
    leave a split of ``history`` without a window (a short history, or a start early in the
    data), every window of it: a run holds nothing out (its sampler calibrates on the
    cross-fitted bank), so it needs no calibration or test split."""
    t = history.n_days
    try:
        splits = make_splits(history, data_cfg)
        if splits.note is None:
            return splits
        # the default shares leave a split empty and smaller train shares stand in, for
        # evaluate's sake: a run takes every window, as where no shares fit at all
        why = "the default data.split_fractions leave a split without a complete window"
    except EmptySplitError as err:  # not a config's mistake (dates out of order): raised
        why = first_line(err).split(";")[0]
    note = (f"the {t} days up to {history.dates[-1]} are too few for the train / calibration "
            f"/ test splits ({why}); a run uses none of them but train, so the CVAE (the kNN "
            "keys) learns from every window of those days")
    whole = {"train": (0, t), "calibration": (t, t), "test": (t, t)}
    return Splits(data_cfg.context, data_cfg.horizon, data_cfg.embargo_days, whole, note)


def get_model(prep: Prepared, model_path: Path | None, console=None) -> CVAE:
    """Load a checkpoint that matches the data, or train one on the train split."""
    if model_path is not None:
        model, meta = load_checkpoint(model_path, str(pick_device(prep.config.train.device)))
        check_model_matches(model, meta, prep, model_path)
        return model
    if console is not None:
        console.print(f"training the CVAE on {len(prep.splits.anchors('train'))} windows")
    with progress_bar(console is not None) as progress:
        return train_model(prep.panel, prep.splits.anchors("train"), prep.config,
                           progress=progress).model


def check_model_matches(model: CVAE, meta: dict, prep: Prepared, path: Path) -> None:
    C, H = prep.config.data.context, prep.config.data.horizon
    if tuple(model.grid_shape) != prep.panel.grid_shape:
        raise CheckpointError(f"{path} was trained on a {model.grid_shape} grid but the data has "
                              f"{prep.panel.grid_shape}; train a model on this data")
    if (model.context, model.horizon) != (C, H):
        raise CheckpointError(f"{path} has context {model.context} / horizon {model.horizon} but "
                              f"the config asks for {C} / {H}; retrain or match data.context / "
                              "data.horizon")
    if meta.get("fingerprint") != prep.panel.history_fingerprint:
        raise CheckpointError(f"{path} was trained on data {meta.get('fingerprint')} but "
                              f"{prep.panel.source} has fingerprint "
                              f"{prep.panel.history_fingerprint}; train a model on this data")


def p50_errors(model: CVAE, prep: Prepared, horizons=(1, 30, 90)) -> dict:
    """Test-split mean absolute error (iv units) of the p50 and of persistence, per horizon."""
    C, H = prep.config.data.context, prep.config.data.horizon
    anchors = prep.splits.anchors("test")
    ctx = prep.panel.contexts_at(anchors, C)
    tgt = prep.panel.surface[anchors[:, None] + np.arange(1, H + 1)[None]]
    med = np.exp(model.median(ctx))
    last = np.exp(ctx[:, -1])
    out = {}
    for h in [h for h in horizons if h <= H]:
        out[h] = {"p50": float(np.abs(med[:, h - 1] - tgt[:, h - 1]).mean()),
                  "persistence": float(np.abs(last - tgt[:, h - 1]).mean())}
    return out


def train_and_report(prep: Prepared, out: Path, console) -> dict:
    splits = prep.splits
    console.print(f"data {prep.panel.source}: {prep.panel.n_days} days, grid "
                  f"{prep.panel.grid_shape[0]}x{prep.panel.grid_shape[1]}, fingerprint "
                  f"{prep.panel.fingerprint}; windows train {len(splits.anchors('train'))}, "
                  f"calibration {len(splits.anchors('calibration'))}, "
                  f"test {len(splits.anchors('test'))}")
    with progress_bar(True) as progress:
        result = train_model(prep.panel, splits.anchors("train"), prep.config, progress=progress)
    path = save_checkpoint(result.model, out, prep.config, prep.panel.fingerprint,
                           prep.panel.grid_dict(), result.history)
    errors = p50_errors(result.model, prep)
    if result.val_pinball is not None:
        console.print(f"validation pinball loss (log-IV) {result.val_pinball:.5f} at epoch "
                      f"{result.best_epoch} of {len(result.history)} (early stopping)")
    console.print(f"trained in {result.seconds:.1f}s")
    console.print("test-split p50 mean absolute error (iv units) vs persistence:")
    for h, e in errors.items():
        console.print(f"  horizon {h:>3}d: p50 {e['p50']:.5f}   persistence {e['persistence']:.5f}")
    console.print(f"saved model to {path}")
    return {"val_pinball": result.val_pinball, "errors": errors, "path": str(path)}
