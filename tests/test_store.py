"""engine.store: round trips, xarray readability, completion markers, resume checks."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from engine.errors import StoreError
from engine.store import (
    SCHEMA_VERSION,
    ScenarioStore,
    StoreMeta,
    business_days_after,
    export_paths,
    marginals_frame,
    parse_store_path,
    remove_temporary_files,
    terminal_paths,
)

GRID = {"moneyness": [0.9, 1.0, 1.1], "maturity_days": [30.0, 91.0]}
START = "2024-01-05"  # a Friday
CONFIG = {"seed": 3, "tree": {"depth": 2, "branching": 5}, "data": {"horizon": 4},
          "engine": {"n_decoders": 1}}
H = 4  # days per level
QUANTILES = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]


def make_store(path: Path, **overrides) -> ScenarioStore:
    kwargs = {"config": CONFIG, "seed": 3, "grid": GRID, "fingerprint": "fp-abc",
              "start_date": START, "kind": "tree", "depth": 2, "chunk_nodes": 2}
    kwargs.update(overrides)
    return ScenarioStore.create(path, **kwargs)


def tiny_tree(seed: int = 0) -> dict:
    """Level 1: 3 nodes under the start; level 2: 2 children each (6 nodes)."""
    rng = np.random.default_rng(seed)
    w1 = np.array([0.25, 0.5, 0.25])
    w2 = np.repeat(w1, 2) * np.tile([1 / 3, 2 / 3], 3)
    return {
        1: {"paths": rng.random((3, H, 3, 2)).astype(np.float32), "parent": np.zeros(3, int),
            "branch": np.arange(3), "weight": w1},
        2: {"paths": rng.random((6, H, 3, 2)).astype(np.float32),
            "parent": np.repeat(np.arange(3), 2), "branch": np.tile([0, 1], 3), "weight": w2},
    }


def write_level(store: ScenarioStore, level: int, data: dict, wait: bool = True) -> None:
    n = len(data["paths"])
    c = store.meta.chunk_nodes
    for start in range(0, n, c):
        rows = slice(start, min(start + c, n))
        store.write_chunk(level, start, data["paths"][rows], data["parent"][rows],
                          data["branch"][rows], data["weight"][rows], wait=wait)


def tree_store_of(path: Path) -> tuple[ScenarioStore, dict]:
    """A store with both levels of ``tiny_tree`` written and complete (no marginals)."""
    store = make_store(path)
    tree = tiny_tree()
    days = business_days_after(START, 2 * H)
    for level in (1, 2):
        store.create_level(level, len(tree[level]["paths"]), days[(level - 1) * H: level * H],
                           (3, 2))
        write_level(store, level, tree[level])
        store.mark_level_complete(level)
    return store, tree


@pytest.fixture
def tree_store(tmp_path) -> tuple[ScenarioStore, dict]:
    return tree_store_of(tmp_path / "run.zarr")


def open_quietly(path: Path, group: str) -> xr.Dataset:
    """xarray must open a group without any warning (consolidated metadata is fresh)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(path, group=group).load()


# ----------------------------------------------------------------------------- dates


def test_business_days_start_strictly_after_the_start():
    assert business_days_after("2024-01-05", 3).tolist() == [
        np.datetime64("2024-01-08"), np.datetime64("2024-01-09"), np.datetime64("2024-01-10")]
    # a Saturday start gives Monday first, never the Tuesday
    assert business_days_after("2024-01-06", 1)[0] == np.datetime64("2024-01-08")
    assert business_days_after("2024-01-08", 1)[0] == np.datetime64("2024-01-09")
    assert business_days_after(START, 5).dtype == np.dtype("datetime64[D]")
    with pytest.raises(StoreError, match="not a date"):
        business_days_after("yesterday-ish", 2)


# ----------------------------------------------------------------------------- round trips


def test_levels_round_trip(tree_store):
    store, tree = tree_store
    reopened = ScenarioStore.open(store.path)
    for level in (1, 2):
        got = reopened.read_level(level)
        for key in ("paths", "parent", "branch", "weight"):
            np.testing.assert_array_equal(got[key], tree[level][key])
        assert got["paths"].dtype == np.float32
        assert got["parent"].dtype == np.int64
        assert got["branch"].dtype == np.int8
        assert reopened.level_size(level) == len(tree[level]["paths"])
    part = reopened.read_level(2, 2, 5)
    np.testing.assert_array_equal(part["paths"], tree[2]["paths"][2:5])
    chunks = list(reopened.iter_chunks(2))
    assert [(a, b) for a, b, _ in chunks] == [(0, 2), (2, 4), (4, 6)]
    np.testing.assert_array_equal(np.concatenate([d["weight"] for *_, d in chunks]),
                                  tree[2]["weight"])
    np.testing.assert_array_equal(reopened.level_days(2), business_days_after(START, 8)[4:])


def test_weights_are_float64_exact(tree_store):
    store, tree = tree_store
    w = store.read_level(2)["weight"]
    assert w.dtype == np.float64
    assert w.tobytes() == tree[2]["weight"].astype(np.float64).tobytes()
    ds = open_quietly(store.path, "level_02")
    assert ds["weight"].dtype == np.float64
    assert ds["weight"].values.tobytes() == tree[2]["weight"].tobytes()


