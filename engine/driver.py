"""The driver: expands the scenario tree (or a brute-force Monte Carlo) level by level into a store.

Level 0 is the root: one node, weight 1, whose context is the C days ending at the start date.
Expanding level k-1 into level k, for each frontier node (after pruning):

    draw M paths      the sampler, in log-IV: (N, M, H, n_m, n_tau); node (k-1, i) draws with
                      ``node_rng(seed, k-1, i)`` (stream TREE) and nothing else
    K children        ``select_children``: K real paths and their conditional weights; a child
                      keeps the first S days (``stride``) and weighs parent weight * its share
    marginals         the node's FULL M-sample distribution over those S days, with the node's
                      weight, into an exact (int64) ``MarginalAccumulator``
With ``tree.lookahead`` = L > 0 (the default), between the draw and the choice:
    lookahead         the node's candidate children (its distinct kept paths, or L score strata
                      when it has more than L) each draw ``lookahead_samples`` paths one level
                      on, from the context the child would have (stream LOOKAHEAD, sub-stream:
                      the candidate's number); the candidates of a whole batch are decoded
                      together (1,024 contexts a call). The K children are the cells' paths
                      with the most typical next-level law, and the candidates' draws (weight:
                      node weight x the
                      candidate's share) are level k+1's marginals, so level k's come from level
                      k-2's nodes: the full mixture over the parent's candidates, not over the K
                      children alone (level 1's: the root's own draws; the last level adds none).
                      Measured against a 20,000-path Monte Carlo (scripts/acceptance_issue4.md).

Child rows are node-major (row = frontier position * K + branch) and go to the store in whole
chunks. A child's context (for level k+1) is the last C days of (start context + its ancestors'
kept days), read back from the store in chunks, so memory never grows with 5^N and a resumed run
sees exactly the bytes a straight one saw (the stored float32 vols). The Monte Carlo twin
(``kind = "mc"``) draws one path per node and level, feeds it back, and weighs paths equally.

The numerics of a batch of nodes are one pure function, ``expand_batch``, split at the same seam
as the kNN sampler (``decode_batch`` = the decoder's half: point forecast and keys; the rest =
the kNN half); the inline backend calls it in-process, the Ray backend inside actors
(``actors/``). Why the store comes out the same for any batch size, actor count, backend or
restart:
  * a node's randomness is its own stream (level, node), never a batch's;
  * each node's numerics are row-wise (CVAE in fixed-shape micro-batches, kNN distances
    recomputed per row, the tree step per node);
  * the marginal sums are int64 fixed point, so partial sums merge exactly in any order;
  * rows are written at fixed positions; a chunk written twice gets the same bytes.

Resume: a level is marked complete only after all its chunks and its marginals are written.
Within the level in progress, finished chunks are skipped; the marginal sums of the nodes
already merged are kept in a checkpoint beside the store (``<store>.partial/level_XX.npz``,
saved every ``checkpoint_seconds`` and on interruption), so a task whose chunks are all written
and whose nodes are all in the checkpoint is not recomputed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from engine.config import Config, EngineConfig, TreeConfig
from engine.errors import (
    BackfillError,
    CheckpointError,
    ConfigError,
    DataError,
    StoreError,
    first_line,
)
from engine.rng import LOOKAHEAD, MC, PROBE, PRUNE, TREE, node_rng
from engine.store import (
    REDO,
    ScenarioStore,
    business_days_after,
    first_difference,
    parse_start_date,
    remove_temporary_files,
)
from engine.tree import (
    MarginalAccumulator,
    child_contexts,
    child_weights,
    kept_paths,
    prune_min_weight,
    resample_frontier,
    resolve_score,
    select_children,
    stride_days,
)

__all__ = [
    "MC_STREAM",
    "PRUNE_STREAM",
    "QUANTILE_LEVELS",
    "Batch",
    "BatchResult",
    "Frontier",
    "LevelPlan",
    "LevelStats",
    "check_run_target",
    "connect_ray",
    "decode_batch",
    "expand_batch",
    "fit_for_run",
    "frontier",
    "is_split",
    "level_plan",
    "node_rngs",
    "open_store",
    "read_position",
    "run_store",
    "start_index",
    "vega_risk",
    "weighted_var_es",
]

# Streams of engine.rng.node_rng (all defined there, so no two purposes share one).
MC_STREAM = MC
PRUNE_STREAM = PRUNE
QUANTILE_LEVELS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Sampled values per draw call inside a task (float64: 8 MB, which stays in cache better than
# bigger slices), so a batch of 256 nodes with M = 512 paths of 90 days x 25 points (2.4 GB at
# once) is drawn a node or a few at a time.
_DRAW_VALUES = 1 << 20
# Lookahead contexts per decoder call (whole micro-batches of the CVAE's 256 rows).
_DECODE_ROWS = 1024
# Seconds between notes while decoder actors wait for GPUs (an autoscaling cluster)
_WAIT_NOTE_SECONDS = 30
_ATTR_START_CONTEXT = "start_context"
_ATTR_N_PATHS = "n_paths"
_ATTR_SAMPLER = "sampler_fingerprint"
_PROBE_SAMPLES = 64


# ============================================================================ the numerics


@dataclass(frozen=True)
class LevelPlan:
    """What every task of one level shares (small; it travels with each task)."""

    kind: str  # "tree" | "mc"
    level: int  # the level being written (the children), 1..depth
    seed: int
    n_samples: int  # M paths per node (1 for mc)
    stride: int  # S days a child keeps
    bins: int  # marginal histogram bins
    grid_shape: tuple[int, int]
    tree: TreeConfig
    own: bool = True  # the nodes' own draws are this level's marginals
    look: bool = False  # lookahead: the candidates' draws are the next level's marginals

    @property
    def branching(self) -> int:
        return self.tree.branching if self.kind == "tree" else 1

    @property
    def marginal_days(self) -> int:
        """Days of marginals one expansion of this level adds to (0: none)."""
        return self.stride * (int(self.own) + int(self.look))

    @property
    def marginal_day0(self) -> int:
        """The run's first marginal day they are (day 0: the first day after the start)."""
        return (self.level - (1 if self.own else 0)) * self.stride


