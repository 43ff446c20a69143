"""`backfill evaluate`: every method fit on the same history, scored on the same test windows.

Steps: resolve the method names (aliases, the oracle only on the synthetic market), get
the model (load or train on the train split), fit every method on ``Prepared.fit_panel()``
(the history before the test split's embargo), then for each method sample the test
windows in batches and score them. Window w's randomness is
``node_rng(seed, 0, anchor_w, EVALUATION)``, so every method sees reproducible draws that
do not depend on the batch a window sits in.

Memory: W windows x M samples x H days x G grid points is tens of GB on the default
synthetic run (1192 x 1000 x 90 x 25), so a batch of windows is sampled, reduced to
what the scores need (``kept`` is about 0.8 GB there), and dropped:

    kept      (n_h, W, M, G) float32   the samples at the requested horizons
    var_pnl   {h: (W, M)}              vega P&L at the VaR horizons (1 and 10 days)
    roughness pooled moments           daily iv changes along the full sample paths (and
                                       daily log-IV changes: roughness_log)
    fans      (3, H, 3)                5/50/95% of the ATM point for three chosen windows

Only one method's ``kept`` lives at a time; everything else is small.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine import metrics
from engine.config import Config
from engine.data.panel import calibration_days
from engine.errors import ConfigError, DataError
from engine.pipeline import Prepared, get_model, prepare
from engine.report import FEW_OUTCOMES, overlap_sentence
from engine.rng import EVALUATION, node_rng
from engine.samplers import ALIASES, known_methods, make_sampler
from engine.samplers.knn import KnnResidualSampler, check_history, min_history
from engine.samplers.knn_conformal import KnnConformalSampler
from engine.train import progress_bar

FAN_METHODS = ("knn-conformal", "cvae-prior", "hist-bootstrap", "oracle")
VAR_HORIZONS = (1, 10)
VAR_LEVELS = (0.95, 0.99)
BAND_LEVELS = (0.9, 0.5)
FAN_QUANTILES = (0.05, 0.5, 0.95)
N_REGIMES = 4
# Bytes of float64 sampler output per batch of windows; the samplers' own temporaries
# take a few times this, so ~256 MiB keeps a batch well under 2 GB.
BATCH_BYTES = 256 << 20
MAX_BATCH = 32


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """One scored method: its report name, registry sampler and the config it is built with."""

    name: str
    sampler: str
    config: Config

    @property
    def knn_group(self) -> tuple[str, str] | None:
        """kNN samplers with the same point forecast and key space share one fit; those
        with the same point forecast alone share one residual bank."""
        if self.sampler not in ("knn", "knn-conformal"):
            return None
        s = self.config.sampler
        return (s.point, s.embedding)


def resolve_methods(config: Config, has_market: bool) -> tuple[list[MethodSpec], list[str]]:
    """The config's method names as specs, and notes for methods skipped (oracle on real data)."""
    # unknown names were refused when the config loaded (EvalConfig._known_methods)
    names = list(dict.fromkeys(config.evaluate.methods))  # drop repeats, keep order
    specs, notes = [], []
    for name in names:
        if name == "oracle" and not has_market:
            notes.append("oracle skipped: the data is not the synthetic market, so there is "
                         "no hidden state to draw the true conditional law from")
            continue
        sampler, overrides = ALIASES.get(name, (name, None))
        cfg = config
        if overrides:
            cfg = config.model_copy(update={"sampler": config.sampler.model_copy(
                update=overrides)})
        specs.append(MethodSpec(name, sampler, cfg))
    if not specs:
        given = ", ".join(names) or "none"
        why = " (oracle needs the synthetic market)" if "oracle" in names else ""
        raise ConfigError(f"evaluate.methods leaves no method to score on this data (given: "
                          f"{given}{why}); add one of "
                          f"{', '.join(n for n in known_methods() if n != 'oracle')}")
    return specs, notes


