"""Acceptance measurements for issue 4: the scenario tree against Monte Carlo of the same
sampler, long horizons against the synthetic market's oracle, determinism across backends,
and store integrity.

Every part runs on its own (``--part``); stores go to ``--root`` (default /tmp/acc4/stores),
results (JSON) to /tmp/acc4/<part>.json, and a store already complete is reused, so a part can
be rerun after a crash. The sampler is fitted once on the whole synthetic panel and pickled to
/tmp/acc4/sampler.pkl (the comparison is tree vs Monte Carlo of the SAME sampler).

    python scripts/tree_vs_mc.py --part fit
    python scripts/tree_vs_mc.py --part tree --starts 8            # depth 3, quantize + quantiles
    python scripts/tree_vs_mc.py --part mc --starts 8 --paths 20000
    python scripts/tree_vs_mc.py --part compare --starts 8 --paths 20000
    python scripts/tree_vs_mc.py --part oracle --starts 20         # depth 4 vs the oracle
    python scripts/tree_vs_mc.py --part determinism
    python scripts/tree_vs_mc.py --part integrity
    python scripts/tree_vs_mc.py --part scale                      # depth 7, M = 512
    python scripts/tree_vs_mc.py --part oracle --starts 20 --default-market
    python scripts/tree_vs_mc.py --part oracle --starts 20 --max-starts 4 --default-market --depth 6
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

OUT = Path("/tmp/acc4")
BASE = {"data.synthetic.n_days": 2500, "sampler.n_folds": 3, "train.epochs": 15,
        "train.threads": 1}
QLEV = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
Q01, Q05, Q50, Q95, Q99 = 0, 1, 3, 5, 6
ATM = 2  # moneyness 1.0


def _threads():
    import torch

    torch.set_num_threads(1)


def config(extra: dict | None = None):
    from engine.config import load_config

    return load_config(None, {**BASE, **(extra or {})})


_PREP = None


def prep():
    global _PREP
    if _PREP is None:
        from engine.pipeline import prepare

        _PREP = prepare(config())
    return _PREP


def sampler():
    path = OUT / "sampler.pkl"
    if path.is_file():
        with path.open("rb") as f:
            cached = pickle.load(f)
        if hasattr(cached, "point_models_"):  # fitted before CV+: refit
            return cached
        print(f"{path} predates the CV+ sampler: refitting")
    from engine.driver import fit_for_run, run_inputs

    p = prep()
    t0 = time.perf_counter()
    s = fit_for_run(p, run_inputs(p, None), None)
    print(f"fitted the sampler in {time.perf_counter() - t0:.0f}s")
    OUT.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(s, f)
    return s


def start_indices(n: int) -> list[int]:
    T = prep().panel.n_days
    return [int(i) for i in np.linspace(0.10 * T, 0.95 * T, n).astype(int)]


def start_date(i: int) -> str:
    return str(prep().panel.dates[i])


def make_store(path: Path, kind: str, cfg, start: str, samp, n_paths: int | None = None):
    """Run (or reuse, if complete) one store; returns (store, seconds or None if reused)."""
    from engine.driver import open_store, run_inputs, run_store
    from engine.store import ScenarioStore

    if path.exists():
        try:
            st = ScenarioStore.open(path)
            if st.levels_complete >= st.meta.depth and st.meta.start_date == start:
                return st, None
        except Exception as err:  # noqa: BLE001 - a broken leftover is rebuilt
            print(f"rebuilding {path}: {err}")
        shutil.rmtree(path, ignore_errors=True)
    inp = run_inputs(prep(), start)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = open_store(path, kind=kind, config=cfg, fingerprint=inp.fingerprint,
                    start_date=inp.start_date, grid=inp.grid, start_context=inp.start_context,
                    n_paths=n_paths, overwrite=True)
    t0 = time.perf_counter()
    run_store(st, samp, cfg)
    return ScenarioStore.open(path), time.perf_counter() - t0


def save(name: str, obj) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(obj, indent=1, default=float))
    print(f"-> {OUT / name}.json")


# ============================================================================ part 1


# kind -> (store tag, config overrides). The default tree draws a lookahead (tree.lookahead
# = 20); the "/no-lookahead" kinds switch it off (their stores predate it, same code path).
TREE_KINDS = {
    "quantize+moment": ("quantize_la", {}),
    "quantiles+equal": ("quantiles_la", {"tree.selection": "quantiles", "tree.weights": "equal"}),
    "quantize+moment/look512": ("quantize_la512", {"tree.lookahead_samples": 512}),
    "quantize+moment/no-lookahead": ("quantize", {"tree.lookahead": 0}),
    "quantiles+equal/no-lookahead": ("quantiles", {"tree.selection": "quantiles",
                                                   "tree.weights": "equal", "tree.lookahead": 0}),
    "quadrature+moment/no-lookahead": ("quadrature", {"tree.selection": "quadrature",
                                                      "tree.lookahead": 0}),
    "quantize+kept_mean/no-lookahead": ("quantize_kept", {"tree.score": "kept_mean",
                                                          "tree.lookahead": 0}),
}


def store_tag(kind: str) -> str:
    """A tree kind's store name part."""
    return TREE_KINDS[kind][0]