def test_marginals_round_trip_and_tidy_frame(tmp_path):
    store = make_store(tmp_path / "run.zarr")
    D, Q = 2 * H, len(QUANTILES)
    rng = np.random.default_rng(1)
    q = np.sort(rng.random((D, Q, 3, 2)), axis=1).astype(np.float32)
    mean, std = rng.random((D, 3, 2)).astype(np.float32), rng.random((D, 3, 2)).astype(np.float32)
    store.create_marginals(D, QUANTILES)
    store.create_marginals(business_days_after(START, D), QUANTILES)  # resume: a no-op
    for level in (0, 1):  # per level, as the driver writes them
        days = slice(level * H, (level + 1) * H)
        store.write_marginal_days(level * H, q[days], mean[days], std[days])
    got = ScenarioStore.open(store.path).read_marginals()
    np.testing.assert_array_equal(got["quantiles"], q)
    np.testing.assert_array_equal(got["mean"], mean)
    np.testing.assert_array_equal(got["std"], std)
    np.testing.assert_array_equal(got["quantile"], QUANTILES)
    np.testing.assert_array_equal(got["days"], business_days_after(START, D))

    frame = marginals_frame(store)
    assert list(frame.columns) == ["date", "moneyness", "maturity_days", "quantile", "iv"]
    assert len(frame) == D * Q * 3 * 2
    row = frame[(frame.date == np.datetime64("2024-01-09")) & (frame.moneyness == 1.1)
                & (frame.maturity_days == 30.0) & (frame["quantile"] == 0.95)]
    assert row.iv.item() == q[1, 5, 2, 0]

    with pytest.raises(StoreError, match="other days or quantiles"):
        store.create_marginals(D, [0.1, 0.9])
    with pytest.raises(StoreError, match="outside the run"):
        store.write_marginal_days(D - 1, q[:2], mean[:2], std[:2])
    with pytest.raises(StoreError, match="required"):
        store.write_marginal_days(0, q[:2], mean[:1], std[:2])


def test_a_garbled_marginals_chunk_is_a_store_error_when_days_are_added(tmp_path):
    """Days of the next level can share a marginals chunk with the last one's: the write
    reads that chunk first, and one a machine crash left empty or garbled is reported as
    damage in one line, not a codec's RuntimeError."""
    store = make_store(tmp_path / "run.zarr")
    D, Q = 2 * H, len(QUANTILES)
    store.create_marginals(D, QUANTILES)
    q = np.ones((H, Q, 3, 2), np.float32)
    m = np.ones((H, 3, 2), np.float32)
    store.write_marginal_days(0, q[:2], m[:2], m[:2])
    chunks = [f for f in (store.path / "marginals" / "quantiles").rglob("*")
              if f.is_file() and f.name != "zarr.json"]
    assert len(chunks) == 1
    chunks[0].write_bytes(b"\x00garbled")
    with pytest.raises(StoreError, match="marginals/quantiles cannot be read.*damaged"):
        store.write_marginal_days(2, q[:2], m[:2], m[:2])


def test_write_marginals_in_one_call_and_unwritten_days_left_out_of_frame(tmp_path):
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, 3)
    q = np.ones((3, 2, 3, 2), np.float32)
    store.write_marginals(days, [0.1, 0.9], q, q[:, 0], q[:, 0])
    assert len(marginals_frame(store)) == 3 * 2 * 6
    other = make_store(tmp_path / "other.zarr")
    other.create_marginals(3, [0.1, 0.9])
    other.write_marginal_days(0, q[:1], q[:1, 0], q[:1, 0])
    assert len(marginals_frame(other)) == 1 * 2 * 6


# ----------------------------------------------------------------------------- xarray


def test_xarray_opens_a_level_with_named_dims_and_coordinates(tree_store):
    store, tree = tree_store
    ds = open_quietly(store.path, "level_01")
    assert ds["paths"].dims == ("node", "day", "moneyness", "maturity")
    for name in ("parent", "branch", "weight"):
        assert ds[name].dims == ("node",)
    assert {"node", "day", "moneyness", "maturity"} <= set(ds.coords)
    np.testing.assert_array_equal(ds["node"].values, np.arange(3))
    np.testing.assert_array_equal(ds["moneyness"].values, GRID["moneyness"])
    np.testing.assert_array_equal(ds["maturity"].values, GRID["maturity_days"])
    assert np.issubdtype(ds["day"].dtype, np.datetime64)
    np.testing.assert_array_equal(ds["day"].values.astype("datetime64[D]"),
                                  business_days_after(START, H))
    np.testing.assert_array_equal(ds["paths"].values, tree[1]["paths"])
    ds2 = open_quietly(store.path, "level_02")
    np.testing.assert_array_equal(ds2["day"].values.astype("datetime64[D]"),
                                  business_days_after(START, 2 * H)[H:])
    assert ds2["done"].dims == ("chunk",) and ds2["done"].values.all()


def test_xarray_opens_marginals_with_quantile_coordinate(tmp_path):
    store = make_store(tmp_path / "run.zarr")
    q = np.full((5, len(QUANTILES), 3, 2), 0.2, np.float32)
    store.write_marginals(business_days_after(START, 5), QUANTILES, q, q[:, 0], q[:, 0])
    ds = open_quietly(store.path, "marginals")
    assert ds["quantiles"].dims == ("day", "quantile", "moneyness", "maturity")
    assert ds["mean"].dims == ds["std"].dims == ("day", "moneyness", "maturity")
    np.testing.assert_array_equal(ds["quantile"].values, QUANTILES)
    np.testing.assert_array_equal(ds["day"].values.astype("datetime64[D]"),
                                  business_days_after(START, 5))
    assert float(ds["quantiles"].sel(quantile=0.5, moneyness=1.0, maturity=91.0)[0]) == \
        pytest.approx(0.2)


def test_xarray_sees_levels_created_after_others_were_complete(tree_store, tmp_path):
    """Consolidated metadata stays fresh when the driver adds a level mid-run."""
    store = make_store(tmp_path / "deep.zarr", depth=3)
    days = business_days_after(START, 3 * H)
    store.create_level(1, 2, days[:H], (3, 2))
    store.write_chunk(1, 0, np.ones((2, H, 3, 2)), [0, 0], [0, 1], [0.5, 0.5])
    store.mark_level_complete(1)
    store.create_level(2, 4, days[H:2 * H], (3, 2))
    assert open_quietly(store.path, "level_02").sizes["node"] == 4
    assert zarr.open_group(store.path, mode="r").attrs["levels_complete"] == 1


# ----------------------------------------------------------------------------- create / open