def lookahead_samples(tree: TreeConfig) -> int:
    """Paths drawn per lookahead candidate: ``tree.lookahead_samples``, or by default as many
    in all as the K children would draw (K x M / L, at least 8)."""
    if tree.lookahead_samples:
        return tree.lookahead_samples
    return max(8, -(-tree.branching * tree.n_samples // max(1, tree.lookahead)))


def level_plan(kind: str, level: int, depth: int, config: Config, stride: int,
               grid_shape: tuple[int, int]) -> LevelPlan:
    """What expanding ``level`` does. With ``tree.lookahead`` the marginals of level k >= 2
    come from the lookahead of level k - 2's nodes, so level 1 adds its own days and the
    next level's, later levels the next level's only, the last level none."""
    tree = config.tree
    look = kind == "tree" and tree.lookahead > 0 and level < depth
    own = kind == "mc" or tree.lookahead == 0 or level == 1
    return LevelPlan(kind, level, config.seed, tree.n_samples if kind == "tree" else 1, stride,
                     config.store.marginal_bins, grid_shape, tree, own, look)


@dataclass
class Batch:
    """A batch of frontier nodes: the unit of work of one task."""

    index: int  # task number within the level
    first_child: int  # level row of the first child
    nodes: np.ndarray  # (n,) int64 whose random stream each node uses (see node_rngs)
    parents: np.ndarray  # (n,) int64 the children's parent pointer (a row of level - 1)
    weights: np.ndarray  # (n,) float64 absolute probability of each node
    marginal: np.ndarray  # (n,) bool add the node's samples to the marginals
    contexts: np.ndarray | None  # (n, C, n_m, n_tau) iv float64

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass
class BatchResult:
    """The children of a batch (rows first_child .. + n*K) and its marginal partial sums."""

    index: int
    first_child: int
    paths: np.ndarray  # (n*K, S, n_m, n_tau) iv float32
    parent: np.ndarray  # (n*K,) int64
    branch: np.ndarray  # (n*K,) int8
    weight: np.ndarray  # (n*K,) float64
    marginal: MarginalAccumulator | None  # over the nodes with Batch.marginal set
    marginal_nodes: np.ndarray  # (n,) bool which nodes the partial holds
    n_nodes: int


def node_rngs(plan: LevelPlan, nodes: np.ndarray) -> list[np.random.Generator]:
    """One stream per node: the tree node (level - 1, node) that draws its children (TREE), or
    Monte Carlo path ``node`` at ``level`` (MC_STREAM)."""
    if plan.kind == "tree":
        return [node_rng(plan.seed, plan.level - 1, int(i), TREE) for i in nodes]
    return [node_rng(plan.seed, plan.level, int(i), MC_STREAM) for i in nodes]


def is_split(sampler) -> bool:
    """Does the sampler split into a decoder half and a kNN half (the calibrated kNN samplers)?"""
    return callable(getattr(sampler, "point_and_keys", None)) and \
        callable(getattr(sampler, "draw", None))


def decode_batch(sampler, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's half: point forecasts (n, F, H, n_m, n_tau) log-IV, one per fold model,
    and kNN keys (n, D)."""
    return sampler.point_and_keys(np.log(np.asarray(contexts, dtype=np.float64)))


def _draw(sampler, batch: Batch, sl: slice, n_samples: int, rngs: list,
          point_keys: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if point_keys is not None:
        point, keys = point_keys
        return sampler.draw(point[sl], keys[sl], n_samples, rngs[sl])
    # a generic sampler: contexts in iv, paths in iv (positive by construction)
    return np.log(sampler.sample(batch.contexts[sl], n_samples, rngs[sl]))


def _candidates(kept: np.ndarray, scores: np.ndarray, n_max: int):
    """One node's lookahead candidates from its kept paths (M, S, n_m, n_tau): its distinct
    paths with their shares when there are at most ``n_max``, else ``n_max`` equal strata of
    the score, each represented by its middle path. Returns the candidates' sample indices
    (distinct paths: in the order first drawn), their probabilities and each sample's
    candidate (M,)."""
    m = kept.shape[0]
    flat = np.ascontiguousarray(kept).reshape(m, -1)
    rows = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
    _, first, member, counts = np.unique(rows, return_index=True, return_inverse=True,
                                         return_counts=True)
    if len(first) <= n_max:
        by_first = np.argsort(first, kind="stable")
        rank = np.empty_like(by_first)
        rank[by_first] = np.arange(len(first))
        return (first[by_first].astype(np.int64), counts[by_first] / m,
                rank[member.reshape(-1)].astype(np.int64))
    order = np.argsort(scores, kind="stable")
    member = np.empty(m, np.int64)
    index, prob = [], []
    for j, pos in enumerate(np.array_split(np.arange(m), n_max)):
        member[order[pos]] = j
        index.append(order[pos[len(pos) // 2]])
        prob.append(len(pos) / m)
    return np.asarray(index, np.int64), np.asarray(prob), member


@dataclass
class _Candidates:
    """A batch's lookahead candidates (rows = candidates, node-major)."""

    owner: np.ndarray  # (c,) position of its node in the batch
    sub: np.ndarray  # (c,) its number within the node (its random stream)
    prob: np.ndarray  # (c,) its share of the node's samples
    paths: np.ndarray  # (c, S, n_m, n_tau) float32 iv: its kept days, as the store keeps them


def _find_candidates(log_paths: np.ndarray, plan: LevelPlan, first_node: int,
                     first_row: int) -> tuple[_Candidates, np.ndarray]:
    """Candidates of a slice of nodes (``_candidates`` per node), the slice's first node
    being batch position ``first_node``; rows numbered from ``first_row``. Returns them and
    (n, M) each sample's candidate row."""
    s = plan.stride
    kept = log_paths[:, :, :s]
    scores = np.asarray(resolve_score(plan.tree.score)(kept), dtype=np.float64)
    n, m = scores.shape
    out, member, row = [], np.empty((n, m), np.int64), first_row
    for b in range(n):
        i, p, mem = _candidates(kept[b], scores[b], plan.tree.lookahead)
        member[b] = mem + row
        row += len(i)
        out.append((np.full(len(i), first_node + b), np.arange(len(i)), p,
                    np.exp(kept[b, i]).astype(np.float32)))
    return _Candidates(*(np.concatenate(x) for x in zip(*out, strict=True))), member


def _lookahead(sampler, batch: Batch, plan: LevelPlan, cand: _Candidates, decode: Callable,
               acc: MarginalAccumulator | None, stop=None) -> np.ndarray:
    """Draw one level on from every candidate of the batch (decoded ``_DECODE_ROWS`` at a
    time, across nodes: the decoder works in fixed-size micro-batches); the draws go into
    ``acc`` (days S..2S-1 of level 1's accumulator, else 0..S-1) with weight node weight x
    candidate share, for the nodes ``batch.marginal`` marks. Returns (c,) the mean score of
    each candidate's draws."""
    s, tree = plan.stride, plan.tree
    score = resolve_score(tree.score)
    n_look = lookahead_samples(tree)
    step = max(1, _DRAW_VALUES // (n_look * sampler.horizon * math.prod(plan.grid_shape)))
    decode_rows = max(step, _DECODE_ROWS)
    offset = s if plan.own else 0
    n_c = len(cand.owner)
    mean_next = np.empty(n_c)
    split = is_split(sampler)
    for d0 in range(0, n_c, decode_rows):  # contexts and streams a block at a time
        d1 = min(n_c, d0 + decode_rows)
        owners = cand.owner[d0:d1]
        contexts = child_contexts(batch.contexts[owners], cand.paths[d0:d1, None])
        rngs = [node_rng(plan.seed, plan.level - 1, int(batch.nodes[o]), LOOKAHEAD, int(j))
                for o, j in zip(owners, cand.sub[d0:d1], strict=True)]
        if split:
            point, keys = decode(contexts)
        for c0 in range(d0, d1, step):
            _check_stop(stop)
            c = slice(c0, min(d1, c0 + step))
            r = slice(c0 - d0, c.stop - d0)
            if split:
                draws = sampler.draw(point[r], keys[r], n_look, rngs[r])
            else:
                draws = np.log(sampler.sample(contexts[r], n_look, rngs[r]))
            draws = np.asarray(draws)[:, :, :s]
            if not np.all(np.isfinite(draws)):
                raise DataError(f"level {plan.level}: lookahead draws are not finite (the "
                                "sampler diverged); check the sampler and the data")
            mean_next[c] = np.asarray(score(draws), dtype=np.float64).mean(axis=1)
            owner = cand.owner[c]
            take = batch.marginal[owner]
            if acc is not None and take.any():
                acc.add(offset, draws[take], batch.weights[owner][take] * cand.prob[c][take])
    return mean_next


def _checked(log_paths, plan: LevelPlan) -> np.ndarray:
    x = np.asarray(log_paths)
    if x.ndim != 5 or x.shape[1] != plan.n_samples or x.shape[2] < plan.stride \
            or x.shape[3:] != plan.grid_shape:
        raise DataError(f"the sampler returned paths {x.shape}; the tree needs "
                        f"(n, {plan.n_samples}, >= {plan.stride}, {plan.grid_shape[0]}, "
                        f"{plan.grid_shape[1]})")
    return x


def _add_own(log_paths: np.ndarray, batch: Batch, sl: slice, acc: MarginalAccumulator,
             s: int) -> None:
    """Nodes ``sl``'s own samples' first ``s`` days into the batch's marginal partial sums
    (days 0..s-1), where ``batch.marginal`` says so."""
    mask = batch.marginal[sl]
    if mask.any():
        x = log_paths[:, :, :s] if mask.all() else log_paths[mask][:, :, :s]
        acc.add(0, x, batch.weights[sl][mask])


def _branch(log_paths: np.ndarray, batch: Batch, sl: slice, plan: LevelPlan,
            next_scores: np.ndarray | None = None):
    """Children of nodes ``sl`` of a batch from their sampled paths (``next_scores``: the
    lookahead's, for ``select_children``)."""
    s, k = plan.stride, plan.branching
    weights = batch.weights[sl]
    n = len(weights)
    if plan.kind == "tree":
        sel = select_children(log_paths, plan.tree, next_scores=next_scores)
        kept = kept_paths(log_paths, sel, s)  # (n, K, S, n_m, n_tau)
        weight = child_weights(weights, sel)
    else:  # Monte Carlo: the one path, fed back with its own weight
        kept = log_paths[:, :1, :s]
        weight = weights.astype(np.float64)
    paths = np.exp(kept.reshape((n * k, s) + plan.grid_shape)).astype(np.float32)
    if not np.all(np.isfinite(paths)) or np.any(paths <= 0):
        raise DataError(f"level {plan.level}: sampled vols are not finite and positive (the "
                        "sampler diverged); check the sampler and the data")
    parent = np.repeat(batch.parents[sl].astype(np.int64), k)
    branch = np.tile(np.arange(k, dtype=np.int8), n)
    return paths, parent, branch, weight


def expand_batch(sampler, batch: Batch, plan: LevelPlan,
                 point_keys: tuple[np.ndarray, np.ndarray] | None = None,
                 timings: dict[str, float] | None = None,
                 decode: Callable | None = None, stop=None) -> BatchResult:
    """Expand a batch of frontier nodes: the one code path, inline or inside an actor.

    ``point_keys``: the decoder's half, already computed (by a decoder actor) for this batch;
    else it is computed here (split samplers) or the sampler's own ``sample`` is used.
    Nodes are drawn a few at a time (``_DRAW_VALUES``) so memory stays bounded; every node
    uses only its own stream, so the slicing never changes a byte. ``timings``: seconds of
    each stage ("decode", "draw", "lookahead", "branch") are added to it (``backfill bench``).
    ``decode(contexts)``: the decoder's half for the lookahead candidates (a decoder actor's,
    under Ray); default ``decode_batch`` in-process. ``stop``: a threading.Event; once it is
    set the task gives up (raises) at its next slice (the threaded inline backend's close).
    """
    clock = time.perf_counter
    t = timings if timings is not None else {}
    n = len(batch)
    if point_keys is None and is_split(sampler):
        t0 = clock()
        point_keys = decode_batch(sampler, batch.contexts)
        t["decode"] = t.get("decode", 0.0) + clock() - t0
    rngs = node_rngs(plan, batch.nodes)
    horizon = sampler.horizon
    per_node = plan.n_samples * horizon * math.prod(plan.grid_shape)
    step = max(1, _DRAW_VALUES // per_node)
    acc = MarginalAccumulator(plan.marginal_days, plan.grid_shape, plan.bins) \
        if plan.marginal_days and batch.marginal.any() else None
    if decode is None:
        def decode(contexts):
            return decode_batch(sampler, contexts)
    next_scores = None
    if plan.look:  # pass 1: each node's candidates; then one lookahead for the whole batch
        found, members, row = [], [], 0
        for i in range(0, n, step):
            _check_stop(stop)
            sl = slice(i, min(n, i + step))
            t0 = clock()
            log_paths = _checked(_draw(sampler, batch, sl, plan.n_samples, rngs, point_keys),
                                 plan)
            t1 = clock()
            if plan.own and acc is not None:
                _add_own(log_paths, batch, sl, acc, plan.stride)
            cand, member = _find_candidates(log_paths, plan, i, row)
            found.append(cand)
            members.append(member)
            row += len(cand.owner)
            t["draw"] = t.get("draw", 0.0) + t1 - t0
            t["lookahead"] = t.get("lookahead", 0.0) + clock() - t1
        cand = _Candidates(*(np.concatenate([getattr(c, f.name) for c in found])
                             for f in fields(_Candidates)))
        t0 = clock()
        next_scores = _lookahead(sampler, batch, plan, cand, decode, acc, stop)[
            np.concatenate(members)]
        t["lookahead"] = t.get("lookahead", 0.0) + clock() - t0
        # pass 2 draws the same paths again (fresh streams): keeping a whole batch's draws
        # from pass 1 would break the _DRAW_VALUES memory bound (2.4 GB at M = 512); the
        # redraw costs about 3-4% of a lookahead node (half of the "draw" stage)
        rngs = node_rngs(plan, batch.nodes)
    parts = []
    for i in range(0, n, step):
        _check_stop(stop)
        sl = slice(i, min(n, i + step))
        t0 = clock()
        log_paths = _checked(_draw(sampler, batch, sl, plan.n_samples, rngs, point_keys), plan)
        t1 = clock()
        parts.append(_branch(log_paths, batch, sl, plan,
                             None if next_scores is None else next_scores[sl]))
        if plan.own and not plan.look and acc is not None:
            _add_own(log_paths, batch, sl, acc, plan.stride)
        t["draw"] = t.get("draw", 0.0) + t1 - t0
        t["branch"] = t.get("branch", 0.0) + clock() - t1
    paths, parent, branch, weight = (np.concatenate(c) for c in zip(*parts, strict=True))
    return BatchResult(batch.index, batch.first_child, paths, parent, branch, weight, acc,
                       batch.marginal.copy(), n)


# ============================================================================ the store


def _partial_dir(path: Path) -> Path:
    # beside the store, not in it: zarr warns about any file of a store that is not its own
    return path.with_name(path.name + ".partial")


MAX_MC_PATHS = 10**9  # 8 GB of weights alone; far beyond what a brute-force reference needs


def store_size_bound(kind: str, config: Config, grid_shape: tuple[int, int],
                     n_paths: int | None = None) -> tuple[int, int]:
    """An upper bound of the bytes a run writes (every level's paths as float32, and each
    node's parent, branch and weight; before compression; ``tree.min_weight`` may prune
    more) and the nodes of its deepest level: a tree's level k holds K x (the frontier it
    expands, at most ``tree.max_frontier``) nodes, an mc run's ``n_paths`` each."""
    tree = config.tree
    s = stride_days(tree.stride, config.data.horizon)
    per_node = s * grid_shape[0] * grid_shape[1] * 4 + 8 + 8 + 1 + 8  # node, parent, branch, weight
    total, nodes = 0, 1
    for _ in range(tree.depth):
        if kind == "mc":
            nodes = int(n_paths or 0)
        else:
            frontier = min(nodes, tree.max_frontier) if tree.max_frontier > 0 else nodes
            nodes = frontier * tree.branching
        total += nodes * per_node
    return total, nodes


def check_run_target(path: str | Path, *, kind: str, n_paths: int | None = None,
                     resume: bool = False, overwrite: bool = False) -> None:
    """What ``open_store`` would refuse about a new store, checked without writing: the CLI
    runs it before the long fit, so a refusal is quick and ``overwrite`` deletes nothing
    until the run is ready to start. (A resumed store is opened and checked at once.)"""
    if resume and overwrite:
        raise ConfigError("--resume continues a store and --overwrite replaces it; pass one")
    if kind == "mc" and (n_paths is None or not 1 <= n_paths <= MAX_MC_PATHS):
        raise ConfigError(f"mc needs --n-paths in 1..{MAX_MC_PATHS:,}, got {n_paths}")
    if not resume:
        ScenarioStore.check_new(path, overwrite)


def open_store(path: str | Path, *, kind: str, config: Config, fingerprint: str,
               start_date: str, grid: dict, start_context: np.ndarray,
               n_paths: int | None = None, resume: bool = False,
               overwrite: bool = False) -> ScenarioStore:
    """A new store for a run (``kind`` 'tree' or 'mc'), or, with ``resume``, the interrupted
    store of the same run: config (but its engine section), seed, data fingerprint, start date
    and context must match, else StoreError says what differs."""
    check_run_target(path, kind=kind, n_paths=n_paths, resume=resume, overwrite=overwrite)
    start = str(parse_start_date(start_date))
    ctx = np.asarray(start_context, dtype=np.float64)
    if resume:
        store = ScenarioStore.open(path, "r+")
        if store.meta.kind != kind:
            raise StoreError(f"{store.path} holds a {store.meta.kind} run, not {kind}; resume "
                             f"it with {store.resume_command} or pass a new path")
        store.check_compatible(config.to_dict(), fingerprint, config.seed,
                               defaults=Config().to_dict(), same_data=NOT_FIT_KEYS)
        problems = []
        if store.meta.start_date != start:
            problems.append(f"start date {store.meta.start_date} in the store, {start} now")
        stored = np.asarray(store.run_attr(_ATTR_START_CONTEXT, []), dtype=np.float64)
        if stored.shape != ctx.shape or not np.array_equal(stored, ctx):
            problems.append("the start context differs")
        if kind == "mc" and store.run_attr(_ATTR_N_PATHS) != n_paths:
            problems.append(f"n_paths {store.run_attr(_ATTR_N_PATHS)} in the store, {n_paths} "
                            "now")
        if problems:
            raise StoreError(f"cannot resume {store.path}: " + "; ".join(problems) + "; rerun "
                             "with the store's start date and settings, or pass a new path or "
                             "--overwrite")
        store.check_intact()
        store.check_marginals_cover(
            store.meta.depth * stride_days(config.tree.stride, config.data.horizon),
            QUANTILE_LEVELS)
        remove_temporary_files(store.path)  # a killed write's; this run is the one writer now
        return store
    store = ScenarioStore.create(path, config=config.to_dict(), seed=config.seed, grid=grid,
                                 fingerprint=fingerprint, start_date=start, kind=kind,
                                 depth=config.tree.depth, chunk_nodes=config.store.chunk_nodes,
                                 overwrite=overwrite)
    shutil.rmtree(_partial_dir(store.path), ignore_errors=True)
    attrs = {_ATTR_START_CONTEXT: ctx.tolist()}  # JSON floats round-trip float64 exactly
    if kind == "mc":
        attrs[_ATTR_N_PATHS] = int(n_paths)
    store.set_run_attrs(**attrs)
    return store


def start_context_of(store: ScenarioStore) -> np.ndarray:
    """The root's context (C, n_m, n_tau) iv, as the run recorded it."""
    stored = store.run_attr(_ATTR_START_CONTEXT)
    if stored is None:
        raise StoreError(f"{store.path} has no start context; it was not written by "
                         "`backfill run` / `backfill mc`")
    try:
        ctx = np.asarray(stored, dtype=np.float64)
    except (TypeError, ValueError):
        ctx = np.zeros(0)
    c = store.meta.config.get("data", {}).get("context")
    want = (c, *store.meta.grid_shape)
    if ctx.shape != want or not (np.all(np.isfinite(ctx)) and np.all(ctx > 0)):
        raise StoreError(f"{store.path}: its start context is not {c} days of positive vols on "
                         f"its {want[1]}x{want[2]} grid (found shape {ctx.shape}); the store "
                         f"was edited or damaged: {REDO}")
    return ctx


def _level_weights(store: ScenarioStore, level: int) -> np.ndarray:
    if not store.chunks_done(level).all():
        raise StoreError(f"level {level} of {store.path} is not complete; resume the run")
    return store.read_weights(level)


def _runs(rows: np.ndarray, gap: int) -> Iterator[tuple[int, int]]:
    """Positions [a, b) of ascending ``rows`` split where consecutive rows are > gap apart."""
    cuts = np.flatnonzero(np.diff(rows) > gap) + 1
    bounds = np.concatenate([[0], cuts, [len(rows)]])
    for a, b in itertools.pairwise(bounds):
        yield int(a), int(b)


def frontier_contexts(store: ScenarioStore, level: int, rows: np.ndarray,
                      start_context: np.ndarray, stride: int) -> np.ndarray:
    """Contexts (n, C, n_m, n_tau) iv of nodes ``rows`` (ascending) of ``level`` (0: the root):
    the last C days of the start context followed by the nodes' ancestor paths."""
    c = start_context.shape[0]
    n = len(rows)
    out = np.empty((n, c) + start_context.shape[1:])
    have = min(c, level * stride)  # days that come from the store
    if have < c:
        out[:, : c - have] = start_context[have:]
    if have == 0:
        return out
    for a, b in _runs(rows, store.meta.chunk_nodes):
        lo, hi = int(rows[a]), int(rows[b - 1]) + 1
        block = store.ancestor_paths(level, lo, hi, n_days=have)
        out[a:b, c - have:] = block[rows[a:b] - lo]
    return out


# ============================================================================ backends


def _one_thread_each() -> None:
    """A pool thread's FAISS searches and torch CPU work run on that thread alone (their
    OpenMP thread counts are per thread; the thread that made the pool keeps its own):
    the pool, not OpenMP, spreads the work over the cores."""
    import faiss
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)


class _Stopped(Exception):
    """A pool task gave up at its next slice because the run is stopping."""


def _check_stop(stop) -> None:
    if stop is not None and stop.is_set():
        raise _Stopped()


class _Inline:
    """Runs the tasks in this process: each one when it is submitted, or with ``threads`` > 1
    in a pool of that many threads (numpy's larger operations, FAISS and torch release the
    GIL; the Python between them does not). Every task is a function of its batch alone and
    the level's sums are exact, so the thread count never changes a byte. When the run
    stops (an error, Ctrl-C), running tasks give up at their next slice of draws."""

    def __init__(self, sampler, threads: int = 1):
        self.sampler = sampler
        self._pool = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="backfill-expand",
                                            initializer=_one_thread_each)
        self._stop = threading.Event()
        # a second task per thread waits in the queue, so no thread idles while the driver
        # writes; memory holds at most that many batches
        self.workers = threads
        self.capacity = 1 if self._pool is None else 2 * threads
        self._done: list[BatchResult] = []
        self._running: list = []  # futures, in submission order

    def devices(self) -> set[str]:
        """Where the decoder half runs: on the sampler's own device."""
        from engine.model import module_devices

        return module_devices(self.sampler)

    def submit(self, batch: Batch, plan: LevelPlan) -> None:
        if self._pool is None:
            self._done.append(expand_batch(self.sampler, batch, plan))
        else:
            self._running.append(self._pool.submit(expand_batch, self.sampler, batch, plan,
                                                   stop=self._stop))

    def pending(self) -> int:
        return len(self._done) + len(self._running)

    def collect(self) -> list[BatchResult]:
        if self._running:
            from concurrent.futures import FIRST_COMPLETED, wait

            finished, _ = wait(self._running, return_when=FIRST_COMPLETED)
            self._running = [f for f in self._running if f not in finished]
            self._done += [f.result() for f in finished]  # a task's error is raised here
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._stop.set()  # running tasks end at their next slice; queued ones never start
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._running = []


def check_private_ray(engine: EngineConfig) -> None:
    """A run that starts a Ray of its own (backend ray, no address) cannot while RAY_ADDRESS
    names a cluster: ray.init would join that one and refuse the CPU count. Said before
    anything trains."""
    if engine.backend == "ray" and engine.address is None and os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"RAY_ADDRESS is set ({os.environ['RAY_ADDRESS']}), but no --address "
                          "was given, so this run would start a Ray of its own; pass --address "
                          "auto to run on that cluster, or unset RAY_ADDRESS")


def _start_local_ray(engine: EngineConfig):
    check_private_ray(engine)
    # Bind a local Ray to the loopback only. Ray reads this variable when it is imported (in
    # ray_constants), so set it first; patch the constant if Ray was imported already.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    imported = "ray" in sys.modules
    import ray

    if imported and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=engine.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)


_CONNECT_SECONDS = 5.0


def _check_reachable(address: str) -> None:
    """A host:port (or ray://host:port) address must answer a TCP connection within a few
    seconds: ray.init retries an unreachable one for minutes, printing warnings. ('auto'
    and other forms are left to Ray.)"""
    import socket

    named = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "auto" and named and named != "auto":  # what ray.init("auto") will join
        address = named
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address.startswith("ray://") and not (sep and host and port.isdigit()):
        # the Ray client would wait half a minute on it, its gRPC printing lines
        raise ConfigError(f"--address {address!r} is not ray://HOST:PORT; pass the Ray "
                          "client address of the cluster's head, e.g. ray://127.0.0.1:10001")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_SECONDS).close()
    except (OSError, ValueError, OverflowError) as err:
        via = " (RAY_ADDRESS, which --address auto joins)" if address == named else ""
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}{via} (nothing answers "
                          f"on {host}:{port} within {_CONNECT_SECONDS:g} s: {first_line(err)}); "
                          "start it (cluster/local.sh up N, or ray start --head), fix "
                          "--address, or leave it out for a local Ray") from None


