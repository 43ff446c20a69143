"""How many sampled values per second could a GPU-resident kNN half make? A measurement of
the arithmetic alone, not of the engine.

The engine's kNN half runs in numpy on the CPU: per node it draws residual paths from the
bank, adds them to the point forecasts, and bins every value into the exact int64 marginal
histogram (``backfill bench --gpu`` counts these values: ``sampled_values_per_node``,
1,008,000 for a lookahead node at M = 64 on the synthetic 5 x 5 grid, 144,000 without the
lookahead). This script times the same steps as torch kernels on one device, with the bank
resident there and the draws never leaving it: a random pick per sample (torch's generator,
not the engine's per-node streams), the residual gather, the point added, the calibration
scale, each node's sums of iv and iv^2 rounded to int64 fixed point, and an int64
``scatter_add_`` of each value's mass into its (day, grid point) histogram row. Values/s
over the values a node draws is the node rate such a redesign could not exceed; it leaves
out the decoder, the neighbour search, the choice of children and the store. Measured on an
H100 (nineteenth session, ``cluster/README.md``): 11.6 billion values/s in float64, 17 in
float32.

    python scripts/gpu_values_ceiling.py [--device cuda] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(device: str, n_bank: int, horizon: int, grid: int, k: int, nodes: int, m: int,
        bins: int, dtype: torch.dtype, seconds: float) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    bank = 0.05 * torch.randn(n_bank, horizon, grid, device=device, dtype=dtype, generator=gen)
    point = torch.log(torch.full((nodes, 1, horizon, grid), 0.2, device=device, dtype=dtype))
    ids = torch.randint(0, n_bank, (nodes, k), device=device, generator=gen)
    scale = torch.full((1, 1, horizon, 1), 1.1, device=device, dtype=dtype)
    mass = torch.zeros(horizon * grid, bins + 2, dtype=torch.int64, device=device)
    unit = torch.full((nodes * m,), 1 << 40, dtype=torch.int64, device=device)
    sums = torch.zeros(2, horizon, grid, dtype=torch.int64, device=device)
    lo, width = -5.3, 6.9 / bins

    def step():
        pick = torch.randint(0, k, (nodes, m), device=device, generator=gen)
        rows = torch.gather(ids, 1, pick)  # (nodes, m) bank rows
        x = bank[rows] * scale + point  # (nodes, m, H, G) log-IV
        # the moments: each node's samples' sums of iv and iv^2, one fixed-point rounding each
        iv = x.exp().clamp_(max=32.0)
        sums[0] += torch.round(iv.sum(1) * 2.0 ** -4).long().sum(0)
        sums[1] += torch.round((iv * iv).sum(1) * 2.0 ** -9).long().sum(0)
        cell = ((x - lo) / width).floor().clamp_(-1, bins).long() + 1
        cell = cell.permute(2, 3, 0, 1).reshape(horizon * grid, nodes * m)
        mass.scatter_add_(1, cell, unit.expand(horizon * grid, -1))

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while True:
        step()
        reps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    dt = (time.perf_counter() - t0) / reps
    values = nodes * m * horizon * grid
    return {"dtype": str(dtype).removeprefix("torch."), "nodes": nodes, "m": m,
            "values_per_call": values, "seconds_per_call": dt, "values_per_s": values / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--nodes", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    per_node = {"lookahead node, M = 64": 1_008_000, "node without lookahead, M = 64": 144_000}
    out = []
    for dtype in (torch.float32, torch.float64):
        r = run(a.device, 3000, 90, 25, 40, a.nodes, 64, 512, dtype, a.seconds)
        r["node_bound"] = {kind: r["values_per_s"] / v for kind, v in per_node.items()}
        out.append(r)
        print(f"{a.device} {r['dtype']}: {r['values_per_s']:,.0f} values/s; nodes/s bound: "
              + ", ".join(f"{kind} {n:,.0f}" for kind, n in r["node_bound"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "runs": out}, f, indent=1)


if __name__ == "__main__":
    main()
