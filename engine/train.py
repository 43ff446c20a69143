"""Training the CVAE on a set of windows (anchors) of a panel."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import Config
from engine.data.panel import Panel
from engine.errors import ConfigError, DataError
from engine.model import CVAE


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is 'cuda' but this torch ({torch.__version__}) sees no "
                          "CUDA device; set it to 'auto' or 'cpu', or install a CUDA build")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class TrainResult:
    model: CVAE
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int | None = None

    @property
    def val_pinball(self) -> float | None:
        vals = [h["val_pinball"] for h in self.history if h.get("val_pinball") is not None]
        return min(vals) if vals else None


def train_model(panel: Panel, anchors: np.ndarray, config: Config,
                val_anchors: np.ndarray | None = None, seed: int | None = None,
                progress=None) -> TrainResult:
    """Fit a fresh CVAE on the windows ending at ``anchors``.

    ``progress`` is a rich Progress (or None for silence); it shows epoch, losses and ETA.
    Validation pinball is in log-IV units, decoded at the prior's mean z.
    """
    C, H = config.data.context, config.data.horizon
    tcfg = config.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    seed = config.seed if seed is None else seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = pick_device(tcfg.device)

    anchors = np.asarray(anchors)
    if len(anchors) == 0:
        raise DataError(f"no training window: the data holds no complete window of {C} context "
                        f"and {H} horizon days where this model may learn; give more history")
    if val_anchors is None and tcfg.val_fraction > 0:
        anchors, val_anchors = holdout_tail(anchors, tcfg.val_fraction, H)
    anchors = anchors[:: tcfg.window_stride]
    ctx = torch.as_tensor(panel.contexts_at(anchors, C), dtype=torch.float32)
    tgt = torch.as_tensor(panel.targets_at(anchors, H), dtype=torch.float32)
    model = CVAE(config.model, panel.grid_shape, C, H)
    # Standardise with the training windows' own days only.
    days = np.unique(anchors[:, None] + np.arange(-C + 1, H + 1)[None, :])
    flat = panel.log_surface[days].reshape(len(days), -1)
    model.loc.copy_(torch.as_tensor(flat.mean(0)))
    model.scale.copy_(torch.as_tensor(np.maximum(flat.std(0), 1e-3)))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs)

    val = None
    if val_anchors is not None and len(val_anchors):
        val = (torch.as_tensor(panel.contexts_at(val_anchors, C), dtype=torch.float32),
               torch.as_tensor(panel.targets_at(val_anchors, H), dtype=torch.float32))

    result = TrainResult(model)
    task = progress.add_task("train", total=tcfg.epochs, info="") if progress else None
    t0 = time.perf_counter()
    n = len(anchors)
    best: tuple[float, dict | None] = (float("inf"), None)
    for epoch in range(tcfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, tcfg.batch_size):
            idx = order[i : i + tcfg.batch_size]
            use_prior = bool(torch.rand((), generator=gen) < config.model.prior_mix)
            out = model.loss(ctx[idx].to(device), tgt[idx].to(device), use_prior)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(out["pinball"].detach()) * len(idx)
            count += len(idx)
        sched.step()
        row = {"epoch": epoch + 1, "train_pinball": total / max(count, 1),
               "val_pinball": validation_pinball(model, *val) if val else None}
        result.history.append(row)
        losses = [row["train_pinball"]] + ([row["val_pinball"]] if val else [])
        if not np.all(np.isfinite(losses)):
            # a loss that overflows has passed through absurd weights on its way (an earlier
            # "finite" epoch may be 1e30 off): refuse rather than save a model that every
            # later command would trip over
            bad = next(x for x in losses if not np.isfinite(x))
            raise ConfigError(f"training diverged: the loss is {bad} after epoch {epoch + 1} "
                              f"(train.lr = {tcfg.lr:g}, train.weight_decay = "
                              f"{tcfg.weight_decay:g}, model.beta = {config.model.beta:g}); "
                              "lower train.lr (default 1e-3)")
        if row["val_pinball"] is not None and row["val_pinball"] < best[0]:
            best = (row["val_pinball"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        if progress is not None:
            info = f"train {row['train_pinball']:.4f}"
            if row["val_pinball"] is not None:
                info += f"  val {row['val_pinball']:.4f}"
            progress.update(task, advance=1, info=info)
    if best[1] is not None:  # early stopping: keep the epoch with the best validation loss
        model.load_state_dict(best[1])
        result.best_epoch = next(r["epoch"] for r in result.history
                                 if r["val_pinball"] == best[0])
    result.seconds = time.perf_counter() - t0
    # The last day any training target touched: samplers keep residuals and calibration
    # windows strictly after it (plus an embargo), so nothing is scored in-sample.
    last = int(max(anchors.max(), val_anchors.max() if val is not None else -1)) + H
    model.train_end = str(panel.dates[min(last, panel.n_days - 1)])
    model.eval()
    return result


def holdout_tail(anchors: np.ndarray, fraction: float, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``fraction`` of windows; training windows end one horizon earlier
    so no training target overlaps a validation target."""
    n_val = max(1, round(fraction * len(anchors)))
    val = anchors[-n_val:]
    train = anchors[anchors <= val[0] - horizon]
    if len(train) == 0:
        return anchors, anchors[:0]
    return train, val


@torch.no_grad()
def validation_pinball(model: CVAE, ctx: torch.Tensor, tgt: torch.Tensor) -> float:
    """Mean pinball loss in log-IV units of the prior-mean forecast."""
    q = torch.as_tensor(model.forecast(ctx.numpy()), dtype=torch.float32)  # (B, Q, H, n_m, n_tau)
    levels = model.quantile_levels.cpu()[None, :, None, None, None]
    diff = tgt[:, None] - q
    return float(torch.maximum(levels * diff, (levels - 1) * diff).mean())


def progress_bar(enabled: bool = True):
    """A rich progress bar with epoch, losses and ETA (or a null context), on stderr with the
    rest of the status: stdout carries only what a command was asked to print."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)
