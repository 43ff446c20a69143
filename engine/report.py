"""Rendering of `backfill evaluate` and `backfill diagnose` results: Markdown tables and PNG plots.

Pure presentation: every number comes from the report dicts (the same ones written as
JSON); the plots take the few arrays the JSON does not hold (PIT values, fan bands,
embeddings). matplotlib runs on the Agg backend, so no display is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from engine.errors import ConfigError

FAN_TITLES = ("calm (lowest context level)", "median context level",
              "stressed (highest context level)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, spec) for v in value) + "]"
    if isinstance(value, float) and not np.isfinite(value):
        return "–"
    return format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def horizon_table(methods: dict, key: str, horizons: list[int], spec: str) -> str | None:
    rows = [[name] + [fmt(m[key].get(str(h)), spec) for h in horizons]
            for name, m in methods.items() if key in m]
    if not rows:
        return None
    return table(["method"] + [f"{h}d" for h in horizons], rows)


# ----------------------------------------------------------------------------- evaluate

# (key, title, number format, note)
HORIZON_TABLES: tuple[tuple[str, str, str, str], ...] = (
    ("coverage90", "Coverage of the 90% band", ".3f", "nominal 0.900"),
    ("coverage50", "Coverage of the 50% band", ".3f", "nominal 0.500"),
    ("crps", "CRPS per grid point (iv units)", ".5f", "lower is better"),
    ("crps_vs_oracle", "CRPS / oracle CRPS", ".3f", "1 = as good as the true law"),
    ("width90", "Width of the 90% band (iv units)", ".4f", "narrow is good only if covered"),
    ("within_var_share", "Within-context variance share E[Var(X|C)] / Var(X)", ".3f",
     "with the between share, sums to about 1 for a calibrated sampler"),
    ("between_var_share", "Between-context variance share Var(E[X|C]) / Var(X)", ".3f", ""),
    ("marginal_std_ratio", "Pooled marginal std / realised std", ".3f", "target 1"),
    ("energy", "Energy score over the surface (iv units)", ".5f", "lower is better"),
)


BASELINES = ("hist-bootstrap", "fhs", "pca-ar")
DEFAULT_METHOD = "knn-conformal"
COVERAGE_BAND = (0.85, 0.95)  # what "near nominal" means in the summary


FEW_OUTCOMES = 20  # non-overlapping outcomes below which the longest horizon's scores are noisy


def overlap_sentence(n: int, stride: int, longest: int) -> tuple[float, str]:
    """How many non-overlapping ``longest``-day outcomes ``n`` test windows ``stride`` days
    apart hold, and a sentence saying so (with a caution below FEW_OUTCOMES)."""
    # the days the windows' outcomes span, in non-overlapping stretches of the horizon
    episodes = min(n, ((n - 1) * stride + longest) / longest)
    text = (f"the {n} test windows overlap: at {longest} days they hold about {episodes:.1f} "
            "non-overlapping outcomes" if stride < longest else
            f"the {n} test windows do not overlap at {longest} days")
    if episodes < FEW_OUTCOMES:
        text += (", too few for a coverage, CRPS, std ratio or variance share there to say "
                 "much (the shares divide by these outcomes' spread; more test days, or the "
                 "synthetic market, decide more)")
    return episodes, text


def summary_markdown(report: dict) -> list[str]:
    """The report's first section: how much the test windows can decide, which methods hold
    the 90% band near nominal, which has the lowest CRPS at each horizon, and the default
    sampler's CRPS over the best baseline's. Every figure is one of the tables below."""
    methods, horizons = report["methods"], report["horizons"]
    lo, hi = COVERAGE_BAND
    n, stride = report["n_windows"], report["split"].get("window_stride", 1)
    parts = ["## Summary", "", f"- {overlap_sentence(n, stride, max(horizons))[1]}"]
    rows = []
    for name, m in methods.items():
        cov = [m["coverage90"].get(str(h)) for h in horizons]
        known = [(h, c) for h, c in zip(horizons, cov, strict=True) if c is not None]
        if not known:
            continue
        inside = sum(lo <= c <= hi for _, c in known)
        worst_h, worst = max(known, key=lambda hc: abs(hc[1] - 0.9))
        rows.append((-inside, np.mean([abs(c - 0.9) for _, c in known]), name,
                     f"{inside} of {len(known)}", f"{worst:.3f} at {worst_h}d"))
    rows.sort()
    parts += ["", (f"_coverage of the 90% band: horizons within [{lo:g}, {hi:g}], and the "
                   "one farthest from 0.9_"), "",
              table(["method", "horizons in band", "farthest"], [r[2:] for r in rows]), ""]
    best = []
    for h in horizons:
        crps = {name: m["crps"].get(str(h)) for name, m in methods.items()
                if name != "oracle" and m["crps"].get(str(h)) is not None}
        best.append(min(crps, key=crps.get) if crps else "–")
    rows = [["lowest CRPS (oracle aside)"] + best]
    if DEFAULT_METHOD in methods:
        ratio = []
        for h in horizons:
            base = [methods[b]["crps"].get(str(h)) for b in BASELINES if b in methods]
            base = [v for v in base if v is not None]
            own = methods[DEFAULT_METHOD]["crps"].get(str(h))
            ratio.append(fmt(own / min(base)) if base and own is not None and min(base) > 0
                         else "–")
        rows.append([f"{DEFAULT_METHOD} CRPS / best baseline's"] + ratio)
    parts += [table(["CRPS"] + [f"{h}d" for h in horizons], rows), ""]
    return parts


def evaluation_markdown(report: dict) -> str:
    data, split, methods = report["data"], report["split"], report["methods"]
    horizons = report["horizons"]
    grid = data["grid"]
    parts = ["# Evaluation report", ""]
    parts.append(f"- data: `{data['source']}`, {data.get('n_days', '?')} days, fingerprint "
                 f"`{data['fingerprint']}`, grid {len(grid['moneyness'])} moneyness x "
                 f"{len(grid['maturity_days'])} maturities (moneyness "
                 f"{', '.join(f'{m:g}' for m in grid['moneyness'])}; maturity days "
                 f"{', '.join(f'{d:g}' for d in grid['maturity_days'])})")
    def days(r) -> str:  # a [start, stop) range of day indices, written so
        return f"[{r[0]}, {r[1]})"

    parts.append(f"- split (day ranges [start, stop)): train {days(split['train'])}, "
                 f"calibration {days(split['calibration'])}, test {days(split['test'])}; "
                 f"context {split['context']}, "
                 f"horizon {split['horizon']}, embargo {split['embargo']}")
    parts.append(f"- every method is fit on the first {split['fit_days']} days (before the "
                 f"test split's embargo) and scored on the same {report['n_windows']} test "
                 f"windows (anchors {split['test_first_anchor']} .. "
                 f"{split['test_last_anchor']}, stride {split['window_stride']}) with "
                 f"{report['n_samples']} samples each, seed {report['seed']}")
    if data.get("test_extension_days"):
        parts.append(f"- the synthetic market runs on for {data['test_extension_days']} days after "
                     f"its {data['n_days']}-day history (fingerprint of the whole "
                     f"`{data['test_extension_fingerprint']}`); the test split runs through them, "
                     "so the scores average over many independent futures (compare the oracle's "
                     "row: the truth's own coverage on this test span)")
    for note in report.get("notes", []):
        parts.append(f"- note: {note}")
    parts.append("")
    parts += summary_markdown(report)
    for key, title, spec, note in HORIZON_TABLES:
        body = horizon_table(methods, key, horizons, spec)
        if body is None:
            continue
        parts += [f"## {title}", ""] + ([f"_{note}_", ""] if note else []) + [body, ""]

    by_year = {n: m["coverage90_by_year"] for n, m in methods.items() if m.get("coverage90_by_year")}
    years = full_years(report)
    if by_year and years:
        left_out = len(report.get("test_year_windows", {})) - len(years)
        parts += ["## Coverage of the 90% band by test year", "",
                  (f"_how much one stretch of history moves the score: lowest / median / "
                   f"highest coverage over the {len(years)} calendar "
                   f"year{'s' if len(years) > 1 else ''} of the test windows"
                   + (f" ({left_out} partial year{'s' if left_out > 1 else ''} with under half "
                      "the usual windows left out)" if left_out else "")
                   + " (the oracle's spread is the luck of the span alone; see "
                   "coverage_by_year.png)_"), ""]
        rows = []
        for name, per_h in by_year.items():
            row = [name]
            for h in horizons:
                v = yearly_coverage(per_h, h, years)
                row.append("–" if v.size == 0 else
                           f"{v.min():.2f} / {np.median(v):.2f} / {v.max():.2f}")
            rows.append(row)
        parts += [table(["method"] + [f"{h}d" for h in horizons], rows), ""]

    parts += ["## Scalar scores", "",
              ("_roughness: std of daily iv changes along sample paths / along realised paths "
              "(target 1; log: the same in log-IV); PIT KS: pooled over horizons (0 = uniform); calendar: share of "
              "sampled surfaces whose total variance falls with maturity; q1..q4: coverage "
              "of the 90% band by quartile of the context's mean level, pooled over "
              "horizons_"), ""]
    levels = report.get("regime_levels", {})
    q_head = [f"cov90 {q} (level {fmt(levels.get(q), '.3f')})" for q in ("q1", "q2", "q3", "q4")]
    rows = []
    for name, m in methods.items():
        reg = m["regime_coverage90"]
        rows.append([name, fmt(m["roughness_ratio"]), fmt(m.get("roughness_ratio_log")),
                     fmt(m["pit_ks"]),
                     fmt(m["calendar_violations"], ".4f")]
                    + [fmt(reg.get(q)) for q in ("q1", "q2", "q3", "q4")])
    parts += [table(["method", "roughness", "roughness (log)", "PIT KS", "calendar"] + q_head,
                    rows), ""]

    var_keys = sorted({k for m in methods.values() for k in m["var_backtest"]},
                      key=lambda k: tuple(float(x) for x in k.split("_")))
    if var_keys:
        multi = sorted({int(k.split("_")[0]) for k in var_keys} - {1})
        overlap = (f"; overlapping windows make exceptions of the "
                   f"{' and '.join(f'{h}-day' for h in multi)} VaR serially dependent, so "
                   f"{'its p-value is' if len(multi) == 1 else 'their p-values are'} "
                   "optimistic" if multi else "")
        from engine.metrics import LONG_VEGA

        held = report.get("var_position") or LONG_VEGA
        parts += [f"## VaR backtest of a vega position: {held}", "",
                  f"_exceptions / expected (Kupiec p-value){overlap}_", ""]
        rows = []
        for name, m in methods.items():
            row = [name]
            for k in var_keys:
                v = m["var_backtest"].get(k)
                row.append("–" if v is None else
                           f"{v['exceptions']} / {fmt(v['expected'], '.1f')} "
                           f"({fmt(v['kupiec_p'], '.3f')})")
            rows.append(row)
        heads = [f"{k.split('_')[0]}d {float(k.split('_')[1]):.0%}" for k in var_keys]
        parts += [table(["method"] + heads, rows), ""]

    parts += ["## Timings (seconds)", ""]
    rows = [[name, fmt(m.get("fit_seconds"), ".1f"), fmt(m.get("sample_seconds"), ".1f"),
             fmt(m.get("score_seconds"), ".1f"), m.get("fit_shared_with") or ""]
            for name, m in methods.items()]
    parts += [table(["method", "fit", "sample", "score", "fit shared with"], rows), ""]
    t = report.get("timings", {})
    parts += [(f"model: {fmt(t.get('model_seconds'), '.1f')} s; total wall time "
              f"{fmt(t.get('total_seconds'), '.1f')} s"), ""]
    parts += ["## Plots", "", "![coverage](coverage.png)", "",
              "![coverage by year](coverage_by_year.png)", "", "![PIT](pit.png)", "",
              "![fans](fans.png)", ""]
    return "\n".join(parts)


def plot_coverage(report: dict, path: Path) -> Path:
    plt = _pyplot()
    horizons = report["horizons"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["methods"].items():
        ys = [m["coverage90"].get(str(h)) for h in horizons]
        ax.plot(horizons, [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax.axhline(0.9, color="black", linestyle="--", linewidth=1, label="nominal 0.9")
    if len(horizons) > 1 and horizons[-1] / horizons[0] >= 10:
        ax.set_xscale("log")
    ax.set_xticks(horizons, [str(h) for h in horizons])
    ax.set_xlabel("horizon (days)")
    ax.set_ylabel("coverage of the 90% band")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def full_years(report: dict) -> list[str]:
    """Test years holding at least half the median year's windows (a span's first and last
    years are often partial, and a handful of windows is no year's score)."""
    counts = report.get("test_year_windows") or {}
    if not counts:
        return []
    half = 0.5 * float(np.median(list(counts.values())))
    return [y for y, n in counts.items() if n >= half]


