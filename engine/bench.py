"""`backfill bench`: throughput and memory of the engine's parts, as one table and one JSON.

Everything is measured with ONE fitted sampler: the config's sampler (``sampler.method``),
fitted on the config's data (``--data`` / ``data.source``, the synthetic market by default)
up to its last day, with a CVAE trained once (``train.epochs`` as configured). The tree and
RSS runs use ``tree.n_samples`` = ``--n-samples``, else the config's capped at
``DEFAULT_SAMPLES`` (64: the default 512 makes a node ~6x dearer and the full bench over an
hour on 2 cores); the JSON's ``config`` is the config they ran with, ``overrides`` what the
bench changed. What each number is:

``inline_nodes_per_s`` / ``ray_nodes_per_s`` {"5", "6", "7"}
    A full tree (``tree.max_frontier`` and ``tree.min_weight`` forced to 0) of that depth
    into a fresh temporary store (removed after), with the inline or the Ray backend: the
    driver's ``LevelStats`` summed over the levels, frontier nodes expanded / seconds of
    the level loops (decoder + kNN draw + children + marginal sums + chunk writes + reading
    the next contexts back; a level's array creation, marginal finalize and metadata are
    outside). The Ray runs share one local Ray (``engine.num_cpus`` CPUs) started here, so
    Ray's start-up is not in them; each run starts its own actors (as ``backfill run``
    does): the driver waits for the decoder actors before level 1, so the kNN actors'
    start-up is in level 1. ``*_nodes_per_s_from_level_2``: the same over levels 2.. only
    (level 1 is one node), i.e. without that start-up.
``decoder_forecasts_per_s``
    ``CVAE.median`` (p50 paths, the decoder half of a tree task) on a batch of contexts of
    the data (4096; 512 with --quick), on the model's torch device, after a warm-up call.
``knn_queries_per_s`` {"faiss", "brute"}
    ``KnnIndex.search`` vs ``engine.knn.brute_knn`` over the sampler's bank keys, the bank
    keys themselves as queries (4096, cycled; 512 with --quick), the sampler's k, no
    exclusion or episode groups, in the same query batches (sized so that brute force holds
    at most ~64 MB of distances at once).
``zarr_write_mb_s`` / ``plain_write_mb_s``
    The same bytes, a level of random-walk float32 paths plus its parent / branch / weight
    columns (~256 MB; 8 MB with --quick), written through ``ScenarioStore.create_level`` +
    ``write_chunk(wait=False)`` one chunk of ``store.chunk_nodes`` rows at a time, then
    ``flush`` (as the engine writes: two chunks in flight on the store's writer threads,
    each chunk file's writeback started as soon as it is written; after one untimed
    warm-up chunk into a scratch store),
    and as one sequential ``open(.., 'wb').write`` per array to a file in the same
    directory; both fsync'd before the clock stops (``"fsync": true``); three times each,
    alternating, and the median time of each (every run's MB/s in ``details.write``).
    MB = 10^6 bytes.
    ``details.write_no_fsync``: the same pair without fsync (the page cache's speed).
``peak_rss_mb`` {"6", "8", "9"}
    Peak resident memory of a fresh driver process (``python -c``, inline backend) that
    unpickles the fitted sampler and expands a tree of that depth with ``tree.max_frontier``
    625 (25 with --quick; the config's value where it sets one) into a temporary store: the
    child's own high-water mark (Linux ``VmHWM``; see ``_own_peak_rss_mb``), reported by it
    when it ends. ``peak_rss_baseline_mb``: the same process with no expansion (imports,
    the sampler, an empty store), so depth N costs ``peak_rss_mb[N] - baseline``.

``--quick`` keeps every key but runs smaller depths; ``"depths"`` in the JSON maps each key
to the depth actually run and ``"quick"`` says so. ``--no-ray`` skips the Ray runs
(``ray_nodes_per_s`` is then null).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.errors import ConfigError

__all__ = ["DEFAULT_SAMPLES", "BenchPlan", "bench_config", "decoder_bound",
           "decoder_half_throughput", "device_info", "plan_for", "render_gpu_table",
           "render_table", "rss_child", "run_bench", "run_gpu_bench", "stage_profile"]

TREE_KEYS = ("5", "6", "7")
RSS_KEYS = ("6", "8", "9")
MB = 1e6
# M paths per node of the tree / RSS runs unless --n-samples says otherwise: a node costs
# ~1/M beyond it (2 cores: ~90 nodes/s at M = 64, ~15 at the default 512), and the full
# bench expands ~55,000 nodes
DEFAULT_SAMPLES = 64


@dataclass(frozen=True)
class BenchPlan:
    """The sizes of one bench run (the full one, or --quick)."""

    quick: bool
    tree_depths: dict[str, int]  # key -> depth of the throughput runs
    rss_depths: dict[str, int]  # key -> depth of the peak-RSS runs
    rss_max_frontier: int
    decoder_contexts: int
    knn_queries: int
    write_mb: float
    min_seconds: float  # repeat a micro-benchmark until it has run this long
    ray: bool
    fsync: bool = True


def plan_for(config: Config, quick: bool, ray: bool) -> BenchPlan:
    frontier = config.tree.max_frontier or (25 if quick else 625)
    if quick:
        return BenchPlan(True, dict(zip(TREE_KEYS, (2, 3, 4), strict=True)),
                         dict(zip(RSS_KEYS, (2, 3, 4), strict=True)), frontier,
                         decoder_contexts=512, knn_queries=512, write_mb=8.0, min_seconds=0.1,
                         ray=ray)
    return BenchPlan(False, {k: int(k) for k in TREE_KEYS}, {k: int(k) for k in RSS_KEYS},
                     frontier, decoder_contexts=4096, knn_queries=4096, write_mb=256.0,
                     min_seconds=1.0, ray=ray)


# ============================================================================ device


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_info(torch_device: str | None = None) -> dict:
    """What ran the bench: CPU, cores, torch device and threads, GPU, library versions."""
    import faiss
    import torch

    from engine.driver import usable_cores

    cuda = torch.cuda.is_available()
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": usable_cores(),
            "torch_device": torch_device or ("cuda" if cuda else "cpu"),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "faiss": getattr(faiss, "__version__", None), "numpy": np.__version__,
            "platform": platform.platform()}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def _device_line(d: dict) -> str:
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    return (f"{d['cpu']}, {d['cores_usable']} of {d['cores']} cores, torch {d['torch_device']} "
            f"({d['torch_threads']} threads){gpu}")


# ============================================================================ timing helpers


def _rate(fn: Callable[[], None], items: int, min_seconds: float, max_reps: int = 50,
          warmup: Callable[[], None] | None = None) -> dict:
    """Items per second of ``fn`` (after a warm-up call: ``warmup``, else ``fn`` itself),
    repeated until it has run ``min_seconds``."""
    (warmup or fn)()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or reps >= max_reps:
            return {"per_s": items * reps / elapsed, "items": items, "reps": reps,
                    "seconds": elapsed}


def _own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec.

    Linux: VmHWM, the high-water mark of this address space. Not ``ru_maxrss``: exec keeps
    the largest RSS of the address space it replaced (and Python's subprocess forks with
    vfork, whose address space is the parent's), so a child's ru_maxrss would report the
    bench process's own size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # bytes on macOS


# ============================================================================ the parts


@dataclass
class _Fitted:
    config: Config
    prep: object  # engine.pipeline.Prepared
    inputs: object  # engine.driver.RunInputs
    model: object  # engine.model.CVAE
    sampler: object


def _fit(config: Config, workdir: Path, console) -> _Fitted:
    """Train the CVAE once and fit the config's sampler with it (as `backfill run --model`)."""
    from engine import driver
    from engine.model import load_checkpoint, save_checkpoint
    from engine.pipeline import get_model, prepare
    from engine.train import pick_device

    prep = prepare(config, run=True)
    inputs = driver.run_inputs(prep, None)  # the last day: the sampler sees all the data
    model = get_model(prep, None, console)
    ckpt = save_checkpoint(model, workdir / "model.pt", config, prep.panel.fingerprint,
                           prep.panel.grid_dict())
    sampler = driver.fit_for_run(prep, inputs, ckpt, console)
    # the decoder bench uses the very weights the sampler holds, where it holds a CVAE
    held = next(iter(getattr(sampler, "point_models_", [])), None)
    if held is None or not hasattr(held, "median"):
        held = getattr(getattr(sampler, "keys_", None), "model", None)
    if held is None or not hasattr(held, "median"):
        held = load_checkpoint(ckpt, str(pick_device(config.train.device)))[0]
    return _Fitted(config, prep, inputs, held, sampler)