def connect_ray(engine: EngineConfig) -> None:
    """Join the Ray cluster at ``engine.address`` (no-op if this process already has)."""
    import ray

    if ray.is_initialized():
        return
    _check_reachable(engine.address)
    auth = getattr(ray.exceptions, "AuthenticationError", ())  # a Ray with token auth
    try:
        with warnings.catch_warnings():  # a failed join warns as well as raising
            warnings.simplefilter("ignore")
            ray.init(address=engine.address, log_to_driver=False,
                     logging_level=logging.ERROR)
    except auth as err:
        raise ConfigError(f"cannot join the Ray cluster at {engine.address!r}: its token "
                          f"authentication failed ({first_line(err).split('. ')[0]}); run this "
                          "with the cluster's RAY_AUTH_MODE=token and its token "
                          "(~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)") from None
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot join the Ray cluster at {engine.address!r} "
                          f"({first_line(err)}); start it, fix "
                          "--address, or leave it out for a local Ray") from None


class _RayPool:
    """Decoder and kNN-residual actors sharing one fitted sampler through the object store.

    The sampler (model weights, residual bank, serialized FAISS index) is ``ray.put`` once;
    every actor gets the same ObjectRef and reads the arrays zero-copy from shared memory.
    A task is a decoder call whose ObjectRef goes straight to a kNN actor (no round trip
    through the driver); at most ``max_in_flight`` tasks per kNN actor are pending.
    """

    def __init__(self, sampler, engine: EngineConfig):
        import ray

        self._ray = ray
        self._started = False
        self.decoders, self.knn, self._pending = [], [], {}
        if not ray.is_initialized():
            if engine.address is None:
                _start_local_ray(engine)
            else:
                connect_ray(engine)
            self._started = True
        try:
            self._start_actors(sampler, engine)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, sampler, engine: EngineConfig) -> None:
        import ray

        from actors.decoder import DecoderActor
        from actors.knn_residual import KnnResidualActor
        from engine.model import models_on

        # Ship the weights on the CPU: kNN actors (and CPU-only nodes) must be able to load
        # them; a decoder actor on a GPU node moves its copy to CUDA itself. ray.put copies
        # the sampler at once, so the caller's models go back to their device right after.
        with models_on(sampler, "cpu"):
            self.sampler_ref = ray.put(sampler)
        shared = {"sampler": self.sampler_ref}  # nested: the actor receives the ref itself
        self.split = is_split(sampler)
        if self.split:
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            each = engine.decoder_gpus
            if each is None:  # a share of the GPUs up now (Ray takes shares of 0.0001)
                each = math.floor(min(1.0, gpus / engine.n_decoders) * 1e4) / 1e4
            elif each * engine.n_decoders > gpus + 1e-9 and self._started \
                    and engine.address is None:  # a Ray of this run's own: no GPU will come
                raise ConfigError(
                    f"engine.decoder_gpus = {each:g} asks for {each * engine.n_decoders:g} "
                    f"GPUs for {engine.n_decoders} decoder(s), but this machine's Ray has "
                    f"{gpus:g}; leave engine.decoder_gpus unset (or 0) here, or join a cluster "
                    "with GPUs (--address)")
            self.decoder_gpus, self.cluster_gpus = each, gpus
            self.decoders = [DecoderActor.options(num_gpus=each).remote(shared)
                             for _ in range(engine.n_decoders)]
            self.knn = [KnnResidualActor.remote(shared) for _ in range(engine.n_knn)]
        else:  # a generic sampler has no seam: one actor calls its `sample`
            self.decoders = []
            self.knn = [KnnResidualActor.remote(shared)]
        self.workers = len(self.knn)
        self.capacity = engine.max_in_flight * len(self.knn)
        self._pending = {}  # ObjectRef -> kNN actor index
        self._load = [0] * len(self.knn)

    def devices(self) -> set[str]:
        """Where the decoder half runs: the decoder actors' devices (a generic sampler's one
        actor samples with the weights as shipped, on the CPU)."""
        if not self.decoders:
            return {"cpu"}
        refs = [d.shared_info.remote() for d in self.decoders]
        waited = 0
        while len(self._ray.wait(refs, num_returns=len(refs), timeout=_WAIT_NOTE_SECONDS)[0]) \
                < len(refs):  # decoders asking for GPUs wait for a node that has them
            waited += _WAIT_NOTE_SECONDS
            print(f"waiting {waited} s for the decoder actors to start: each asks for "
                  f"{self.decoder_gpus:g} GPU (engine.decoder_gpus), the cluster had "
                  f"{self.cluster_gpus:g} at the start", file=sys.stderr, flush=True)
        infos = self._ray.get(refs)
        for info in infos:
            if info["gpu_ids"] and info["device"] == "cpu":
                raise ConfigError(
                    f"a decoder actor on node {info['node']} was granted GPU "
                    f"{','.join(map(str, info['gpu_ids']))}, but its torch {info['torch']} "
                    "cannot use CUDA there; install a CUDA build of torch on the GPU nodes, or "
                    "set engine.decoder_gpus = 0 to decode on CPUs")
        labels = {info["device_label"] for info in infos}
        _check_one_decoder_kind(labels)
        return labels

    def submit(self, batch: Batch, plan: LevelPlan) -> None:
        a = int(np.argmin(self._load))
        if self.split:
            dec = self.decoders[batch.index % len(self.decoders)]  # round robin by task
            point_keys = dec.point_and_keys.remote(batch.contexts)
            # the lookahead builds its candidates' contexts from the nodes' own and has the
            # decoder actor decode them; otherwise the kNN actor needs no contexts
            ref = self.knn[a].expand.remote(batch if plan.look else
                                            replace(batch, contexts=None), plan, point_keys,
                                            dec if plan.look else None)
        else:
            ref = self.knn[a].expand.remote(batch, plan, None)
        self._pending[ref] = a
        self._load[a] += 1

    def pending(self) -> int:
        return len(self._pending)

    def collect(self) -> list[BatchResult]:
        ray = self._ray
        refs = list(self._pending)
        ray.wait(refs, num_returns=1)  # block until one is done, then take every one done
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            self._load[self._pending.pop(ref)] -= 1
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                # a user error inside an actor stays one clear line
                if isinstance(err.cause, BackfillError):
                    raise err.cause from None
                raise
        return out

    def close(self) -> None:
        ray = self._ray
        for actor in self.decoders + self.knn:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.decoders, self.knn, self._pending = [], [], {}
        if self._started:
            ray.shutdown()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the platform tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _executor(sampler, engine: EngineConfig):
    if engine.backend == "inline":
        return _Inline(sampler, engine.threads or usable_cores())
    return _RayPool(sampler, engine)