def test_root_attributes_record_the_run(tree_store):
    store, _ = tree_store
    attrs = zarr.open_group(store.path, mode="r").attrs.asdict()
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["config"] == CONFIG and attrs["seed"] == 3 and attrs["fingerprint"] == "fp-abc"
    assert attrs["grid"] == GRID and attrs["start_date"] == START
    assert attrs["kind"] == "tree" and attrs["depth"] == 2 and attrs["levels_complete"] == 2
    summary = store.to_dict()
    assert summary["levels"][2] == {"n_nodes": 6, "n_days": H, "chunks": 3, "chunks_done": 3}
    assert ScenarioStore.from_dict(summary) == store.meta
    assert StoreMeta.from_dict(store.meta.to_dict()) == store.meta
    # a store's own start date garbled: said as the store's attribute, not as a flag to pass
    for bad, found in (("2005-13-45", "'2005-13-45' is no day of the calendar"),
                       (20050930, "20050930 is not a date written YYYY-MM-DD")):
        with pytest.raises(StoreError, match=rf"its start_date attribute {found}.*; the "
                           "store is corrupt, recreate it with --overwrite$"):
            StoreMeta.from_dict({**store.meta.to_dict(), "start_date": bad}, origin="s.zarr")


def test_refuses_an_existing_store_unless_overwrite(tmp_path):
    path = tmp_path / "run.zarr"
    make_store(path)
    with pytest.raises(StoreError, match="--resume.*--overwrite"):
        make_store(path)
    store = make_store(path, overwrite=True, seed=9)
    assert ScenarioStore.open(path).meta.seed == 9 and store.levels_complete == 0
    (tmp_path / "empty").mkdir()
    make_store(tmp_path / "empty")  # an empty directory is fine
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a Zarr store"):
        make_store(notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "keep me"
    theirs = tmp_path / "theirs.zarr"  # a Zarr store of someone else's
    zarr.open_group(theirs, mode="w", zarr_format=3).create_array("x", data=np.arange(3))
    with pytest.raises(StoreError, match="backfill did not make"):
        make_store(theirs, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(theirs / "x", mode="r")[:], np.arange(3))
    for working_directory in (".", Path("")):  # an empty --store reaches us as Path(".")
        with pytest.raises(StoreError, match="names the working directory"):
            ScenarioStore.check_new(working_directory)


def test_one_writer_per_store_across_processes(tmp_path):
    """While another process writes a store, neither --overwrite nor --resume may touch it
    (its own run would go on and report success over a store half deleted); readers may."""
    import subprocess

    path = tmp_path / "run.zarr"
    make_store(path)  # made, then let go: this process holds no lock
    hold = ("import sys; from pathlib import Path; from engine.store import ScenarioStore; "
            "s = ScenarioStore.open(Path(sys.argv[1]), 'r+'); print('held', flush=True); "
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        link = tmp_path / "link.zarr"  # the same store by another name: the same lock
        link.symlink_to(path)
        for attempt in (lambda: make_store(path, overwrite=True, seed=9),
                        lambda: ScenarioStore.open(path, "r+"),
                        lambda: ScenarioStore.open(link, "r+")):
            with pytest.raises(StoreError, match=f"another backfill process .pid {holder.pid}"
                               ) as err:
                attempt()
            assert "\n" not in str(err.value)
        assert ScenarioStore.open(path).meta.seed == 3  # untouched, and readable
    finally:
        holder.communicate("", timeout=60)
    assert make_store(path, overwrite=True, seed=9).meta.seed == 9  # the lock went with it
    (tmp_path / "sub").mkdir()
    mine = ScenarioStore.open(path, "r+")  # this process's own stores share its hold
    assert ScenarioStore.open(tmp_path / "sub" / ".." / "run.zarr", "r+")._lock is mine._lock


def test_create_validates_its_arguments(tmp_path):
    with pytest.raises(StoreError, match="kind"):
        make_store(tmp_path / "a.zarr", kind="forest")
    with pytest.raises(StoreError, match="maturity_days"):
        make_store(tmp_path / "b.zarr", grid={"moneyness": [1.0]})
    with pytest.raises(StoreError, match="repeated"):
        make_store(tmp_path / "c.zarr", grid={"moneyness": [1.0, 1.0], "maturity_days": [30]})
    with pytest.raises(StoreError, match="start date"):
        make_store(tmp_path / "d.zarr", start_date="not-a-date")
    with pytest.raises(StoreError, match="JSON"):
        make_store(tmp_path / "e.zarr", config={"x": object()})
    with pytest.raises(StoreError, match="depth"):
        make_store(tmp_path / "f.zarr", depth=0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        parse_store_path(tmp_path / "file.txt")


def test_open_refuses_missing_foreign_and_other_schema(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ScenarioStore.open(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a Zarr store"):
        ScenarioStore.open(tmp_path / "plain")
    zarr.open_group(tmp_path / "foreign.zarr", mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="schema_version"):
        ScenarioStore.open(tmp_path / "foreign.zarr")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a readable Zarr v3 group"):
        ScenarioStore.open(tmp_path / "broken")
    zarr.create_array(tmp_path / "array.zarr", shape=(2,), dtype="float32")
    with pytest.raises(StoreError, match="not a readable Zarr v3 group"):
        ScenarioStore.open(tmp_path / "array.zarr")
    path = tmp_path / "run.zarr"
    make_store(path)
    zarr.open_group(path, mode="r+", use_consolidated=False).attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99"):
        ScenarioStore.open(path)
    with pytest.raises(StoreError, match="mode"):
        ScenarioStore.open(path, mode="w")


def test_read_only_store_refuses_writes(tree_store):
    store, tree = tree_store
    ro = ScenarioStore.open(store.path, mode="r")
    with pytest.raises(StoreError, match="read-only"):
        ro.write_chunk(1, 0, tree[1]["paths"][:2], [0, 0], [0, 1], [0.5, 0.5])


# ----------------------------------------------------------------------------- resume checks


def test_check_compatible_accepts_the_same_run_and_engine_changes(tree_store):
    store, _ = tree_store
    store.check_compatible(CONFIG, "fp-abc", 3)
    wider = {**CONFIG, "engine": {"n_decoders": 8}}  # cannot change the bytes
    ScenarioStore.open(store.path, "r+").check_compatible(wider, "fp-abc", 3)


@pytest.mark.parametrize("config, fingerprint, seed, message", [
    (CONFIG, "fp-abc", 4, "seed 3 in the store, 4 now"),
    (CONFIG, "fp-xyz", 3, "data fingerprint fp-abc in the store, fp-xyz now"),
    ({**CONFIG, "tree": {"depth": 3, "branching": 5}}, "fp-abc", 3,
     "config key 'tree.depth' is 2 in the store, 3 now"),
    ({**CONFIG, "tree": {"depth": 3, "branching": 4}}, "fp-abc", 3,
     r"'tree.branching' is 5 in the store, 4 now \(and 1 more keys\)"),
    ({**CONFIG, "data": {}}, "fp-abc", 3, "'data.horizon' is 4 in the store, '<missing>' now"),
])
def test_check_compatible_names_what_differs(tree_store, config, fingerprint, seed, message):
    store, _ = tree_store
    with pytest.raises(StoreError, match=message) as err:
        store.check_compatible(config, fingerprint, seed)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)


def test_a_setting_added_since_the_store_resumes_at_its_default(tree_store):
    """A key the store's config lacks (added to backfill after it was written) is no
    difference while the command gives it its default; another value is named."""
    store, _ = tree_store
    newer = {**CONFIG, "data": {"horizon": 4, "fill": "none"}}
    defaults = {"data": {"fill": "none", "horizon": 90}, "tree": {"depth": 4}}
    store.check_compatible(newer, "fp-abc", 3, defaults=defaults)
    with pytest.raises(StoreError, match="'data.fill' is '<missing>' in the store, 'none' now"):
        store.check_compatible(newer, "fp-abc", 3)  # without the defaults, as before
    other = {**CONFIG, "data": {"horizon": 4, "fill": "previous"}}
    with pytest.raises(StoreError, match="'data.fill' is '<missing>' in the store, 'previous'"):
        store.check_compatible(other, "fp-abc", 3, defaults=defaults)
    # a key the command lacks is still a difference, default or not
    with pytest.raises(StoreError, match="'data.horizon' is 4 in the store, '<missing>' now"):
        store.check_compatible({**CONFIG, "data": {}}, "fp-abc", 3, defaults=defaults)


def test_the_data_may_be_named_otherwise_where_its_fingerprint_is_the_store_s(tree_store):
    """``same_data`` keys (the data file's name) may differ only where the data fingerprint
    is the store's: ``./f.csv`` resumes a run of ``f.csv``, another file does not."""
    store, _ = tree_store
    renamed = {**CONFIG, "data": {"horizon": 4, "source": "./f.csv"}}
    store.check_compatible(renamed, "fp-abc", 3, same_data=("data.source",))
    with pytest.raises(StoreError, match="'data.source' is '<missing>' in the store"):
        store.check_compatible(renamed, "fp-abc", 3)  # without same_data, as before
    with pytest.raises(StoreError, match="data fingerprint fp-abc in the store, fp-xyz now; "
                                         "config key 'data.source'"):
        store.check_compatible(renamed, "fp-xyz", 3, same_data=("data.source",))
    longer = {**CONFIG, "data": {"horizon": 5, "source": "./f.csv"}}
    with pytest.raises(StoreError, match="'data.horizon' is 4 in the store, 5 now$|"
                                         "'data.horizon' is 4 in the store, 5 now;"):
        store.check_compatible(longer, "fp-abc", 3, same_data=("data.source",))


def test_check_compatible_names_the_schema(tree_store, monkeypatch):
    store, _ = tree_store
    monkeypatch.setattr("engine.store.SCHEMA_VERSION", 3)
    with pytest.raises(StoreError, match="schema version 2 in the store, 3 now"):
        store.check_compatible(CONFIG, "fp-abc", 3)


def test_a_version_1_store_is_read_but_not_resumed(tree_store):
    """Version 1 wrote the node coordinate chunk by chunk and nested chunk keys: still
    readable, but resuming one with this version would leave new chunks without node ids."""
    store, _ = tree_store
    zarr.open_group(store.path, mode="r+", use_consolidated=False).attrs["schema_version"] = 1
    old = ScenarioStore.open(store.path)
    assert old.meta.schema_version == 1 and old.read_level(1)["paths"].shape[0] > 0
    with pytest.raises(StoreError, match="schema version 1 in the store, 2 now"):
        old.check_compatible(CONFIG, "fp-abc", 3)


# ----------------------------------------------------------------------------- chunks / markers


def chunk_files(path: Path, level: int) -> dict[str, bytes]:
    root = path / f"level_{level:02d}"
    return {str(f.relative_to(root)): f.read_bytes()
            for name in ("paths", "parent", "branch", "weight")
            for f in sorted((root / name).glob("c.*")) if f.is_file()}  # flat chunk keys


def test_rewriting_a_chunk_gives_the_same_bytes(tmp_path):
    store = make_store(tmp_path / "run.zarr", depth=1)
    store.create_level(1, 5, business_days_after(START, H), (3, 2))
    tree = tiny_tree()
    data = {k: np.concatenate([v, v[:2]]) for k, v in tree[1].items()}
    data["weight"] = np.full(5, 0.2)
    write_level(store, 1, data)
    first = chunk_files(store.path, 1)
    assert any(k.startswith("paths/c.") for k in first) and len(first) == 4 * 3
    mtimes = {f: f.stat().st_mtime_ns for f in (store.path / "level_01" / "paths").glob("c.*")}
    # resume after a crash: another process writes chunk 1 (rows 2..4) again
    again = ScenarioStore.open(store.path, "r+")
    again.write_chunk(1, 2, data["paths"][2:4], data["parent"][2:4], data["branch"][2:4],
                      data["weight"][2:4])
    assert chunk_files(store.path, 1) == first
    assert any(f.stat().st_mtime_ns != t for f, t in mtimes.items())  # it was rewritten
    np.testing.assert_array_equal(again.read_level(1)["paths"], data["paths"])


def test_writes_handed_over_give_the_same_bytes_and_reads_see_them(tmp_path):
    """write_chunk(wait=False), as the driver writes: the same files as waiting for each
    write, and the store's own reads (no flush called) see every chunk handed over."""
    days = business_days_after(START, H)
    rng = np.random.default_rng(5)
    n = 9
    data = {"paths": rng.random((n, H, 3, 2)).astype(np.float32), "parent": np.zeros(n, int),
            "branch": np.arange(n) % 5, "weight": np.full(n, 1 / n)}
    files = {}
    for wait in (True, False):
        store = make_store(tmp_path / f"wait_{wait}.zarr", depth=1)
        store.create_level(1, n, days, (3, 2))
        write_level(store, 1, data, wait=wait)
        assert store.chunks_done(1).all()
        np.testing.assert_array_equal(store.read_level(1)["paths"], data["paths"])
        store.mark_level_complete(1)
        files[wait] = chunk_files(store.path, 1)
    assert files[True] == files[False] and len(files[True]) == 4 * 5


def test_a_read_of_a_level_waits_for_that_levels_writes_only(tmp_path, monkeypatch):
    """The driver reads level k - 1 (the contexts) while level k's chunks are in flight: that
    read must not wait for them; a read of level k must."""
    import threading

    from engine import store as store_module

    store = make_store(tmp_path / "run.zarr")
    tree = tiny_tree()
    days = business_days_after(START, 2 * H)
    store.create_level(1, 3, days[:H], (3, 2))
    write_level(store, 1, tree[1])
    store.mark_level_complete(1)
    store.create_level(2, 6, days[H:], (3, 2))
    gate, write_rows = threading.Event(), store_module._write_rows

    def held(*args):
        gate.wait(timeout=30)  # (a read that waited for it would stall 30 s, then fail below)
        write_rows(*args)

    monkeypatch.setattr(store_module, "_write_rows", held)
    store.write_chunk(2, 0, *(tree[2][k][:2] for k in tree[2]), wait=False)
    np.testing.assert_array_equal(store.read_level(1)["paths"], tree[1]["paths"])
    assert not store._pending[0][1].done()  # level 2's write is still held
    gate.set()
    assert store.chunks_done(2).tolist() == [True, False, False]  # waited for it


def test_ensure_consolidated_repairs_a_root_left_unconsolidated(tmp_path):
    """A crash between writing the root's attributes and consolidating leaves the root
    without consolidated metadata (xarray warns at every open); a resume puts it back."""
    store = make_store(tmp_path / "run.zarr", depth=1)
    store.create_level(1, 2, business_days_after(START, H), (3, 2))
    store.write_chunk(1, 0, np.ones((2, H, 3, 2)), [0, 0], [0, 1], [0.5, 0.5])
    store.mark_level_complete(1)
    other = zarr.open_group(store.path, mode="r+", use_consolidated=False)
    other.attrs["levels_complete"] = 1  # as mark_level_complete's write, then the crash
    with pytest.warns(RuntimeWarning, match="consolidated metadata"):
        xr.open_zarr(store.path, group="level_01")
    again = ScenarioStore.open(store.path, "r+")
    again.ensure_consolidated()
    assert open_quietly(store.path, "level_01").sizes["node"] == 2
    again.ensure_consolidated()  # fresh: nothing to do
    assert again.levels_complete == 1


def test_a_reopened_store_writes_a_chunk_equal_to_the_fill_value(tmp_path):
    """An array's write_empty_chunks is not stored in its zarr.json: the store sets it again
    on opening, so every chunk written has its file (what damage() counts), even one that
    equals the fill value (branch -1 here: write_chunk refuses it, so straight into the
    array)."""
    store = make_store(tmp_path / "run.zarr", depth=1)
    store.create_level(1, 4, business_days_after(START, H), (3, 2))
    again = ScenarioStore.open(store.path, "r+")
    branch = again._level(1).branch
    branch[0:2] = np.int8(-1)
    assert (store.path / "level_01" / "branch" / "c.0").is_file()
    assert branch[0:2].tolist() == [-1, -1]


def test_a_failed_write_handed_over_is_raised_and_leaves_its_chunk_undone(tmp_path):
    store = make_store(tmp_path / "run.zarr", depth=1)
    store.create_level(1, 6, business_days_after(START, H), (3, 2))
    p, z, w = np.ones((2, H, 3, 2), np.float32), np.zeros(2, int), np.full(2, 1 / 6)
    store.write_chunk(1, 0, p, z, z, w, wait=False)
    folder = store.path / "level_01" / "paths"
    store.flush()
    folder.rename(folder.with_name("moved"))
    folder.write_text("not a folder")  # the next chunk file cannot be made
    with pytest.raises(OSError):
        store.write_chunk(1, 2, p, z, z, w, wait=False)
        store.flush()
    store.flush()  # nothing left pending: raised once
    folder.unlink()
    folder.with_name("moved").rename(folder)
    assert store.chunks_done(1).tolist() == [True, False, False]
    store.write_chunk(1, 2, p, z, z, w, wait=False)  # the store writes on after the error
    assert store.chunks_done(1).tolist() == [True, True, False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_hint_is_found_on_linux_and_ignores_a_missing_file(tmp_path):
    from engine import store as store_module

    assert store_module._SYNC_FILE_RANGE is not None
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 4096)
    fd = os.open(f, os.O_RDONLY)
    try:  # the call as start_writeback makes it succeeds (wrong arguments: EINVAL)
        assert store_module._SYNC_FILE_RANGE(fd, 0, 0, store_module._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)
    store_module.start_writeback(f)
    store_module.start_writeback(tmp_path / "missing.bin")  # only a hint: no error
    assert f.read_bytes() == b"x" * 4096


def test_misaligned_or_malformed_writes_are_refused(tmp_path):
    store = make_store(tmp_path / "run.zarr", chunk_nodes=4)
    store.create_level(1, 10, business_days_after(START, H), (3, 2))
    p = np.ones((4, H, 3, 2), np.float32)
    z, w = np.zeros(4, int), np.full(4, 0.1)
    with pytest.raises(StoreError, match="whole chunks of 4"):
        store.write_chunk(1, 2, p, z, z, w)  # start inside a chunk
    with pytest.raises(StoreError, match="whole chunks of 4"):
        store.write_chunk(1, 0, p[:3], z[:3], z[:3], w[:3])  # stops inside a chunk
    with pytest.raises(StoreError, match="whole chunks of 4"):
        store.write_chunk(1, 8, p, z, z, w)  # past the end (10 nodes)
    with pytest.raises(StoreError, match="paths have shape"):
        store.write_chunk(1, 0, p[:, :2], z, z, w)
    with pytest.raises(StoreError, match="parent has shape"):
        store.write_chunk(1, 0, p, z[:3], z, w)
    with pytest.raises(StoreError, match="weights must be finite"):
        store.write_chunk(1, 0, p, z, z, np.full(4, np.nan))
    with pytest.raises(StoreError, match="parents run 0..1"):
        store.write_chunk(1, 0, p, [0, 0, 1, 0], z, w)  # level 1 hangs off the start
    for bad in (0.0, -0.2, np.nan, np.inf):  # vols are finite and positive
        q = p.copy()
        q[1, 3, 2, 1] = bad
        with pytest.raises(StoreError, match="1 path values are not finite positive"):
            store.write_chunk(1, 0, q, z, z, w)
    for column, values in (("parent", [0, 0.5, 0, 0]), ("parent", [0, -1, 0, 0]),
                           ("branch", [0, 1, 200, 3]), ("branch", [0, -1, 2, 3]),
                           ("branch", [0, 1, np.nan, 3])):
        args = {"parent": z, "branch": z, column: np.asarray(values)}
        with pytest.raises(StoreError, match=f"{column} must hold whole numbers"):
            store.write_chunk(1, 0, p, args["parent"], args["branch"], w)
    assert store.chunks_done(1).tolist() == [False, False, False]  # none of those wrote
    store.write_chunk(1, 8, p[:2], z[:2], z[:2], w[:2])  # the short last chunk is whole
    store.write_chunk(1, 0, np.ones((8, H, 3, 2)), np.zeros(8), np.zeros(8), np.full(8, 0.1))
    assert store.chunks_done(1).tolist() == [True, True, True]
    with pytest.raises(StoreError, match="no level_02"):
        store.write_chunk(2, 0, p, z, z, w)
    with pytest.raises(StoreError, match="outside 1..2"):
        store.create_level(3, 4, business_days_after(START, H), (3, 2))


def test_create_level_is_idempotent_but_refuses_another_shape(tmp_path):
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, H)
    store.create_level(1, 3, days, (3, 2))
    store.write_chunk(1, 0, np.ones((2, H, 3, 2)), [0, 0], [0, 1], [0.5, 0.25])
    store.create_level(1, 3, days, (3, 2))  # resume: keeps what was written
    assert store.chunks_done(1).tolist() == [True, False]
    np.testing.assert_array_equal(store.read_level(1, 0, 2)["weight"], [0.5, 0.25])
    with pytest.raises(StoreError, match="exists with"):
        store.create_level(1, 4, days, (3, 2))
    with pytest.raises(StoreError, match="other days"):
        store.create_level(1, 3, business_days_after("2024-02-01", H), (3, 2))
    with pytest.raises(StoreError, match="grid shape"):
        store.create_level(2, 3, days, (2, 3))
    with pytest.raises(StoreError, match="strictly increasing"):
        store.create_level(2, 3, days[::-1], (3, 2))


def test_chunks_done_and_mark_level_complete(tmp_path):
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, 2 * H)
    store.create_level(1, 5, days[:H], (3, 2))
    assert store.chunks_done(1).tolist() == [False, False, False]
    p = np.ones((2, H, 3, 2), np.float32)
    store.write_chunk(1, 2, p, [0, 0], [2, 3], [0.2, 0.2])
    assert store.chunks_done(1).tolist() == [False, True, False]
    with pytest.raises(StoreError, match="2 of 3 chunks unwritten"):
        store.mark_level_complete(1)
    with pytest.raises(StoreError, match="chunk 0 is not written"):
        store.read_level(1)
    np.testing.assert_array_equal(store.read_level(1, 2, 4)["branch"], [2, 3])
    store.write_chunk(1, 0, p, [0, 0], [0, 1], [0.2, 0.2])
    store.write_chunk(1, 4, p[:1], [0], [4], [0.2])
    assert ScenarioStore.open(store.path).chunks_done(1).all()  # durable: another reader sees it
    assert store.levels_complete == 0
    with pytest.raises(StoreError, match="complete level 1 first"):
        store.mark_level_complete(2)
    store.mark_level_complete(1)
    store.mark_level_complete(1)  # resume: already recorded
    assert ScenarioStore.open(store.path).levels_complete == 1
    store.create_level(2, 2, days[H:], (3, 2))
    store.write_chunk(2, 0, p, [0, 4], [0, 0], [0.5, 0.4])
    with pytest.raises(StoreError, match="weights sum to 0.9"):
        store.mark_level_complete(2)
    # a reader's check of a level read back: summing to 1 is not enough
    np.testing.assert_array_equal(store.complete_weights(1, [0.25, 0.75]), [0.25, 0.75])
    with pytest.raises(StoreError, match="level 1's weight of node 1 is -0.1.*backfill check"):
        store.complete_weights(1, [1.1, -0.1])
    assert store.levels_complete == 1


# ----------------------------------------------------------------------------- reconstruction


def test_terminal_paths_follow_parents(tree_store):
    store, tree = tree_store
    paths, weights = terminal_paths(store)
    assert paths.shape == (6, 2 * H, 3, 2)
    np.testing.assert_array_equal(weights, tree[2]["weight"])
    for i in range(6):
        p = tree[2]["parent"][i]
        expected = np.concatenate([tree[1]["paths"][p], tree[2]["paths"][i]])
        np.testing.assert_array_equal(paths[i], expected)
    level1, w1 = terminal_paths(store, level=1)
    np.testing.assert_array_equal(level1, tree[1]["paths"])
    np.testing.assert_array_equal(w1, tree[1]["weight"])
    tail = store.ancestor_paths(2, 3, 6, n_days=H + 1)  # one day reaches into level 1
    np.testing.assert_array_equal(tail, paths[3:6, -(H + 1):])
    assert store.ancestor_paths(2, 0, 2, n_days=2).shape == (2, 2, 3, 2)
    # scattered rows, in any order and repeated, across chunks: the same paths
    rows = np.array([5, 0, 3, 5, 1])
    np.testing.assert_array_equal(store.ancestor_rows(2, rows), paths[rows])
    np.testing.assert_array_equal(store.ancestor_rows(2, rows, n_days=H + 1),
                                  paths[rows, -(H + 1):])


@pytest.mark.parametrize("block_values", [1, 2 * H * 6 * 2, 1 << 21])
def test_export_paths_streams_blocks_into_the_same_files(tree_store, tmp_path, monkeypatch,
                                                         block_values):
    """Blocks of 1 node, of 2 nodes, or all at once: the same arrays and rows as the whole
    rebuild, with the progress told every node once."""
    import pandas as pd

    import engine.store as store_module

    store, _ = tree_store
    monkeypatch.setattr(store_module, "EXPORT_BLOCK_VALUES", block_values)
    out = tmp_path / "out"
    out.mkdir()
    full, weight = terminal_paths(store)
    told = []
    assert export_paths(store, out / "p.npz", on_block=lambda k, n: told.append((k, n))) \
        == (6, 2 * H)
    assert sum(k for k, _ in told) == 6 and {n for _, n in told} == {6}
    with np.load(out / "p.npz", allow_pickle=False) as f:
        assert list(f) == ["paths", "weight", "dates", "moneyness", "maturity_days"]
        np.testing.assert_array_equal(f["paths"], full)
        assert f["paths"].dtype == full.dtype
        np.testing.assert_array_equal(f["weight"], weight)
        np.testing.assert_array_equal(f["dates"], business_days_after(START, 2 * H))
        np.testing.assert_array_equal(f["moneyness"], store.meta.grid["moneyness"])
    export_paths(store, out / "p.parquet", level=1)
    rows = pd.read_parquet(out / "p.parquet")
    level1, w1 = terminal_paths(store, level=1)
    assert len(rows) == level1.size and rows["path"].is_monotonic_increasing
    np.testing.assert_array_equal(rows["iv"].to_numpy(), level1.ravel())
    np.testing.assert_array_equal(rows.groupby("path")["weight"].first().to_numpy(), w1)
    assert rows["date"].iloc[0] == pd.Timestamp(business_days_after(START, H)[0])
    assert sorted(p.name for p in out.iterdir()) == ["p.npz", "p.parquet"]


def test_a_failed_export_keeps_the_old_file(tree_store, tmp_path, monkeypatch):
    import engine.store as store_module

    store, _ = tree_store
    monkeypatch.setattr(store_module, "EXPORT_BLOCK_VALUES", 1)  # a block per node
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.npz"
    out.write_bytes(b"the last export")
    calls = []

    def full_disk(k, n):
        calls.append(k)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        export_paths(store, out, on_block=full_disk)
    assert out.read_bytes() == b"the last export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.npz"]


def test_export_writes_through_a_link_with_the_usual_mode(tree_store, tmp_path):
    store, _ = tree_store
    (tmp_path / "out").mkdir()
    target, link = tmp_path / "out" / "target.npz", tmp_path / "out" / "link.npz"
    link.symlink_to(target)
    export_paths(store, link)
    assert link.is_symlink() and target.is_file()
    with np.load(link) as f:
        assert f["paths"].shape == (6, 2 * H, 3, 2)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["link.npz", "target.npz"]


def test_terminal_paths_need_a_complete_level(tmp_path):
    with pytest.raises(StoreError, match="no complete level"):
        terminal_paths(make_store(tmp_path / "run.zarr"))
    store, _ = tree_store_of(tmp_path / "two.zarr")
    with pytest.raises(StoreError, match=r"level 0 is not a complete level.*1\.\.2"):
        terminal_paths(store, level=0)


def finished(path: Path) -> ScenarioStore:
    """A complete two-level store with its marginals."""
    store, _ = tree_store_of(path)
    D = 2 * H
    store.write_marginals(business_days_after(START, D), QUANTILES,
                          np.ones((D, len(QUANTILES), 3, 2)), np.ones((D, 3, 2)),
                          np.ones((D, 3, 2)))
    return store


def test_an_intact_store_has_no_damage(tmp_path):
    store = finished(tmp_path / "run.zarr")
    assert store.damage() is None
    store.check_intact()
    # an unfinished run is not damaged: its missing parts are still to come
    partial = make_store(tmp_path / "partial.zarr")
    partial.create_level(1, 3, business_days_after(START, H), (3, 2))
    assert partial.damage() is None


@pytest.mark.parametrize("lose, found", [
    ("level_02/paths/c.1.0.0.0", "level_02/paths lacks 1 of its 3 chunk files"),
    ("level_01/done/c.0", "level_01/done lacks 1"),
    ("level_01/weight", "level_01/weight is missing"),
    ("level_02", "level_02 is missing"),
    ("marginals/std", "marginals/std is missing"),
    ("marginals", "marginals is missing"),
])
def test_a_lost_file_of_a_finished_part_is_found(tmp_path, lose, found):
    """zarr reads a missing chunk file as its fill value: NaN paths, not an error."""
    store = finished(tmp_path / "run.zarr")
    target = store.path / lose
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    reopened = ScenarioStore.open(store.path)
    assert found in reopened.damage()
    with pytest.raises(StoreError, match="is damaged.*--overwrite"):
        reopened.check_intact()


def _edit_json(path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, found", [
    (("level_02/weight", {"shape": [2]}), "level_02/weight has shape (2,), the level's"),
    (("level_02/weight", {"shape": [100]}), "level_02/weight has shape (100,)"),
    (("level_01/weight", {"data_type": "int32"}), "TypeError"),
    (("level_01/weight", {"node_type": "group"}), "cannot be read"),
    (("marginals/quantiles", {"shape": [1, 7, 3, 2]}), "marginals/quantiles has shape (1, 7, 3, 2)"),
    (("marginals/quantile", "reversed"), "not increasing quantile levels in (0, 1)"),
    (("marginals/quantile", "times 10"), "not increasing quantile levels in (0, 1)"),
])
def test_garbled_metadata_or_labels_are_one_store_error(tmp_path, edit, found):
    """An array's zarr.json edited (its shape, type or kind) or the quantile labels made
    wrong: reading the level or the marginals is one StoreError naming it, never zarr's or
    numpy's own error, and never labels that readers would export."""
    store = finished(tmp_path / "run.zarr")
    name, change = edit
    if change == "reversed" or change == "times 10":
        arr = zarr.open_array(store.path / name, mode="r+")
        arr[:] = arr[:][::-1] if change == "reversed" else arr[:] * 10
    else:
        _edit_json(store.path / name / "zarr.json", **change)
    reopened = ScenarioStore.open(store.path)
    with pytest.raises(StoreError, match=re.escape(found)):
        if name.startswith("marginals"):
            reopened.read_marginals()
        else:
            level = int(name[6:8])
            reopened.read_level(level, 0, reopened.level_size(level))


