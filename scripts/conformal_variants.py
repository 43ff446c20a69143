"""Other ways to calibrate knn-conformal, measured against the default split scale.

The VIX file's test span (2021-2023) is over-covered at 60 and 90 days by the default
(see README, known limitations). This script fits ``knn-conformal`` as ``backfill
evaluate`` does and scores, on every daily window of the evaluation's test span, six
alternatives that need no look at the test span:

- ``per grid point``: one split scale per (horizon, grid point) instead of one per horizon;
- ``localized``: each window's scale is the kernel-weighted 90% conformal quantile of its
  K neighbours' own leave-one-out scores (localized conformal, Guan 2023) instead of all
  the bank's;
- ``centred on the point``: bands about the point forecast instead of the neighbour
  mixture's mean (scores ``y / (hi - mu)``, ``-y / (mu - lo)``; samples ``c * (r - mu)``);
- ``one scale per side``: the upper and the lower half-band calibrated apart, each to
  1 - alpha/2 (asymmetric conformalized quantiles, Romano et al. 2019); its scale column
  lists the upper side's over the default's, then the lower side's;
- ``point recalibrated``: the fold models' forecasts of the change from the context's
  last day mapped by a Mincer-Zarnowitz fit per horizon on the bank (``a_h + b_h x``),
  residuals and scores recomputed.
- ``realised-vol normalized``: each score divided by its context's realised volatility (the
  20-day std of the surface's mean daily log change, as in the hand-made features), one split
  scale of those, each window's band that scale times its own realised vol (normalized
  conformal, Papadopoulos et al. 2008; the volatility scaling of filtered historical
  simulation);
- ``features keys``: the same bank searched in the hand-made feature space
  (``sampler.embedding = "features"``) instead of the CVAE embedding, scores and split
  scale recomputed (``rekeyed``: what ``evaluate`` reports as ``knn-conformal-features``;
  its scale column: over the default's).

Whether the fitted history itself favours the online scale: each day of the bank, both
scales as a forecaster had them that day (the expanding equal-weight conformal quantile of
the scores realised by then, and the default online scale), scored by the quantile
(pinball) loss at the nominal level against the scores the bank's windows anchored that day
then realised. A lower loss for the online scale would have said, before the test span,
that this market drifts enough to prefer it.

First, how far a span's scores may stray from the split scale on this history: the 90%
quantile of the bank's leave-one-out scores within each of its cross-fitting time blocks
(about two years each on the VIX file), and of the test span's, over the split scale (a
span that needs exactly the split scale gives 1; below 1, the split band over-covers it).

Then, per variant and horizon: the share of test (window, grid point) pairs whose score lies
within the variant's scale (the score proxy of coverage: the sampled bands add the fold
models' spread, so ``evaluate``'s coverage tracks it but differs a little) and the
variant's scale over the default's (per grid point and localized: its mean over the grid
points or the test windows). The bank's own Mincer-Zarnowitz slopes are printed too
(b < 1: the point forecast over-reacts).

    python scripts/conformal_variants.py --data ../shared/data/vix_term_2011_2023.csv  # ~2 min
    python scripts/conformal_variants.py                    # the synthetic market, ~35 min
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
import types

import numpy as np

from engine.config import load_config
from engine.evaluate import evaluation_windows, set_threads
from engine.pipeline import get_model, prepare
from engine.samplers import make_sampler
from engine.samplers.bank import context_features
from engine.samplers.knn_conformal import weighted_quantiles

HORIZONS = (1, 5, 10, 20, 30, 60, 90)
BLOCK = 256  # windows per neighbour search


def localized_scales(sampler, keys: np.ndarray, anchors: np.ndarray, alpha: float
                     ) -> np.ndarray:
    """(n, H) per window: the weighted 1 - alpha quantile of its neighbours' bank scores
    (pooled over grid points), neighbours sharing a target day with it left out."""
    H, bank_anchors = sampler.horizon, sampler.bank_.anchors
    out = np.empty((len(anchors), H))
    for i in range(0, len(anchors), BLOCK):
        a = anchors[i : i + BLOCK]

        def exclude(ids, a=a):
            return np.abs(bank_anchors[ids] - a[:, None]) <= H

        ids, w = sampler.neighbours(keys[i : i + BLOCK], exclude_fn=exclude, extra=2 * H + 1)
        nb = sampler.scores_[ids]  # (b, k, H, G)
        b, k, _, G = nb.shape
        values = np.nan_to_num(nb.transpose(0, 1, 3, 2).reshape(b, k * G, H), nan=np.inf)
        out[i : i + BLOCK] = weighted_quantiles(values, np.repeat(w, G, axis=1) / G,
                                                [1 - alpha])[0]
    return out


def block_quantiles(sampler, panel, test_scores: np.ndarray, cols: list[int],
                    level: float) -> dict[str, list[float]]:
    """The ``level`` quantile of the scores (pooled over grid points) within each time
    block of the bank, and within the test span, over the split scale, at ``cols``."""
    def ratios(scores):
        return [round(float(np.nanquantile(scores[:, c], level) / sampler.split_scale_[c]), 3)
                for c in cols]

    bank, out = sampler.bank_, {}
    for f in np.unique(bank.fold):
        a = bank.anchors[bank.fold == f]
        out[f"bank {panel.dates[a[0]]!s:.10}..{panel.dates[a[-1]]!s:.10}"] = ratios(
            sampler.scores_[bank.fold == f])
    out["test span"] = ratios(test_scores)
    return out


def prequential_losses(sampler, cfg, panel, cols: list[int]) -> dict[str, list[float]]:
    """Mean pinball loss at the coverage level over the bank's windows: the equal-weight
    expanding scale (``split``) and the online one, each as issued on the window's anchor
    day; per horizon at ``cols``, then pooled over every horizon. Only days on which both
    had at least max(h, 10) realised h-day windows behind them count. ``panel``: the
    fitted history."""
    def path(**over):
        c = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(
            update={"conformal": "online", **over})})
        return sampler.recalibrated(c, panel)._online_path(panel)

    paths = {"split": path(online_memory_days=1e12, online_prior_episodes=0.0),
             "online": path()}
    tau, anchors = cfg.sampler.coverage, sampler.bank_.anchors
    s = sampler.scores_.astype(np.float64)  # (N, H, G)
    hs = np.arange(1, s.shape[1] + 1)
    ok = (anchors[:, None] - anchors[0] >= hs[None, :] - 1 + np.maximum(hs, 10)[None, :])
    ok = ok[:, :, None] & ~np.isnan(s)
    out = {}
    for name, p in paths.items():
        d = np.where(ok, s - p[anchors][:, :, None], 0.0)
        loss = np.maximum(tau * d, (tau - 1) * d)
        per_h = loss.sum(axis=(0, 2)) / ok.sum(axis=(0, 2))
        out[name] = [round(float(per_h[c]), 5) for c in cols] + [
            round(float(loss.sum() / ok.sum()), 5)]
    return out


def rescored(sampler, score):
    """A copy of the fitted sampler whose nonconformity is ``score(y, lo, hi, mu)``, its
    bank's leave-one-out scores recomputed."""
    c = copy.copy(sampler)

    def _score(self, keys, y, exclude, extra):
        lo, hi, mu = self._band(keys, exclude, extra)
        return score(y, lo, hi, mu).astype(np.float32)

    c._score = types.MethodType(_score, c)
    c.scores_ = c._scores(np.arange(len(c.bank_.anchors)), c.horizon)
    return c