# ============================================================================ one level


@dataclass
class LevelStats:
    level: int
    nodes: int  # frontier nodes expanded (this run; skipped ones excluded)
    children: int
    seconds: float
    frontier: int = 0  # the level's frontier nodes, with those a resumed run found done

    @property
    def nodes_per_second(self) -> float:
        return self.nodes / self.seconds if self.seconds > 0 else float("nan")


class _Checkpoint:
    """The marginal sums of the level in progress and which frontier nodes they hold."""

    def __init__(self, store_path: Path, level: int):
        self.path = _partial_dir(store_path) / f"level_{level:02d}.npz"

    def load(self, n_frontier: int, template: MarginalAccumulator):
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path) as f:
                included = np.asarray(f["included"], dtype=bool)
                acc = MarginalAccumulator.from_arrays(
                    {k[4:]: f[k] for k in f.files if k.startswith("acc_")})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError,
                ConfigError):
            return None  # unreadable: recompute those marginals rather than trust it
        same = (acc.n_days, acc.grid_shape, acc.bins, acc.lo, acc.hi) == \
            (template.n_days, template.grid_shape, template.bins, template.lo, template.hi)
        if not same or included.shape != (n_frontier,):
            return None
        return acc, included

    def save(self, acc: MarginalAccumulator, included: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, included=included, **{f"acc_{k}": v for k, v in acc.to_arrays().items()})
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new checkpoint

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


