"""The scenario store: a Zarr v3 directory that xarray opens group by group.

Layout (every array carries Zarr v3 ``dimension_names``; every dimension has a
1-D coordinate array of the same name, so ``xarray.open_zarr(path,
group="level_02")`` attaches them)::

    run.zarr/      attrs: schema_version, kind, depth, seed, fingerprint, start_date,
                          grid {moneyness, maturity_days}, chunk_nodes, config,
                          created_by, levels_complete
      level_01/    paths  (node, day, moneyness, maturity) float32
                   parent (node,) int64   index into level k-1 (0, the start, for level 1)
                   branch (node,) int8    which of the parent's children
                   weight (node,) float64 absolute probability; sums to 1 per level
                   done   (chunk,) bool   completion marker, one per node chunk
                   node, day, moneyness, maturity   coordinates
      level_02/    ...
      marginals/   quantiles (day, quantile, moneyness, maturity) float32
                   mean, std (day, moneyness, maturity) float32
                   day, quantile, moneyness, maturity   coordinates

Dates are int64 *calendar* days since the start date with CF attributes
(``units: "days since YYYY-MM-DD"``), which xarray decodes to datetime64. The
days themselves are business days (Mon-Fri) strictly after the start date.

Completion markers: ``write_chunk`` writes the data chunks of a node range,
then sets ``done[c] = True`` for each chunk it covered. ``done`` is chunked one
element per chunk and uncompressed, so each marker is its own one-byte file
(no read-modify-write, so writers of different chunks never race), and
LocalStore writes every file to a temporary name and renames it, so a marker
never exists before its data is on disk. A crash leaves at most some chunks
without a marker; resume rewrites them with the same bytes. A level is marked
complete (root attr ``levels_complete``) only once all its markers are set.

Writes in flight: the driver hands each chunk over (``write_chunk(wait=False)``) and two
writer threads compress and write chunks while it assembles the next ones; each data
file's writeback to the disk starts as soon as it is written (Linux ``sync_file_range``),
so the fsync that completes a level waits for little. A read of a level first waits for
that level's writes in flight, ``mark_level_complete`` for all of them; a write that
failed is raised there (or by the next ``write_chunk``) and leaves its chunk unmarked.

Metadata is kept consolidated (zarr's consolidated metadata in the root
``zarr.json``) after every change of structure or attributes, so xarray opens
any group without a fallback warning. The engine itself always opens with
``use_consolidated=False`` and so never reads stale metadata. Only the driver
changes metadata; workers only write chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import itertools
import json
import os
import shlex
import shutil
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ZarrUserWarning

from engine.config import iso_day
from engine.errors import StoreError, first_line

# 2: flat chunk keys, LZ4 paths, the node coordinate written once per level (1: per chunk).
# Version 1 stores are still read; only version 2 ones are resumed (check_compatible).
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("tree", "mc")
MARGINALS = "marginals"
# Sections of the config that cannot change the bytes of a run (where and how
# wide it runs, what `evaluate` scores), so `--resume` may change them.
RESUME_IGNORED = ("engine", "evaluate")

_CALENDAR = "proleptic_gregorian"
_MARGINAL_CHUNK_BYTES = 4 << 20
PATHS_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_NODE_COORD_CHUNK = 1 << 20
# chunk files side by side (paths/c.12.0.0.0), not one nested folder per index: fewer
# folders to create and to sync
_FLAT_KEYS = {"name": "default", "separator": "."}
# every written chunk has a file, even one equal to the fill value (a finished level must
# have all its chunk files: see damage)
_FULL = {"write_empty_chunks": True}
# write_chunk(wait=False): chunk writes pending at most (each holds its chunk's arrays); on 2
# cores, two overlap one chunk's compression (Blosc, which releases the GIL) with the
# other's file write
WRITES_IN_FLIGHT = 2


def _created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"backfill {version('backfill')}"
    except PackageNotFoundError:  # a bare checkout, not installed: the store still works
        return "backfill"


# ----------------------------------------------------------------------------- business days


def business_days_after(start_date: str | np.datetime64, n: int) -> np.ndarray:
    """The first ``n`` business days (Mon-Fri) strictly after ``start_date``, datetime64[D]."""
    start = parse_start_date(start_date)
    # roll backward first so that a weekend start still gives the next Monday
    return np.busday_offset(start, np.arange(1, int(n) + 1), roll="backward")


# ----------------------------------------------------------------------------- parse_* (boundary)


def parse_store_path(path: str | Path, new: bool = True) -> Path:
    """A store path from outside (CLI, config): a str or Path that is not an existing file
    (``new``: for a store to be made, else for one to be read)."""
    if not isinstance(path, (str, Path)) or str(path).strip() == "":
        raise StoreError(f"store path {path!r} is not a path; pass a directory such as run.zarr")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        fix = "pass a new path" if new else \
            "pass the store's directory (made by `backfill run` or `backfill mc`)"
        raise StoreError(f"store path {p} is a file, a store is a directory; {fix}")
    return p


def parse_start_date(value: str | np.datetime64) -> np.datetime64:
    try:
        return iso_day(value)
    except ValueError as err:  # says which: not written YYYY-MM-DD, or no day of the calendar
        raise StoreError(f"start date {first_line(err)}") from None


def parse_grid(grid: Mapping) -> dict:
    """``{moneyness: [...], maturity_days: [...]}`` as lists of distinct finite floats."""
    if not isinstance(grid, Mapping) or set(grid) != {"moneyness", "maturity_days"}:
        found = sorted(grid) if isinstance(grid, Mapping) else type(grid).__name__
        raise StoreError(f"grid has keys {found}; it needs exactly 'moneyness' and "
                         "'maturity_days' (lists of numbers)")
    out = {}
    for key in ("moneyness", "maturity_days"):
        try:
            values = np.asarray(grid[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise StoreError(f"grid['{key}'] is not numeric; pass a list of numbers") from None
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
            raise StoreError(f"grid['{key}'] has shape {values.shape}; it needs a non-empty "
                             "1-D list of finite numbers")
        if np.unique(values).size != values.size:
            raise StoreError(f"grid['{key}'] has repeated values {values.tolist()}; "
                             "pass distinct grid points")
        out[key] = values.tolist()
    return out


def parse_days(days: np.ndarray, after: np.datetime64, what: str) -> np.ndarray:
    """A strictly increasing 1-D array of dates strictly after ``after``, as datetime64[D]."""
    try:
        d = np.asarray(days).astype("datetime64[D]")
    except (ValueError, TypeError):
        raise StoreError(f"{what}: days are not dates; pass datetime64[D] business days") from None
    if d.ndim != 1 or d.size == 0:
        raise StoreError(f"{what}: days have shape {d.shape}; pass a non-empty 1-D array")
    if np.any(np.isnat(d)) or np.any(np.diff(d).astype(np.int64) <= 0) or d[0] <= after:
        raise StoreError(f"{what}: days run {d[0]}..{d[-1]} but must be strictly increasing and "
                         f"after the start date {after}; pass business_days_after(start, n)")
    return d


def _as_json(value: Any, what: str) -> Any:
    """Round trip through JSON, as the attributes will (tuples become lists)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} is not JSON-serialisable ({err}); pass Config.to_dict()") from None


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class StoreMeta:
    """What the root attributes say about a run (everything but ``levels_complete``)."""

    schema_version: int
    kind: str
    depth: int
    seed: int
    fingerprint: str
    start_date: str
    grid: dict
    chunk_nodes: int
    config: dict
    created_by: str = "backfill"

    @property
    def grid_shape(self) -> tuple[int, int]:
        return len(self.grid["moneyness"]), len(self.grid["maturity_days"])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, origin: str = "store") -> StoreMeta:
        """Validate root attributes; a missing or bad field is one StoreError line."""
        if not isinstance(d, Mapping) or "schema_version" not in d:
            raise StoreError(f"{origin} has no 'schema_version' attribute, so it is not a "
                             "backfill scenario store; pass the path of a store made by backfill")
        version = d["schema_version"]
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{origin} has schema version {version} but this backfill reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}; use the "
                             "backfill that wrote it or recreate the store")
        missing = [f for f in cls.__dataclass_fields__ if f not in d and f != "created_by"]
        if missing:
            raise StoreError(f"{origin} lacks attributes {missing}; the store is corrupt, "
                             "recreate it with --overwrite")
        if d["kind"] not in KINDS:
            raise StoreError(f"{origin}: kind {d['kind']!r} is not one of {KINDS}")
        for key in ("depth", "chunk_nodes"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
                raise StoreError(f"{origin}: {key} is {d[key]!r}; it must be an integer >= 1")
        if not isinstance(d["seed"], int) or isinstance(d["seed"], bool):
            raise StoreError(f"{origin}: seed is {d['seed']!r}; it must be an integer")
        if not isinstance(d["fingerprint"], str):
            raise StoreError(f"{origin}: fingerprint is {d['fingerprint']!r}; it must be a string")
        if not isinstance(d["config"], Mapping):
            raise StoreError(f"{origin}: config is {type(d['config']).__name__}; it must be a dict")
        try:
            start = iso_day(d["start_date"])
        except (ValueError, TypeError) as err:
            what = first_line(err).split(";")[0]  # iso_day's own fix is for a typed date
            raise StoreError(f"{origin}: its start_date attribute {what}; the store "
                             "is corrupt, recreate it with --overwrite") from None
        return cls(
            schema_version=version,
            kind=d["kind"],
            depth=d["depth"],
            seed=d["seed"],
            fingerprint=d["fingerprint"],
            start_date=str(start),
            grid=parse_grid(d["grid"]),
            chunk_nodes=d["chunk_nodes"],
            config=_as_json(dict(d["config"]), f"{origin}: config"),
            created_by=str(d.get("created_by", "backfill")),
        )


_MISSING = "<missing>"


def first_difference(stored: Any, given: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every dotted key where two JSON-like trees differ, in sorted key order."""
    if isinstance(stored, Mapping) and isinstance(given, Mapping):
        out = []
        for key in sorted(set(stored) | set(given), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            out += first_difference(stored.get(key, _MISSING), given.get(key, _MISSING),
                                    dotted)
        return out
    return [] if stored == given else [(prefix or "(root)", stored, given)]


def _dotted(tree: Any, key: str) -> Any:
    """The value at a dotted key of a JSON-like tree (``_MISSING`` where there is none)."""
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- the store


def _level_name(level: int) -> str:
    return f"level_{level:02d}"


@dataclass
class _Level:
    """Open handles of one level's arrays (cached: reading zarr.json once per level)."""

    group: zarr.Group
    paths: zarr.Array
    parent: zarr.Array
    branch: zarr.Array
    weight: zarr.Array
    done: zarr.Array

    @property
    def n_nodes(self) -> int:
        return self.paths.shape[0]


_LEVEL_ARRAYS = ("paths", "parent", "branch", "weight", "node", "done", "day", "moneyness",
                 "maturity")
# what a finished level / finished marginals must have every chunk file of
_LEVEL_DATA = ("paths", "parent", "branch", "weight", "node", "done", "day", "moneyness",
               "maturity")
_MARGINAL_DATA = ("quantiles", "mean", "std", "quantile", "day", "moneyness", "maturity")
# what zarr and its codecs raise on a file that does not decode (a truncated or foreign
# chunk, broken metadata); MemoryError and our own bugs (AttributeError...) pass through
# (TypeError: a metadata file zarr decodes into a wrong object, e.g. an array's zarr.json
# made a group's, or a NaN fill value on an integer type)
_UNREADABLE = (ValueError, KeyError, TypeError, RuntimeError, OSError, EOFError,
               zarr.errors.BaseZarrError)
# what a metadata file that does not decode raises (empty or garbled JSON, fields zarr
# refuses); not I/O errors (a full disk): those must not restart a level
_BAD_METADATA = (ValueError, KeyError, TypeError, zarr.errors.BaseZarrError)
# what a chunk that does not decode raises; not I/O errors (a full disk has its own fix)
_GARBLED = (ValueError, RuntimeError, zarr.errors.BaseZarrError)
# the fix for a store whose data cannot be trusted (damaged, or failing `backfill check`)
REDO = "rerun it into a new path (or with --overwrite)"
_TEMP_SUFFIX = ".partial"
_TEMP_MIN_AGE = 60.0  # seconds
_DAMAGED = f"the store is damaged: {REDO}"
WEIGHT_ATOL = 1e-6  # a complete level's weights sum to 1 within this


def _whole(arr: np.ndarray, top: int) -> bool:
    """Every value a whole number in 0..top (an integer array, or floats that are)."""
    if arr.dtype.kind not in "iuf":
        return False
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        return False
    return bool(arr.min() >= 0 and arr.max() <= top)


def _is_temporary(name: str) -> bool:
    """zarr's LocalStore writes each file as ``<name>.<uuid>.partial`` and renames it: a
    process killed in between leaves that file behind (``c.3.0.0.<uuid>.partial``)."""
    return name.endswith(_TEMP_SUFFIX)


def _chunk_files(folder: Path) -> int:
    """Chunk files of the array in ``folder``: flat keys (c.0.0) or nested (c/0/0), zarr's
    leftover temporary files not counted. One directory listing: zarr's
    nchunks_initialized grows with the square of the count."""
    n = 0
    for entry in os.scandir(folder):
        if entry.name.startswith("c.") and entry.is_file() and not _is_temporary(entry.name):
            n += 1
        elif entry.name == "c" and entry.is_dir():
            n += sum(not _is_temporary(f) for _, _, files in os.walk(entry.path) for f in files)
    return n


# a directory that cannot be opened (Windows) or fsync'd (some network and FUSE file
# systems): its entries are then as durable as that file system makes them
_NO_DIRECTORY_SYNC = (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EINVAL, errno.EBADF,
                      errno.ENOTSUP)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if directory and err.errno in _NO_DIRECTORY_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not (directory and err.errno in _NO_DIRECTORY_SYNC):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every directory (their entries: new files)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root), directory=True)