def signed(sampler):
    """The usual score above the mixture's mean, minus it below."""
    return rescored(sampler, lambda y, lo, hi, mu: np.where(
        y >= mu, (y - mu) / np.maximum(hi - mu, 1e-9), -(mu - y) / np.maximum(mu - lo, 1e-9)))


def side_scales(sampler, scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(H,) each: the conformal 1 - alpha/2 quantile of the upper and of the lower side's
    score (asymmetric conformalized quantiles, Romano et al. 2019), from signed scores
    (N, H, G); a window on the other side scores below zero on this one."""
    def side(s):
        return sampler._global_scale(np.where(s >= 0, s, -1.0), 1 - alpha / 2
                                     ).astype(np.float64)

    return side(scores), side(-scores)


def centred(sampler):
    """Scores measured from the point forecast instead of the mixture's mean."""
    return rescored(sampler, lambda y, lo, hi, mu: np.where(
        y >= 0, y / np.maximum(hi - mu, 1e-9), -y / np.maximum(mu - lo, 1e-9)))


def recalibrated_point(sampler, panel):
    """A copy whose point forecasts are Mincer-Zarnowitz-mapped per horizon (fit on the
    bank's out-of-sample forecasts), with its residuals and scores recomputed; and the
    slopes b_h. ``panel``: the history the sampler was fitted on."""
    bank, H = sampler.bank_, sampler.horizon
    n = len(bank.anchors)
    target = panel.targets_at(bank.anchors, H).reshape(n, H, -1)  # (N, H, G)
    last = panel.log_surface[bank.anchors].reshape(n, 1, -1)
    point = target - bank.residuals.reshape(target.shape)
    dx, dy = (point - last).transpose(1, 0, 2), (target - last).transpose(1, 0, 2)
    dx, dy = dx.reshape(H, -1), dy.reshape(H, -1)
    xc = dx - dx.mean(axis=1, keepdims=True)
    slope = (xc * (dy - dy.mean(axis=1, keepdims=True))).sum(axis=1) / (xc ** 2).sum(axis=1)
    icpt = dy.mean(axis=1) - slope * dx.mean(axis=1)
    new_point = last + icpt[None, :, None] + slope[None, :, None] * (point - last)
    c = copy.copy(sampler)
    c.bank_ = dataclasses.replace(
        bank, residuals=(target - new_point).reshape(bank.residuals.shape).astype(np.float32))
    fold_forecast = sampler.point_forecast
    shape = (1, 1, H, 1, 1)

    def point_forecast(log_ctx):
        p = fold_forecast(log_ctx)  # (B, F, H, n_m, n_tau)
        lst = log_ctx[:, -1][:, None, None]
        return lst + icpt.reshape(shape) + slope.reshape(shape) * (p - lst)

    c.point_forecast = point_forecast
    c.scores_ = c._scores(np.arange(len(bank.anchors)), H)
    return c, slope


def realised_vol(panel, anchors: np.ndarray, context: int) -> np.ndarray:
    """(n,) the realised volatility of each window's context: the hand-made features' own."""
    return np.exp(context_features(panel.contexts_at(anchors, context))[:, 3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--json", default=None, help="write the table here too")
    args = ap.parse_args()
    cfg = load_config(None, {} if args.data == "synthetic" else {"data.source": args.data})
    set_threads(cfg)
    prep = prepare(cfg, evaluation=True)
    t0 = time.perf_counter()
    model = get_model(prep, None, None)
    sampler = make_sampler("knn-conformal", cfg).fit(prep.fit_panel(), model)
    print(f"fitted in {time.perf_counter() - t0:.0f}s; {sampler.bank_summary()}")
    panel, H, alpha = prep.panel, cfg.data.horizon, 1 - cfg.sampler.coverage
    a0 = int(sampler.bank_.anchors[0])
    test = evaluation_windows(prep).anchors
    every = np.arange(test[0], test[-1] + 1)
    hz = [h for h in HORIZONS if h <= H]
    cols = [h - 1 for h in hz]
    rows = {}

    def row(name: str, test_scores: np.ndarray, scale: np.ndarray, rel=None) -> None:
        """scale broadcasts against test_scores (n, H, G); ``rel``: the scale over the
        default's to show, if not the mean of ``scale`` over it."""
        cover = (test_scores <= scale)[:, cols]
        ok = ~np.isnan(test_scores[:, cols])
        if rel is None:
            rel = np.broadcast_to(scale, test_scores.shape)[:, cols].mean(
                axis=(0, 2), dtype=np.float64) / sampler.split_scale_[cols]
        rows[name] = {"coverage90": ((cover & ok).sum(axis=(0, 2)) / ok.sum(axis=(0, 2))
                                     ).round(3).tolist(),
                      "scale_over_default": rel.round(3).tolist()}
        print(f"{name:24s} cov {rows[name]['coverage90']}  scale/default "
              f"{rows[name]['scale_over_default']}  ({time.perf_counter() - t0:.0f}s)")

    print(f"test span: {len(every)} daily windows; horizons {hz}")
    scores = sampler.window_scores(panel)[every - a0]
    blocks = block_quantiles(sampler, panel, scores, cols, 1 - alpha)
    print(f"{1 - alpha:.0%} quantile of the scores over the split scale, "
          f"{panel.dates[every[0]]!s:.10}..{panel.dates[every[-1]]!s:.10} the test span:")
    for name, q in blocks.items():
        print(f"  {name:27s} {q}")
    pre = prequential_losses(sampler, cfg, prep.fit_panel(), cols)
    print(f"pinball loss over the bank of the scale issued day by day, at {hz} and over "
          "every horizon:")
    for name, q in pre.items():
        print(f"  {name:27s} {q}")
    row("split (default)", scores, sampler.split_scale_[None, :, None])
    # the sampler's own conformal quantile, of each grid point's scores alone: (H, G)
    per_point = np.stack([sampler._global_scale(sampler.scores_[:, :, [g]])
                          for g in range(sampler.scores_.shape[2])], axis=1)
    row("per grid point", scores, per_point[None])
    keys = sampler.keys_(panel.contexts_at(every, cfg.data.context))
    row("localized", scores, localized_scales(sampler, keys, every, alpha)[:, :, None])
    c = centred(sampler)
    row("centred on the point", c.window_scores(panel)[every - a0],
        c._global_scale(c.scores_)[None, :, None])
    sg = signed(sampler)
    up, down = side_scales(sampler, sg.scores_, alpha)
    ts = sg.window_scores(panel)[every - a0]  # signed; NaN stays NaN
    per_side = np.where(ts >= 0, ts / up[None, :, None], -ts / down[None, :, None])
    # its scale column: the upper side's over the default's, then the lower side's
    row("one scale per side", per_side, np.ones((1, H, 1)),
        rel=np.concatenate([up[cols], down[cols]]) / np.tile(sampler.split_scale_[cols], 2))
    r, slope = recalibrated_point(sampler, prep.fit_panel())
    print(f"bank's Mincer-Zarnowitz slopes at {hz}: {slope[cols].round(3).tolist()}")
    row("point recalibrated", r.window_scores(panel)[every - a0],
        r._global_scale(r.scores_)[None, :, None])
    vol_bank = realised_vol(prep.fit_panel(), sampler.bank_.anchors, cfg.data.context)
    vol_test = realised_vol(panel, every, cfg.data.context)
    vol_scale = sampler._global_scale(sampler.scores_ / vol_bank[:, None, None])
    print(f"realised vol of the contexts, test span over bank: mean "
          f"{vol_test.mean() / vol_bank.mean():.3f}, median "
          f"{np.median(vol_test) / np.median(vol_bank):.3f}")
    row("realised-vol normalized", scores / vol_test[:, None, None],
        vol_scale[None, :, None],
        rel=vol_scale[cols] * vol_test.mean() / sampler.split_scale_[cols])
    feat = sampler.rekeyed(cfg.model_copy(update={"sampler": cfg.sampler.model_copy(
        update={"embedding": "features"})}), prep.fit_panel(), model)
    row("features keys", feat.window_scores(panel)[every - a0],
        feat.split_scale_[None, :, None])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "horizons": hz, "rows": rows, "blocks": blocks,
                       "mz_slopes": slope[cols].round(4).tolist(),
                       "prequential_pinball": pre}, f, indent=1)


if __name__ == "__main__":
    main()
