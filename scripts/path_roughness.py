"""Where a fitted kNN sampler's path roughness comes from (README, known limitations).

    python scripts/path_roughness.py SAMPLER.pt DATA

SAMPLER.pt: a `backfill fit --data DATA --out SAMPLER.pt` file (knn or knn-conformal).
Prints the std of daily log-IV changes (pooled over days and grid points) and their lag-1
autocorrelation along: the history; the bank's realised target paths; the fold models'
point paths on the bank's contexts; the bank's residual paths; 2,000 residuals drawn from
the fitted history's last context, before and after the conformal scale; the samples.
"""

from __future__ import annotations

import sys

import numpy as np

from engine import sampler_file
from engine.data.io import read_panel


def daily(x: np.ndarray) -> np.ndarray:
    return np.diff(x, axis=-3)  # paths (..., H, n_m, n_tau)


def describe(name: str, x: np.ndarray) -> None:
    d = daily(x)
    lag1 = np.corrcoef(d[..., 1:, :, :].ravel(), d[..., :-1, :, :].ravel())[0, 1]
    print(f"{name:34s} daily std {d.std():.4f}   lag-1 autocorrelation {lag1:+.3f}")


def main(sampler_path: str, data: str) -> None:
    sampler, meta = sampler_file.load_sampler(sampler_path)
    cfg = sampler.config.data
    panel = read_panel(data, cfg.fill, cfg.fill_limit)
    if panel.slice_days(0, meta["fit_days"]).fingerprint != meta["history_fingerprint"]:
        sys.exit(f"{data} is not the data {sampler_path} was fitted on")
    C, H = cfg.context, cfg.horizon
    log = panel.log_surface[:meta["fit_days"]]
    bank = sampler.bank_
    describe("history", log[None])
    describe("bank: realised targets", panel.targets_at(bank.anchors, H))
    describe("bank: fold point paths", sampler.point_forecast(
        panel.contexts_at(bank.anchors[::max(1, len(bank.anchors) // 200)], C)))
    describe("bank: residual paths", bank.residuals.astype(np.float64))
    last = log[None, -C:]
    point, keys = sampler.point_and_keys(last)
    ids, w = sampler.neighbours(keys)
    picks, res = sampler.residual_draw(ids, w, 2000, [np.random.default_rng(0)])
    describe("last context: residuals drawn", res)
    adjusted = sampler.adjust(res.copy(), ids, w)
    scale = getattr(sampler, "scale_", None)
    if scale is not None:
        print(f"{'conformal scale over horizons':34s} {np.min(scale):.2f} .. {np.max(scale):.2f}")
    describe("last context: after the scale", adjusted)
    describe("last context: samples", adjusted + point[np.zeros((1, 1), int), bank.fold[picks]])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