def yearly_coverage(by_year: dict, h: int, years: list[str]) -> np.ndarray:
    """One method's coverage at horizon ``h`` in each of ``years`` that it scored."""
    per = by_year.get(str(h), {})
    return np.array([per[y] for y in years if per.get(y) is not None], dtype=float)


def plot_coverage_by_year(report: dict, path: Path) -> Path:
    """Per method, the spread over test years of the 90% band's coverage (a box, and each
    year as a dot), at the shortest and the longest horizon."""
    plt = _pyplot()
    horizons = report["horizons"]
    shown = sorted({horizons[0], horizons[-1]})
    names = list(report["methods"])
    years = full_years(report)
    fig, axes = plt.subplots(1, len(shown), figsize=(max(6.0, 0.9 * len(names) + 2) * len(shown)
                                                      / 1.6, 4.2), squeeze=False)
    rng = np.random.default_rng(0)  # dot jitter only
    for ax, h in zip(axes[0], shown, strict=True):
        per_method = []
        for name in names:
            per_method.append(yearly_coverage(
                report["methods"][name].get("coverage90_by_year", {}), h, years))
        ax.boxplot([v if v.size else [np.nan] for v in per_method], widths=0.55,
                   showfliers=False)
        for i, v in enumerate(per_method, start=1):
            ax.plot(i + rng.uniform(-0.18, 0.18, v.size), v, ".", color="tab:blue", alpha=0.5,
                    markersize=4)
        ax.axhline(0.9, color="black", linestyle="--", linewidth=1)
        n_years = max((v.size for v in per_method), default=0)
        ax.set_title(f"{h}-day horizon, {n_years} test year{'s' * (n_years != 1)}",
                     fontsize=10)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("coverage of the 90% band in one year")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pit(pits: dict[str, np.ndarray], report: dict, path: Path) -> Path:
    plt = _pyplot()
    names = list(pits)
    n_col = min(3, len(names))
    n_row = int(np.ceil(len(names) / n_col))
    fig, axes = plt.subplots(n_row, n_col, figsize=(3.6 * n_col, 2.8 * n_row), squeeze=False)
    m = int(report["n_samples"])
    rng = np.random.default_rng(0)
    for ax, name in zip(axes.flat, names, strict=False):
        # PIT values are k / M; spreading rank k uniformly over [k, k + 1) / (M + 1) gives a
        # uniform histogram for a calibrated sampler, free of the comb that bins cut from
        # a lattice (plot only: the KS statistic uses the raw values).
        k = np.rint(np.ravel(pits[name]) * m)
        u = (k + rng.random(k.shape)) / (m + 1)
        ax.hist(u, bins=20, range=(0, 1), density=True, color="tab:blue", alpha=0.8)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ks = report["methods"][name]["pit_ks"]
        ax.set_title(f"{name} (KS {fmt(ks)})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("PIT: the sample's rank of the outcome", fontsize=8)
        ax.set_ylabel("density (1 = calibrated)", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("PIT histograms (randomised ranks), pooled over windows, grid points and "
                 "horizons", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fans(fans: dict[str, np.ndarray], windows, dates: np.ndarray, grid: dict,
              path: Path) -> Path:
    """Realised ATM path vs each method's 5/50/95% band for the calm, median, stressed window."""
    plt = _pyplot()
    i_m, i_t = windows.atm
    C, H = windows.contexts.shape[1], windows.realised.shape[1]
    fig, axes = plt.subplots(1, len(windows.fan_rows), figsize=(5 * len(windows.fan_rows), 4),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (ax, w) in enumerate(zip(axes[0], windows.fan_rows, strict=True)):
        days_ctx = np.arange(-C + 1, 1)
        days = np.arange(1, H + 1)
        ax.plot(days_ctx, windows.contexts[w, :, i_m, i_t], color="black", linewidth=1)
        ax.plot(days, windows.realised[w, :, i_m, i_t], color="black", linewidth=1.5,
                label="realised")
        for k, (name, band) in enumerate(fans.items()):
            c = colors[k % len(colors)]
            ax.fill_between(days, band[col, :, 0], band[col, :, 2], color=c, alpha=0.18)
            ax.plot(days, band[col, :, 1], color=c, linewidth=1, label=f"{name} 5/50/95%")
            ax.plot(days, band[col, :, 0], color=c, linewidth=0.6, linestyle=":")
            ax.plot(days, band[col, :, 2], color=c, linewidth=0.6, linestyle=":")
        ax.axvline(0, color="grey", linewidth=0.8)
        anchor = dates[windows.anchors[w]]
        ax.set_title(f"{FAN_TITLES[col] if col < len(FAN_TITLES) else ''}\nanchor {anchor}",
                     fontsize=9)
        ax.set_xlabel("days from the anchor")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"iv at moneyness {grid['moneyness'][i_m]:g}, "
                          f"{grid['maturity_days'][i_t]:g} days")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_STALE_STAGE_SECONDS = 3600.0  # a stage lives for the seconds its files take to write


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden folder in ``out`` to write a report's files into. On success each file is
    moved over its namesake in ``out`` (a rename: it needs no space and is never half
    done), the JSON last; on a failure (a full disk, an interrupt) the folder goes and
    ``out`` keeps the last complete report, not a truncated one beside a stale one. An
    error names the file as it would have been in ``out``. Stages that a killed run left
    (older than an hour) are cleared first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > _STALE_STAGE_SECONDS:
                shutil.rmtree(old)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        try:
            yield stage
        except OSError as err:
            if err.filename is None or Path(err.filename).parent != stage:
                raise
            raise OSError(err.errno, err.strerror, str(out / Path(err.filename).name)) from None
        files = sorted(stage.iterdir(), key=lambda f: (f.suffix == ".json", f.name))
        taken = [out / f.name for f in files if (out / f.name).is_dir()]
        if taken:  # checked before any move: a clash half-way would mix two reports
            raise ConfigError(f"{taken[0]} is a folder, where the report writes a file of "
                              "that name; move it away or pass another --out")
        for f in files:
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def pick_fan_methods(names: Sequence[str], preferred: Sequence[str], n_default: int = 3
                     ) -> list[str]:
    chosen = [n for n in preferred if n in names]
    return chosen or list(names)[:n_default]


def write_evaluation_report(report: dict, plots, windows, out: Path, dates: np.ndarray,
                            fan_methods: Sequence[str]) -> list[Path]:
    out = Path(out)
    md = out / "report.md"
    md.write_text(evaluation_markdown(report))
    files = [md, plot_coverage(report, out / "coverage.png"),
             plot_coverage_by_year(report, out / "coverage_by_year.png"),
             plot_pit(plots.pits, report, out / "pit.png")]
    chosen = pick_fan_methods(list(plots.fans), fan_methods)
    files.append(plot_fans({n: plots.fans[n] for n in chosen}, windows, dates,
                           report["data"]["grid"], out / "fans.png"))
    return files


# ----------------------------------------------------------------------------- diagnose


def _kv_table(d: dict, fmt_value: Callable[[object], str] = fmt) -> str:
    return table(["quantity", "value"], [[k, fmt_value(v)] for k, v in d.items()])


def diagnose_markdown(result: dict) -> str:
    data = result["data"]
    parts = ["# Diagnostics of the CVAE", "",
             (f"- data: `{data['source']}`, fingerprint `{data['fingerprint']}`; "
             f"{result['n_windows']} {result['split_name']} windows (context "
             f"{result['split']['context']}, horizon {result['split']['horizon']}); all "
             "spreads in iv units"), *[f"- note: {n}" for n in result.get("notes", [])], ""]
    sens = result["decoder_sensitivity"]
    parts += ["## Decoder sensitivity to z", "",
              ("_std over prior draws of the decoded p50 path, z = mu_p + s * sigma_p * eps, "
              "mean over windows, days and grid points; the realised residual std of the p50 "
              f"is {fmt(sens['residual_std'], '.5f')}_"), "",
              table(["noise scale s", "std of decoded p50"],
                    [[fmt(float(s), "g"), fmt(v, ".6f")]
                     for s, v in sens["std_by_noise_scale"].items()]), ""]
    cz = result["context_vs_z"]
    parts += ["## Zeroing the context embedding vs zeroing z", "",
              ("_mean |change| of the decoded p50 path against the decode at a prior draw of z, "
              "when the context embedding is set to 0 (the last context day, which the decoder "
              "adds back, stays) or when z is; ratio = the first over the second: a large ratio "
              "means the output is driven by the context and z hardly matters. "
              "output_spread_over_windows: std of that decode across windows, for scale_"),
              "", _kv_table(cz, lambda v: fmt(v, ".6f")), ""]
    pv = result["posterior_vs_prior"]
    parts += ["## Posterior vs prior", "",
              ("_variances of z under the posterior q(z | C, X) and the prior p(z | C), mean "
              "over windows and latent dimensions; mean spreads = std over windows of their "
              "means. kl = KL(q || p) in nats, summed over latent dimensions and averaged over "
              "windows. A posterior as wide as the prior (ratio near 1) with KL near 0 means z "
              "carries almost no information about the outcome: the decoder ignores it_"), "",
              _kv_table({**pv, "kl": result["kl"]}, lambda v: fmt(v, ".5g")), ""]
    nb = result["neighbour_variance"]
    parts += ["## Outcome variance among the nearest contexts", "",
              (f"_per horizon: mean over windows of the variance of the realised values of its "
              f"{nb['k']} nearest neighbours in embedding space (windows within "
              f"{nb['exclusion_days']} days excluded) / the unconditional variance (both "
              "unbiased); random neighbours give about 1, so well below 1 means the embedding "
              "finds contexts with similar outcomes_"), "",
              table(["horizon", "neighbour variance share"],
                    [[f"{h}d", fmt(v)] for h, v in nb["share"].items()]), ""]
    rs = result["regime_separation"]
    parts += ["## Volatility regimes in embedding space", "",
              ("_windows split at the median context level (median_level, mean iv of the "
              "context); silhouette in [-1, 1] (higher = better separated); ratio = distance "
              "between the two centroids / mean distance to the own centroid; level_r2 = R^2 of "
              "a linear read-out of the context level from the embedding (in sample, and "
              "adjusted for its coefficients); pc1_level_corr = correlation of the first "
              "principal axis (pointed to higher levels) with the level; pc_variance_share = "
              "share of the embedding's variance on the first two axes (the plot's)_"), "",
              _kv_table(rs, lambda v: fmt(v, ".4g")), "",
              "![embedding](embedding.png)", ""]
    vb = result["variance_budget"]
    rows = [[f"{h}d", fmt(v["var_x"], ".3e"), fmt(v["between_var"], ".3e"),
             fmt(v["within_var"], ".3e"), fmt(v["between_share"], ".3g"),
             fmt(v["within_share"], ".3g"), fmt(v.get("residual_share"), ".3g")]
            for h, v in vb.items()]
    parts += ["## Variance budget of the raw prior decode", "",
              ("_Var X of the realised values; Var E[X|C] = variance of the model's p50 over "
              "windows; E[Var(X|C)] = mean within-window variance of its prior decodes; shares "
              "of Var X, averaged over the grid. The two model terms need not add up to the "
              "realised Var X: what they miss is the residual share, E[(X - p50)^2] / Var X, "
              "the realised error of the p50. A calibrated model's within share would be about "
              "the residual share; a within share far below it is the over-confidence that "
              "the kNN residuals and conformal calibration repair_"), "",
              table(["horizon", "Var X", "Var E[X|C]", "E[Var(X|C)]", "between share",
                     "within share", "residual share"], rows), "",
              "![sensitivity and budget](diagnose.png)", ""]
    return "\n".join(parts)


def plot_diagnose(result: dict, path: Path) -> Path:
    """Two panels: the decoded p50's spread as the z noise grows, against the realised
    residual std; and the variance budget per horizon as shares of Var X (log scale), the
    raw decode's within share beside the residual share it should match."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sens = result["decoder_sensitivity"]
    scales = [float(s) for s in sens["std_by_noise_scale"]]
    left.plot(scales, list(sens["std_by_noise_scale"].values()), "o-", color="tab:red",
              label="std of the decoded p50 over prior draws")
    if sens["residual_std"] is not None:
        left.axhline(sens["residual_std"], color="black", ls="--",
                     label="realised residual std of the p50")
    left.axvline(1.0, color="grey", lw=0.8, ls=":")
    left.set_xlabel("z noise scale s (1 = the prior)")
    left.set_ylabel("iv")
    left.set_title("decoder sensitivity to z", fontsize=10)
    left.legend(fontsize=8)
    vb, nb = result["variance_budget"], result["neighbour_variance"]["share"]
    hs = [int(h) for h in vb]
    lines = (("residual_share", "residual E[(X - p50)^2]", "black", "o-"),
             ("between_share", "between Var E[X|C]", "tab:blue", "s-"),
             ("within_share", "within E[Var(X|C)], raw decode", "tab:red", "^-"))
    for key, label, color, style in lines:
        ys = [vb[str(h)][key] for h in hs]
        if all(y is not None and y > 0 for y in ys):
            right.plot(hs, ys, style, color=color, label=label)
    ys = [nb.get(str(h)) for h in hs]
    if all(y is not None and y > 0 for y in ys):
        right.plot(hs, ys, "d--", color="tab:green",
                   label=f"outcome variance of {result['neighbour_variance']['k']} nearest")
    right.set_yscale("log")
    right.set_xscale("log")
    right.set_xlabel("horizon (days)")
    right.set_ylabel("share of Var X")
    right.set_title("variance budget", fontsize=10)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.suptitle(f"{result['data']['source']}: {result['n_windows']} {result['split_name']} "
                 "windows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pnl(levels: list[tuple[int, np.ndarray, np.ndarray]], rows: list[dict],
             alphas: list[float], path: Path, title: str) -> Path:
    """One panel per level: the weighted histogram of the nodes' P&L, each VaR (as the P&L
    it marks, -VaR), the mean, and the realised P&L where ``rows`` have one."""
    plt = _pyplot()
    n = len(levels)
    cols = min(n, 3)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4.2 * cols, 3.2 * -(-n // cols)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (level, pnl, weight), row in zip(axes.flat, levels, rows, strict=False):
        ax.hist(pnl, bins=min(60, max(10, len(pnl) // 5)), weights=weight / weight.sum(),
                color="tab:blue", alpha=0.6)
        ax.axvline(row["mean_pnl"], color="grey", lw=1, label="mean")
        for k, a in enumerate(alphas):
            label = repr(float(a))
            ax.axvline(-row[f"var_{label}"], color=colors[(k + 1) % len(colors)], ls="--",
                       lw=1.2, label=f"-VaR {label}")
        if row.get("realised_pnl") is not None:
            ax.axvline(row["realised_pnl"], color="black", lw=2, label="realised")
        ax.set_title(f"level {level}: {row['days_ahead']} days ({row['date']})", fontsize=9)
        ax.set_xlabel("P&L")
        # few ticks, the axis' own power of ten apart: long P&L labels ran into each other
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("probability")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_embedding(coords: np.ndarray, level: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=level, cmap="viridis", s=10)
    fig.colorbar(sc, ax=ax, label="context mean iv")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
