"""How the online conformal scale's defaults were chosen: a grid over its two settings.

Fits ``knn-conformal`` as ``backfill evaluate`` does (the model trained on the train split,
the sampler on the history before the test split), scores every window up to the end of
the evaluation panel once, then replays the scale for each (memory, prior) pair and the
split scale. Coverage here is the score proxy (a window is covered at (h, g) when its score
is at most the scale; the sampled bands add the fold models' spread), so it tracks but does
not equal `evaluate`'s coverage. Per setting, over every test anchor (daily):

- coverage90 at 1, 5, 10, 20, 30, 60, 90 days;
- the interval score of the 90% band, in units of the neighbours' half-band (lower is
  better; proper for the band);
- the scale's mean, mean square and std of its log over the test span, the first two
  over the split scale's (how much wider it makes the samples, and whether by its level
  or by its swings);
- on the synthetic market's long test span, the share of 475-day spans (the VIX file's
  test span) whose coverage lies in [0.85, 0.95] at every horizon, and per horizon.

It also prints the 90% quantile of the test windows' own scores over the split scale: the
level a scale that tracks them tends to.

    python scripts/online_conformal.py                      # the synthetic market
    python scripts/online_conformal.py --data FILE.csv      # any data file (a report only)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from engine.config import load_config
from engine.evaluate import evaluation_windows, set_threads
from engine.pipeline import get_model, prepare
from engine.samplers import make_sampler

HORIZONS = (1, 5, 10, 20, 30, 60, 90)
SPAN = 475


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--memory", default="125,250,500,1000")
    ap.add_argument("--prior", default="0,1,3,10")
    ap.add_argument("--json", default=None, help="write the table here too")
    args = ap.parse_args()
    over = {} if args.data == "synthetic" else {"data.source": args.data}
    cfg = load_config(None, over)
    set_threads(cfg)
    prep = prepare(cfg, evaluation=True)
    t0 = time.perf_counter()
    model = get_model(prep, None, None)
    sampler = make_sampler("knn-conformal", cfg).fit(prep.fit_panel(), model)
    scores = sampler.window_scores(prep.panel)
    print(f"fit and scored {len(scores)} windows in {time.perf_counter() - t0:.0f}s")
    a0 = int(sampler.bank_.anchors[0])
    test = evaluation_windows(prep).anchors
    every = np.arange(test[0], test[-1] + 1)
    alpha = 1 - cfg.sampler.coverage
    hz = [h for h in HORIZONS if h <= cfg.data.horizon]

    split = np.asarray([sampler.split_scale_[h - 1] for h in hz], dtype=np.float64)
    # the level an online scale tends to over a long test span: the 90% quantile of
    # the test windows' own scores, over the split scale (1 = the bank's scores agree)
    test_q = np.asarray([np.nanquantile(scores[every - a0, h - 1], 1 - alpha) for h in hz])
    print(f"test windows' own 90% score quantile / split scale: {(test_q / split).round(3)}")

    def summary(path: np.ndarray) -> dict:
        s = np.stack([scores[every - a0, h - 1] for h in hz])  # (n_h, n, G)
        c = np.stack([path[every, h - 1] for h in hz]).astype(np.float64)[:, :, None]
        covered = (s <= c).mean(axis=2)  # (n_h, n)
        out = {"coverage90": covered.mean(axis=1).round(3).tolist(),
               "interval_score": (2 * c + (2 / alpha) * np.maximum(s - c, 0)).mean(
                   axis=(1, 2), dtype=np.float64).round(3).tolist(),
               # the spread the scale adds to the pooled samples: mean square of the scale
               # over the split scale's (1 for the split scale itself)
               "scale_ms": (np.mean(c[:, :, 0] ** 2, axis=1) / split ** 2).round(3).tolist(),
               # its level and its swings: mean scale over the split's, std of log(scale)
               "scale_mean": (c[:, :, 0].mean(axis=1) / split).round(3).tolist(),
               "log_scale_std": np.log(c[:, :, 0]).std(axis=1).round(3).tolist()}
        n = covered.shape[1] // SPAN
        if n >= 10:
            spans = covered[:, : n * SPAN].reshape(len(hz), n, SPAN).mean(axis=2)
            inside = (spans >= 0.85) & (spans <= 0.95)
            out.update(spans=n, all_in_band=round(float(inside.all(axis=0).mean()), 3),
                       in_band=inside.mean(axis=1).round(3).tolist())
        return out

    rows = {"split": summary(np.broadcast_to(sampler.split_scale_,
                                             (prep.panel.n_days, cfg.data.horizon)))}
    for memory, prior in itertools.product(map(float, args.memory.split(",")),
                                           map(float, args.prior.split(","))):
        sc = cfg.sampler.model_copy(update={"online_memory_days": memory,
                                            "online_prior_episodes": prior})
        sampler.config = cfg.model_copy(update={"sampler": sc})
        rows[f"online memory={memory:g} prior={prior:g}"] = summary(
            sampler._online_path(prep.panel, scores))
    print(f"horizons {hz}")
    for name, r in rows.items():
        spans = (f" | spans all-in {r['all_in_band']:.2f} per-h {r['in_band']}"
                 if "spans" in r else "")
        print(f"{name:32s} cov {r['coverage90']} IS {r['interval_score']} "
              f"ms {r['scale_ms']} mean {r['scale_mean']} "
              f"log-std {r['log_scale_std']}{spans}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "horizons": hz, "rows": rows,
                       "defaults": [cfg.sampler.online_memory_days,
                                    cfg.sampler.online_prior_episodes]}, f, indent=1)


if __name__ == "__main__":
    main()