def uncalibrated(conformal: KnnConformalSampler) -> KnnResidualSampler:
    """The plain kNN residual sampler behind a fitted conformal one, without refitting.

    Both build the same cross-fitted bank, keys, index and K from the same config; the
    conformal step only adds ``scale_`` (and its scores) on top. The returned sampler
    shares the learned arrays (no copy) and samples exactly as a separately fitted
    ``knn`` would (tests/test_evaluate.py checks it).
    """
    knn = KnnResidualSampler(conformal.config)
    conformal_only = {"scale_", "split_scale_", "scale_path_"}
    knn.__dict__.update({k: v for k, v in vars(conformal).items()
                         if k.endswith("_") and k not in conformal_only})
    return knn


@dataclass
class FittedMethod:
    sampler: object
    fit_seconds: float
    shared_with: str | None = None  # the method whose fit this one reuses


def check_fit_history(prep: Prepared, specs: list[MethodSpec]) -> None:
    """Refuse, before anything trains, a fit history (the days before the test split's
    embargo) too short for a kNN method's residual bank, saying which split dates, or how
    many days, would leave it enough."""
    n, fit = prep.panel.history_days, prep.splits.pre_test_stop()
    by_point: dict[str, list[MethodSpec]] = {}  # one residual bank per point forecast
    for spec in specs:
        if spec.knn_group is not None:
            by_point.setdefault(spec.config.sampler.point, []).append(spec)
    for group in by_point.values():
        cfg = group[0].config
        try:
            check_history(fit, cfg, cfg.sampler.point)
        except DataError:
            need = min_history(cfg, cfg.sampler.point)
            C, H, E = cfg.data.context, cfg.data.horizon, cfg.data.embargo_days
            dates = prep.panel.dates
            # the first test day: the fits see the `need` days before its embargo, and a
            # calibration day fits in them (calibration_days); halfway is suggested
            tst = max(need + E, C + 2 * H + 2 * E)
            cal = sum(calibration_days(C, H, E, tst)) // 2
            if n >= tst + H:  # a later test start leaves the bank enough, and a window
                k = n - tst - H + 1
                how = (f"set data.test_start on or after {dates[tst]} (with "
                       f"data.calibration_start before it, e.g. {dates[cal]}; the "
                       f"test split then holds up to {k} window{'s' if k > 1 else ''})")
            elif prep.panel.market is not None:  # the synthetic market: its own length
                how = (f"set data.synthetic.n_days to at least {tst + H} and data.test_start "
                       f"on or after day {tst + 1} of it, a smaller data.embargo or a shorter "
                       "data.horizon")
            else:
                how = (f"give a file of at least {tst + H} days with data.test_start on or "
                       f"after its day {tst + 1} (the fit history, the {E}-day embargo and "
                       f"one {H}-day test window), a smaller data.embargo or a shorter "
                       "data.horizon")
            names = ", ".join(s.name for s in group)
            raise DataError(
                f"evaluate fits {names} on the {fit} days before the test split's embargo "
                f"(of the data's {n}), and {'their' if len(group) > 1 else 'its'} cross-fitted "
                f"residual bank needs at least {need} "
                f"(data.context {C}, data.horizon {H}, data.embargo {E}); {how}, "
                "or leave the kNN methods out of --methods") from None


def needs_model(specs: list[MethodSpec]) -> bool:
    return any(make_sampler(s.sampler, s.config).uses_model for s in specs)