@pytest.mark.parametrize("lost", ["level_02/paths/c.1.0.0.0", "marginals/std/c/0/0/0"])
def test_a_killed_writes_temporary_file_does_not_stand_in_for_a_lost_chunk(tmp_path, lost):
    """zarr writes each file as <name>.<uuid>.partial and renames it; kill -9 in between
    leaves the temporary file. It is no chunk: the lost one is still found, and a resume
    deletes the leftovers."""
    store = finished(tmp_path / "run.zarr")
    target = store.path / lost
    leftover = target.with_suffix(".0f3a9c.partial")  # zarr's own naming
    leftover.write_bytes(b"half a chunk")
    assert ScenarioStore.open(store.path).damage() is None  # a leftover alone is no damage
    target.unlink()
    assert "lacks 1 of its" in ScenarioStore.open(store.path).damage()
    assert remove_temporary_files(store.path) == 0  # seconds old: maybe a live writer's
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    assert remove_temporary_files(store.path) == 1
    assert not leftover.exists()


@pytest.mark.parametrize("lost", ["day", "maturity", "moneyness", "node", "empty day",
                                  "empty maturity", "empty metadata"])
def test_create_level_finishes_a_level_that_a_crash_left_half_made(tmp_path, lost):
    """A crash between zarr's create_array and the write of a coordinate leaves it reading as
    its fill value, a crash of the machine a file empty; the resume's create_level writes
    it again, or starts the unfinished level over (and still refuses other days)."""
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, H)
    store.create_level(1, 3, days, (3, 2))
    name = lost.split()[-1]
    if lost == "empty metadata":
        (store.path / "level_01" / "paths" / "zarr.json").write_bytes(b"")
    elif lost.startswith("empty"):
        for f in (store.path / "level_01" / name).rglob("*"):
            if f.is_file() and f.name != "zarr.json":
                f.write_bytes(b"")
    else:
        for f in (store.path / "level_01" / name).glob("c*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    store = ScenarioStore.open(store.path, "r+")
    store.create_level(1, 3, days, (3, 2))
    ds = xr.open_zarr(store.path, group="level_01")
    np.testing.assert_array_equal(ds["day"].values, days.astype("datetime64[ns]"))
    np.testing.assert_array_equal(ds["maturity"].values, GRID["maturity_days"])
    np.testing.assert_array_equal(ds["moneyness"].values, GRID["moneyness"])
    np.testing.assert_array_equal(ds["node"].values, np.arange(3))
    with pytest.raises(StoreError, match="covers other days"):
        store.create_level(1, 3, business_days_after("2024-02-01", H), (3, 2))


def test_an_io_error_while_resuming_a_level_keeps_what_it_holds(tmp_path, monkeypatch):
    """Only metadata that does not decode starts an unfinished level over; a full disk is an
    error to fix and resume from, with the level's written chunks kept."""
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, H)
    store.create_level(1, 3, days, (3, 2))
    write_level(store, 1, {k: v[:2] for k, v in tiny_tree()[1].items()})
    store = ScenarioStore.open(store.path, "r+")

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_consolidate", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.create_level(1, 3, days, (3, 2))
    assert ScenarioStore.open(store.path).chunks_done(1).tolist() == [True, False]