def _open(fitted: _Fitted, path: Path, cfg: Config):
    from engine import driver

    inp = fitted.inputs
    return driver.open_store(path, kind="tree", config=cfg, fingerprint=inp.fingerprint,
                             start_date=inp.start_date, grid=inp.grid,
                             start_context=inp.start_context, overwrite=True)


def _tree_config(config: Config, depth: int, backend: str, threads: int | None = None,
                 ) -> Config:
    d = config.to_dict()
    d["tree"].update(depth=depth, max_frontier=0, min_weight=0.0)
    d["engine"]["backend"] = backend
    if threads is not None:
        d["engine"]["threads"] = threads
    return Config.from_dict(d)


def store_digest(path: Path) -> str:
    """sha256 over every array of a store (name, dtype, shape and bytes, in name order)."""
    import hashlib

    import zarr

    h = hashlib.sha256()
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    arrays = {f"{g}/{a}": arr for g, group in root.groups() for a, arr in group.arrays()}
    for name in sorted(arrays):
        x = np.ascontiguousarray(arrays[name][:])
        h.update(f"{name} {x.dtype} {x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def tree_throughput(fitted: _Fitted, depth: int, backend: str, workdir: Path,
                    threads: int | None = None, digest: bool = False) -> dict:
    """Expand a full tree of ``depth`` into a fresh temporary store; nodes/s from LevelStats.
    ``threads``: the inline backend's ``engine.threads`` (default: the config's);
    ``digest``: also the store's ``store_digest`` (computed after the clock stops)."""
    from engine import driver

    cfg = _tree_config(fitted.config, depth, backend, threads)
    tmp = Path(tempfile.mkdtemp(prefix=f"tree-{backend}-{depth}-", dir=workdir))
    try:
        store = _open(fitted, tmp / "run.zarr", cfg)
        t0 = time.perf_counter()
        stats = driver.run_store(store, fitted.sampler, cfg, console=None)
        wall = time.perf_counter() - t0
        sha = store_digest(tmp / "run.zarr") if digest else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nodes = sum(s.nodes for s in stats)
    seconds = sum(s.seconds for s in stats)
    return {"backend": backend, "depth": depth, "threads": cfg.engine.threads,
            "nodes": nodes, "seconds": seconds,
            "nodes_per_s": nodes / seconds, "run_store_seconds": wall,
            "levels": [{"level": s.level, "nodes": s.nodes, "seconds": s.seconds}
                       for s in stats], "digest": sha}