def part_tree(args):
    samp = sampler()
    times = {}
    for kind, (_, extra) in TREE_KINDS.items():
        cfg = config({"tree.depth": 3, "tree.n_samples": 512, "engine.backend": "inline",
                      **extra})
        for i in start_indices(args.starts)[: args.max_starts or None]:
            tag = store_tag(kind)
            _, sec = make_store(args.root / f"tree3_{tag}_{i}", "tree", cfg, start_date(i), samp)
            print(f"tree {kind} start {i} ({start_date(i)}): "
                  f"{'reused' if sec is None else f'{sec:.1f}s'}")
            if sec is not None:
                times[f"{kind}/{i}"] = sec
    save(f"tree_times_{args.starts}", times)


def part_mc(args):
    samp = sampler()
    cfg = config({"tree.depth": 3, "engine.backend": "inline"})
    times = {}
    for i in start_indices(args.starts)[: args.max_starts or None]:
        _, sec = make_store(args.root / f"mc3_{args.paths}_{i}", "mc", cfg, start_date(i), samp,
                             n_paths=args.paths)
        print(f"mc {args.paths} start {i} ({start_date(i)}): "
              f"{'reused' if sec is None else f'{sec:.1f}s'}", flush=True)
        if sec is not None:
            times[str(i)] = sec
    save(f"mc_times_{args.paths}", times)


def children_marginals(store, level: int) -> dict:
    """Marginals of level ``level``'s node paths alone (weighted by ``weight``)."""
    from engine.tree import weighted_quantile

    lv = store.read_level(level)
    x = np.moveaxis(lv["paths"].astype(np.float64), 0, -1)  # (S, n_m, n_tau, N)
    w = lv["weight"]
    q = weighted_quantile(x, w, QLEV)  # (S, n_m, n_tau, Q)
    mean = (x * w).sum(-1) / w.sum()
    std = np.sqrt(np.maximum(((x - mean[..., None]) ** 2 * w).sum(-1) / w.sum(), 0))
    return {"quantiles": np.moveaxis(q, -1, 1), "mean": mean, "std": std}


def _errors(t: dict, m: dict, it: int, im: int) -> dict:
    sd = m["std"][im].astype(np.float64)
    return {
        "std_ratio": t["std"][it] / sd,
        "q01": (t["quantiles"][it, Q01] - m["quantiles"][im, Q01]) / sd,  # signed
        "q99": (t["quantiles"][it, Q99] - m["quantiles"][im, Q99]) / sd,
        "mean": (t["mean"][it] - m["mean"][im]) / sd,
    }