def fit_methods(prep: Prepared, model, specs: list[MethodSpec], progress=None,
                console=None, notes: list[str] | None = None) -> dict[str, FittedMethod]:
    """Fit every method on ``prep.fit_panel()``; kNN samplers of one group share one fit.
    The fits' notes (a thin bank, neighbours hardly local) go to ``console`` and ``notes``."""
    panel = prep.fit_panel()
    fitted: dict[str, FittedMethod] = {}
    # Within a kNN group, a conformal member is fitted first; plain members derive from it.
    order = sorted(specs, key=lambda s: s.sampler != "knn-conformal")
    group_fit: dict[tuple[str, str], tuple[str, object]] = {}
    bank_fit: dict[str, tuple[str, object]] = {}  # point forecast -> its first kNN fit
    for spec in order:
        group = spec.knn_group
        if group is not None and group not in group_fit and group[0] in bank_fit:
            # another key space on a bank already cross-fitted: only the keys (and the
            # conformal scores) are new
            owner, base = bank_fit[group[0]]
            t0 = time.perf_counter()
            sampler = base.rekeyed(spec.config, panel, model)
            seconds = time.perf_counter() - t0
            group_fit[group] = (spec.name, sampler)
            if spec.sampler != sampler.name:
                sampler = uncalibrated(sampler)
            fitted[spec.name] = FittedMethod(sampler, seconds, shared_with=owner)
            _say(console, f"{spec.name}: its {spec.config.sampler.embedding} keys fitted in "
                 f"{seconds:.1f}s on the residual bank of {owner}")
            continue
        if group in group_fit:
            owner, base = group_fit[group]
            if spec.sampler == base.name:
                sampler = base.recalibrated(spec.config, panel)
            else:
                sampler = uncalibrated(base)
            fitted[spec.name] = FittedMethod(sampler, 0.0, shared_with=owner)
            _say(console, f"{spec.name}: shares the fit of {owner}")
            continue
        sampler = make_sampler(spec.sampler, spec.config)
        if isinstance(sampler, KnnResidualSampler):
            sampler.progress = progress
        t0 = time.perf_counter()
        sampler.fit(panel, model)
        seconds = time.perf_counter() - t0
        if isinstance(sampler, KnnResidualSampler):
            sampler.progress = None  # a rich Progress does not belong in the fitted state
        fitted[spec.name] = FittedMethod(sampler, seconds)
        if group is not None:
            group_fit[group] = (spec.name, sampler)
            bank_fit.setdefault(group[0], (spec.name, sampler))
        knn = isinstance(sampler, KnnResidualSampler)
        bank = f" ({sampler.bank_summary()})" if knn else ""
        _say(console, f"{spec.name}: fitted in {seconds:.1f}s{bank}")
        for note in sampler.notes(spec.name) if knn else ():
            _say(console, f"note: {note}")
            if notes is not None and note not in notes:  # one bank: said once
                notes.append(note)
    return {s.name: fitted[s.name] for s in specs}


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def set_threads(config: Config) -> None:
    """Apply ``train.threads`` to inference too: decoding a million prior draws is torch work,
    and on a shared machine torch's default (all cores) can run ~10x slower than 1 thread."""
    if config.train.threads:
        import torch

        torch.set_num_threads(config.train.threads)


# ----------------------------------------------------------------------------- windows


@dataclass
class EvalWindows:
    """The scored windows, in iv units; every method sees exactly these."""

    anchors: np.ndarray  # (W,) last context day
    contexts: np.ndarray  # (W, C, n_m, n_tau)
    realised: np.ndarray  # (W, H, n_m, n_tau)
    level: np.ndarray  # (W,) mean iv over the context days and grid
    regime: np.ndarray  # (W,) quartile 0..3 of level
    fan_rows: np.ndarray  # (3,) windows with the lowest, median and highest level
    atm: tuple[int, int]  # grid index of moneyness nearest 1, shortest maturity
    year: np.ndarray  # (W,) calendar year of the anchor
    vega: np.ndarray | None = None  # (G,) the VaR backtest's position; None: 1 at every point

    @property
    def n(self) -> int:
        return len(self.anchors)