def remove_temporary_files(path: Path, min_age: float = _TEMP_MIN_AGE) -> int:
    """Delete zarr's leftover temporary files under a store (a write killed between its
    temporary file and the rename) older than ``min_age`` seconds; returns how many. A live
    writer's own (a second run on the store by mistake) lasts milliseconds: left alone."""
    n, now = 0, time.time()
    for root, _, files in os.walk(path):
        for name in files:
            f = Path(root, name)
            with contextlib.suppress(FileNotFoundError):
                if _is_temporary(name) and now - f.stat().st_mtime >= min_age:
                    f.unlink()
                    n += 1
    return n


def _linux_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` on Linux (Python's os module has none), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _linux_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def start_writeback(path: Path) -> None:
    """Start writing a file's dirty pages to the disk, without waiting for them (Linux; a
    no-op elsewhere), as PostgreSQL's ``backend_flush_after`` does: the disk writes a level's
    chunks while the engine computes the next ones, and the fsync that completes the level
    finds little left to wait for. Only a hint: its failures are ignored (the fsync is what
    makes the data durable)."""
    if _SYNC_FILE_RANGE is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)


def _chunk_file(arr: zarr.Array, chunk: int) -> Path:
    """The file of a node chunk of a level array (LocalStore: the store is a directory)."""
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return Path(arr.store_path.store.root, arr.store_path.path, key)


def _write_rows(lv: _Level, rows: slice, data: tuple, chunks: slice) -> None:
    """One chunk write: the four arrays at once (one round of zarr's event loop), then the
    chunks' done markers (a chunk is done only once its data is written), then the start of
    the data files' writeback."""
    async def write_all():
        await asyncio.gather(*(arr.async_array.setitem(rows, v) for arr, v in data))
        await lv.done.async_array.setitem(chunks, np.ones(chunks.stop - chunks.start, bool))

    zarr_sync(write_all())
    # only a hint: nothing here may fail a chunk that is written and marked
    with contextlib.suppress(AttributeError, ValueError):  # (start_writeback: OSError)
        for arr, _ in data:
            for chunk in range(chunks.start, chunks.stop):
                start_writeback(_chunk_file(arr, chunk))


class _WriterLock:
    """An open lock file whose ``flock`` this process holds; closed (released) when the last
    store holding it is collected."""

    def __init__(self, file):
        self.file = file

    def __del__(self):
        self.file.close()


_HELD: weakref.WeakValueDictionary[str, _WriterLock] = weakref.WeakValueDictionary()


def writer_lock(path: Path) -> _WriterLock | None:
    """This process's hold on ``path``'s writer lock (shared by its stores of that path, let
    go with the last of them or when the process dies), or StoreError if another process
    holds it. Two writers of one store would interleave chunks, or one's --overwrite would
    delete the other's levels while it still reports success. The lock is ``flock`` on a
    hidden file beside the store (not in it: --overwrite deletes the store). Where the
    filesystem has no locks (or no such file can be made) the run goes on without one."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    real = path.resolve()  # one store, one lock: through a symlink or '..' too
    lock_path = real.parent / f".{real.name}.lock"
    held = _HELD.get(str(lock_path))
    if held is not None:
        return held
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")  # noqa: SIM115 - held open for the run: the lock lives on it
    except OSError:
        try:  # another user's lock file: flock needs no write access
            f = open(lock_path)  # noqa: SIM115
        except OSError:
            return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            f.close()
            return None  # no locks on this filesystem
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StoreError(f"{path} is being written by another backfill process (pid "
                         f"{holder}); wait for it to finish, or pass another path") from None
    if f.writable():  # who holds it, for the message of a refused one
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    lock = _HELD[str(lock_path)] = _WriterLock(f)
    return lock


def _weights_problem(w: np.ndarray) -> str | None:
    """What keeps a level's weights from being probabilities summing to 1 (None: nothing)."""
    bad = ~(w >= 0)  # NaN too
    if bad.any():
        i = int(np.argmax(bad))
        return f"weight of node {i} is {float(w[i])!r}"
    total = float(np.sum(w))
    return None if abs(total - 1.0) <= WEIGHT_ATOL else f"weights sum to {total!r}"


def _made_by_backfill(path: Path) -> bool:
    """Whether the Zarr group at ``path`` says it is a backfill run's store (its root
    attributes name a schema and a run kind; a store has them from its creation on)."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("kind") in KINDS and "schema_version" in attrs


class ScenarioStore:
    """One run's scenarios on disk. Make one with ``create``, reopen it with ``open``."""

    def __init__(self, path: Path, root: zarr.Group, meta: StoreMeta, mode: str):
        # use create / open; this only binds what they validated
        self.path = path
        self.mode = mode
        self.meta = meta
        self._root = root
        self._levels: dict[int, _Level] = {}
        # write_chunk(wait=False): the writer threads and the writes handed over, in order
        # (level, its future)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, Future]] = deque()
        self._lock: _WriterLock | None = None  # a writer's hold on writer_lock

    # ------------------------------------------------------------------ make / open

    @classmethod
    def create(cls, path: str | Path, *, config: dict, seed: int, grid: dict, fingerprint: str,
               start_date: str, kind: str, depth: int, chunk_nodes: int,
               overwrite: bool = False) -> ScenarioStore:
        p = cls.check_new(path, overwrite)
        if kind not in KINDS:
            raise StoreError(f"kind {kind!r} is not one of {KINDS}; pass 'tree' or 'mc'")
        meta = StoreMeta.from_dict({
            "schema_version": SCHEMA_VERSION, "kind": kind, "depth": depth, "seed": seed,
            "fingerprint": fingerprint, "start_date": str(parse_start_date(start_date)),
            "grid": grid, "chunk_nodes": chunk_nodes,
            "config": _as_json(config, "config"), "created_by": _created_by(),
        }, origin=str(p))
        # all checked: only now lock it and (--overwrite) delete the old store, checked again
        # under the lock (another process may have written it since)
        lock = writer_lock(p)
        cls.check_new(path, overwrite)
        if p.exists() and any(p.iterdir()):
            shutil.rmtree(p)
        root = zarr.open_group(p, mode="w", zarr_format=3,
                               attributes={**meta.to_dict(), "levels_complete": 0})
        store = cls(p, root, meta, "r+")
        store._lock = lock
        store._consolidate()
        return store

    @staticmethod
    def check_new(path: str | Path, overwrite: bool = False) -> Path:
        """The path ``create`` would write to, or StoreError if it may not (checked before
        any long work, so a refusal costs nothing and nothing is deleted yet)."""
        p = parse_store_path(path)
        if str(path).strip() == ".":  # the CLI turns an empty --store into Path(".")
            raise StoreError(f"store path {str(path)!r} names the working directory; a new "
                             "store needs a directory of its own: pass one such as run.zarr")
        if p.exists() and any(p.iterdir()):
            if not overwrite:
                raise StoreError(f"{p} already exists and is not empty; pass --resume to continue "
                                 "that run, or a new path, or --overwrite to replace it")
            if not (p / "zarr.json").is_file():
                # never rmtree a directory that is not a store (a typo could name $HOME)
                raise StoreError(f"{p} exists and is not a Zarr store, so --overwrite will not "
                                 "delete it; pass a new path")
            if not _made_by_backfill(p):
                raise StoreError(f"{p} is a Zarr store that backfill did not make (its root "
                                 "has no backfill run attributes), so --overwrite will not "
                                 "delete it; pass a new path or delete it yourself")
        return p

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ScenarioStore:
        if mode not in ("r", "r+"):
            raise StoreError(f"mode {mode!r} is not 'r' or 'r+'; open read-only or for resuming")
        p = parse_store_path(path, new=False)
        if not (p / "zarr.json").is_file():
            what = "does not exist" if not p.exists() else "is not a Zarr store"
            raise StoreError(f"{p} {what}; pass the path of a store made by `backfill run` or "
                             "`backfill mc`")
        lock = writer_lock(p) if mode == "r+" else None
        try:
            # never consolidated: a worker must see the metadata as it is now
            root = zarr.open_group(p, mode=mode, zarr_format=3, use_consolidated=False)
        except (ValueError, KeyError, TypeError, OSError) as err:  # zarr's errors are ValueErrors
            raise StoreError(f"{p} is not a readable Zarr v3 group ({first_line(err)}); pass "
                             "the path of a store made by `backfill run` or `backfill mc`"
                             ) from None
        meta = StoreMeta.from_dict(root.attrs.asdict(), origin=str(p))
        store = cls(p, root, meta, mode)
        store._lock = lock
        return store

    def check_compatible(self, config: dict, fingerprint: str, seed: int,
                         ignore: tuple[str, ...] = RESUME_IGNORED,
                         defaults: Mapping | None = None,
                         same_data: tuple[str, ...] = ()) -> None:
        """Refuse to resume a run that would not give the same bytes: say what differs.
        ``defaults``: the config's defaults; a key the store's config lacks (a setting added
        to backfill after the store was written) is no difference where the command gives it
        its default, which keeps what the store's version did. ``same_data``: dotted keys
        (or their prefixes) that may differ where the data fingerprint is the store's (the
        data file's name: ``./f.csv`` for ``f.csv``)."""
        problems = []
        if self.meta.schema_version != SCHEMA_VERSION:
            problems.append(f"schema version {self.meta.schema_version} in the store, "
                            f"{SCHEMA_VERSION} now")
        if self.meta.seed != seed:
            problems.append(f"seed {self.meta.seed} in the store, {seed} now")
        if self.meta.fingerprint != fingerprint:
            problems.append(f"data fingerprint {self.meta.fingerprint} in the store, "
                            f"{fingerprint} now")
        # the seed is checked above (it may come from --seed); ignored sections cannot
        # change the output
        skip = set(ignore) | {"seed"}
        stored = {k: v for k, v in self.meta.config.items() if k not in skip}
        given = {k: v for k, v in _as_json(config, "config").items() if k not in skip}
        defaults = _as_json(defaults, "defaults") if defaults is not None else None
        same = same_data if self.meta.fingerprint == fingerprint else ()
        diffs = [(key, old, new) for key, old, new in first_difference(stored, given)
                 if not (old == _MISSING and defaults is not None
                         and _dotted(defaults, key) == new) and not key.startswith(same)]
        if diffs:
            key, old, new = diffs[0]
            more = f" (and {len(diffs) - 1} more keys)" if len(diffs) > 1 else ""
            problems.append(f"config key '{key}' is {old!r} in the store, {new!r} now{more}")
        if problems:
            raise StoreError(f"cannot resume {self.path}: " + "; ".join(problems) + "; rerun with "
                             "the store's config, data and seed, or pass a new path or "
                             "--overwrite")

    # ------------------------------------------------------------------ metadata

    def run_attr(self, key: str, default=None):
        """A root attribute the driver keeps about its run (beside ``StoreMeta``)."""
        return self._root.attrs.get(key, default)

    def set_run_attrs(self, **attrs) -> None:
        """Set them through this handle (another handle's write would be overwritten by this
        one's cached attributes at its next write)."""
        self._require_writable()
        self._root.attrs.update(attrs)
        self._consolidate()

    @property
    def levels_complete(self) -> int:
        value = self._root.attrs.get("levels_complete", 0)
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 0 <= value <= self.meta.depth:
            raise StoreError(f"{self.path}: levels_complete is {value!r}, not a count of levels "
                             f"in 0..{self.meta.depth}; {_DAMAGED}")
        return value

    def levels(self) -> list[int]:
        """The levels whose group exists (complete or not), in order."""
        # groups() decodes each group's metadata, and passes over (with a warning) a folder
        # whose metadata is lost: the check finds that level missing and says so
        with self._reading("(metadata)"), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ZarrUserWarning)
            names = [n for n, _ in self._root.groups() if n.startswith("level_")]
        return sorted(int(n.removeprefix("level_")) for n in names)

    @contextlib.contextmanager
    def _reading(self, what: str, level: int | None = None):
        """Turn a chunk or metadata file that zarr cannot decode into one StoreError line.
        A read of a level sees this store's own writes: that level's writes in flight land
        first (not the others': the driver reads level k - 1 while it writes level k)."""
        if level is not None:
            self._land(level)
        try:
            yield
        except _UNREADABLE as err:
            raise self._unreadable(what, err) from None

    def _unreadable(self, what: str, err: BaseException) -> StoreError:
        return StoreError(f"{self.path}/{what} cannot be read ({type(err).__name__}: "
                          f"{first_line(err)}); {_DAMAGED}")

    def _make_or_restart(self, name: str, make: Callable[[], None], final: bool) -> None:
        """``make()`` the group ``name``; where one of its metadata files does not decode (a
        crash of the machine can leave one empty), start the group over, unless it holds
        something ``final``."""
        try:
            make()
        except _BAD_METADATA as err:
            if final:
                raise self._unreadable(name, err) from None
            shutil.rmtree(self.path / name, ignore_errors=True)
            with self._reading(name):
                make()

    def damage(self) -> str | None:
        """The first missing piece of what the store says is finished (each level marked
        complete; the marginals once every level is), or None. Lists files, reads no chunk:
        zarr reads a missing chunk file as its fill value, so a lost file would otherwise
        pass for data (NaN paths)."""
        wanted = [(_level_name(k), _LEVEL_DATA) for k in range(1, self.levels_complete + 1)]
        if self.levels_complete >= self.meta.depth:
            wanted.append((MARGINALS, _MARGINAL_DATA))
        with self._reading("(metadata)"):
            for name, arrays in wanted:
                if name not in self._root:
                    return f"{name} is missing"
                group = self._root[name]
                for a in arrays:
                    if a not in group:
                        return f"{name}/{a} is missing"
                    want = group[a].nchunks
                    lost = want - _chunk_files(self.path / name / a)
                    if lost > 0:
                        return f"{name}/{a} lacks {lost} of its {want} chunk files"
        return None

    def check_intact(self) -> None:
        """StoreError if ``damage`` finds a finished part of the store missing."""
        problem = self.damage()
        if problem:
            raise StoreError(f"{self.path} is damaged: {problem}; its data cannot be trusted: "
                             f"{REDO}")

    def require_complete_level(self) -> int:
        """``levels_complete``, or StoreError if no level is complete yet."""
        done = self.levels_complete
        if done < 1:
            raise StoreError(f"{self.path} has no complete level yet; finish the run with "
                             f"{self.resume_command}")
        return done

    @property
    def resume_command(self) -> str:
        """The command that finishes this store's run (with the options it was started with:
        a resume must match them, and says what differs if not)."""
        m = self.meta
        cmd = (f"backfill {'run' if m.kind == 'tree' else 'mc'} --store "
               f"{shlex.quote(str(self.path))} --resume --start {m.start_date} --depth "
               f"{m.depth} --seed {m.seed}")
        if m.kind == "mc":
            n_paths = self.run_attr("n_paths")
            cmd += f" --n-paths {n_paths if isinstance(n_paths, int) else 'N'}"
        return (f"`{cmd}` with the run's own --config, --data and --model (or its --sampler "
                "file)")

    def to_dict(self) -> dict:
        out = self.meta.to_dict()
        out["levels_complete"] = self.levels_complete
        out["levels"] = {}
        for level in self.levels():
            try:
                lv = self._level(level)
            except StoreError:
                continue  # half-created (crash in create_level): resume recreates it
            done = lv.done[:]
            out["levels"][level] = {"n_nodes": lv.n_nodes, "n_days": lv.paths.shape[1],
                                    "chunks": int(done.size), "chunks_done": int(done.sum())}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> StoreMeta:
        """The metadata part of ``to_dict`` back as a validated ``StoreMeta``."""
        return StoreMeta.from_dict(d, origin="dict")

    def __repr__(self) -> str:
        m = self.meta
        return (f"ScenarioStore({str(self.path)!r}, kind={m.kind!r}, depth={m.depth}, "
                f"levels_complete={self.levels_complete}, mode={self.mode!r})")

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write")

    def ensure_consolidated(self) -> None:
        """Consolidate the metadata again where a crash between a metadata write and its
        consolidation left the root without it (xarray then warns at every open)."""
        self._require_writable()
        with self._reading("zarr.json"):
            doc = json.loads((self.path / "zarr.json").read_bytes())
        if not doc.get("consolidated_metadata"):
            self._consolidate()

    def _consolidate(self) -> None:
        # v3 consolidated metadata is not in the spec yet (zarr warns), but xarray
        # looks for it first and warns when it is missing; we keep it fresh instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ZarrUserWarning)
            zarr.consolidate_metadata(self._root.store)
        # durable now, not at the next level's completion: a crash of the machine must not
        # leave the root's metadata (the run's attributes) empty under finished levels
        _fsync(self.path / "zarr.json")
        _fsync(self.path, directory=True)

    def _check_level_number(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 1 <= level <= self.meta.depth:
            raise StoreError(f"level {level!r} is outside 1..{self.meta.depth} (the store's "
                             "depth); pass a level of this run")

    def _coordinate(self, group: zarr.Group, name: str, values: np.ndarray, dtype: str,
                    attributes: dict) -> bool:
        """Write a 1-D coordinate, unless it is already whole with these values (resume);
        returns whether it wrote. Whole: every chunk file on disk (a crash between zarr's
        create_array and the write leaves the array reading as its fill value). Whole with
        other values: StoreError."""
        same = None  # not whole, or an empty or garbled file: written below
        if name in group and _chunk_files(self.path / group.path / name) >= group[name].nchunks:
            with contextlib.suppress(*_UNREADABLE):
                same = bool(np.array_equal(group[name][:], values))
        if same:
            return False
        if same is False:
            what = {"day": "other days", "quantile": "other quantile levels"}.get(
                name, f"another {name} grid")
            raise StoreError(f"{self.path}/{group.path} covers {what} than this run needs; "
                             "resume with the store's config and start date or pass "
                             "--overwrite")
        arr = group.create_array(name, shape=values.shape, dtype=dtype, dimension_names=(name,),
                                 fill_value=0, overwrite=True, attributes=attributes,
                                 config=_FULL)
        arr[:] = values
        return True

    def _day_coordinate(self, group: zarr.Group, days: np.ndarray) -> bool:
        start = np.datetime64(self.meta.start_date, "D")
        return self._coordinate(
            group, "day", (days - start).astype(np.int64), "int64",
            {"units": f"days since {self.meta.start_date}", "calendar": _CALENDAR,
             "long_name": "business day"})

    def _grid_coordinates(self, group: zarr.Group) -> bool:
        wrote = False
        for name, key, long_name in (("moneyness", "moneyness", "moneyness"),
                                     ("maturity", "maturity_days", "maturity in calendar days")):
            values = np.asarray(self.meta.grid[key], dtype=np.float64)
            # no `units: days` attribute: xarray would decode maturities as timedeltas
            wrote |= self._coordinate(group, name, values, "float64", {"long_name": long_name})
        return wrote

    def _days_of(self, group: zarr.Group) -> np.ndarray:
        start = np.datetime64(self.meta.start_date, "D")
        return start + group["day"][:].astype("timedelta64[D]")

    # ------------------------------------------------------------------ levels

    def create_level(self, level: int, n_nodes: int, days: np.ndarray,
                     grid_shape: tuple[int, int]) -> None:
        """Make a level's empty arrays and coordinates; on resume, check them and finish what
        a crash left half made (a level of another shape or other days: StoreError)."""
        self._require_writable()
        self._check_level_number(level)
        if tuple(grid_shape) != self.meta.grid_shape:
            raise StoreError(f"level {level}: grid shape {tuple(grid_shape)} does not match the "
                             f"store's {self.meta.grid_shape}; pass the run's grid")
        if not isinstance(n_nodes, (int, np.integer)) or n_nodes < 1:
            raise StoreError(f"level {level}: n_nodes is {n_nodes!r}; it must be an integer >= 1")
        days = parse_days(days, np.datetime64(self.meta.start_date, "D"), f"level {level}")
        # nothing of an unfinished level is final
        self._make_or_restart(_level_name(level),
                              lambda: self._make_level(level, int(n_nodes), days),
                              final=level <= self.levels_complete)

    def _make_level(self, level: int, n_nodes: int, days: np.ndarray) -> None:
        S, name = days.size, _level_name(level)
        want = {"level": int(level), "n_nodes": n_nodes, "n_days": S}
        if name in self._root:
            group = self._root[name]
            have = {k: group.attrs.get(k) for k in want}
            if have != want:
                raise StoreError(f"{self.path}/{name} exists with {have} but this run needs "
                                 f"{want}; resume with the store's config or pass --overwrite")
        else:
            # attrs first: they are what a resume compares against
            group = self._root.create_group(name, attributes=want)
        # On resume everything below is checked or done again: a crash can fall between any
        # two of these steps, and each is idempotent (same arrays, same coordinate values).
        n_m, n_tau = self.meta.grid_shape
        c = self.meta.chunk_nodes
        n_chunks = -(-n_nodes // c)
        node_dim = ("node",)
        specs = [
            # (name, shape, chunks, dtype, fill, dims)
            ("paths", (n_nodes, S, n_m, n_tau), (c, S, n_m, n_tau), "float32", np.nan,
             ("node", "day", "moneyness", "maturity")),
            ("parent", (n_nodes,), (c,), "int64", -1, node_dim),
            ("branch", (n_nodes,), (c,), "int8", -1, node_dim),
            ("weight", (n_nodes,), (c,), "float64", np.nan, node_dim),
            # the node coordinate is known now: written here, in big chunks, not per chunk
            ("node", (n_nodes,), (min(n_nodes, _NODE_COORD_CHUNK),), "int64", -1, node_dim),
        ]
        for arr_name, shape, chunks, dtype, fill, dims in specs:
            if arr_name not in group:
                # paths: LZ4 after a byte shuffle (Blosc) writes ~2x faster than zarr's default
                # zstd and packs float32 vols tighter (1.33x vs 1.19x on random walks)
                comp = PATHS_CODEC if arr_name == "paths" else "auto"
                group.create_array(arr_name, shape=shape, chunks=chunks, dtype=dtype,
                                   fill_value=fill, dimension_names=dims, config=_FULL,
                                   compressors=comp, chunk_key_encoding=_FLAT_KEYS)
        for lo in range(0, n_nodes, _NODE_COORD_CHUNK):
            hi = min(n_nodes, lo + _NODE_COORD_CHUNK)
            group["node"][lo:hi] = np.arange(lo, hi, dtype=np.int64)
        if "done" not in group:
            # one uncompressed one-byte file per marker: set without read-modify-write
            group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype="bool",
                               fill_value=False, compressors=None, dimension_names=("chunk",),
                               chunk_key_encoding=_FLAT_KEYS,
                               attributes={"long_name": "node chunk fully written"})
        self._day_coordinate(group, days)
        self._grid_coordinates(group)
        self._levels.pop(level, None)
        self._consolidate()

    def _level(self, level: int) -> _Level:
        if level in self._levels:
            return self._levels[level]
        self._check_level_number(level)
        name = _level_name(level)
        damaged = level <= self.levels_complete  # a finished level must be whole
        fix = _DAMAGED if damaged else f"resume the run ({self.resume_command}) to write it"
        with self._reading(name):
            if name not in self._root:
                raise StoreError(f"{self.path} has no {name} yet; {fix}")
            group = self._root[name]
            missing = [a for a in _LEVEL_ARRAYS if a not in group]
            if missing:
                raise StoreError(f"{self.path}/{name} lacks arrays {missing}; {fix}")
            # an array's config is not stored in its zarr.json: reopened, it would be zarr's
            # default, which compares every chunk written against the fill value (for NaN
            # fills a full extra pass over the chunk on zarr's one event-loop thread, ~1/3
            # of a chunk's write time) to skip writing chunks equal to it
            lv = _Level(group, *(group[a].with_config(_FULL)
                                 for a in ("paths", "parent", "branch", "weight", "done")))
        if lv.paths.ndim != 4 or lv.paths.shape[2:] != self.meta.grid_shape:
            raise StoreError(f"{self.path}/{name} holds paths of shape {lv.paths.shape}, not "
                             f"(node, day, {self.meta.grid_shape[0]}, "
                             f"{self.meta.grid_shape[1]}) on the store's grid; {_DAMAGED}")
        n, chunks = lv.n_nodes, -(-lv.n_nodes // self.meta.chunk_nodes)
        for a, want in (("parent", (n,)), ("branch", (n,)), ("weight", (n,)),
                        ("done", (chunks,))):
            if getattr(lv, a).shape != want:
                raise StoreError(f"{self.path}/{name}/{a} has shape {getattr(lv, a).shape}, the "
                                 f"level's {n:,} nodes need {want}; {_DAMAGED}")
        self._levels[level] = lv
        return lv

    def level_size(self, level: int) -> int:
        return self._level(level).n_nodes

    def level_days(self, level: int) -> np.ndarray:
        """The business days that a level covers, datetime64[D]."""
        group = self._level(level).group
        # No wait for the chunk writes in flight: the day coordinate is written with the level.
        with self._reading(f"{_level_name(level)}/day"):
            return self._days_of(group)

    def n_chunks(self, level: int) -> int:
        return self._level(level).done.shape[0]

    def chunk_range(self, level: int, chunk: int) -> tuple[int, int]:
        lv, c = self._level(level), self.meta.chunk_nodes
        return chunk * c, min((chunk + 1) * c, lv.n_nodes)

    def write_chunk(self, level: int, start_node: int, paths: np.ndarray, parent: np.ndarray,
                    branch: np.ndarray, weight: np.ndarray, wait: bool = True) -> None:
        """Write whole chunks of rows [start, start + n), then mark each chunk done.

        ``wait=False``: check the rows now, write them on a writer thread and return once at
        most ``WRITES_IN_FLIGHT`` writes are pending, so that compressing and writing one
        chunk overlap the caller's next one (and each other). The caller hands the arrays
        over: it must not change them afterwards. ``flush`` waits for the pending writes
        and raises the first one's error (the next ``write_chunk`` raises it too); a read
        of a level waits for that level's writes, ``mark_level_complete`` for all."""
        self._require_writable()
        self._raise_failed_write()
        lv, c = self._level(level), self.meta.chunk_nodes
        n_nodes, S = lv.n_nodes, lv.paths.shape[1]
        n = len(paths)
        stop = start_node + n
        if start_node % c or (stop % c and stop != n_nodes) or n == 0 or stop > n_nodes:
            raise StoreError(f"level {level}: rows [{start_node}, {stop}) do not cover whole "
                             f"chunks of {c} nodes of {n_nodes}; write from a multiple of "
                             f"{c} to the next multiples (or the end of the level)")
        paths = np.asarray(paths, dtype=np.float32)
        want = (n, S, *self.meta.grid_shape)
        if paths.shape != want:
            raise StoreError(f"level {level}: paths have shape {paths.shape}, required {want} "
                             "(nodes, days, moneyness, maturity)")
        # min > 0 is False for a NaN too
        if not (paths.min() > 0 and paths.max() < np.inf):
            bad = int(np.count_nonzero(~(np.isfinite(paths) & (paths > 0))))
            raise StoreError(f"level {level}: {bad} path values are not finite positive vols "
                             f"(min {paths.min()}, max {paths.max()}); fix the sampler's "
                             "output, nothing was written")
        cols = {}
        for name, values, dtype in (("parent", parent, np.int64), ("branch", branch, np.int8),
                                    ("weight", weight, np.float64)):
            arr = np.asarray(values)
            if arr.shape != (n,):
                raise StoreError(f"level {level}: {name} has shape {arr.shape}, required ({n},)")
            if name != "weight" and not _whole(arr, np.iinfo(dtype).max):
                raise StoreError(f"level {level}: {name} must hold whole numbers in "
                                 f"0..{np.iinfo(dtype).max}, found {arr.dtype} values "
                                 f"{arr.min()}..{arr.max()}; fix the tree's indices")
            cols[name] = arr.astype(dtype)
        w = cols["weight"]
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise StoreError(f"level {level}: weights must be finite and >= 0, found "
                             f"min {np.min(w)}; fix the sampler's probabilities")
        n_prev = 1 if level == 1 else self.level_size(level - 1)
        pmin, pmax = int(cols["parent"].min()), int(cols["parent"].max())
        if pmin < 0 or pmax >= n_prev:
            raise StoreError(f"level {level}: parents run {pmin}..{pmax} but level {level - 1} "
                             f"has {n_prev} nodes; parents index the previous level")
        data = ((lv.paths, paths), (lv.parent, cols["parent"]), (lv.branch, cols["branch"]),
                (lv.weight, w))
        job = functools.partial(_write_rows, lv, slice(start_node, stop), data,
                                slice(start_node // c, -(-stop // c)))
        if wait:
            self.flush()  # in order: after every write handed over before
            job()
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(WRITES_IN_FLIGHT, thread_name_prefix="store-write")
        self._pending.append((level, self._writer.submit(job)))
        while len(self._pending) > WRITES_IN_FLIGHT:
            self._pending[0][1].exception()  # waits for the oldest (raised below, in order)
            self._raise_failed_write()
        self._raise_failed_write()

    def _raise_failed_write(self) -> None:
        """Drop the finished writes from the pending ones; raise the first that failed."""
        while self._pending and self._pending[0][1].done():
            err = self._pending.popleft()[1].exception()
            if err is not None:
                self.flush(quiet=True)
                raise err

    def _land(self, level: int) -> None:
        """Wait for the writes in flight to ``level``; raise the first write that failed."""
        for lv, fut in self._pending:
            if lv == level:
                fut.exception()  # waits
        self._raise_failed_write()

    def flush(self, quiet: bool = False) -> None:
        """Wait for every write that ``write_chunk(wait=False)`` handed over; raise the first
        error among them (``quiet``: none, e.g. on the way out of a failed run)."""
        first = None
        while self._pending:
            err = self._pending.popleft()[1].exception()  # waits
            first = first or err
        if first is not None and not quiet:
            raise first

    def chunks_done(self, level: int) -> np.ndarray:
        lv = self._level(level)
        with self._reading(f"{_level_name(level)}/done", level):
            return np.asarray(lv.done[:], dtype=bool)

    def chunks_intact(self, level: int) -> np.ndarray:
        """``chunks_done``, less the done chunks whose data does not read back whole (a file
        missing, garbled or empty, NaN vols or weights, parents or branches at their fill):
        after an operating-system crash a done marker may reach the disk before its data.
        Reads the done chunks of the level once (a resume's check of the level in progress)."""
        try:
            done = self.chunks_done(level)
        except StoreError:  # a marker that does not decode (left empty): that chunk is not done
            markers = self._level(level).done
            done = np.zeros(markers.shape[0], bool)
            for chunk in range(len(done)):
                with contextlib.suppress(*_UNREADABLE):
                    done[chunk] = bool(markers[chunk])
        for chunk in np.flatnonzero(done):
            start, stop = self.chunk_range(level, int(chunk))
            try:
                rows = self.read_level(level, start, stop)
            except StoreError:
                done[chunk] = False
                continue
            p, w = rows["paths"], rows["weight"]
            done[chunk] = bool(np.all(p > 0) and np.all(np.isfinite(p)) and np.all(w >= 0)
                               and np.all(np.isfinite(w)) and np.all(rows["parent"] >= 0)
                               and np.all(rows["branch"] >= 0))
        return done

    def _sync(self, *names: str) -> None:
        """fsync every file and directory of the named groups, then the root's files and
        directory: what was written is on the disk, not only in the page cache."""
        self.flush()
        for name in names:
            fsync_tree(self.path / name)
        for entry in os.scandir(self.path):
            if entry.is_file():
                _fsync(Path(entry.path))
        _fsync(self.path, directory=True)

    def mark_level_complete(self, level: int) -> None:
        """Record ``levels_complete = level`` once every chunk of it is written."""
        self._require_writable()
        if level <= self.levels_complete:
            return  # resume: already recorded
        if level != self.levels_complete + 1:
            raise StoreError(f"cannot mark level {level} complete: only {self.levels_complete} "
                             f"levels are; complete level {self.levels_complete + 1} first")
        done = self.chunks_done(level)
        if not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(f"level {level} has {missing.size} of {done.size} chunks unwritten "
                             f"(first: chunk {missing[0]}); write them before marking it complete")
        problem = _weights_problem(self.read_weights(level))  # NaN: a chunk read as its fill
        if problem is not None:
            raise StoreError(f"level {level}: {problem}, required probabilities summing to 1; "
                             "fix the weights and rewrite the level")
        # durable before it is recorded: a crash of the machine (not only of the process)
        # must not leave a level marked complete whose chunks never reached the disk
        self._sync(_level_name(level), *([MARGINALS] if MARGINALS in self._root else []))
        self._root.attrs["levels_complete"] = int(level)
        self._consolidate()
        self._sync()

    def _check_done(self, level: int, start: int, stop: int) -> None:
        c = self.meta.chunk_nodes
        lv = self._level(level)
        with self._reading(f"{_level_name(level)}/done", level):
            done = lv.done[start // c: -(-stop // c)]
        if not np.all(done):
            first = start // c + int(np.flatnonzero(~done)[0])
            raise StoreError(f"level {level} chunk {first} is not written yet; finish the run "
                             "with --resume before reading it")

    def read_weights(self, level: int) -> np.ndarray:
        """The whole level's absolute weights (N,) float64, without reading its paths."""
        lv = self._level(level)
        with self._reading(f"{_level_name(level)}/weight", level):
            return np.asarray(lv.weight[:], dtype=np.float64)

    def complete_weights(self, level: int, weights: np.ndarray | None = None) -> np.ndarray:
        """A complete level's weights (read, or ``weights`` as read by the caller), or
        StoreError if they are no longer probabilities summing to 1, as they were when it
        was marked complete: a chunk file changed since (only ``backfill check`` decodes
        everything else)."""
        w = self.read_weights(level) if weights is None else np.asarray(weights, np.float64)
        problem = _weights_problem(w)
        if problem is not None:
            raise StoreError(f"{self.path} level {level}'s {problem} (required: probabilities "
                             f"summing to 1), so a chunk changed after the run: run `backfill "
                             f"check --store {shlex.quote(str(self.path))}`; {_DAMAGED}")
        return w

    def read_level(self, level: int, start: int = 0, stop: int | None = None,
                   checked: bool = True) -> dict:
        """Rows [start, stop) of a level as numpy: paths, parent, branch, weight; StoreError
        where a path value is not a finite positive vol (as every one was when written),
        unless not ``checked`` (``backfill check``, which names each problem itself)."""
        lv = self._level(level)
        stop = lv.n_nodes if stop is None else stop
        if not 0 <= start < stop <= lv.n_nodes:
            raise StoreError(f"level {level}: rows [{start}, {stop}) are outside "
                             f"[0, {lv.n_nodes}); pass a range inside the level")
        self._check_done(level, start, stop)
        rows = slice(start, stop)
        with self._reading(_level_name(level), level):
            out = {"paths": lv.paths[rows], "parent": lv.parent[rows],
                   "branch": lv.branch[rows], "weight": lv.weight[rows]}
        p = out["paths"]
        if checked and not (p.min() > 0 and p.max() < np.inf):  # False for a NaN too
            ok = (np.isfinite(p) & (p > 0)).reshape(len(p), -1)
            bad = int(np.count_nonzero(~ok))
            first = start + int(np.flatnonzero(~ok.all(axis=1))[0])
            raise StoreError(f"{self.path} level {level} row {first}'s path holds a value "
                             f"that is not a finite positive vol ({bad} in rows [{start}, "
                             f"{stop})), so the store changed after the run; run `backfill "
                             f"check --store {shlex.quote(str(self.path))}`; {_DAMAGED}")
        return out

    def iter_chunks(self, level: int) -> Iterator[tuple[int, int, dict]]:
        """``(start, stop, read_level(level, start, stop))`` for each chunk, in order."""
        for chunk in range(self.n_chunks(level)):
            start, stop = self.chunk_range(level, chunk)
            yield start, stop, self.read_level(level, start, stop)

    def ancestor_paths(self, level: int, start: int, stop: int,
                       n_days: int | None = None) -> np.ndarray:
        """Full paths (n, days, n_m, n_tau) from day 0 to the end of ``level`` for rows
        [start, stop), following parents back; only the last ``n_days`` (at most) if given."""
        return self._ancestors(level, np.arange(start, stop), n_days, self._span_rows)

    def ancestor_rows(self, level: int, rows: np.ndarray,
                      n_days: int | None = None) -> np.ndarray:
        """``ancestor_paths`` of any rows of ``level`` (scattered, in any order): each level
        reads only the chunks its rows lie in, each once."""
        return self._ancestors(level, np.asarray(rows, dtype=np.int64), n_days,
                               self._chunk_rows)

    def _ancestors(self, level: int, idx: np.ndarray, n_days: int | None,
                   read: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]
                   ) -> np.ndarray:
        segments, covered = [], 0
        for k in range(level, 0, -1):
            paths, parent = read(k, idx)
            segments.append(paths)
            covered += paths.shape[1]
            if n_days is not None and covered >= n_days:
                break
            idx = parent
        full = np.concatenate(segments[::-1], axis=1)  # (n, days, n_m, n_tau)
        return full if n_days is None else full[:, -n_days:]

    def _span_rows(self, level: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paths and parents of ``idx`` read as one range: a contiguous block's ancestors are
        contiguous too (siblings are)."""
        lo, hi = int(idx.min()), int(idx.max()) + 1
        block = self.read_level(level, lo, hi)
        return block["paths"][idx - lo], block["parent"][idx - lo]

    def _chunk_rows(self, level: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paths and parents of ``idx``, reading each chunk they lie in once."""
        paths = parent = None
        for chunk in np.unique(idx // self.meta.chunk_nodes):
            lo, hi = self.chunk_range(level, int(chunk))
            here = np.flatnonzero((idx >= lo) & (idx < hi))
            block = self.read_level(level, lo, hi)
            if paths is None:
                paths = np.empty((len(idx), *block["paths"].shape[1:]), block["paths"].dtype)
                parent = np.empty(len(idx), block["parent"].dtype)
            paths[here] = block["paths"][idx[here] - lo]
            parent[here] = block["parent"][idx[here] - lo]
        return paths, parent

    # ------------------------------------------------------------------ marginals

    def create_marginals(self, days: int | np.ndarray, quantile_levels) -> None:
        """Make empty marginal arrays over the whole run (an int: that many business days
        after the start); a no-op if they exist with these days and quantiles (resume)."""
        self._require_writable()
        start = np.datetime64(self.meta.start_date, "D")
        if isinstance(days, (int, np.integer)):
            days = business_days_after(start, int(days))
        days = parse_days(days, start, "marginals")
        q = np.asarray(quantile_levels, dtype=np.float64)
        if q.ndim != 1 or q.size == 0 or np.any((q <= 0) | (q >= 1)) or np.any(np.diff(q) <= 0):
            raise StoreError(f"quantile levels {q.tolist()} must be increasing in (0, 1); "
                             "pass e.g. [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]")
        # while no level is complete the marginals hold nothing final; later they hold
        # finished levels' days
        self._make_or_restart(MARGINALS, lambda: self._make_marginals(days, q),
                              final=self.levels_complete > 0)

    def final_marginal_days(self, n_days: int) -> int:
        """How many of the ``n_days`` days of the marginals the complete levels have written
        (each level's days are an equal share: ``levels_with_marginals``)."""
        depth = max(1, self.meta.depth)
        tree = self.meta.config.get("tree", {})
        lookahead = tree.get("lookahead", 0) if isinstance(tree, dict) else 0
        lookahead = lookahead if isinstance(lookahead, int) else 0
        return n_days * levels_with_marginals(self.meta.kind, depth, lookahead,
                                              self.levels_complete) // depth

    def check_marginals_cover(self, n_days: int, quantile_levels) -> None:
        """StoreError, before a resume fits anything, where the marginals already written
        hold another number of days or quantile levels than the run's ``n_days`` and
        ``quantile_levels`` (the store's depth or config edited by hand): ``create_marginals``
        would refuse them only after the fit."""
        if self.levels_complete == 0 or MARGINALS not in self._root:
            return  # the run makes them (over, if a crash left them half made)
        group = self._marginals_group()
        with self._reading(MARGINALS):
            shape = group["quantiles"].shape if "quantiles" in group else None
        want = (n_days, len(quantile_levels))
        if shape is None or tuple(shape[:2]) != want:
            found = "no quantiles" if shape is None else \
                f"{shape[0]} days x {shape[1]} quantile levels"
            raise StoreError(f"{self.path}/{MARGINALS} holds {found}, but its run of depth "
                             f"{self.meta.depth} covers {n_days} days x {want[1]} quantile "
                             f"levels: the store changed after the run; {_DAMAGED}")

    def _make_marginals(self, days: np.ndarray, q: np.ndarray) -> None:
        n_m, n_tau = self.meta.grid_shape
        D, Q = days.size, q.size
        group = self._root[MARGINALS] if MARGINALS in self._root else \
            self._root.create_group(MARGINALS)
        # every step checked or done again on resume (a crash can fall between any two)
        chunk_days = max(1, min(D, _MARGINAL_CHUNK_BYTES // (Q * n_m * n_tau * 4)))
        changed = False
        # partial-chunk writes per level are read-modify-write: fine, the driver is the one writer
        for name, shape, dims in (
                ("quantiles", (D, Q, n_m, n_tau), ("day", "quantile", "moneyness", "maturity")),
                ("mean", (D, n_m, n_tau), ("day", "moneyness", "maturity")),
                ("std", (D, n_m, n_tau), ("day", "moneyness", "maturity"))):
            if name in group:
                if group[name].shape != shape:
                    raise StoreError(f"{self.path}/{MARGINALS} exists with other days or "
                                     "quantiles; resume with the store's config or pass "
                                     "--overwrite")
                continue
            group.create_array(name, shape=shape, chunks=(chunk_days,) + shape[1:],
                               dtype="float32", fill_value=np.nan, dimension_names=dims)
            changed = True
        changed |= self._coordinate(group, "quantile", q, "float64",
                                    {"long_name": "quantile level"})
        changed |= self._day_coordinate(group, days)
        changed |= self._grid_coordinates(group)
        if changed:
            self._consolidate()

    def write_marginal_days(self, start_day: int, quantiles: np.ndarray, mean: np.ndarray,
                            std: np.ndarray) -> None:
        """Write days [start_day, start_day + d) of the marginals (d = len(quantiles))."""
        self._require_writable()
        group = self._marginals_group()
        D, Q, n_m, n_tau = group["quantiles"].shape
        d = len(quantiles)
        if not 0 <= start_day < start_day + d <= D:
            raise StoreError(f"marginal days [{start_day}, {start_day + d}) are outside the "
                             f"run's [0, {D}); pass a slice of the run's days")
        arrays = {"quantiles": (quantiles, (d, Q, n_m, n_tau)), "mean": (mean, (d, n_m, n_tau)),
                  "std": (std, (d, n_m, n_tau))}
        for name, (values, shape) in arrays.items():
            values = np.asarray(values, dtype=np.float32)
            if values.shape != shape:
                raise StoreError(f"marginals: {name} has shape {values.shape}, required {shape}")
            try:  # a partial chunk is read first: one a crash left garbled does not decode
                group[name][start_day: start_day + d] = values
            except _GARBLED as err:
                raise self._unreadable(f"{MARGINALS}/{name}", err) from None

    def write_marginals(self, days: np.ndarray, quantile_levels, quantiles: np.ndarray,
                        mean: np.ndarray, std: np.ndarray) -> None:
        """All the run's marginals at once: ``create_marginals`` + ``write_marginal_days(0)``."""
        self.create_marginals(days, quantile_levels)
        self.write_marginal_days(0, quantiles, mean, std)

    def _marginals_group(self) -> zarr.Group:
        with self._reading(MARGINALS):
            group = self._root.get(MARGINALS)
        if group is None:
            fix = (_DAMAGED if self.levels_complete >= self.meta.depth
                   else f"finish the run with {self.resume_command} first")
            raise StoreError(f"{self.path} has no marginals; {fix}")
        return group

    def read_marginals(self, checked: bool = True) -> dict:
        """``days`` (datetime64[D]), ``quantile`` levels, ``quantiles``, ``mean``, ``std``;
        StoreError where a day's values are not what the run writes (``marginal_problems``)
        unless not ``checked`` (``backfill check``, which lists each problem itself). Checked,
        a day written in part reads as not written (NaN): after the complete levels' days,
        an interrupted run's level in progress may hold part of one."""
        group = self._marginals_group()
        with self._reading(MARGINALS):
            days, levels = self._days_of(group), group["quantile"][:]
            shapes = {a: group[a].shape for a in ("quantiles", "mean", "std")}
        grid = self.meta.grid_shape
        want = {"quantiles": (len(days), len(levels), *grid), "mean": (len(days), *grid),
                "std": (len(days), *grid)}
        for a, shape in shapes.items():
            if shape != want[a]:
                raise StoreError(f"{self.path}/{MARGINALS}/{a} has shape {shape}, its "
                                 f"{len(days)} days x {len(levels)} quantile levels on the "
                                 f"store's {grid[0]}x{grid[1]} grid need {want[a]}; {_DAMAGED}")
        if not (levels.ndim == 1 and np.all((levels > 0) & (levels < 1))
                and np.all(np.diff(levels) > 0)):
            raise StoreError(f"{self.path}/{MARGINALS}/quantile holds {levels.tolist()}, not "
                             f"increasing quantile levels in (0, 1); {_DAMAGED}")
        with self._reading(MARGINALS):
            m = {"days": days, "quantile": levels, "quantiles": group["quantiles"][:],
                 "mean": group["mean"][:], "std": group["std"][:]}
        if not checked:
            return m
        written, problems = marginal_problems(m, self.final_marginal_days(len(days)))
        for a in ("quantiles", "mean", "std"):
            m[a][~written] = np.nan
        if problems:
            text, bad = problems[0]
            raise StoreError(f"{self.path}/{MARGINALS}: on {days[int(np.argmax(bad))]} the "
                             f"{text} ({int(bad.sum())} day{'' if bad.sum() == 1 else 's'}), so "
                             "the store changed after the run; run `backfill check --store "
                             f"{shlex.quote(str(self.path))}`; {_DAMAGED}")
        return m


def levels_with_marginals(kind: str, depth: int, lookahead: int, levels_complete: int) -> int:
    """How many levels' days of marginals a run has written once ``levels_complete`` levels
    are: as many, but for a tree with a lookahead, whose level k writes level k + 1's days
    (and level 1 its own too; ``driver.level_plan``)."""
    ahead = kind == "tree" and lookahead > 0 and levels_complete >= 1
    return min(depth, levels_complete + int(ahead))


def marginal_problems(m: dict, final: int) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The days of marginals ``m`` (``read_marginals``) that are written, and each problem
    of their values as (text, mask over days). The first ``final`` days (the complete
    levels') are written; a later day is NaN throughout, or, of an interrupted level, in
    part. A written day holds positive quantiles that do not fall as the level rises, a
    positive mean and a std >= 0."""
    q, mean, std = m["quantiles"], m["mean"], m["std"]
    finite = np.concatenate([np.isfinite(a).reshape(len(a), -1) for a in (q, mean, std)], axis=1)
    unwritten = np.concatenate([np.isnan(a).reshape(len(a), -1) for a in (q, mean, std)], axis=1)
    written = finite.all(axis=1)
    blank = unwritten.all(axis=1)
    within = np.arange(len(written)) < final
    partial = ~written & ~blank & within
    qw, mw, sw = q[written], mean[written], std[written]
    on_written = (("quantiles are not positive", ~(qw > 0).all(axis=(1, 2, 3))),
                  ("quantiles fall as the level rises",
                   (np.diff(qw, axis=1) < 0).any(axis=(1, 2, 3))),
                  ("mean is not positive", ~(mw > 0).all(axis=(1, 2))),
                  ("std is negative", (sw < 0).any(axis=(1, 2))))
    problems = [(text, bad) for text, bad in (
        ("values are not written although their level is complete", blank & within),
        ("values are partly written (some NaN or inf)", partial)) if bad.any()]
    for text, bad in on_written:
        if bad.any():
            mask = np.zeros(len(written), bool)
            mask[np.flatnonzero(written)[bad]] = True
            problems.append((text, mask))
    return written, problems


# ----------------------------------------------------------------------------- exports


def marginals_frame(store: ScenarioStore) -> pd.DataFrame:
    """Tidy marginal quantiles: date, moneyness, maturity_days, quantile, iv.

    Days not written yet (an unfinished run) are left out.
    """
    m = store.read_marginals()
    grid = store.meta.grid
    date, mny, mat, q = np.meshgrid(m["days"].astype("datetime64[ns]"),
                                    np.asarray(grid["moneyness"]),
                                    np.asarray(grid["maturity_days"]), m["quantile"],
                                    indexing="ij")
    iv = m["quantiles"].transpose(0, 2, 3, 1)  # (D, n_m, n_tau, Q)
    frame = pd.DataFrame({"date": date.ravel(), "moneyness": mny.ravel(),
                          "maturity_days": mat.ravel(), "quantile": q.ravel(),
                          "iv": iv.ravel()})
    return frame.dropna(subset=["iv"]).reset_index(drop=True)


def _export_level(store: ScenarioStore, level: int | None) -> int:
    """``level``, or the deepest complete one; refused unless complete."""
    done = store.require_complete_level()
    level = done if level is None else level
    if not isinstance(level, (int, np.integer)) or not 1 <= level <= done:
        raise StoreError(f"level {level!r} is not a complete level of {store.path}; pass a "
                         f"level in 1..{done}")
    return int(level)


def terminal_paths(store: ScenarioStore, level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every node of ``level`` (default: the deepest complete one) as its full path from
    day 0, rebuilt from parent pointers: paths (N, days, n_m, n_tau), weights (N,)."""
    level = _export_level(store, level)
    n = store.level_size(level)
    return store.ancestor_paths(level, 0, n), store.complete_weights(level)


# Vols per block of nodes that ``export_paths`` rebuilds at once (8 MB of float32; a parquet
# block's columns take about 40 bytes a vol more).
EXPORT_BLOCK_VALUES = 1 << 21


def export_paths(store: ScenarioStore, out: Path, level: int | None = None,
                 on_block: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Write ``terminal_paths`` to ``out`` a block of nodes at a time, so memory stays flat
    however deep the tree: ``.npz`` (arrays paths, weight, dates, moneyness, maturity_days) or
    ``.parquet`` (columns path, weight, date, moneyness, maturity_days, iv; one row per path,
    day and grid point). The file is written in a stage beside ``out`` and moved into place
    at the end (``report.staged``), so a failed export leaves no partial file (and an older
    ``out`` whole). ``on_block(k, n)``
    is told the k nodes each block adds of the n. Returns (paths, days)."""
    level = _export_level(store, level)
    n = store.level_size(level)
    weight = store.complete_weights(level)
    days = np.concatenate([store.level_days(k) for k in range(1, level + 1)])
    grid = store.meta.grid
    mny, mat = np.asarray(grid["moneyness"]), np.asarray(grid["maturity_days"])
    step = max(1, EXPORT_BLOCK_VALUES // (len(days) * mny.size * mat.size))

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, n, step):
            block = store.ancestor_paths(level, lo, min(lo + step, n))
            yield lo, block
            if on_block is not None:
                on_block(len(block), n)

    from engine.report import staged

    out = Path(os.path.realpath(out))  # a link is written through, as open(out, "wb") would
    with staged(out.parent) as stage:
        if out.suffix.lower() == ".npz":
            _write_paths_npz(stage / out.name, blocks(), n, {
                "weight": weight, "dates": days.astype("datetime64[D]"), "moneyness": mny,
                "maturity_days": mat})
        else:
            _write_paths_parquet(stage / out.name, blocks(), weight, days, mny, mat)
    return n, len(days)


def _write_paths_npz(path: Path, blocks: Iterator[tuple[int, np.ndarray]], n: int,
                     arrays: dict[str, np.ndarray]) -> None:
    """What ``numpy.savez_compressed(paths=..., **arrays)`` writes, with ``paths`` streamed
    block by block into its zip member (the rows of a C-order array are contiguous)."""
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        _, first = next(blocks)
        header = {"descr": npy.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (n, *first.shape[1:])}
        rows = 0
        with zf.open("paths.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, header)
            for block in itertools.chain([first], (b for _, b in blocks)):
                if block.shape[1:] != first.shape[1:]:
                    raise StoreError(f"a block of paths of shape {block.shape} after "
                                     f"{first.shape}: {_DAMAGED}")
                f.write(np.ascontiguousarray(block, dtype=first.dtype).tobytes())
                rows += len(block)
        if rows != n:
            raise StoreError(f"{rows} paths rebuilt of the level's {n}: {_DAMAGED}")
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                npy.write_array(f, np.asarray(a), allow_pickle=False)


def _write_paths_parquet(path: Path, blocks: Iterator[tuple[int, np.ndarray]],
                         weight: np.ndarray, days: np.ndarray, mny: np.ndarray,
                         mat: np.ndarray) -> None:
    """One parquet row group per block of nodes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for lo, block in blocks:
            k, d, n_m, n_tau = block.shape
            node, date, m, t = np.meshgrid(np.arange(lo, lo + k), days.astype("datetime64[ns]"),
                                           mny, mat, indexing="ij")
            table = pa.Table.from_pandas(pd.DataFrame({
                "path": node.ravel(), "weight": np.repeat(weight[lo:lo + k], d * n_m * n_tau),
                "date": date.ravel(), "moneyness": m.ravel(), "maturity_days": t.ravel(),
                "iv": block.ravel()}), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