def _real_contexts(fitted: _Fitted, n: int) -> np.ndarray:
    """``n`` log-IV contexts (n, C, n_m, n_tau) of the data's complete windows, in order,
    cycled when the data has fewer."""
    panel, c, h = fitted.prep.panel, fitted.config.data.context, fitted.config.data.horizon
    return panel.contexts_at(np.resize(np.arange(c - 1, panel.n_days - h), n), c)


def decoder_throughput(fitted: _Fitted, n: int, min_seconds: float) -> dict:
    """p50 forecasts per second of the CVAE on ``n`` real contexts at once."""
    from engine.model import MICRO

    log_ctx = _real_contexts(fitted, n)
    model = fitted.model

    def call():
        model.median(log_ctx)

    def warmup():
        model.median(log_ctx[:MICRO])

    out = _rate(call, n, min_seconds, max_reps=20, warmup=warmup)
    out["device"] = str(model.loc.device)
    return out


def decoder_resident(fitted: _Fitted, n: int, min_seconds: float) -> dict:
    """p50 forecasts per second with inputs and outputs left on the model's device (one
    fixed-shape ``CVAE.p50`` call per MICRO rows, synchronised before the clock stops): what
    the decoder itself does, without the copies to and from numpy that ``CVAE.median``
    makes."""
    import torch

    from engine.model import MICRO

    model = fitted.model
    device = model.loc.device
    x = torch.as_tensor(_real_contexts(fitted, n), dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def call():
        for i in range(0, n, MICRO):
            model.p50(x[i: i + MICRO])
        sync()

    model.eval()
    out = _rate(call, n, min_seconds, max_reps=50)
    out["device"] = str(device)
    return out


def decoder_half_throughput(fitted: _Fitted, n: int, min_seconds: float) -> dict | None:
    """Contexts per second of the engine's decoder half (``driver.decode_batch``: every
    fold model's p50 path and the kNN key, through numpy, as a tree task decodes) on ``n``
    real contexts at once, after a warm-up call; None for a sampler without that half."""
    from engine import driver
    from engine.model import MICRO

    if not driver.is_split(fitted.sampler):
        return None
    contexts = np.exp(_real_contexts(fitted, n))  # decode_batch takes iv

    def call():
        driver.decode_batch(fitted.sampler, contexts)

    def warmup():
        driver.decode_batch(fitted.sampler, contexts[:MICRO])

    return _rate(call, n, min_seconds, max_reps=20, warmup=warmup)


def _bank_keys(fitted: _Fitted) -> tuple[np.ndarray, int]:
    index = getattr(fitted.sampler, "index_", None)
    if index is not None:
        return index.keys, int(fitted.sampler.k_)
    # a sampler without a kNN bank: the CVAE's standardised embeddings of every context
    panel, c = fitted.prep.panel, fitted.config.data.context
    raw = fitted.model.embed(panel.contexts_at(np.arange(c - 1, panel.n_days), c))
    std = raw.std(axis=0)
    return (raw - raw.mean(axis=0)) / np.where(std > 0, std, 1.0), 50


def knn_throughput(fitted: _Fitted, n: int, min_seconds: float) -> dict:
    """Queries per second of FAISS (KnnIndex.search) and of brute_knn, same keys, k, batches."""
    from engine.knn import KnnIndex, brute_knn

    keys, k = _bank_keys(fitted)
    index = KnnIndex(keys)
    k = min(k, len(keys))
    queries = keys[np.resize(np.arange(len(keys)), n)]
    batch = int(np.clip((64 << 20) // (8 * len(keys) * keys.shape[1]), 1, 1024))
    batches = [queries[i: i + batch] for i in range(0, n, batch)]
    _, i_f = index.search(batches[0], k)
    _, i_b = brute_knn(keys, batches[0], k)
    agree = float(np.mean(i_f == i_b))

    def faiss_all():
        for q in batches:
            index.search(q, k)

    def brute_all():
        for q in batches:
            brute_knn(keys, q, k)

    # the first batch above was the warm-up of both
    return {"faiss": _rate(faiss_all, n, min_seconds, warmup=lambda: None),
            "brute": _rate(brute_all, n, min_seconds, warmup=lambda: None),
            "bank": len(keys), "dim": int(keys.shape[1]), "k": k, "queries": n,
            "batch": batch, "same_ids": agree}


def write_throughput(fitted: _Fitted, mb: float, workdir: Path, fsync: bool = True,
                     repeats: int = 3) -> dict:
    """The same bytes through ScenarioStore (chunk by chunk) and through one plain file,
    ``repeats`` times each, alternating; MB/s of the median time of each."""
    from engine.store import ScenarioStore, business_days_after, fsync_tree
    from engine.tree import stride_days

    cfg = fitted.config
    grid = fitted.prep.panel.grid_shape
    s = stride_days(cfg.tree.stride, cfg.data.horizon)
    row_bytes = s * grid[0] * grid[1] * 4 + 8 + 1 + 8  # paths + parent + branch + weight
    c = cfg.store.chunk_nodes
    n = max(c, round(mb * MB / row_bytes / c) * c)
    rng = np.random.default_rng(0)
    # random walks in log-IV from 20 vol: compress like real paths do (i.e. hardly)
    steps = rng.normal(0.0, 0.02, size=(n, s) + grid).astype(np.float32)
    paths = np.exp(np.log(np.float32(0.2)) + np.cumsum(steps, axis=1)).astype(np.float32)
    del steps
    parent = np.zeros(n, np.int64)  # level 1: every row's parent is the root
    branch = (np.arange(n) % 5).astype(np.int8)
    weight = np.full(n, 1.0 / n)
    total = paths.nbytes + parent.nbytes + branch.nbytes + weight.nbytes
    days = business_days_after(fitted.inputs.start_date, s)
    tmp = Path(tempfile.mkdtemp(prefix="write-", dir=workdir))
    try:
        # warm-up, untimed: one chunk through a scratch store (zarr's event loop, codec
        # buffers), as the other micro-benchmarks warm up before the clock starts
        scratch = _open(fitted, tmp / "warmup.zarr", cfg)
        scratch.create_level(1, c, days, grid)
        scratch.write_chunk(1, 0, paths[:c], parent[:c], branch[:c], np.full(c, 1.0 / c),
                            wait=False)
        scratch.flush()
        shutil.rmtree(scratch.path)
        zarr_runs, plain_runs = [], []
        for _ in range(repeats):  # alternating, so both see the same state of the disk
            store = _open(fitted, tmp / "run.zarr", cfg)
            if fsync:
                fsync_tree(store.path)
            t0 = time.perf_counter()
            store.create_level(1, n, days, grid)
            for lo in range(0, n, c):
                hi = min(n, lo + c)
                store.write_chunk(1, lo, paths[lo:hi], parent[lo:hi], branch[lo:hi],
                                  weight[lo:hi], wait=False)
            store.flush()
            if fsync:
                fsync_tree(store.path)
            zarr_runs.append(time.perf_counter() - t0)
            on_disk = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
            check = ScenarioStore.open(store.path).read_level(1, 0, min(n, c))["paths"]
            if not np.array_equal(check, paths[: len(check)]):
                raise AssertionError("the store did not give back the bytes written")  # a bug
            shutil.rmtree(store.path)
            t0 = time.perf_counter()
            with open(tmp / "plain.bin", "wb") as f:
                f.writelines(memoryview(a).cast("B") for a in (paths, parent, branch, weight))
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            plain_runs.append(time.perf_counter() - t0)
            (tmp / "plain.bin").unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zarr_s, plain_s = float(np.median(zarr_runs)), float(np.median(plain_runs))
    return {"bytes": total, "rows": n, "chunk_nodes": c, "n_chunks": -(-n // c),
            "zarr_seconds": zarr_s, "plain_seconds": plain_s,
            "zarr_mb_s": total / MB / zarr_s, "plain_mb_s": total / MB / plain_s,
            "zarr_bytes_on_disk": on_disk, "fsync": fsync, "repeats": repeats,
            "zarr_mb_s_each": [total / MB / t for t in zarr_runs],
            "plain_mb_s_each": [total / MB / t for t in plain_runs]}


def stage_profile(fitted: _Fitted, n_nodes: int, n_samples: int) -> dict:
    """Seconds per node of each stage of a node expansion, on ``n_nodes`` real contexts of
    the data as frontier nodes (level 1, M = ``n_samples``): the decoder half
    (``decode_batch``: p50 forecasts + kNN keys, on the model's device), the kNN half
    (``sampler.draw``: FAISS search, residual draw, calibration; with the lookahead, both
    of its passes), the lookahead (the candidates: found, decoded, drawn, and every marginal
    sum of the level) and the tree half (``_branch``: children by quantization, their
    weights; without the lookahead, the marginal sums too), as
    ``expand_batch`` times them; nothing is written. Also counts what a node costs whatever
    the hardware: the contexts it decodes and the values (paths x days x grid points) its
    kNN half draws, both passes and its candidates' draws."""
    from engine import driver
    from engine.tree import stride_days

    cfg = fitted.config
    panel, c = fitted.prep.panel, cfg.data.context
    anchors = np.resize(np.arange(c - 1, panel.n_days), n_nodes)
    contexts = np.exp(panel.contexts_at(anchors, c))
    s = stride_days(cfg.tree.stride, cfg.data.horizon)
    # level 1 of a deeper tree: with the lookahead when the config has one
    plan = driver.level_plan("tree", 1, max(2, cfg.tree.depth), cfg, s, panel.grid_shape)
    plan = dataclasses.replace(plan, n_samples=n_samples,
                               tree=cfg.tree.model_copy(update={"n_samples": n_samples}))
    nodes = np.arange(n_nodes, dtype=np.int64)
    batch = driver.Batch(0, 0, nodes, np.zeros(n_nodes, np.int64), np.full(n_nodes, 1 / n_nodes),
                         np.ones(n_nodes, bool), contexts)
    sampler = fitted.sampler
    if not driver.is_split(sampler):
        return {"split": False}
    driver.decode_batch(sampler, contexts[: min(n_nodes, 64)])  # warm-up
    t = {"decode": 0.0, "draw": 0.0, "lookahead": 0.0, "branch": 0.0}
    looked = [0]  # lookahead contexts decoded (the nodes' own: expand_batch, one each)
    drawn = [0]  # values the kNN half returned: paths x days x grid points, every pass

    def decode(candidates):
        looked[0] += len(candidates)
        return driver.decode_batch(sampler, candidates)

    def draw(*args, **kwargs):
        out = type(sampler).draw(sampler, *args, **kwargs)
        drawn[0] += out.size
        return out

    sampler.draw = draw  # counted for this one call (an instance attribute, removed below)
    try:
        driver.expand_batch(sampler, batch, plan, timings=t, decode=decode)
    finally:
        del sampler.draw
    total = sum(t.values())
    contexts_per_node = 1.0 + looked[0] / n_nodes
    n_models = len(getattr(sampler, "point_models_", ())) or 1
    return {"split": True, "nodes": n_nodes, "n_samples": n_samples,
            "seconds": t, "ms_per_node": {k: 1e3 * v / n_nodes for k, v in t.items()},
            "share": {k: v / total for k, v in t.items()}, "nodes_per_s": n_nodes / total,
            "lookahead": plan.look, "contexts_per_node": contexts_per_node,
            "point_models": n_models, "forecasts_per_node": contexts_per_node * n_models,
            "sampled_values_per_node": drawn[0] / n_nodes}


def decoder_bound(contexts_per_s: float | None, profile: dict) -> float | None:
    """Expansions per second of the profile's nodes (with the lookahead: every level's but
    the last) if the engine's decoder half were their only work: its contexts per second
    (``decoder_half_throughput``: every fold model's p50 and the kNN key, in full
    micro-batches) over the contexts one such node decodes (its own and its candidates').
    An upper bound: a task's last micro-batch is padded."""
    if contexts_per_s is None or not profile.get("split"):
        return None
    return contexts_per_s / profile["contexts_per_node"]


def run_gpu_bench(config: Config, *, samples: tuple[int, ...] = (64, 512),
                  depths: tuple[int, ...] = (5, 6), threads: tuple[int, ...] | None = None,
                  workdir: Path | None = None, console=None) -> dict:
    """The GPU part (``backfill bench --gpu``): the CVAE trained and decoding on the torch
    device (CUDA where present), decoder forecasts/s at several batch sizes (and on the
    CPU for comparison), the engine's decoder half (contexts/s of every fold model's p50
    and the kNN key), the per-stage profile of a node expansion with the contexts it
    decodes (and so the nodes/s the decoder half alone would allow), and full inline trees
    (the inline backend stands in for Ray) at each M of ``samples``, each depth of
    ``depths`` and each ``engine.threads`` of ``threads`` (default: 1 and one per core);
    at the larger M only the first depth, with the most threads, so that it fits the time."""
    import copy
    from dataclasses import replace

    from engine import driver

    base = Path(workdir) if workdir is not None else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="backfill-gpu-bench-", dir=base))
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[bold]bench --gpu[/] {msg}")

    try:
        t0 = time.perf_counter()
        fitted = _fit(config, work, console)
        fit_s = time.perf_counter() - t0
        say(f"fitted in {fit_s:.1f} s on {fitted.model.loc.device}")
        decoder = {}
        for n in (4096, 65536):
            decoder[str(n)] = decoder_throughput(fitted, n, 1.0)
            say(f"decoder, batch {n}: {decoder[str(n)]['per_s']:,.0f} forecasts/s")
        half = decoder_half_throughput(fitted, 4096, 1.0)
        if half is not None:
            say(f"decoder half (every fold model's p50 and the kNN key), batch 4096: "
                f"{half['per_s']:,.0f} contexts/s")
        if str(fitted.model.loc.device) != "cpu":
            decoder["65536_resident"] = decoder_resident(fitted, 65536, 1.0)
            say(f"decoder, batch 65536, output left on the device: "
                f"{decoder['65536_resident']['per_s']:,.0f} forecasts/s")
            cpu = replace(fitted, model=copy.deepcopy(fitted.model).to("cpu"))
            decoder["4096_cpu"] = decoder_throughput(cpu, 4096, 1.0)
            say(f"decoder on the CPU, batch 4096: {decoder['4096_cpu']['per_s']:,.0f}/s")
        threads = tuple(sorted(set(threads or (1, driver.usable_cores()))))
        depths = tuple(dict.fromkeys(depths))
        profile, trees = {}, []
        for m in samples:
            cfg_m, _ = bench_config(config, m)
            fm = replace(fitted, config=cfg_m)
            profile[str(m)] = prof = stage_profile(fm, 256 if m <= 64 else 128, m)
            prof["decoder_bound_nodes_per_s"] = decoder_bound(
                None if half is None else half["per_s"], prof)
            say(f"stage profile, M = {m}: {prof.get('ms_per_node')}")
            if prof["decoder_bound_nodes_per_s"] is not None:
                kind = "lookahead node" if prof["lookahead"] else "node"
                say(f"M = {m}: a {kind} decodes {prof['contexts_per_node']:.1f} contexts "
                    f"({prof['forecasts_per_node']:.0f} p50 forecasts), so the decoder half "
                    f"alone allows {prof['decoder_bound_nodes_per_s']:,.0f} of them a second")
            say(f"M = {m}: the kNN half draws {prof['sampled_values_per_node']:,.0f} values "
                "(paths x days x grid points) per node")
            small = m == min(samples)
            for depth in depths if small else depths[:1]:
                for n_threads in threads if small else (max(threads),):
                    r = tree_throughput(fm, depth, "inline", work, threads=n_threads,
                                        digest=True)
                    r["n_samples"] = m
                    r["nodes_per_s_from_level_2"] = _warm_rate(r)
                    trees.append(r)
                    say(f"inline tree, M = {m}, depth {depth}, {n_threads} thread(s): "
                        f"{r['nodes_per_s']:,.0f} nodes/s")
        return {"part": "gpu", "decoder_forecasts_per_s": {k: v["per_s"]
                                                           for k, v in decoder.items()},
                "decoder_half_contexts_per_s": None if half is None else half["per_s"],
                "inline_nodes_per_s": {f"M{r['n_samples']}_depth{r['depth']}_threads"
                                       f"{r['threads']}": r["nodes_per_s"] for r in trees},
                "decoder_bound_nodes_per_s": {m: p.get("decoder_bound_nodes_per_s")
                                              for m, p in profile.items()},
                "same_bytes_across_threads": same_bytes(trees),
                "stage_profile": profile, "device": device_info(str(fitted.model.loc.device)),
                "details": {"fit_seconds": fit_s, "decoder": decoder, "decoder_half": half,
                            "tree": trees,
                            "sampler": config.sampler.method,
                            "grid": list(fitted.prep.panel.grid_shape),
                            "total_seconds": time.perf_counter() - t_start},
                "config": config.to_dict()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def same_bytes(trees: list[dict]) -> dict[str, bool]:
    """For each (M, depth) run at several thread counts: did every run write the same store?"""
    groups: dict[str, list] = {}
    for r in trees:
        groups.setdefault(f"M{r['n_samples']}_depth{r['depth']}", []).append(r["digest"])
    return {key: len(set(d)) == 1 for key, d in groups.items() if len(d) > 1}


def render_gpu_table(result: dict):
    """One rich Table of ``run_gpu_bench``'s numbers."""
    from rich.table import Table

    table = Table(title=f"backfill bench --gpu: {result['details']['sampler']}",
                  caption=_device_line(result["device"]))
    for col, just in (("what", "left"), ("case", "right"), ("value", "right"), ("unit", "left")):
        table.add_column(col, justify=just)
    for key, rate in result["decoder_forecasts_per_s"].items():
        n, _, where = key.partition("_")
        table.add_row("decoder p50 forecasts, 1 model", f"batch {n}, {where or result['device']['torch_device']}",
                      _fmt(rate), "forecasts/s")
    if result.get("decoder_half_contexts_per_s") is not None:
        table.add_row("decoder half: every fold model's p50 + kNN key", "batch 4096",
                      _fmt(result["decoder_half_contexts_per_s"]), "contexts/s")
    for m, prof in result["stage_profile"].items():
        if prof.get("split"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in prof["ms_per_node"].items())
            table.add_row("node expansion by stage", f"M = {m}", parts, "ms/node")
            table.add_row("", f"M = {m}, stages only", _fmt(prof["nodes_per_s"]), "nodes/s")
            table.add_row("", f"M = {m}, values the kNN half draws (paths x days x grid)",
                          _fmt(prof["sampled_values_per_node"]), "per node")
            if prof.get("decoder_bound_nodes_per_s") is not None:
                table.add_row("", f"M = {m}, decoder half alone ({prof['contexts_per_node']:.1f}"
                              " contexts/node)", _fmt(prof["decoder_bound_nodes_per_s"]),
                              "lookahead nodes/s" if prof.get("lookahead") else "nodes/s")
    for r in result["details"]["tree"]:
        table.add_row("tree expansions, inline",
                      f"M = {r['n_samples']}, depth {r['depth']}, {r['threads']} thread(s)",
                      f"{_fmt(r['nodes_per_s'])} ({_fmt(r['nodes_per_s_from_level_2'])} from "
                      "level 2)", "nodes/s")
    for key, same in result.get("same_bytes_across_threads", {}).items():
        table.add_row("same store bytes for every thread count", key.replace("_", ", "),
                      "yes" if same else "NO", "")
    return table


# ============================================================================ peak RSS


def rss_child(spec_path: str) -> None:
    """The body of a peak-RSS child process (``python -c``): expand one tree, inline."""
    import torch

    from engine import driver

    # two children run at once on the machine's cores: one torch thread each, or the
    # decoder's threads oversubscribe the cores (the lookahead decodes ~20 contexts a node)
    torch.set_num_threads(1)

    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    cfg = Config.from_dict(spec["config"])
    with open(spec["sampler"], "rb") as f:
        sampler = pickle.load(f)
    inp = spec["inputs"]
    store = driver.open_store(spec["store"], kind="tree", config=cfg,
                              fingerprint=inp["fingerprint"], start_date=inp["start_date"],
                              grid=inp["grid"], start_context=inp["start_context"],
                              overwrite=True)
    stats = driver.run_store(store, sampler, cfg) if spec["expand"] else []
    print("\n" + json.dumps({"nodes": sum(s.nodes for s in stats),
                             "seconds": sum(s.seconds for s in stats),
                             "levels_complete": store.levels_complete,
                             "peak_rss_mb": _own_peak_rss_mb()}), flush=True)


def peak_rss(fitted: _Fitted, depth: int, max_frontier: int, sampler_file: Path,
             workdir: Path, expand: bool = True) -> dict:
    """Peak RSS of a fresh driver process that expands a tree of ``depth`` inline."""
    d = fitted.config.to_dict()
    d["tree"].update(depth=max(depth, 1), max_frontier=max_frontier)
    d["engine"]["backend"] = "inline"
    tmp = Path(tempfile.mkdtemp(prefix=f"rss-{depth}-", dir=workdir))
    inp = fitted.inputs
    spec = {"config": d, "sampler": str(sampler_file), "store": str(tmp / "run.zarr"),
            "expand": expand,
            "inputs": {"fingerprint": inp.fingerprint, "start_date": inp.start_date,
                       "grid": inp.grid, "start_context": inp.start_context}}
    spec_path = tmp / "spec.pkl"
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)
    code = "import sys; from engine.bench import rss_child; rss_child(sys.argv[1])"
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        from engine.errors import BackfillError

        tail = proc.stderr.strip().splitlines()[-5:]
        raise BackfillError(f"the peak-RSS child (depth {depth}) failed with status "
                            f"{proc.returncode}: " + " | ".join(tail))
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])  # the child's last line (anything a library printed comes first)
    return {"depth": depth, "max_frontier": max_frontier, "expand": expand,
            "wall_seconds": wall, **res}