def window_stride(prep: Prepared) -> int:
    """``evaluate.window_stride``, or the smallest stride within ``evaluate.max_windows``."""
    ev = prep.config.evaluate
    if ev.window_stride:
        return ev.window_stride
    return max(1, -(-len(prep.splits.anchors("test")) // ev.max_windows))


def evaluation_windows(prep: Prepared) -> EvalWindows:
    cfg = prep.config
    C, H = cfg.data.context, cfg.data.horizon
    anchors = prep.splits.anchors("test", stride=window_stride(prep))
    panel = prep.panel
    contexts = panel.contexts_at(anchors, C, log=False)
    realised = panel.targets_at(anchors, H, log=False)
    level = contexts.mean(axis=(1, 2, 3))
    ranks = np.argsort(np.argsort(level, kind="stable"), kind="stable")
    regime = (ranks * N_REGIMES) // len(anchors)  # equal-count quartiles
    by_level = np.argsort(level, kind="stable")
    fan_rows = by_level[[0, len(by_level) // 2, len(by_level) - 1]]
    atm = (int(np.argmin(np.abs(panel.moneyness - 1.0))), int(np.argmin(panel.maturity_days)))
    year = panel.dates[anchors].astype("datetime64[Y]").astype(np.int64) + 1970
    return EvalWindows(anchors, contexts, realised, level, regime.astype(np.int64), fan_rows, atm,
                       year)


def check_horizons(config: Config) -> tuple[list[int], list[str]]:
    H = config.data.horizon
    horizons = sorted(set(config.evaluate.horizons))
    if any(h < 1 for h in horizons):
        raise ConfigError(f"evaluate.horizons must be days >= 1, got {horizons}")
    kept = [h for h in horizons if h <= H]
    notes = []
    if len(kept) < len(horizons):
        notes.append(f"horizons {[h for h in horizons if h > H]} dropped: beyond data.horizon {H}")
    if not kept:
        raise ConfigError(f"evaluate.horizons {horizons} all lie beyond data.horizon {H}; pass "
                          f"--horizons within 1..{H}")
    return kept, notes


# ----------------------------------------------------------------------------- sampling


class PooledMoments:
    """Count, mean and sum of squared deviations of a stream of arrays (Chan's merge)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        n_b, mean_b = x.size, float(x.mean())
        d = x - mean_b
        self._merge(n_b, mean_b, float(np.square(d, out=d).sum()))

    def add_steps(self, paths: np.ndarray, axis: int) -> None:
        """``add(np.diff(paths, axis=axis))`` in two passes over the steps instead of five:
        their sum telescopes to last - first, and their squares are summed by one einsum."""
        d = np.diff(paths, axis=axis)
        if d.size == 0:
            return
        n_b = d.size
        total = np.take(paths, -1, axis=axis) - np.take(paths, 0, axis=axis)
        mean_b = float(total.sum()) / n_b
        flat = d.reshape(-1)
        m2_b = max(float(np.einsum("i,i->", flat, flat)) - n_b * mean_b * mean_b, 0.0)
        self._merge(n_b, mean_b, m2_b)

    def _merge(self, n_b: int, mean_b: float, m2_b: float) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.mean += delta * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")


@dataclass
class Draws:
    """What one method's samples are reduced to (see the module docstring)."""

    kept: np.ndarray  # (n_h, W, M, G) float32
    var_pnl: dict[int, np.ndarray]  # h -> (W, M)
    roughness: PooledMoments  # daily iv changes
    fans: np.ndarray  # (3, H, 3)
    roughness_log: PooledMoments = field(default_factory=PooledMoments)  # log-IV changes
    seconds: float = 0.0


def batch_size(n_samples: int, horizon: int, n_grid: int) -> int:
    return int(np.clip(BATCH_BYTES // (8 * n_samples * horizon * n_grid), 1, MAX_BATCH))


def sample_windows(sampler, windows: EvalWindows, horizons: list[int], n_samples: int,
                   seed: int, progress=None, label: str = "") -> Draws:
    """Sample every window in batches and keep what the scores need."""
    W = windows.n
    H = windows.realised.shape[1]
    n_m, n_tau = windows.realised.shape[2:]
    G = n_m * n_tau
    kept = np.empty((len(horizons), W, n_samples, G), dtype=np.float32)
    var_h = [h for h in VAR_HORIZONS if h <= H]
    var_pnl = {h: np.empty((W, n_samples)) for h in var_h}
    rough, rough_log = PooledMoments(), PooledMoments()
    fans = np.full((len(windows.fan_rows), H, len(FAN_QUANTILES)), np.nan)
    fan_at = {int(w): i for i, w in enumerate(windows.fan_rows)}
    step = batch_size(n_samples, H, G)
    task = (progress.add_task(f"sample {label}", total=W, info="") if progress is not None
            else None)
    t0 = time.perf_counter()
    for start in range(0, W, step):
        sl = slice(start, min(W, start + step))
        rngs = [node_rng(seed, 0, int(a), EVALUATION) for a in windows.anchors[sl]]
        log_paths = sampler.sample_log(windows.contexts[sl], n_samples, rngs,
                                       days=windows.anchors[sl])  # (b, M, H, n_m, n_tau)
        paths = np.exp(log_paths)  # iv: the same values as ``sample``'s
        b = log_paths.shape[0]
        flat, log_flat = (x.reshape(b, n_samples, H, G) for x in (paths, log_paths))
        for j, h in enumerate(horizons):
            kept[j, sl] = flat[:, :, h - 1]
        start_surface = windows.contexts[sl, -1].reshape(b, G)
        for h in var_h:
            var_pnl[h][sl] = metrics.vega_pnl(start_surface, flat[:, :, h - 1], windows.vega)
        if H >= 2:
            # The roughness: daily changes of the sample paths, in iv units; beside
            # it in log-IV (the model's space: scale-free, not dominated by the few stressed
            # paths whose iv moves are largest)
            rough.add_steps(flat, axis=2)
            rough_log.add_steps(log_flat, axis=2)
        for w in range(sl.start, sl.stop):
            if w in fan_at:
                atm = paths[w - sl.start, :, :, windows.atm[0], windows.atm[1]]  # (M, H)
                fans[fan_at[w]] = np.quantile(atm, FAN_QUANTILES, axis=0).T
        del log_paths, paths, flat, log_flat
        if task is not None:
            progress.update(task, advance=b)
    return Draws(kept, var_pnl, rough, fans, rough_log, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- scores


def realised_roughness(windows: EvalWindows, log: bool = False) -> PooledMoments:
    """Pooled daily changes of the realised paths, in iv (or log-IV) units."""
    acc = PooledMoments()
    if windows.realised.shape[1] >= 2:
        paths = windows.realised.reshape(windows.n, windows.realised.shape[1], -1)
        acc.add(np.diff(np.log(paths) if log else paths, axis=1))
    return acc


def score_draws(draws: Draws, windows: EvalWindows, horizons: list[int],
                maturity_days: np.ndarray) -> tuple[dict, np.ndarray]:
    """The report's scores of one method; also its PIT values (n_h, W, G) for the plots."""
    W = windows.n
    G = draws.kept.shape[-1]
    real = windows.realised.reshape(W, windows.realised.shape[1], G)
    out: dict = {k: {} for k in ("coverage90", "coverage50", "width90", "width50", "crps",
                                 "energy", "marginal_std_ratio", "within_var_share",
                                 "between_var_share", "coverage90_by_year")}
    years = np.unique(windows.year)
    pits = np.empty((len(horizons), W, G))
    inside90 = np.zeros(W)  # per-window covered share, summed over horizons
    for j, h in enumerate(horizons):
        s, y = draws.kept[j], real[:, h - 1]
        key = str(h)
        for level in BAND_LEVELS:
            lo, hi = metrics.band(s, level)
            inside = (lo <= y) & (y <= hi)  # as metrics.coverage, one band computation
            tag = f"{round(level * 100)}"
            out[f"coverage{tag}"][key] = float(inside.mean())
            out[f"width{tag}"][key] = float((hi - lo).mean())
            if level == 0.9:
                share = inside.mean(axis=1)  # (W,)
                inside90 += share
                out["coverage90_by_year"][key] = {
                    str(yr): float(share[windows.year == yr].mean()) for yr in years}
        out["crps"][key] = float(metrics.crps_ensemble(s, y).mean())
        out["energy"][key] = float(metrics.energy_score(s, y).mean())
        out["marginal_std_ratio"][key] = metrics.marginal_std_ratio(s, y)
        budget = metrics.variance_budget(s, y)
        out["within_var_share"][key] = budget["within_var_share"]
        out["between_var_share"][key] = budget["between_var_share"]
        pits[j] = metrics.pit(s, y)
    for key, drawn, log in (("roughness_ratio", draws.roughness, False),
                            ("roughness_ratio_log", draws.roughness_log, True)):
        real_rough = realised_roughness(windows, log)
        out[key] = drawn.std / real_rough.std if drawn.n and real_rough.std > 0 else None
    out["pit_ks"] = metrics.pit_ks(pits)
    # Every window holds the same G points at every horizon: pooled coverage of a group is
    # the mean of its windows' shares.
    per_window = inside90 / len(horizons)
    out["regime_coverage90"] = {
        f"q{q + 1}": float(per_window[windows.regime == q].mean())
        if (windows.regime == q).any() else None for q in range(N_REGIMES)}
    n_tau = len(maturity_days)
    if n_tau >= 2:
        n_m = G // n_tau
        out["calendar_violations"] = metrics.calendar_violations(
            draws.kept.reshape(-1, n_m, n_tau), maturity_days)
    else:
        out["calendar_violations"] = None  # a single maturity has no calendar spread
    out["var_backtest"] = {}
    start_surface = windows.contexts[:, -1].reshape(W, G)
    for h, pnl in draws.var_pnl.items():
        realised_pnl = metrics.vega_pnl(start_surface, real[:, h - 1][:, None], windows.vega)[:, 0]
        for level in VAR_LEVELS:
            out["var_backtest"][f"{h}_{level:g}"] = metrics.var_backtest(pnl, realised_pnl, level)
    return out, pits


# ----------------------------------------------------------------------------- the command


def json_safe(x):
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


@dataclass
class PlotData:
    """What the plots need beyond report.json."""

    pits: dict[str, np.ndarray] = field(default_factory=dict)  # method -> PIT values
    fans: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (3, H, 3)


def run_evaluation(cfg: Config, out: Path, model_path: Path | None = None,
                   console=None, position: Path | None = None) -> dict:
    """Fit, sample and score every method; write report.json, report.md and the plots.
    ``position``: a CSV of vegas (``driver.read_position``) whose VaR the backtest scores,
    instead of long one vega at every grid point."""
    t_start = time.perf_counter()
    out = Path(out)
    set_threads(cfg)
    horizons, notes = check_horizons(cfg)
    prep = prepare(cfg, evaluation=True, console=console)
    panel = prep.panel
    specs, skip_notes = resolve_methods(cfg, panel.market is not None)
    notes += skip_notes
    for note in notes:
        _say(console, f"note: {note}")
    notes += panel.notes()  # said by prepare; kept in the report too
    windows = evaluation_windows(prep)
    if position is not None:  # read before any training: a bad file fails at once
        from engine.driver import read_position

        windows = replace(windows, vega=read_position(position, panel.grid_dict(), "data").ravel())
    M = cfg.evaluate.n_samples
    extra = panel.n_days - panel.history_days
    _say(console, f"data {panel.source}: {panel.history_days} days"
                  f"{f' + {extra} simulated test days' if extra else ''}, grid "
                  f"{panel.grid_shape[0]}x{panel.grid_shape[1]}, fingerprint "
                  f"{panel.history_fingerprint}; fit history {prep.splits.pre_test_stop()} days, "
                  f"{windows.n} test windows (every {window_stride(prep)} days), {M} samples")

    episodes, overlap = overlap_sentence(windows.n, window_stride(prep), max(horizons))
    if episodes < FEW_OUTCOMES:  # the report's summary says it too
        _say(console, f"note: {overlap}")
    check_fit_history(prep, specs)
    t0 = time.perf_counter()
    model = get_model(prep, model_path, console) if needs_model(specs) else None
    model_seconds = time.perf_counter() - t0
    if model is not None and model.train_end is not None:
        cut = panel.dates[prep.splits.pre_test_stop()]  # the first day no fit may see
        if np.datetime64(model.train_end, "D") >= cut:
            raise ConfigError(f"the model {model_path} learned from days up to "
                              f"{model.train_end}, past the start of the test split's embargo "
                              f"({cut}): its scores would have seen test outcomes; leave "
                              "--model out (a model is trained on the train split) or train "
                              "one with this config's split")

    report: dict = {
        "data": {"source": panel.source, "fingerprint": panel.history_fingerprint,
                 "grid": panel.grid_dict(), "n_days": panel.history_days,
                 "test_extension_days": panel.n_days - panel.history_days,
                 "test_extension_fingerprint": panel.fingerprint},
        "split": {**prep.splits.to_dict(), "fit_days": prep.splits.pre_test_stop(),
                  "test_first_anchor": str(panel.dates[windows.anchors[0]]),
                  "test_last_anchor": str(panel.dates[windows.anchors[-1]]),
                  "window_stride": window_stride(prep)},
        "n_windows": windows.n, "n_samples": M, "horizons": horizons,
        "seed": cfg.seed, "notes": notes,
        "var_position": metrics.LONG_VEGA if position is None else str(position),
        "model": {"path": str(model_path) if model_path else None,
                  "trained_here": model is not None and model_path is None},
        "test_year_windows": {str(y): int(n) for y, n in
                              zip(*np.unique(windows.year, return_counts=True), strict=True)},
        "regime_levels": {f"q{q + 1}": float(windows.level[windows.regime == q].mean())
                          for q in range(N_REGIMES) if (windows.regime == q).any()},
        "methods": {},
    }
    plots = PlotData()
    with progress_bar(console is not None) as progress:
        # Lines go above the live bars, not through them.
        say = progress.console if progress is not None else None
        fitted = fit_methods(prep, model, specs, progress=progress, console=say,
                             notes=report["notes"])
        for spec in specs:
            fm = fitted[spec.name]
            fm.sampler.observe(panel)  # an online sampler sees the test days as they realise
            draws = sample_windows(fm.sampler, windows, horizons, M, cfg.seed, progress,
                                   spec.name)
            t0 = time.perf_counter()
            scores, pits = score_draws(draws, windows, horizons, panel.maturity_days)
            score_seconds = time.perf_counter() - t0
            scores.update(fit_seconds=fm.fit_seconds, sample_seconds=draws.seconds,
                          score_seconds=score_seconds, fit_shared_with=fm.shared_with)
            report["methods"][spec.name] = scores
            plots.pits[spec.name] = pits
            plots.fans[spec.name] = draws.fans
            del draws
            _say(say, f"{spec.name}: sampled in {scores['sample_seconds']:.1f}s, scored in "
                          f"{score_seconds:.1f}s; coverage90 "
                          + " ".join(f"{h}d {scores['coverage90'][str(h)]:.2f}"
                                     for h in horizons))
    oracle = report["methods"].get("oracle")
    if oracle is not None:
        for scores in report["methods"].values():
            scores["crps_vs_oracle"] = {k: v / oracle["crps"][k] if oracle["crps"][k] else None
                                        for k, v in scores["crps"].items()}
    report["timings"] = {"model_seconds": model_seconds,
                         "total_seconds": time.perf_counter() - t_start}
    report = json_safe(report)
    from engine.report import staged, write_evaluation_report

    with staged(out) as stage:
        (stage / "report.json").write_text(json.dumps(report, indent=2))
        files = write_evaluation_report(report, plots, windows, stage, panel.dates,
                                        FAN_METHODS)
    _say(console, f"wrote {out / 'report.json'}, " + ", ".join(str(f.name) for f in files)
         + f" in {report['timings']['total_seconds']:.1f}s")
    return report
