"""`backfill check`: read a whole store back and check what a VaR system relies on.

A store's structure is a function of the store itself: level k's rows are the frontier of
level k - 1 (``driver.frontier``: after pruning or resampling, recomputed from the stored
weights and the stored config) times K branches, node-major. So, without the sampler or
the data, every chunk can be checked against what the run must have written:

    rows       level k has len(frontier) * K rows (mc: n_paths, one per path)
    pointers   row r has parent frontier.parents[r // K] and branch r % K: no node is
               lost, doubled or given another parent
    weights    finite and >= 0; the K children of a frontier node sum to its weight
               (relative 1e-9), so each level holds its parent level's whole mass: 1
    paths      finite, positive vols on the level's business days
    marginals  (a finished run) every day written; quantiles positive and non-decreasing
               in the quantile level; mean positive, std >= 0

Every chunk is decoded, so a chunk file that is present but garbled is found as well
(``ScenarioStore.damage`` only lists files). The level in progress of an interrupted run
is checked on its written chunks; its sums once it is complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.config import Config
from engine.errors import BackfillError, StoreError, first_line
from engine.store import (
    _DAMAGED,
    WEIGHT_ATOL,
    ScenarioStore,
    business_days_after,
    marginal_problems,
)
from engine.tree import stride_days

# a child's weight is its parent's times a share, and the K shares sum to 1 up to rounding
BRANCH_RTOL = 1e-9
# a level's weights sum to 1 (as ``ScenarioStore.mark_level_complete`` requires)
LEVEL_ATOL = WEIGHT_ATOL
MAX_LISTED = 5  # problems kept per level (the count goes on)


@dataclass
class LevelCheck:
    level: int
    rows: int
    chunks: int
    chunks_written: int
    complete: bool
    first_day: str
    last_day: str
    weight_sum: float = 0.0  # over the written rows
    worst_branch_error: float | None = None  # max |children's sum / parent weight - 1|
    iv_min: float | None = None
    iv_max: float | None = None
    n_problems: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(f"level {self.level}: {text}")


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _count(bad: np.ndarray, noun: str) -> str:
    n = int(np.count_nonzero(bad))
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _check_chunk(lc: LevelCheck, start: int, block: dict, parents: np.ndarray | None,
                 k: int, n_days: int) -> None:
    """One chunk's rows [start, start + n) against the frontier's ``parents`` (None: the
    row count is already wrong, so the pointers are not compared)."""
    rows = np.arange(start, start + len(block["weight"]))
    where = "row {:,}".format
    if parents is not None:
        want = parents[rows // k]
        bad = block["parent"] != want
        if bad.any():
            i = _first(bad)
            lc.problem(f"{where(rows[i])} has parent {int(block['parent'][i])}, the run's "
                       f"frontier gives {int(want[i])} ({_count(bad, 'row')} of its chunk)")
    bad = block["branch"] != rows % k
    if bad.any():
        i = _first(bad)
        lc.problem(f"{where(rows[i])} has branch {int(block['branch'][i])}, required "
                   f"{int(rows[i] % k)} ({_count(bad, 'row')} of its chunk)")
    w = np.asarray(block["weight"], dtype=np.float64)
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        i = _first(bad)
        lc.problem(f"{where(rows[i])} has weight {float(w[i])!r}; weights are probabilities")
    paths = np.asarray(block["paths"])
    if paths.shape[1] != n_days:
        lc.problem(f"paths hold {paths.shape[1]} days, the level covers {n_days}")
    ok = np.isfinite(paths) & (paths > 0)
    if not ok.all():
        i = _first(~ok.reshape(len(rows), -1).all(axis=1))
        n = int(np.count_nonzero(~ok[i]))
        lc.problem(f"{where(rows[i])}'s path holds {_count(~ok[i], 'value')} that "
                   f"{'is not a finite positive vol' if n == 1 else 'are not finite positive vols'}"
                   f" ({_count(~ok, 'value')} in its chunk)")
    if ok.any():
        lo = float(np.min(paths, where=ok, initial=np.inf))
        hi = float(np.max(paths, where=ok, initial=-np.inf))
        lc.iv_min = lo if lc.iv_min is None else min(lc.iv_min, lo)
        lc.iv_max = hi if lc.iv_max is None else max(lc.iv_max, hi)


def _check_level(store: ScenarioStore, level: int, config: Config, days: np.ndarray,
                 tick: Callable[[], None]) -> LevelCheck:
    from engine.driver import frontier

    done = store.chunks_done(level)
    lc = LevelCheck(level, store.level_size(level), len(done), int(done.sum()),
                    level <= store.levels_complete, str(days[0]), str(days[-1]))
    stored_days = store.level_days(level)
    if not np.array_equal(stored_days, days):
        lc.problem(f"its days run {stored_days[0]}..{stored_days[-1]} ({len(stored_days)}), "
                   f"the run's {days[0]}..{days[-1]} ({len(days)})")
    k = config.tree.branching if store.meta.kind == "tree" else 1
    try:
        front = frontier(store, level, config)
    except BackfillError as err:
        front = None
        lc.problem(f"its frontier cannot be rebuilt ({first_line(err)})")
    if front is not None and len(front.nodes) * k != lc.rows:
        lc.problem(f"{lc.rows:,} rows, the run's frontier gives {len(front.nodes):,} nodes x "
                   f"{k} = {len(front.nodes) * k:,}")
        front = None
    child_sum = np.zeros(len(front.nodes)) if front is not None else None
    read_all = True  # the sums need every row
    for chunk in np.flatnonzero(done):
        start, stop = store.chunk_range(level, int(chunk))
        try:
            block = store.read_level(level, start, stop, checked=False)
        except StoreError as err:
            cause = err.__context__ or err  # zarr's own error, under the store's one line
            lc.problem(f"chunk {int(chunk)} (rows {start:,}..{stop - 1:,}) cannot be read "
                       f"({type(cause).__name__}: {first_line(cause)})")
            read_all = False
            tick()
            continue
        _check_chunk(lc, start, block, None if front is None else front.parents, k, len(days))
        w = np.asarray(block["weight"], dtype=np.float64)
        lc.weight_sum += float(w.sum())
        if child_sum is not None:
            lo = start // k
            pos = np.arange(start, stop) // k - lo
            child_sum[lo: lo + pos[-1] + 1] += np.bincount(pos, weights=w)
        tick()
    if not (done.all() and read_all):
        return lc
    if child_sum is not None:
        err = np.abs(child_sum / np.maximum(front.weights, np.finfo(float).tiny) - 1.0)
        err[front.weights == 0] = np.abs(child_sum[front.weights == 0])
        lc.worst_branch_error = float(np.nanmax(err)) if err.size else 0.0
        bad = ~(err <= BRANCH_RTOL)
        if bad.any():
            i = _first(bad)
            lc.problem(f"the children of frontier node {i:,} (rows {i * k:,}..{i * k + k - 1:,}) "
                       f"weigh {float(child_sum[i])!r}, their parent {float(front.weights[i])!r} "
                       f"({_count(bad, 'frontier node')})")
    if not abs(lc.weight_sum - 1.0) <= LEVEL_ATOL:
        lc.problem(f"its weights sum to {lc.weight_sum!r}, required 1")
    return lc


def _check_marginals(store: ScenarioStore, days: np.ndarray) -> tuple[dict, list[str]]:
    """Shape, days and values of the marginals (every day, once the run is finished)."""
    problems: list[str] = []
    finished = store.levels_complete >= store.meta.depth
    try:
        m = store.read_marginals(checked=False)
    except StoreError as err:
        damaged = _DAMAGED in first_line(err)  # not merely unfinished: a problem either way
        return ({"present": False},
                [f"marginals: {_without_fix(err)}"] if finished or damaged else [])
    if not np.array_equal(m["days"], days):
        problems.append(f"marginals: {len(m['days'])} days, the run covers {len(days)}")
    # a finished run's final days are all of them: each must be written
    written, value_problems = marginal_problems(m, store.final_marginal_days(len(m["days"])))
    for text, bad in value_problems:
        problems.append(f"marginals: on {m['days'][_first(bad)]} the {text} "
                        f"({_count(bad, 'day')})")
    return {"present": True, "days": len(m["days"]), "days_written": int(written.sum())}, problems


def _without_fix(err: StoreError) -> str:
    """A store error's line less its closing fix (check's own line says it once)."""
    return first_line(err).split(f"; {_DAMAGED}")[0]


def _checked_levels(store: ScenarioStore) -> list[int]:
    """The levels with data to check: the complete ones and the one in progress."""
    last = min(store.levels_complete + 1, store.meta.depth)
    return [k for k in store.levels() if k <= last]


def check_store(store: ScenarioStore, progress=None) -> dict:
    """Check every written chunk and the marginals of ``store`` (``progress``: a rich
    Progress to show the chunks read). Returns a JSON-ready report whose ``problems`` lists
    the first few of each part (``n_problems`` counts them all)."""
    from engine.driver import start_context_of

    meta = store.meta
    try:
        config = Config.from_dict(meta.config)
    except BackfillError as err:
        raise StoreError(f"{store.path}: its config does not load in this backfill "
                         f"({first_line(err)}); check it with the backfill that wrote it") from None
    checked = _checked_levels(store)
    task = None
    if progress is not None:
        total = 0
        for level in checked:
            with contextlib.suppress(StoreError):  # _check_level reports it
                total += int(store.chunks_done(level).sum())
        task = progress.add_task("check chunks", total=total, info="")

    def tick() -> None:
        if task is not None:
            progress.update(task, advance=1)

    s = stride_days(config.tree.stride, config.data.horizon)
    all_days = business_days_after(meta.start_date, meta.depth * s)
    damage = store.damage()
    first = [f"{damage} (zarr reads a lost chunk file as empty data)"] if damage else []
    try:  # what the first level was drawn from and what `var` measures against
        start_context_of(store)
    except StoreError as err:
        first.append(first_line(err))
    levels = []
    for level in checked:
        lc = LevelCheck(level, 0, 0, 0, level <= store.levels_complete, "", "")
        try:
            lc = _check_level(store, level, config, all_days[(level - 1) * s: level * s], tick)
        except StoreError as err:  # its metadata or done markers do not decode
            lc.problem(_without_fix(err))
        levels.append(lc)
    extra = [k for k in store.levels() if k not in checked]  # (a missing one: damage says)
    last = [f"level {extra[0]} exists beyond the level in progress"] if extra else []
    marginals, m_problems = _check_marginals(store, all_days)
    last += m_problems
    problems = first + [p for lc in levels for p in lc.problems] + last
    n_problems = len(first) + sum(lc.n_problems for lc in levels) + len(last)
    return {"store": str(store.path), "kind": meta.kind, "depth": meta.depth,
            "start_date": meta.start_date,
            "grid": {"moneyness": [float(v) for v in meta.grid["moneyness"]],
                     "maturity_days": [float(v) for v in meta.grid["maturity_days"]]},
            "levels_complete": store.levels_complete,
            "finished": store.levels_complete >= meta.depth,
            "levels": [asdict(lc) for lc in levels], "marginals": marginals,
            "n_problems": n_problems, "problems": problems, "ok": n_problems == 0}