# ============================================================================ the bench


class _Ray:
    """One local Ray for every Ray run (the driver then neither starts nor stops it)."""

    def __init__(self, config: Config):
        self.config, self.started = config, False

    def start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if not ray.is_initialized() and self.config.engine.address is None:
            from engine.driver import _start_local_ray

            _start_local_ray(self.config.engine)
            self.started = True

    def stop(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _steps(plan: BenchPlan) -> list[str]:
    steps = ["decoder", "knn", "write", "write cached"]
    steps += [f"inline {d}" for d in plan.tree_depths.values()]
    if plan.ray:
        steps += ["ray start"] + [f"ray {d}" for d in plan.tree_depths.values()]
    steps += ["rss baseline"] + [f"rss {d}" for d in plan.rss_depths.values()]
    return steps


def bench_config(config: Config, n_samples: int | None = None) -> tuple[Config, dict]:
    """The config of the tree and RSS runs: ``tree.n_samples`` = ``n_samples``, else the
    config's capped at DEFAULT_SAMPLES (so the full bench fits ~15 minutes on 2 cores).
    Returns it and the overrides it made."""
    m = n_samples if n_samples is not None else min(config.tree.n_samples, DEFAULT_SAMPLES)
    if m == config.tree.n_samples:
        return config, {}
    if m < config.tree.branching:
        raise ConfigError(f"--n-samples {m} is below tree.branching = {config.tree.branching} "
                          "(a node keeps that many of its sampled paths); pass at least that")
    d = config.to_dict()
    d["tree"]["n_samples"] = int(m)
    return Config.from_dict(d), {"tree.n_samples": int(m)}


def _warm_rate(run: dict) -> float:
    """Nodes/s over levels 2.. only: level 1 is one node, and with Ray it holds the actors'
    start-up (each run_store starts its own)."""
    later = [lv for lv in run["levels"] if lv["level"] > 1]
    seconds = sum(lv["seconds"] for lv in later)
    return sum(lv["nodes"] for lv in later) / seconds if seconds > 0 else float("nan")


def run_bench(config: Config, *, quick: bool = False, ray: bool = True,
              n_samples: int | None = None, workdir: Path | None = None,
              console=None) -> dict:
    """Every measurement of the module docstring; returns the JSON-able result.

    ``console``: a rich Console (stderr) for the training / fitting output and the bench's
    progress bar; None: silent."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    given = config
    config, overrides = bench_config(config, n_samples)
    plan = plan_for(config, quick, ray)
    base = Path(workdir) if workdir is not None else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="backfill-bench-", dir=base))
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        fitted = _fit(config, work, console)
        fit_s = time.perf_counter() - t0
        sampler_file = work / "sampler.pkl"
        with open(sampler_file, "wb") as f:
            pickle.dump(fitted.sampler, f, protocol=pickle.HIGHEST_PROTOCOL)
        runs: dict = {"tree": [], "rss": []}
        progress = Progress(SpinnerColumn(), TextColumn("[bold]bench[/] {task.description}"),
                            BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, disable=console is None, transient=False)
        steps = _steps(plan)
        with progress:
            task = progress.add_task(steps[0], total=len(steps))

            def step(name: str, fn):
                progress.update(task, description=name)
                out = fn()
                progress.advance(task)
                return out

            dec = step("decoder: CVAE p50 forecasts",
                       lambda: decoder_throughput(fitted, plan.decoder_contexts,
                                                  plan.min_seconds))
            knn = step("knn: faiss vs brute force",
                       lambda: knn_throughput(fitted, plan.knn_queries, plan.min_seconds))
            wr = step(f"write: {plan.write_mb:g} MB, zarr vs plain, fsync",
                      lambda: write_throughput(fitted, plan.write_mb, work, plan.fsync))
            # the same again without fsync: how much of it is the disk, how much the CPU
            wr_cached = step(f"write: {plan.write_mb:g} MB, zarr vs plain, no fsync",
                             lambda: write_throughput(fitted, plan.write_mb, work, False))
            rates: dict = {"inline": {}, "ray": None}
            warm: dict = {"inline": {}, "ray": None}
            for key, depth in plan.tree_depths.items():
                r = step(f"inline tree, depth {depth}",
                         lambda depth=depth: tree_throughput(fitted, depth, "inline", work))
                runs["tree"].append(r)
                rates["inline"][key], warm["inline"][key] = r["nodes_per_s"], _warm_rate(r)
            if plan.ray:
                rates["ray"], warm["ray"] = {}, {}
                local = _Ray(config)
                t0 = time.perf_counter()
                try:
                    step("starting a local Ray", local.start)
                    runs["ray_start_seconds"] = time.perf_counter() - t0
                    for key, depth in plan.tree_depths.items():
                        r = step(f"ray tree, depth {depth}",
                                 lambda depth=depth: tree_throughput(fitted, depth, "ray", work))
                        runs["tree"].append(r)
                        rates["ray"][key], warm["ray"][key] = r["nodes_per_s"], _warm_rate(r)
                finally:
                    local.stop()
            # memory, not time: two children at a time (each reports its own peak)
            progress.update(task, description="peak RSS: fresh driver processes")
            jobs = [(None, 0, False)] + [(k, d, True) for k, d in plan.rss_depths.items()]
            with ThreadPoolExecutor(max_workers=2) as pool:
                futures = [pool.submit(peak_rss, fitted, d, plan.rss_max_frontier,
                                       sampler_file, work, expand) for _, d, expand in jobs]
                for fut in futures:
                    runs["rss"].append(fut.result())
                    progress.advance(task)
        rss = {key: r["peak_rss_mb"] for (key, _, _), r in zip(jobs, runs["rss"], strict=True)
               if key is not None}
        return {
            "quick": plan.quick, "ray": plan.ray, "fsync": plan.fsync,
            "inline_nodes_per_s": rates["inline"],
            "ray_nodes_per_s": rates["ray"],
            "inline_nodes_per_s_from_level_2": warm["inline"],
            "ray_nodes_per_s_from_level_2": warm["ray"],
            "decoder_forecasts_per_s": dec["per_s"],
            "knn_queries_per_s": {"faiss": knn["faiss"]["per_s"], "brute": knn["brute"]["per_s"]},
            "zarr_write_mb_s": wr["zarr_mb_s"],
            "plain_write_mb_s": wr["plain_mb_s"],
            "peak_rss_mb": rss,
            "peak_rss_baseline_mb": runs["rss"][0]["peak_rss_mb"],
            "depths": {"nodes_per_s": plan.tree_depths, "peak_rss_mb": plan.rss_depths},
            "device": device_info(dec["device"]),
            "plan": asdict(plan),
            "overrides": overrides,
            "details": {"fit_seconds": fit_s, "decoder": dec, "knn": knn, "write": wr,
                        "write_no_fsync": wr_cached, **runs,
                        "tree_runs": {"max_frontier": 0, "min_weight": 0.0,
                                      "n_samples": config.tree.n_samples,
                                      "config_n_samples": given.tree.n_samples,
                                      "branching": config.tree.branching,
                                      "batch_size": config.engine.batch_size},
                        "rss_runs": {"backend": "inline", "max_frontier": plan.rss_max_frontier,
                                     "n_samples": config.tree.n_samples},
                        "sampler": config.sampler.method,
                        "bank": knn["bank"], "k": knn["k"],
                        "grid": list(fitted.prep.panel.grid_shape),
                        "data_days": fitted.prep.panel.n_days,
                        "total_seconds": time.perf_counter() - t_start},
            "config": config.to_dict(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ============================================================================ the table


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    s = f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"
    return f"{s}{unit}"


def render_table(result: dict):
    """One rich Table of every number of ``result``."""
    from rich.table import Table

    quick = " --quick (small depths and sizes)" if result["quick"] else ""
    m = result["details"]["tree_runs"]["n_samples"]
    table = Table(title=f"backfill bench{quick}: {result['details']['sampler']}, "
                  f"M = {m} paths per node", caption=_device_line(result["device"]))
    table.add_column("what")
    table.add_column("case", justify="right")
    table.add_column("value", justify="right")
    table.add_column("unit")
    tree_d = result["depths"]["nodes_per_s"]
    for backend in ("inline", "ray"):
        rates = result[f"{backend}_nodes_per_s"]
        warm = result[f"{backend}_nodes_per_s_from_level_2"]
        for key in TREE_KEYS:
            value = "skipped" if rates is None else \
                f"{_fmt(rates[key])} ({_fmt(warm[key])} from level 2)"
            table.add_row(f"tree expansions, {backend}" if key == TREE_KEYS[0] else "",
                          f"full tree, depth {tree_d[key]}", value, "nodes/s")
    det = result["details"]
    table.add_row("decoder p50 forecasts, 1 model", f"batch {det['decoder']['items']}, "
                  f"{det['decoder']['device']}", _fmt(result["decoder_forecasts_per_s"]),
                  "forecasts/s")
    knn = result["knn_queries_per_s"]
    table.add_row("kNN search, faiss", f"bank {det['bank']}, k {det['k']}", _fmt(knn["faiss"]),
                  "queries/s")
    table.add_row("kNN search, brute force", f"bank {det['bank']}, k {det['k']}",
                  _fmt(knn["brute"]), "queries/s")
    sync = "fsync" if result["fsync"] else "no fsync"
    size = f"{det['write']['bytes'] / MB:,.0f} MB, {sync}"
    table.add_row("write, zarr store", size, _fmt(result["zarr_write_mb_s"]), "MB/s")
    table.add_row("write, plain file", size, _fmt(result["plain_write_mb_s"]), "MB/s")
    rss_d = result["depths"]["peak_rss_mb"]
    front = det["rss_runs"]["max_frontier"]
    table.add_row("peak RSS, driver", "no expansion", _fmt(result["peak_rss_baseline_mb"]), "MB")
    for key in RSS_KEYS:
        table.add_row("", f"depth {rss_d[key]}, frontier <= {front}",
                      _fmt(result["peak_rss_mb"][key]), "MB")
    return table
