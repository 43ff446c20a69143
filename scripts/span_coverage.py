"""How often a test span as short as the VIX file's meets the coverage band, on the synthetic market.

The VIX acceptance scores ``knn-conformal``'s 90% bands on one test span of 475 daily windows
and asks for coverage within [0.85, 0.95] at every horizon. A 90-day horizon over 475 days
holds about five independent outcomes, so the coverage of even a perfect forecaster swings
widely from span to span. The synthetic market's long test span shows how widely: this
script samples 1,000 paths for every daily test window of its first ``--days`` days, for each
method of ``--methods`` (``oracle``, the true conditional law, by default beside
``knn-conformal``), and reports, over every ``--span``-day span (starting every
``--every`` days):

- the coverage90 over all the windows, per horizon;
- the share of spans whose coverage lies within [``--lo``, ``--hi``], per horizon and at
  every horizon at once;
- the share of spans over ``--hi`` at the longest horizon (a calm span: the failure on the
  VIX file).

    python scripts/span_coverage.py                       # oracle, knn-conformal; ~25 min
    python scripts/span_coverage.py --methods oracle --days 5000 --json spans.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from engine import metrics
from engine.config import load_config
from engine.evaluate import evaluation_windows, sample_windows, set_threads
from engine.pipeline import get_model, prepare
from engine.samplers import make_sampler

BLOCK = 500  # windows sampled at a time (memory)
PER_WINDOW = ("anchors", "contexts", "realised", "level", "regime", "year")  # EvalWindows'


def take(windows, sel: slice, **other):
    """``windows`` cut to the windows ``sel`` (every per-window field), ``other`` replaced."""
    return dataclasses.replace(windows, **{f: getattr(windows, f)[sel] for f in PER_WINDOW},
                               **other)


def window_coverage(sampler, windows, horizons: list[int], n_samples: int, seed: int
                    ) -> np.ndarray:
    """(len(horizons), W) share of each window's grid points inside its 5-95% band."""
    W = windows.n
    real = windows.realised.reshape(W, windows.realised.shape[1], -1)
    cov = np.empty((len(horizons), W))
    for b0 in range(0, W, BLOCK):
        b = slice(b0, min(W, b0 + BLOCK))
        kept = sample_windows(sampler, take(windows, b), horizons, n_samples, seed).kept
        each = np.arange(b.stop - b.start)  # one group per window: its own coverage
        for j, h in enumerate(horizons):
            cov[j, b] = metrics.coverage_by_group(kept[j], real[b, h - 1], 0.9, each, len(each))
    return cov


def span_summary(cov: np.ndarray, horizons: list[int], span: int, every: int, lo: float,
                 hi: float) -> dict:
    starts = range(0, cov.shape[1] - span + 1, every)
    per_span = np.array([cov[:, i : i + span].mean(axis=1) for i in starts])  # (S, h)
    ok = (per_span >= lo) & (per_span <= hi)
    return {"coverage90": dict(zip(map(str, horizons), cov.mean(axis=1).round(4).tolist(),
                                   strict=True)),
            "n_spans": len(per_span),
            "share_within": dict(zip(map(str, horizons), ok.mean(axis=0).round(4).tolist(),
                                     strict=True)),
            "share_within_every_horizon": round(float(ok.all(axis=1).mean()), 4),
            "share_over_at_longest": round(float((per_span[:, -1] > hi).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="oracle,knn-conformal")
    ap.add_argument("--days", type=int, default=5000, help="daily test windows scored")
    ap.add_argument("--horizons", default="1,5,10,20,30,60,90")
    ap.add_argument("--span", type=int, default=475)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--lo", type=float, default=0.85)
    ap.add_argument("--hi", type=float, default=0.95)
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    cfg = load_config(None, {"evaluate.window_stride": 1})
    set_threads(cfg)
    prep = prepare(cfg, evaluation=True)
    if prep.panel.market is None:
        raise SystemExit("span_coverage.py needs the synthetic market (the oracle's truth)")
    windows = evaluation_windows(prep)
    n = min(args.days, windows.n)
    if n < args.span:
        raise SystemExit(f"--days {args.days} gives {n} windows, fewer than one --span")
    windows = take(windows, slice(0, n), fan_rows=np.arange(min(3, n)))
    horizons = [int(h) for h in args.horizons.split(",")]
    print(f"synthetic market: {n} daily test windows from day {windows.anchors[0]}, spans of "
          f"{args.span} days every {args.every}, band [{args.lo}, {args.hi}]", flush=True)
    model = None
    results = {}
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        sampler = make_sampler(name, cfg)
        if sampler.uses_model and model is None:
            model = get_model(prep, None, None)
        sampler.fit(prep.fit_panel(), model)
        sampler.observe(prep.panel)
        cov = window_coverage(sampler, windows, horizons, args.n_samples, cfg.seed)
        results[name] = span_summary(cov, horizons, args.span, args.every, args.lo, args.hi)
        print(f"{name} ({time.perf_counter() - t0:.0f}s): {json.dumps(results[name])}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"days": n, "span": args.span, "every": args.every,
                       "band": [args.lo, args.hi], "methods": results}, f, indent=2)


if __name__ == "__main__":
    main()