class _ChunkWriter:
    """Assembles result rows into whole chunks and writes each as soon as it is complete."""

    def __init__(self, store: ScenarioStore, level: int, n_rows: int, done: np.ndarray,
                 after_chunk: Callable[[int, int], None] | None):
        self.store, self.level, self.n_rows, self.done = store, level, n_rows, done
        self.c = store.meta.chunk_nodes
        self.after_chunk = after_chunk
        self._buffers: dict[int, dict] = {}

    def add(self, res: BatchResult) -> None:
        r0, r1 = res.first_child, res.first_child + len(res.weight)
        for chunk in range(r0 // self.c, -(-r1 // self.c)):
            if self.done[chunk]:
                continue  # written by an earlier run: same bytes, skip
            lo, hi = chunk * self.c, min((chunk + 1) * self.c, self.n_rows)
            a, b = max(lo, r0), min(hi, r1)
            buf = self._buffers.get(chunk)
            if buf is None:
                buf = self._buffers[chunk] = {
                    "paths": np.empty((hi - lo,) + res.paths.shape[1:], np.float32),
                    "parent": np.empty(hi - lo, np.int64), "branch": np.empty(hi - lo, np.int8),
                    "weight": np.empty(hi - lo, np.float64), "filled": 0}
            for name in ("paths", "parent", "branch", "weight"):
                buf[name][a - lo: b - lo] = getattr(res, name)[a - r0: b - r0]
            buf["filled"] += b - a
            if buf["filled"] == hi - lo:
                del self._buffers[chunk]
                # handed over (the buffer is this chunk's alone): written on the store's
                # writer threads while the next results are assembled
                self.store.write_chunk(self.level, lo, buf["paths"], buf["parent"],
                                       buf["branch"], buf["weight"], wait=False)
                self.done[chunk] = True
                if self.after_chunk is not None:
                    self.after_chunk(self.level, chunk)


@dataclass
class Frontier:
    nodes: np.ndarray  # random stream of each node
    parents: np.ndarray  # parent pointer of its children
    rows: np.ndarray | None  # rows of level - 1 whose contexts it uses (None: the root)
    weights: np.ndarray


def frontier(store: ScenarioStore, level: int, config: Config) -> Frontier:
    """The nodes expanded into ``level``, after pruning (tree): a function of the store (its
    kind, ``n_paths`` and level ``level - 1``'s weights) and ``config`` only, so ``backfill
    check`` recomputes the very frontier that the run expanded."""
    if store.meta.kind == "mc":
        n = store.run_attr(_ATTR_N_PATHS)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise StoreError(f"{store.path} has n_paths {n!r}, not a count of paths; it was not "
                             "written by `backfill mc`: rerun it into a new path")
        ids = np.arange(n, dtype=np.int64)
        if level == 1:
            return Frontier(ids, np.zeros(n, np.int64), None, np.full(n, 1.0 / n))
        return Frontier(ids, ids, ids, _level_weights(store, level - 1))
    if level == 1:
        root = np.zeros(1, np.int64)
        return Frontier(root, root, None, np.ones(1))
    weights = _level_weights(store, level - 1)
    idx = np.arange(len(weights), dtype=np.int64)
    tree = config.tree
    if tree.min_weight > 0:
        keep, weights = prune_min_weight(weights, tree.min_weight)
        idx = idx[keep]
    if tree.max_frontier > 0 and len(idx) > tree.max_frontier:
        # once per level on the whole frontier, with its own stream: independent of batching
        rng = node_rng(config.seed, level - 1, 0, PRUNE_STREAM)
        keep, weights = resample_frontier(weights, tree.max_frontier, rng)
        idx = idx[keep]
    return Frontier(idx, idx, idx, np.asarray(weights, dtype=np.float64))


def _progress(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.1f} nodes/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=console is None, transient=False)