@pytest.mark.parametrize("lost", ["quantile", "day", "quantiles", "std"])
def test_create_marginals_finishes_what_a_crash_left_half_made(tmp_path, lost):
    store = make_store(tmp_path / "run.zarr")
    days = business_days_after(START, 2 * H)
    store.create_marginals(days, QUANTILES)
    target = store.path / "marginals" / lost
    if lost in ("quantile", "day"):  # the array made, its values not written
        for f in target.glob("c*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    else:  # the crash came before this array was made
        shutil.rmtree(target)
        store = ScenarioStore.open(store.path, "r+")
    store.create_marginals(days, QUANTILES)
    ds = xr.open_zarr(store.path, group="marginals")
    np.testing.assert_array_equal(ds["quantile"].values, QUANTILES)
    np.testing.assert_array_equal(ds["day"].values, days.astype("datetime64[ns]"))
    assert ds["std"].shape == (2 * H, 3, 2)
    with pytest.raises(StoreError, match="other quantile levels"):
        store.create_marginals(days, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.98])


def test_a_level_whose_weight_chunk_is_lost_is_not_marked_complete(tmp_path):
    """A lost weight chunk reads as NaN (its fill value): NaN sums fail every comparison."""
    store = make_store(tmp_path / "run.zarr")
    store.create_level(1, 3, business_days_after(START, H), (3, 2))
    write_level(store, 1, tiny_tree()[1])
    (store.path / "level_01" / "weight" / "c.1").unlink()
    with pytest.raises(StoreError, match="weight of node 2 is nan"):
        ScenarioStore.open(store.path, "r+").mark_level_complete(1)


def test_an_undecodable_chunk_is_one_store_error(tmp_path):
    store = finished(tmp_path / "run.zarr")
    (store.path / "level_02" / "paths" / "c.0.0.0.0").write_bytes(b"garbage")
    reopened = ScenarioStore.open(store.path)
    assert reopened.damage() is None  # the file is there: only reading finds it
    with pytest.raises(StoreError, match=r"level_02 cannot be read \(.*\); the store is damaged"):
        reopened.read_level(2)
    (store.path / "level_01" / "done" / "c.0").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="level_01/done cannot be read"):
        ScenarioStore.open(store.path).chunks_done(1)