def part_compare(args):
    from engine.store import ScenarioStore

    days = (90, 180, 270)
    starts = start_indices(args.starts)[: args.max_starts or None]
    acc = {v: {d: {k: [] for k in ("std_ratio", "q01", "q99", "mean")} for d in days}
           for v in (*TREE_KINDS, "children")}
    for i in starts:
        mc = ScenarioStore.open(args.root / f"mc3_{args.paths}_{i}").read_marginals()
        mc = {k: np.asarray(v, dtype=np.float64) if k in ("quantiles", "mean", "std") else v
              for k, v in mc.items()}
        for kind in TREE_KINDS:
            st = ScenarioStore.open(args.root / f"tree3_{store_tag(kind)}_{i}")
            tm = {k: np.asarray(v, dtype=np.float64) for k, v in st.read_marginals().items()
                  if k in ("quantiles", "mean", "std")}
            for d in days:
                for k, v in _errors(tm, mc, d - 1, d - 1).items():
                    acc[kind][d][k].append(v.ravel())
            if kind == "quantize+moment":
                S = st.level_days(1).size
                for d in days:
                    level, j = (d - 1) // S + 1, (d - 1) % S
                    cm = children_marginals(st, level)
                    for k, v in _errors(cm, mc, j, d - 1).items():
                        acc["children"][d][k].append(v.ravel())
    rows = []
    for v, per_day in acc.items():
        for d, per in per_day.items():
            signed = {k: np.concatenate(x) for k, x in per.items()}
            a = {k: np.abs(x) if k != "std_ratio" else x for k, x in signed.items()}
            r = a["std_ratio"]
            rows.append({
                "variant": v, "day": d, "n": int(r.size),
                "std_ratio_median": float(np.median(r)),
                "std_ratio_min": float(r.min()), "std_ratio_max": float(r.max()),
                "std_ratio_worst_dev": float(np.abs(r - 1).max()),
                "q01_median": float(np.median(a["q01"])), "q01_max": float(a["q01"].max()),
                "q99_median": float(np.median(a["q99"])), "q99_max": float(a["q99"].max()),
                "mean_median": float(np.median(a["mean"])), "mean_max": float(a["mean"].max()),
                **{f"{k}_signed_median": float(np.median(signed[k]))
                   for k in ("q01", "q99", "mean")},
            })
    print(f"tree (M 512, depth 3) vs mc ({args.paths} paths), {len(starts)} starts x 25 grid "
          "points; errors in mc std units")
    hdr = (f"{'variant':16} {'day':>4} {'ratio med':>9} {'min':>6} {'max':>6} {'q01 med':>8} "
           f"{'max':>6} {'q99 med':>8} {'max':>6} {'mean med':>8} {'max':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['variant']:16} {r['day']:>4} {r['std_ratio_median']:9.3f} "
              f"{r['std_ratio_min']:6.3f} {r['std_ratio_max']:6.3f} {r['q01_median']:8.3f} "
              f"{r['q01_max']:6.3f} {r['q99_median']:8.3f} {r['q99_max']:6.3f} "
              f"{r['mean_median']:8.3f} {r['mean_max']:6.3f}  signed med q01 "
              f"{r['q01_signed_median']:+.3f} q99 {r['q99_signed_median']:+.3f} mean "
              f"{r['mean_signed_median']:+.3f}")
    save(f"compare_{len(starts)}_{args.paths}", {"starts": starts, "paths": args.paths,
                                                  "rows": rows})


# ============================================================================ part 2


def part_oracle(args):
    """Depth ``--depth`` trees (default 4) against 5000 oracle paths from the true state on
    each start day, every 90 days: bias and mean |error| of q05 / q50 / q95 over starts and
    grid points, the share of oracle paths inside the tree's 90% band, and the grid point
    whose band width (q95 - q05, averaged over starts) is furthest from the oracle's."""
    samp = sampler()
    market = prep().panel.market
    depth = args.depth
    cfg = config({"tree.depth": depth, "tree.n_samples": 512, "engine.backend": "inline"})
    days = tuple(90 * k for k in range(1, depth + 1))
    starts = start_indices(args.starts)[: args.max_starts or None]
    diff = {d: {q: [] for q in ("q05", "q50", "q95")} for d in days}
    cover, cover_atm, times = {d: [] for d in days}, {d: [] for d in days}, {}
    width = {d: [] for d in days}  # (tree width, oracle width) per grid point
    tag = "tree4" if depth == 4 else f"tree{depth}"
    for n, i in enumerate(starts):
        st, sec = make_store(args.root / f"{tag}_{i}", "tree", cfg, start_date(i), samp)
        if sec is not None:
            times[str(i)] = sec
        print(f"tree depth {depth} start {i} ({start_date(i)}): "
              f"{'reused' if sec is None else f'{sec:.1f}s'}", flush=True)
        m = st.read_marginals()
        tq = np.asarray(m["quantiles"], dtype=np.float64)
        orc = market.oracle(i, 5000, days[-1], np.random.default_rng(1000 + n))  # (5000, D, 5, 5)
        for d in days:
            o = orc[:, d - 1]
            oq = np.quantile(o, (0.05, 0.5, 0.95), axis=0)
            for name, qi, k in (("q05", Q05, 0), ("q50", Q50, 1), ("q95", Q95, 2)):
                diff[d][name].append((tq[d - 1, qi] - oq[k]).ravel())
            inside = (o >= tq[d - 1, Q05]) & (o <= tq[d - 1, Q95])  # (5000, 5, 5)
            share = inside.mean(0)
            cover[d].append(share.ravel())
            cover_atm[d].append(share[ATM].ravel())
            width[d].append((tq[d - 1, Q95] - tq[d - 1, Q05], oq[2] - oq[0]))
    rows = []
    for d in days:
        ratio = np.mean([t for t, _ in width[d]], axis=0) / np.mean([o for _, o in width[d]],
                                                                    axis=0)  # (5, 5)
        worst = np.unravel_index(np.argmax(np.abs(np.log(ratio))), ratio.shape)
        rows.append({
            "day": d,
            **{f"{q}_bias": float(np.concatenate(diff[d][q]).mean()) for q in diff[d]},
            **{f"{q}_mean_abs": float(np.abs(np.concatenate(diff[d][q])).mean())
               for q in diff[d]},
            "coverage_90": float(np.concatenate(cover[d]).mean()),
            "coverage_90_atm": float(np.concatenate(cover_atm[d]).mean()),
            "width_ratio_atm": float(ratio[ATM].mean()),
            "width_ratio_worst": float(ratio[worst]), "worst_point": [int(x) for x in worst],
        })
    print(f"depth-{depth} tree (M 512, quantize) vs oracle (5000 paths), {len(starts)} starts x "
          "25 grid points; tree minus oracle in iv; band width (q95 - q05) tree / oracle")
    print(f"{'day':>4} {'q05':>8} {'q50':>8} {'q95':>8} {'|q05|':>7} {'|q50|':>7} {'|q95|':>7} "
          f"{'cov90':>6} {'cov90 ATM':>9} {'width ATM':>9} {'worst width (m, tau)':>21}")
    for r in rows:
        print(f"{r['day']:>4} {r['q05_bias']:8.4f} {r['q50_bias']:8.4f} {r['q95_bias']:8.4f} "
              f"{r['q05_mean_abs']:7.4f} {r['q50_mean_abs']:7.4f} {r['q95_mean_abs']:7.4f} "
              f"{r['coverage_90']:6.3f} {r['coverage_90_atm']:9.3f} "
              f"{r['width_ratio_atm']:9.3f} {r['width_ratio_worst']:12.3f} "
              f"{tuple(r['worst_point'])!s:>8}")
    save(f"oracle_{len(starts)}" + ("" if depth == 4 else f"_depth{depth}"),
         {"starts": starts, "rows": rows, "times": times})