def _run_level(store: ScenarioStore, executor, plan: LevelPlan, frontier: Frontier,
               start_context: np.ndarray, days: np.ndarray, config: Config, progress,
               after_chunk, checkpoint_seconds: float) -> LevelStats:
    level, k, s = plan.level, plan.branching, plan.stride
    n_front = len(frontier.nodes)
    n_rows = n_front * k
    store.create_level(level, n_rows, days, plan.grid_shape)
    done = store.chunks_intact(level)  # resume: what a crash left half written is redone
    ckpt = _Checkpoint(store.path, level)
    if plan.marginal_days:
        acc = MarginalAccumulator(plan.marginal_days, plan.grid_shape, plan.bins)
        loaded = ckpt.load(n_front, acc)
        acc, included = loaded if loaded is not None else (acc, np.zeros(n_front, bool))
    else:  # no marginals to add (the last level under lookahead): only chunks count
        acc, included = None, np.ones(n_front, bool)
    # a level smaller than a batch per worker is cut finer, so that every worker gets some
    # (the batch size never changes a byte)
    c = store.meta.chunk_nodes
    bsize = min(config.engine.batch_size, max(1, -(-n_front // executor.workers)))

    def needed(b: int) -> bool:
        p0, p1 = b * bsize, min(n_front, (b + 1) * bsize)
        rows_done = done[(p0 * k) // c: -(-(p1 * k) // c)].all()
        return not (rows_done and included[p0:p1].all())

    todo = [b for b in range(-(-n_front // bsize)) if needed(b)]
    n_todo = sum(min(n_front, (b + 1) * bsize) - b * bsize for b in todo)
    task = progress.add_task(f"level {level}/{store.meta.depth}", total=n_front,
                             completed=n_front - n_todo)
    writer = _ChunkWriter(store, level, n_rows, done, after_chunk)
    rows_of = frontier.rows

    def batch(b: int) -> Batch:
        p0, p1 = b * bsize, min(n_front, (b + 1) * bsize)
        rows = None if rows_of is None else rows_of[p0:p1]
        if rows is None:
            ctx = np.broadcast_to(start_context, (p1 - p0,) + start_context.shape).copy()
        else:
            ctx = frontier_contexts(store, level - 1, rows, start_context, s)
        return Batch(b, p0 * k, frontier.nodes[p0:p1], frontier.parents[p0:p1],
                     frontier.weights[p0:p1], ~included[p0:p1], ctx)

    t0 = last_save = time.perf_counter()
    queue = iter(todo)
    exhausted = False
    consistent = True  # acc and included agree (False while one result is being added)
    try:
        while True:
            while not exhausted and executor.pending() < executor.capacity:
                b = next(queue, None)
                if b is None:
                    exhausted = True
                    break
                executor.submit(batch(b), plan)
            if executor.pending() == 0:
                break
            for res in executor.collect():
                consistent = False
                if res.marginal is not None:
                    acc.merge(res.marginal)
                p0 = res.index * bsize
                included[p0: p0 + res.n_nodes] |= res.marginal_nodes
                consistent = True
                writer.add(res)
                progress.advance(task, res.n_nodes)
            if acc is not None and time.perf_counter() - last_save >= checkpoint_seconds:
                ckpt.save(acc, included)
                last_save = time.perf_counter()
        store.flush()  # the level's last chunks: a failed write is raised here, in the try
    except BaseException:
        # keep what is done for --resume: the chunk writes in flight land (a failed one stays
        # unmarked and is redone); half-added results (an interrupt between the merge and the
        # mask) are not saved: the last checkpoint stands and those tasks rerun
        store.flush(quiet=True)
        if acc is not None and consistent:
            with contextlib.suppress(Exception):
                ckpt.save(acc, included)
        raise
    seconds = time.perf_counter() - t0
    if not done.all() or not included.all():
        raise StoreError(f"level {level}: {int((~done).sum())} chunks unwritten after every "
                         "task returned; resume the run")  # a bug, not a user error
    if acc is not None:
        marg = acc.finalize(QUANTILE_LEVELS)
        if not np.allclose(marg["weight"], 1.0, rtol=0, atol=1e-6):  # as mark_level_complete
            raise StoreError(f"level {level}: marginal mass {marg['weight'].min()!r}, required "
                             "1; the level's weights do not sum to 1")
        store.write_marginal_days(plan.marginal_day0, marg["quantiles"], marg["mean"],
                                  marg["std"])
    store.mark_level_complete(level)
    ckpt.remove()
    return LevelStats(level, n_todo, n_rows, seconds, n_front)


# ============================================================================ the run


def _check_sampler(sampler, config: Config, grid_shape: tuple[int, int],
                   start_context: np.ndarray) -> None:
    if not (getattr(sampler, "is_fitted", None) and sampler.is_fitted()):
        raise ConfigError(f"{type(sampler).__name__} is not fitted; fit it before the run")
    c, h = config.data.context, config.data.horizon
    if (sampler.context, sampler.horizon) != (c, h):
        raise ConfigError(f"the sampler has context/horizon {sampler.context}/{sampler.horizon}"
                          f", the run {c}/{h}; fit it with the run's config")
    if tuple(sampler.grid_) != tuple(grid_shape) or start_context.shape != (c, *grid_shape):
        raise DataError(f"the sampler's grid {tuple(sampler.grid_)}, the store's grid "
                        f"{tuple(grid_shape)} and the start context {start_context.shape} "
                        "do not match; use one data set")


def sampler_probe(sampler, start_context: np.ndarray, seed: int) -> str:
    """A fingerprint of the fitted sampler: the SHA-256 of ``_PROBE_SAMPLES`` paths drawn
    from the start context with a stream of their own, as the store keeps them (float32
    vols), on the CPU wherever its models sit (where decoding happens is the fingerprint's
    other half: ``devices`` of the executor). Another model draws other bytes."""
    from engine.model import models_on

    rng = node_rng(seed, 0, 0, PROBE)
    with models_on(sampler, "cpu"):
        x = sampler.sample_log(np.asarray(start_context)[None], _PROBE_SAMPLES, [rng])
    with np.errstate(over="ignore", under="ignore"):
        iv = np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)
    if not (np.all(np.isfinite(iv)) and np.all(iv > 0)):
        raise DataError("the fitted sampler draws vols that are not finite and positive from "
                        "the start context (it diverged); check the data and the sampler's "
                        "settings")
    return hashlib.sha256(iv.tobytes()).hexdigest()[:32]


def _check_one_decoder_kind(devices: set[str]) -> None:
    """Refuse decoder actors on different kinds of device (two GPU models, or GPUs and
    CPUs): their forecasts round differently, so the store's bytes would depend on which
    decoder took which task, which Ray's placement of the actors decides anew on every run.
    (Inline, the sampler's models sit where they sit: the same on every run.)"""
    if len(devices) > 1:
        raise ConfigError(f"the decoder actors run on {' and '.join(sorted(devices))}, whose "
                          "forecasts round differently: the store would depend on which "
                          "decoder took which task; keep the decoders on one GPU model (a "
                          "node type or custom resource of their own), or decode on CPUs "
                          "(engine.decoder_gpus = 0)")


def _check_sampler_fingerprint(store: ScenarioStore, fingerprint: str) -> None:
    """Record the sampler's fingerprint (probe / decoder devices) in a new store; refuse to
    go on with another one: the config and data may match while the model (--model, a
    retrained one) or the decoders' device differ, and a store must not mix two samplers."""
    stored = store.run_attr(_ATTR_SAMPLER)
    if stored is None:
        store.set_run_attrs(**{_ATTR_SAMPLER: fingerprint})
    elif stored != fingerprint:
        raise StoreError(
            f"cannot resume {store.path}: the sampler fitted now draws other paths than the one "
            f"that began it (fingerprint {stored} in the store, {fingerprint} now: another "
            "--model, a model trained on another machine, another version of backfill, or "
            "decoders on another device); "
            "resume with the model and the kind of machine that began it, or pass a new path "
            "or --overwrite")


def run_store(store: ScenarioStore, sampler, config: Config, *, console=None,
              after_chunk: Callable[[int, int], None] | None = None,
              checkpoint_seconds: float | None = None) -> list[LevelStats]:
    """Expand every level not yet complete in ``store`` (from ``open_store``) with a fitted
    sampler; the backend and its sizes come from ``config.engine``.

    ``console``: a rich Console for a progress bar per level (None: silent). ``after_chunk(level,
    chunk)`` is called after each chunk is handed to the store's writer (tests use it to
    simulate a crash; a crash raised there lets the writes in flight land first).
    ``checkpoint_seconds``: default ``config.engine.checkpoint_seconds``. Returns the
    statistics of the levels this call expanded.
    """
    if checkpoint_seconds is None:
        checkpoint_seconds = config.engine.checkpoint_seconds
    kind, depth = store.meta.kind, store.meta.depth
    grid_shape = store.meta.grid_shape
    start_context = start_context_of(store)
    _check_sampler(sampler, config, grid_shape, start_context)
    s = stride_days(config.tree.stride, config.data.horizon)
    days = business_days_after(store.meta.start_date, depth * s)
    store.create_marginals(days, QUANTILE_LEVELS)
    store.ensure_consolidated()
    for old in range(1, store.levels_complete + 1):  # stale checkpoints of finished levels
        _Checkpoint(store.path, old).remove()
    stats: list[LevelStats] = []
    if store.levels_complete >= depth:
        return stats
    probe = sampler_probe(sampler, start_context, config.seed)
    executor = _executor(sampler, config.engine)
    try:
        _check_sampler_fingerprint(store, f"{probe}/{'+'.join(sorted(executor.devices()))}")
        with _progress(console) as progress:
            for level in range(store.levels_complete + 1, depth + 1):
                plan = level_plan(kind, level, depth, config, s, grid_shape)
                stats.append(_run_level(store, executor, plan, frontier(store, level, config),
                                        start_context, days[(level - 1) * s: level * s],
                                        config, progress, after_chunk, checkpoint_seconds))
    finally:
        executor.close()
    return stats


# ============================================================================ CLI glue


def start_index(panel, start: str | None, context: int, horizon: int,
                least: Callable[[], tuple[int, str] | None] | None = None) -> int:
    """The panel day a run starts from: the last day (default) or the last on or before
    ``start``; it needs ``context`` + ``horizon`` days up to it (a context to start from,
    and the least history a sampler fits on); where it has fewer, the refusal names the
    sampler's ``least()`` = (days, what needs them) if it gives one."""
    if start is None:
        i = panel.n_days - 1
    else:
        day = parse_start_date(start)
        i = int(np.searchsorted(panel.dates, day, side="right")) - 1
        if i < 0:
            raise DataError(f"--start {start} is before the first day of the data "
                            f"({panel.dates[0]}); pick a date inside the data")
    # from a window's days up to ``least`` the sampler's fit refuses it, saying why
    if i < context + horizon - 1:
        need, what = (least and least()) or (
            context + horizon, "a run's sampler fits on at least context + horizon =")
        later = (f"pick a --start on or after {panel.dates[need - 1]}" if need <= panel.n_days else
                 f"the data hold {panel.n_days} days: give a longer history")
        raise DataError(f"the start day {panel.dates[i]} has only {i + 1} days of history up "
                        f"to it, but {what} {need}; {later}")
    return i


def least_history(config) -> tuple[int, str] | None:
    """The fewest days of history up to the start that the run's sampler fits on, where
    it needs more than a context and a horizon (the kNN samplers' cross-fitted bank), and
    what needs them; else None."""
    from engine.samplers import is_knn
    from engine.samplers.knn import min_history

    if not is_knn(config.sampler.method):
        return None
    return (min_history(config, config.sampler.point),
            f"the {config.sampler.method} sampler's cross-fitted residual bank needs at least")


@dataclass
class RunInputs:
    """What `backfill run` / `mc` derive from the config before expanding."""

    fingerprint: str
    grid: dict
    start_date: str
    start_context: np.ndarray  # (C, n_m, n_tau) iv
    fit_days: int  # days of history the sampler is fitted on
    start_note: str | None = None  # where --start is not a day of the data


def run_inputs(prep, start: str | None, fitted: bool = False) -> RunInputs:
    """``fitted``: the sampler comes fitted (a --sampler file), so the history up to the
    start needs only a context and a horizon."""
    c = prep.config.data.context
    i = start_index(prep.panel, start, c, prep.config.data.horizon,
                    None if fitted else lambda: least_history(prep.config))
    panel = prep.panel
    note = None
    if start is not None and (asked := parse_start_date(start)) != panel.dates[i]:
        days = int((asked - panel.dates[i].astype("datetime64[D]")).astype(np.int64))
        beyond = asked > panel.dates[-1]
        note = (f"note: --start {start} is {'after the last day' if beyond else 'not a day'} "
                f"of the data: taking {'that day' if beyond else 'the last day before it'}, "
                f"{panel.dates[i]} ({days} calendar day{'s' * (days != 1)} earlier)")
    return RunInputs(panel.fingerprint, panel.grid_dict(), str(panel.dates[i]),
                     panel.surface[i - c + 1: i + 1].astype(np.float64), i + 1, note)


def fit_for_run(prep, inputs: RunInputs, model_path: Path | None, console=None):
    """The run's sampler (``config.sampler.method``), fitted on ALL history up to the start
    day: production has no test split to hold out. The CVAE comes from ``model_path`` or is
    trained (pipeline.get_model)."""
    from engine.pipeline import Prepared, get_model, run_splits
    from engine.samplers import make_sampler
    from engine.samplers.knn import KnnResidualSampler, check_history, min_history
    from engine.train import progress_bar

    cfg = prep.config
    sampler = make_sampler(cfg.sampler.method, cfg)
    history = prep.panel.slice_days(0, inputs.fit_days)
    if isinstance(sampler, KnnResidualSampler):  # a history too short for its bank: refused
        try:  # before the CVAE trains, not after
            check_history(history.n_days, cfg, cfg.sampler.point)
        except DataError as err:
            later = ""
            if inputs.fit_days < prep.panel.n_days:
                need = min_history(cfg, cfg.sampler.point)
                later = (f"; the history runs up to the start {inputs.start_date}: a --start on "
                         f"or after {prep.panel.dates[need - 1]} gives it enough"
                         if need <= prep.panel.n_days else "")
            raise DataError(f"{err}{later}") from None
    model = None
    if sampler.uses_model and model_path is not None:
        model = get_model(prep, model_path, console)  # checked against the whole data file
        if (console is not None and model.train_end is not None
                and np.datetime64(model.train_end, "D") > np.datetime64(inputs.start_date, "D")):
            console.print(f"note: {model_path} learned from days up to {model.train_end}, "
                          f"after the start {inputs.start_date}: its paths may know what "
                          "came next; leave --model out to train on the history before the "
                          "start only", markup=False)
    elif sampler.uses_model:
        # trained here on the train split of the history up to the start day only, so a run
        # from a past date never learns from the days after it
        cut = prep if inputs.fit_days == prep.panel.n_days else \
            Prepared(cfg, history, run_splits(history, cfg.data))
        if console is not None and cut.splits.note is not None:
            console.print(f"note: {cut.splits.note}")
        model = get_model(cut, None, console)
    if console is not None:
        console.print(f"fitting sampler {cfg.sampler.method} on {history.n_days} days up to "
                      f"{inputs.start_date}")
    with progress_bar(console is not None) as progress:
        if hasattr(type(sampler), "progress"):
            sampler.progress = progress
        try:
            sampler.fit(history, model)
        finally:
            if "progress" in vars(sampler):
                del sampler.progress  # a rich Progress does not pickle (Ray ships the sampler)
    if console is not None and isinstance(sampler, KnnResidualSampler):
        console.print(sampler.bank_summary())
        for note in sampler.notes():
            console.print(f"note: {note}")
    return sampler


# the config keys a sampler's fit reads: a saved sampler serves only runs that agree on all
# of them but NOT_FIT_KEYS (the data is checked by its fingerprint, not by its name or by
# the settings that made the synthetic market)
FIT_KEYS = ("seed", "data", "model", "train", "sampler")
NOT_FIT_KEYS = ("data.source", "data.synthetic.")


def fit_differences(fitted: Config, config: Config) -> list[tuple[str, object, object]]:
    """(key, the fit's value, the run's value) of every FIT_KEYS key on which they differ."""
    a, b = fitted.to_dict(), config.to_dict()
    return [d for k in FIT_KEYS for d in first_difference(a[k], b[k], k)
            if not d[0].startswith(NOT_FIT_KEYS)]


def history_fingerprint(prep, inputs: RunInputs) -> str:
    """The fingerprint of the days a run's sampler is fitted on (up to its start)."""
    return prep.panel.slice_days(0, inputs.fit_days).fingerprint


@dataclass
class SavedSampler:
    """A sampler file read but not yet decoded: its meta (what it was fitted on) and state."""

    path: Path
    meta: dict
    state: dict

    @property
    def start_date(self) -> str:
        return self.meta["start_date"]


def read_saved_sampler(path: Path, config: Config) -> SavedSampler:
    """Read a sampler file (``backfill fit``) and check that it was fitted with this run's
    config; its data and start are checked by ``check_saved_sampler``."""
    from engine import sampler_file

    meta, state = sampler_file.read_meta(path)
    try:
        fitted = Config.from_dict(meta["config"])
    except (KeyError, TypeError, BackfillError) as err:
        raise CheckpointError(f"{path}: its config is not one this backfill reads "
                              f"({first_line(err)}); fit it again with `backfill fit`") from None
    diff = fit_differences(fitted, config)
    if diff:
        key, was, now = diff[0]
        more = f" (and {len(diff) - 1} more key{'s' * (len(diff) > 2)})" if len(diff) > 1 else ""
        raise ConfigError(f"--sampler {path} was fitted with {key} = {was!r}, this run's config "
                          f"has {now!r}{more}; run with the config it was fitted with "
                          "(`backfill config show` prints yours), or fit it again with "
                          "`backfill fit --out` and this config")
    return SavedSampler(Path(path), meta, state)


def check_saved_sampler(saved: SavedSampler, prep, inputs: RunInputs,
                        start_given: bool = True) -> str | None:
    """The run starts where the sampler file's fit ended, on the same history and grid.
    ``start_given``: --start was passed (else the run took the file's start). Returns a note
    to print once the store is checked too (the data runs on past the fit), or None."""
    meta, path = saved.meta, saved.path
    panel = prep.panel
    fitted_on = str(meta["config"].get("data", {}).get("source", "?"))
    # where the run reads another data source than the fit did (--data left out, say)
    named = "" if fitted_on == prep.config.data.source else \
        f" (it was fitted on {fitted_on}, this run reads {prep.config.data.source})"
    if inputs.start_date != meta["start_date"]:
        if not np.any(panel.dates == np.datetime64(meta["start_date"], "D")):
            raise ConfigError(f"--sampler {path} was fitted on the history up to "
                              f"{meta['start_date']}, a day this data does not have (its last "
                              f"day on or before is {inputs.start_date}){named}; pass the data "
                              "it was fitted on, or fit it again with `backfill fit --data`")
        raise ConfigError(f"--sampler {path} was fitted on the history up to "
                          f"{meta['start_date']}, this run starts on {inputs.start_date}; "
                          "leave --start out (the run then starts where the fit ended), or fit "
                          "a sampler for this start with `backfill fit --start`")
    if inputs.grid != meta["grid"]:
        raise ConfigError(f"--sampler {path} was fitted on another grid (moneyness "
                          f"{meta['grid'].get('moneyness')}, maturities "
                          f"{meta['grid'].get('maturity_days')}), this data's is moneyness "
                          f"{inputs.grid['moneyness']}, maturities {inputs.grid['maturity_days']}"
                          f"{named}; pass the data it was fitted on, or fit it again with "
                          "`backfill fit --data`")
    history = history_fingerprint(prep, inputs)
    if history != meta["history_fingerprint"]:
        raise ConfigError(f"--sampler {path} was fitted on other data (its history up to "
                          f"{meta['start_date']} has fingerprint {meta['history_fingerprint']}, "
                          f"this data's {history}){named}; pass the data file it was fitted "
                          "on, or fit it again with `backfill fit --data`")
    later = panel.n_days - inputs.fit_days
    if later and not start_given:
        return (f"note: the data runs on to {panel.dates[-1]} ({later} more "
                f"day{'s' * (later != 1)}); the run starts on {inputs.start_date}, where "
                f"{path} was fitted: `backfill fit` again to start on the last day")
    return None


def load_saved_sampler(saved: SavedSampler, config: Config, console=None):
    """The fitted sampler of a checked file, its CVAEs where a fresh fit would leave them
    (and torch's threads set as a fit sets them)."""
    import torch

    from engine import sampler_file
    from engine.model import module_devices
    from engine.samplers.knn import KnnResidualSampler
    from engine.train import pick_device

    device = pick_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    sampler = sampler_file.decode(saved.state, saved.path, str(device))
    if sampler_file.method_of(sampler) != config.sampler.method:
        raise CheckpointError(f"{saved.path} holds a {type(sampler).__name__}, not the "
                              f"{config.sampler.method} sampler its config names; fit it again "
                              "with `backfill fit`")
    if console is not None:
        console.print(f"sampler {saved.meta['method']} from {saved.path}: fitted on "
                      f"{saved.meta['fit_days']} days up to {saved.start_date}", markup=False)
        now = sorted(module_devices(sampler))
        if now != saved.meta["devices"]:
            console.print(f"note: its models were fitted on {', '.join(saved.meta['devices'])} "
                          f"and compute on {', '.join(now)} here: the paths are its models', "
                          "not those a fit on this machine would make", markup=False)
        if isinstance(sampler, KnnResidualSampler):
            console.print(sampler.bank_summary())
            for note in sampler.notes():
                console.print(f"note: {note}")
    return sampler


def save_fitted_sampler(sampler, path: Path, prep, inputs: RunInputs) -> Path:
    """``backfill fit``: the sampler with what a run must share with it."""
    from engine import sampler_file

    return sampler_file.save_sampler(sampler, path, config=prep.config,
                                     history_fingerprint=history_fingerprint(prep, inputs),
                                     start_date=inputs.start_date, fit_days=inputs.fit_days,
                                     grid=inputs.grid)


# ============================================================================ reports


def _by_loss(pnl: np.ndarray, weights: np.ndarray):
    """A weighted P&L sample sorted by loss L = -P&L, smallest first: (order, sorted losses,
    their probabilities, cdf)."""
    loss = -np.asarray(pnl, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if loss.shape != w.shape or loss.ndim != 1 or loss.size == 0 or np.any(w < 0) or \
            not w.sum() > 0:
        raise DataError(f"P&L {loss.shape} and weights {w.shape} must be matching non-empty "
                        "1-D arrays with non-negative weights")
    order = np.argsort(loss, kind="stable")
    ws = w[order] / w.sum()
    return order, loss[order], ws, np.cumsum(ws)


# The highest VaR level: beyond it the tail's mass is lost in the rounding of float64 sums
# of the weights (a million nodes' cumulative sum errs by about 1e-10).
MAX_VAR_LEVEL = 1 - 1e-9


def _var_position(cdf: np.ndarray, a: float) -> int:
    """Where VaR_a sits in the sorted losses: the first with P(L <= l) >= a."""
    if not 0 < a <= MAX_VAR_LEVEL:
        raise ConfigError(f"VaR level {a!r} must lie in (0, {MAX_VAR_LEVEL!r}], e.g. 0.99")
    return min(int(np.searchsorted(cdf, a - 1e-12, side="left")), len(cdf) - 1)


def _atom(ws: np.ndarray, j: int, a: float) -> float:
    """The part of the atom at VaR_a (sorted position ``j``) in the worst 1 - a: what the
    nodes beyond it leave of 1 - a, within [0, its own weight] (summed from the tail's
    end, so the shares add up to 1 - a even where the cdf rounds past 1). A rounding
    remainder is 0: with 100 equal weights at 0.99 the tail is the worst node alone."""
    part = (1 - a) - ws[j + 1:].sum()
    return 0.0 if part <= 1e-9 * (1 - a) else float(min(part, ws[j]))


def _tails(pnl: np.ndarray, weights: np.ndarray, levels
           ) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
    """For each level a, sorting the sample once: VaR_a, ES_a, and the points at or beyond
    VaR_a with their shares (see ``weighted_var_es`` and ``tail_shares``)."""
    order, ls, ws, cdf = _by_loss(pnl, weights)
    out = []
    for a in levels:
        j = _var_position(cdf, a)
        share = ws[j:].copy()
        share[0] = _atom(ws, j, a)
        es = (ws[j + 1:] @ ls[j + 1:] + share[0] * ls[j]) / (1 - a)
        # a mean of losses at or beyond VaR: never below it (the shares' rounding could)
        es = max(float(es), float(ls[j]))
        out.append((float(ls[j]), es, order[j:][::-1], share[::-1] / (1 - a)))
    return out


def weighted_var_es(pnl: np.ndarray, weights: np.ndarray,
                    levels) -> list[tuple[float, float]]:
    """Value at risk and expected shortfall (as positive losses) of a weighted P&L sample.

    VaR_a is the a-quantile of the loss L = -P&L (the smallest l with P(L <= l) >= a); ES_a the
    mean loss in the worst 1 - a of probability, with the atom at VaR split exactly:
    ES_a = (E[L 1{L > VaR}] + (P(L <= VaR) - a) VaR) / (1 - a), the atom's part taken as
    what P(L > VaR) leaves of 1 - a (``_atom``).
    """
    return [(var, es) for var, es, _, _ in _tails(pnl, weights, levels)]


def tail_shares(pnl: np.ndarray, weights: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """The sample's points at or beyond VaR_a, worst first (indices into ``pnl``), and each
    one's share of the worst 1 - a of probability: all of its own beyond VaR, the part of
    the atom at VaR that ES counts. The shares sum to 1 and ES_a = sum(share * loss)."""
    _, _, nodes, share = _tails(pnl, weights, [a])[0]
    return nodes, share


def level_label(level: float) -> str:
    """A confidence level as its row keys and columns name it: 0.95, 0.995, 0.999999999
    (the shortest text that reads back as the same float, so two levels never share a label
    and none is rounded to 1)."""
    return repr(float(level))


POSITION_COLUMNS = ("moneyness", "maturity_days", "vega")
# A user's grid values (a position's, realised data's) match the store's to this relative
# tolerance: a grid read from float32 (0.800000011920929) still takes the 0.8 a user writes.
GRID_RTOL = 1e-6


def _position_rows(p: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A position CSV's header and its non-blank rows, each with its line number."""
    need = f"a CSV with the header {','.join(POSITION_COLUMNS)}"
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text; save it as UTF-8, {need}") from None
    except (OSError, csv.Error) as err:  # unreadable, NUL bytes, an unclosed quote
        raise DataError(f"{p}: cannot read it as CSV ({first_line(err)}); write {need}") from None
    if not rows:
        raise DataError(f"{p}: empty; write {need} and one row per grid point held")
    raw = rows[0][1]
    header = [c.strip().lower() for c in raw]
    if any(header.count(c) != 1 for c in POSITION_COLUMNS):
        raise DataError(f"{p}: the header is {','.join(repr(c) for c in raw)} but a position "
                        f"needs each of {', '.join(POSITION_COLUMNS)} once")
    if len(rows) == 1:
        raise DataError(f"{p}: no rows under the header; write one row per grid point held")
    return header, rows[1:]


# A vega beyond this (P&L per 1.00 of iv) is no book: its P&L would overflow float64 sums.
MAX_VEGA = 1e15


def read_position(path: str | Path, grid: dict, whose: str = "store") -> np.ndarray:
    """A position's vega per grid point, (n_m, n_tau), from a CSV with one row per point held:
    ``moneyness, maturity_days, vega``, the vega being the P&L per 1.00 of iv (so per vol
    point x 100); the points it leaves out hold nothing. Each row must name a point of the
    grid (``whose``: the store's, or the data's), and some vega must be nonzero."""
    p = Path(path)
    if not p.is_file():
        found = "not found" if not p.exists() else "is not a regular file"
        raise DataError(f"position file {p} {found}; pass a CSV with columns "
                        f"{', '.join(POSITION_COLUMNS)}")
    header, rows = _position_rows(p)
    axes = {"moneyness": np.asarray(grid["moneyness"], dtype=np.float64),
            "maturity_days": np.asarray(grid["maturity_days"], dtype=np.float64)}
    vega = np.zeros((len(axes["moneyness"]), len(axes["maturity_days"])))
    seen: dict[tuple[int, int], int] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{p}: line {line} has {len(row)} fields but the header has "
                            f"{len(header)}; write one value under each column")
        value, at = {}, []
        for col in POSITION_COLUMNS:
            text = row[header.index(col)].strip()
            try:
                value[col] = float(text)
            except ValueError:
                value[col] = math.nan
            if not math.isfinite(value[col]):
                shown = repr(text) if text else "empty"
                raise DataError(f"{p}: {col} is {shown} on line {line}; write a finite number")
        if abs(value["vega"]) > MAX_VEGA:
            raise DataError(f"{p}: vega {value['vega']:g} on line {line} is beyond "
                            f"{MAX_VEGA:g} per 1.00 of iv; write the book's vega in its own "
                            "units (a vega of 1,000 per vol point is 100000)")
        for col, axis in axes.items():
            near = np.flatnonzero(np.isclose(value[col], axis, rtol=GRID_RTOL, atol=0))
            if near.size == 0:
                # the units a vendor's file may use: percent of spot, years
                scaled = {"moneyness": (value[col] / 100, "in percent; write strike / spot"),
                          "maturity_days": (value[col] * 365, "in years; write calendar days")}
                v, unit = scaled[col]
                nearest = axis[np.argmin(np.abs(axis - v))]
                hint = ""
                other = "maturity_days" if col == "moneyness" else "moneyness"
                if np.isclose(value[col], axes[other], rtol=GRID_RTOL, atol=0).any():
                    hint = (f" ({value[col]:.10g} is one of the grid's {other}: the header's "
                            "column names may not match the values' order)")
                elif np.isclose(v, nearest, rtol=0.02, atol=0):
                    on = "" if np.isclose(v, nearest, rtol=GRID_RTOL, atol=0) else "near "
                    hint = f" (it reads as {v:.10g}, {on}the grid's {nearest:.10g}, if it is {unit})"
                raise DataError(f"{p}: {col} {value[col]!r} on line {line} is not on the "
                                f"{whose}'s grid ({col} {', '.join(f'{a:.10g}' for a in axis)})"
                                f"{hint}; name grid points only")
            at.append(int(near[0]))
        point = (at[0], at[1])
        if point in seen:
            raise DataError(f"{p}: line {line} names moneyness {value['moneyness']!r}, maturity "
                            f"{value['maturity_days']!r} days again (line {seen[point]}); "
                            "write each grid point once (sum its vegas)")
        seen[point] = line
        vega[point] = value["vega"]
    if not vega.any():
        raise DataError(f"{p} holds no vega (every vega is 0): such a book cannot lose, so it "
                        "has no VaR; give the vegas held")
    return vega


def vega_risk(store: ScenarioStore, levels=(0.95, 0.99), vega: np.ndarray | None = None,
              realised: np.ndarray | None = None,
              on_level: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
              on_chunk: Callable[[], None] | None = None,
              realised_dates: np.ndarray | None = None) -> list[dict]:
    """VaR / ES per complete level of a vega position: by default long one vega at every
    grid point, else ``vega`` (n_m, n_tau) (see ``read_position``).

    P&L of a node at its level's last day T: sum over the grid of vega * (iv_T - iv_start),
    in iv units (0.01 = one vol point per unit of vega); weights are the nodes'
    probabilities. ``tail_losses_<a>``: the distinct losses the worst 1 - a of probability
    lies on. ``realised`` (steps, n_m, n_tau): the surfaces that came after the start,
    a step a row; for each level they reach, the row gets ``realised_pnl``,
    ``realised_rank`` (the level's probability of a P&L at most that) and ``breach_<a>``
    (the realised loss exceeded VaR a), and ``realised_date`` (that row's date, from
    ``realised_dates`` (steps,), else the level's); for a level beyond them, None each.
    ``on_level(level, pnl, weight)`` is shown each level's node P&Ls and weights (for a
    plot); ``on_chunk()`` is called after each chunk read (a progress bar's tick).
    """
    levels = list(dict.fromkeys(levels))  # a level given twice is one column
    if not levels:
        raise ConfigError("no VaR level given; pass levels in (0, 1), e.g. --levels 0.95,0.99")
    done = store.require_complete_level()
    start = start_context_of(store)[-1]  # (n_m, n_tau) the start day's surface
    if vega is None:
        vega = np.ones_like(start)
    if vega.shape != start.shape:
        raise DataError(f"a position of shape {vega.shape} for a store whose grid is "
                        f"{start.shape}; read it with read_position and the store's grid")
    rows = []
    for level in range(1, done + 1):
        pnl, weight = [], []
        for _, _, block in store.iter_chunks(level):
            last = block["paths"][:, -1].astype(np.float64)  # (n, n_m, n_tau)
            pnl.append(((last - start) * vega).reshape(len(last), -1).sum(-1))
            weight.append(block["weight"])
            if on_chunk is not None:
                on_chunk()
        pnl, weight = np.concatenate(pnl), store.complete_weights(level, np.concatenate(weight))
        if on_level is not None:
            on_level(level, pnl, weight)
        days = store.level_days(level)
        row = {"level": level, "date": str(days[-1]),
               "days_ahead": int(level * len(days)), "nodes": len(pnl),
               "mean_pnl": float(weight @ pnl / weight.sum())}
        for a, (var, es, nodes, share) in zip(levels, _tails(pnl, weight, levels), strict=True):
            row[f"var_{level_label(a)}"] = var
            row[f"es_{level_label(a)}"] = es
            # how many distinct losses the worst 1 - a of probability lies on: one (a single
            # node, or paths that repeat one drawn residual path), and the ES is that loss,
            # which says little of the law's tail beyond it
            row[f"tail_losses_{level_label(a)}"] = int(np.unique(pnl[nodes[share > 0]]).size)
        if realised is not None and row["days_ahead"] > len(realised):  # the data end first
            row.update({"realised_date": None, "realised_pnl": None, "realised_rank": None},
                       **{f"breach_{level_label(a)}": None for a in levels})
        elif realised is not None:
            real = float(((realised[row["days_ahead"] - 1] - start) * vega).sum())
            row["realised_date"] = (row["date"] if realised_dates is None
                                    else str(realised_dates[row["days_ahead"] - 1]))
            row["realised_pnl"] = real
            row["realised_rank"] = float(weight[pnl <= real].sum() / weight.sum())
            for a in levels:
                row[f"breach_{level_label(a)}"] = bool(-real > row[f"var_{level_label(a)}"])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Beyond:
    """A level's paths against the history's range (``beyond_history``)."""

    level: int
    above: float  # probability of the nodes whose days rise above the history's highest
    top: np.ndarray  # (n_m, n_tau) the level's highest drawn vol at each grid point
    below: float  # probability of the nodes whose days fall below the history's lowest
    bottom: np.ndarray  # (n_m, n_tau) the level's lowest drawn vol at each grid point


def beyond_history(store: ScenarioStore, history_min: np.ndarray, history_max: np.ndarray,
                   on_chunk: Callable[[], None] | None = None) -> list[Beyond]:
    """For each complete level: how much of its probability lies on nodes whose own days
    (the level's) leave the history's range at some grid point (``history_min`` /
    ``history_max``, (n_m, n_tau): the lowest and highest vol of the history at each point,
    on some day), on each side, and the level's extreme drawn vols. Reads the level a chunk
    at a time; ``on_chunk()`` after each (a progress bar's tick)."""
    lo = np.asarray(history_min, dtype=np.float64)
    hi = np.asarray(history_max, dtype=np.float64)
    out = []
    for level in range(1, store.require_complete_level() + 1):
        above = below = 0.0
        top, bottom = np.full(hi.shape, -np.inf), np.full(lo.shape, np.inf)
        for _, _, block in store.iter_chunks(level):
            paths = block["paths"]  # (n, days, n_m, n_tau)
            weight = np.asarray(block["weight"], dtype=np.float64)
            top = np.maximum(top, paths.max(axis=(0, 1)))
            bottom = np.minimum(bottom, paths.min(axis=(0, 1)))
            above += float(weight[(paths > hi).reshape(len(paths), -1).any(axis=1)].sum())
            below += float(weight[(paths < lo).reshape(len(paths), -1).any(axis=1)].sum())
            if on_chunk is not None:
                on_chunk()
        out.append(Beyond(level, above, top, below, bottom))
    return out


def tail_scenarios(store: ScenarioStore, level: int, pnl: np.ndarray, weight: np.ndarray,
                   a: float):
    """The nodes of ``level`` at or beyond its VaR_a, worst first, as a tidy frame: level,
    date (the level's last day), path (the node's index in the level, as ``paths`` exports
    it), weight, pnl, tail_share (see ``tail_shares``: ES_a = sum of tail_share x -pnl over
    the level's nodes), then one row per grid point of the node's surface that day: moneyness,
    maturity_days, iv, iv_start (the start day's). ``pnl`` and ``weight``: every node's, as
    ``vega_risk`` shows them to ``on_level``."""
    import pandas as pd

    nodes, share = tail_shares(pnl, weight, a)
    start = start_context_of(store)[-1]
    surfaces = store.ancestor_rows(level, nodes, n_days=1)[:, 0]  # (n, n_m, n_tau) float32
    grid = store.meta.grid
    m, t = np.meshgrid(np.asarray(grid["moneyness"], dtype=np.float64),
                       np.asarray(grid["maturity_days"], dtype=np.float64), indexing="ij")
    g = m.size
    return pd.DataFrame({
        "level": level, "date": store.level_days(level)[-1].astype("datetime64[ns]"),
        "path": np.repeat(nodes, g), "weight": np.repeat(weight[nodes], g),
        "pnl": np.repeat(pnl[nodes], g), "tail_share": np.repeat(share, g),
        "moneyness": np.tile(m.ravel(), len(nodes)), "maturity_days": np.tile(t.ravel(), len(nodes)),
        "iv": surfaces.reshape(-1), "iv_start": np.tile(start.ravel(), len(nodes))})


def spread_nodes(values: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` distinct nodes spread over the weighted distribution of ``values``: the
    ones at its (k + 1/2) / n quantiles, k = 0..n-1, lowest first (a heavy node standing at
    two quantiles is taken once)."""
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    at = np.searchsorted(cdf / cdf[-1], (np.arange(n) + 0.5) / n, side="left")
    return order[np.unique(np.minimum(at, len(order) - 1))]


def scenario_paths(store: ScenarioStore, i: int, j: int, n: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` whole paths of the deepest complete level at grid point (i, j), spread over its
    last day's vol there (``spread_nodes``): days (D,), paths (k, D) iv and the nodes' weights."""
    level = store.require_complete_level()
    last, weight = [], []
    for _, _, block in store.iter_chunks(level):
        last.append(block["paths"][:, -1, i, j])
        weight.append(block["weight"])
    weight = store.complete_weights(level, np.concatenate(weight))
    nodes = spread_nodes(np.concatenate(last), weight, n)
    days = np.concatenate([store.level_days(k) for k in range(1, level + 1)])
    return days, store.ancestor_rows(level, nodes)[:, :, i, j], weight[nodes]


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
