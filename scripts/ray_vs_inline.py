"""The Ray backend against the inline one on one machine (a GPU machine, say): nodes/s of
the same tree with a local Ray of every core (one decoder actor, on the GPU where there is
one, and ``--knn`` kNN actors) and with the inline backend in one thread per core, each
level's time, and whether the two stores have the same bytes.

``backfill bench --gpu`` runs the inline backend only (Ray's wheel is too big to carry to a
machine without internet); this runs both where Ray is installed.

    python scripts/ray_vs_inline.py --knn 15 --depth 6 --epochs 2 --json ray_vs_inline.json

Sizes: M = ``--n-samples`` (64), ``engine.batch_size`` = ``--batch`` (8: a depth-6 tree's
lookahead levels have 125 and 625 nodes, so smaller tasks keep every actor busy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from engine import bench
from engine.config import Config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--knn", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="kNN actors (default: one per core but one)")
    ap.add_argument("--decoders", type=int, default=1, help="decoder actors")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    cfg = Config.from_dict({"train": {"epochs": args.epochs},
                            "tree": {"n_samples": args.n_samples},
                            "engine": {"n_knn": args.knn, "n_decoders": args.decoders,
                                       "batch_size": args.batch, "num_cpus": cores}})
    work = Path(tempfile.mkdtemp(prefix="ray-vs-inline-"))
    try:
        t0 = time.perf_counter()
        fitted = bench._fit(cfg, work, None)  # as `backfill bench` fits (module-private)
        print(f"fitted in {time.perf_counter() - t0:.1f} s on {fitted.model.loc.device}",
              flush=True)
        result = {"device": bench.device_info(str(fitted.model.loc.device)),
                  "config": cfg.to_dict(), "runs": []}
        for backend, threads in (("ray", None), ("inline", cores)):
            r = bench.tree_throughput(fitted, args.depth, backend, work, threads=threads,
                                      digest=True)
            r["nodes_per_s_from_level_2"] = bench._warm_rate(r)
            result["runs"].append(r)
            levels = ", ".join(f"{x['level']}: {x['nodes']} in {x['seconds']:.2f} s"
                               for x in r["levels"])
            who = f"{threads} threads" if threads else f"{args.knn} kNN actors"
            print(f"{backend} ({who}): {r['nodes_per_s']:,.1f} nodes/s "
                  f"({r['nodes_per_s_from_level_2']:,.1f} from level 2); levels {levels}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["same_bytes"] = len({r["digest"] for r in result["runs"]}) == 1
    print(f"same store bytes: {'yes' if result['same_bytes'] else 'NO'}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