# ============================================================================ parts 3, 4

DET_RUNS = {
    "inline": {"engine.backend": "inline"},
    "ray_1_1_7": {"engine.backend": "ray", "engine.n_decoders": 1, "engine.n_knn": 1,
                  "engine.batch_size": 7, "engine.num_cpus": 2},
    "ray_2_2_256": {"engine.backend": "ray", "engine.n_decoders": 2, "engine.n_knn": 2,
                    "engine.batch_size": 256, "engine.num_cpus": 2},
}


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(path, mode="r", zarr_format=3, use_consolidated=False)
    out = {}
    for gname, group in sorted(root.groups()):
        for aname, arr in sorted(group.arrays()):
            out[f"{gname}/{aname}"] = arr[...]
    return out


def det_start(args) -> int:
    return start_indices(args.starts)[len(start_indices(args.starts)) // 2]


def part_determinism(args):
    samp = sampler()
    i = det_start(args)
    times, paths = {}, {}
    for name, extra in DET_RUNS.items():
        cfg = config({"tree.depth": 4, "tree.n_samples": 512, **extra})
        path = args.root / f"det4_{name}_{i}"
        shutil.rmtree(path, ignore_errors=True)  # always a fresh, timed run
        _, sec = make_store(path, "tree", cfg, start_date(i), samp)
        times[name], paths[name] = sec, path
        print(f"{name}: {sec:.1f}s", flush=True)
    try:
        import ray

        ray.shutdown()
    except ImportError:
        pass
    ref = store_arrays(paths["inline"])
    result = {"start": i, "start_date": start_date(i), "times_s": times, "arrays": len(ref),
              "compare": {}}
    for name in list(DET_RUNS)[1:]:
        other = store_arrays(paths[name])
        diff = sorted(k for k in set(ref) | set(other)
                      if k not in ref or k not in other
                      or not np.array_equal(ref[k], other[k], equal_nan=True))
        result["compare"][name] = {"bit_equal": not diff, "differing": diff}
        print(f"inline vs {name}: {len(ref)} arrays, "
              f"{'all bit-equal' if not diff else f'differ: {diff}'}")
    save("determinism", result)


def part_scale(args):
    """A full depth-7 tree (19,531 expansions, 78,125 terminal paths, 630 days) at the default
    M = 512 from the last day, inline then Ray (local, engine defaults); wall time, nodes/s."""
    samp = sampler()
    i = prep().panel.n_days - 1
    result = {}
    for backend in ("inline", "ray"):
        cfg = config({"tree.depth": 7, "engine.backend": backend})
        path = args.root / f"scale7_{backend}"
        shutil.rmtree(path, ignore_errors=True)
        from engine.driver import open_store, run_inputs, run_store

        inp = run_inputs(prep(), start_date(i))
        st = open_store(path, kind="tree", config=cfg, fingerprint=inp.fingerprint,
                        start_date=inp.start_date, grid=inp.grid,
                        start_context=inp.start_context, overwrite=True)
        t0 = time.perf_counter()
        stats = run_store(st, samp, cfg)
        wall = time.perf_counter() - t0
        nodes, sec = sum(x.nodes for x in stats), sum(x.seconds for x in stats)
        result[backend] = {"wall_s": wall, "nodes": nodes, "level_seconds": sec,
                           "nodes_per_s": nodes / sec, "terminal": st.level_size(7),
                           "days": int(len(st.level_days(1)) * 7)}
        print(f"{backend}: {nodes} nodes in {wall:.0f}s ({nodes / sec:.1f} nodes/s)", flush=True)
        shutil.rmtree(path, ignore_errors=True)
    result["ray_over_inline"] = result["ray"]["nodes_per_s"] / result["inline"]["nodes_per_s"]
    print(f"ray / inline: {result['ray_over_inline']:.2f}")
    save("scale7", result)


def check_store(path: Path) -> dict:
    import xarray as xr

    from engine.store import ScenarioStore

    st = ScenarioStore.open(path)
    out = {"path": str(path), "kind": st.meta.kind, "levels": []}
    prev_n = 1
    for k in range(1, st.meta.depth + 1):
        lv = st.read_level(k)
        w, par, p = lv["weight"], lv["parent"], lv["paths"]
        ds = xr.open_zarr(path, group=f"level_{k:02d}", consolidated=False)
        dims_ok = tuple(ds["paths"].dims) == ("node", "day", "moneyness", "maturity")
        coords_ok = all(c in ds.coords for c in ("day", "moneyness", "maturity"))
        out["levels"].append({
            "level": k, "nodes": int(w.size),
            "weight_sum_err": float(abs(w.sum() - 1.0)),
            "weights_ok": bool(abs(w.sum() - 1.0) <= 1e-9),
            "parents_ok": bool(((par >= 0) & (par < prev_n)).all()),
            "paths_ok": bool(np.isfinite(p).all() and (p > 0).all()),
            "xarray_ok": bool(dims_ok and coords_ok),
            "xarray_dims": list(ds["paths"].dims),
            "xarray_coords": sorted(ds.coords),
        })
        prev_n = w.size
    return out


def part_integrity(args):
    root = args.root
    paths = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    results = []
    for p in paths:
        r = check_store(p)
        ok = all(lv[f] for lv in r["levels"]
                 for f in ("weights_ok", "parents_ok", "paths_ok", "xarray_ok"))
        worst = max(lv["weight_sum_err"] for lv in r["levels"])
        r["ok"] = ok
        results.append(r)
        print(f"{p.name:28} {r['kind']:4} levels {len(r['levels'])} "
              f"max |sum w - 1| {worst:.1e} {'OK' if ok else 'FAIL'}")
    save("integrity", {"stores": results, "all_ok": all(r["ok"] for r in results)})
    print(f"{len(results)} stores, all ok: {all(r['ok'] for r in results)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", required=True, choices=("fit", "tree", "mc", "compare", "oracle",
                                                      "determinism", "integrity", "scale"))
    ap.add_argument("--starts", type=int, default=8, help="start dates, 10%%..95%% of the data")
    ap.add_argument("--max-starts", type=int, default=0, help="use only the first n (0: all)")
    ap.add_argument("--paths", type=int, default=20000, help="Monte Carlo paths")
    ap.add_argument("--depth", type=int, default=4, help="--part oracle: tree depth (90 days "
                    "a level)")
    ap.add_argument("--root", type=Path, default=None, help="stores (default: OUT/stores)")
    ap.add_argument("--default-market", action="store_true",
                    help="the default synthetic market and model (6000 days, 25 epochs, 5 "
                         "folds) instead of the smaller BASE; results under /tmp/acc4_default")
    args = ap.parse_args()
    global OUT, BASE
    if args.default_market:
        OUT, BASE = Path("/tmp/acc4_default"), {"train.threads": 1}
    args.root = args.root or OUT / "stores"
    _threads()
    t0 = time.perf_counter()
    {"fit": lambda a: sampler(), "tree": part_tree, "mc": part_mc, "compare": part_compare,
     "oracle": part_oracle, "determinism": part_determinism,
     "integrity": part_integrity, "scale": part_scale}[args.part](args)
    print(f"part {args.part}: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
