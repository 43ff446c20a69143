"""The driver without Ray: a valid store, the same bytes for any batch size, the Monte Carlo twin,
resume after a crash, refused resumes, the exact marginal sums, and the CLI end to end.

One small kNN-conformal sampler (toy panel, tiny CVAE) is fitted once per session
(``fitted_sampler``) and shared with tests/test_engine_ray.py.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from typer.testing import CliRunner

from engine import driver, tree
from engine.audit import check_store
from engine.cli import app
from engine.config import Config, TreeConfig
from engine.data import io as data_io
from engine.errors import ConfigError, DataError, StoreError
from engine.model import load_checkpoint
from engine.rng import LOOKAHEAD, TREE, node_rng
from engine.samplers import make_sampler
from engine.store import ScenarioStore, terminal_paths
from engine.train import train_model
from tests.conftest import backfill_cmd, cli_toml, tiny_config, toy_panel

DEPTH, M, K, CHUNK = 3, 32, 5, 4


def run_config(**overrides) -> Config:
    """The tiny model of conftest, M = 32 paths, depth 3, chunks of 4 nodes, 64 bins."""
    base = {"tree.n_samples": M, "tree.depth": DEPTH, "engine.backend": "inline",
            "engine.batch_size": 7, "store.chunk_nodes": CHUNK, "store.marginal_bins": 64,
            "train.epochs": 1}
    return tiny_config(**{**base, **overrides})


@functools.cache
def fitted_sampler(method: str = "knn-conformal"):
    """(panel, sampler) fitted once per session on the toy panel."""
    cfg = run_config()
    panel = toy_panel()
    sampler = make_sampler(method, cfg)
    model = None
    if sampler.uses_model:
        model = train_model(panel, np.arange(cfg.data.context - 1, 300), cfg).model
    return panel, sampler.fit(panel, model)


def make_run(path: Path, cfg: Config, kind: str = "tree", method: str = "knn-conformal",
             n_paths: int | None = None, resume: bool = False, overwrite: bool = True,
             sampler=None, **kwargs) -> ScenarioStore:
    """Open (or resume) a store for the toy panel's last day and expand it (with ``method``'s
    session sampler, or ``sampler``)."""
    panel, fitted = fitted_sampler(method)
    sampler = fitted if sampler is None else sampler
    c = cfg.data.context
    i = panel.n_days - 1
    store = driver.open_store(path, kind=kind, config=cfg, fingerprint=panel.fingerprint,
                              start_date=str(panel.dates[i]), grid=panel.grid_dict(),
                              start_context=panel.surface[i - c + 1: i + 1], n_paths=n_paths,
                              resume=resume, overwrite=overwrite and not resume)
    driver.run_store(store, sampler, cfg, **kwargs)
    return store


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of every group of a store, by 'group/array'."""
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    return {f"{name}/{a}": arr[:] for name, group in root.groups() for a, arr in group.arrays()}


def assert_same_bytes(a: Path, b: Path) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    differ = {}
    for key in sorted(x):
        assert x[key].dtype == y[key].dtype, key
        if x[key].tobytes() != y[key].tobytes():
            rows = (x[key] != y[key]).reshape(len(x[key]), -1).any(axis=1) \
                if x[key].ndim else np.ones(1, bool)
            differ[key] = np.flatnonzero(rows)[:8].tolist()
    assert not differ, f"arrays that differ (first rows): {differ}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The reference tree: inline, batch 7."""
    path = tmp_path_factory.mktemp("ref") / "run.zarr"
    make_run(path, run_config())
    return path


def test_inline_run_writes_a_valid_store(reference):
    store = ScenarioStore.open(reference)
    assert store.levels_complete == DEPTH
    attrs = zarr.open_group(reference, mode="r").attrs.asdict()
    for key in ("schema_version", "config", "seed", "grid", "fingerprint", "start_date",
                "levels_complete", "start_context"):
        assert key in attrs, key
    assert attrs["config"]["tree"]["n_samples"] == M
    panel, _ = fitted_sampler()
    assert attrs["fingerprint"] == panel.fingerprint
    assert attrs["start_date"] == str(panel.dates[-1])
    for level in range(1, DEPTH + 1):
        data = store.read_level(level)
        n = K ** level
        assert data["paths"].shape == (n, 6, 2, 3)
        assert abs(data["weight"].sum() - 1.0) < 1e-9
        assert np.all(data["weight"] > 0)
        n_prev = 1 if level == 1 else K ** (level - 1)
        assert np.all((data["parent"] >= 0) & (data["parent"] < n_prev))
        np.testing.assert_array_equal(data["parent"], np.repeat(np.arange(n_prev), K))
        np.testing.assert_array_equal(data["branch"], np.tile(np.arange(K), n_prev))
        assert np.all(np.isfinite(data["paths"])) and np.all(data["paths"] > 0)
        ds = xr.open_zarr(reference, group=f"level_{level:02d}")
        assert ds["paths"].dims == ("node", "day", "moneyness", "maturity")
        for dim in ("node", "day", "moneyness", "maturity"):
            assert dim in ds.coords
        assert np.issubdtype(ds["day"].dtype, np.datetime64)
        np.testing.assert_array_equal(ds["node"].values, np.arange(n))
    m = xr.open_zarr(reference, group="marginals")
    assert m["quantiles"].dims == ("day", "quantile", "moneyness", "maturity")
    assert m.sizes["day"] == DEPTH * 6
    for name in ("quantiles", "mean", "std"):
        assert np.all(np.isfinite(m[name].values)), name
    q = m["quantiles"].values
    assert np.all(np.diff(q, axis=1) >= 0)  # quantiles increase with the level
    assert np.all(m["std"].values > 0)
    # day coordinates: level k's days follow level k-1's
    days = np.concatenate([store.level_days(k) for k in range(1, DEPTH + 1)])
    np.testing.assert_array_equal(days, m["day"].values.astype("datetime64[D]"))
    assert not Path(str(reference) + ".partial").exists()  # no checkpoint left behind


def test_children_continue_their_parents_context(reference):
    """A level-2 node's path starts from its level-1 parent's last kept day: its first
    sampled day stays near it (the toy market moves a few percent a day)."""
    store = ScenarioStore.open(reference)
    one, two = store.read_level(1), store.read_level(2)
    last = one["paths"][two["parent"], -1]  # (25, n_m, n_tau)
    first = two["paths"][:, 0]
    assert np.median(np.abs(np.log(first / last))) < 0.2
    full = store.ancestor_paths(2, 0, 25)
    np.testing.assert_array_equal(full[:, :6], one["paths"][two["parent"]])


def test_batch_size_does_not_change_a_byte(reference, tmp_path):
    make_run(tmp_path / "b256.zarr", run_config(**{"engine.batch_size": 256}))
    assert_same_bytes(reference, tmp_path / "b256.zarr")
    make_run(tmp_path / "b1.zarr", run_config(**{"engine.batch_size": 1}))
    assert_same_bytes(reference, tmp_path / "b1.zarr")


def test_monte_carlo_writes_the_same_layout(tmp_path):
    n = 24
    cfg = run_config(**{"tree.depth": 2})
    store = make_run(tmp_path / "mc.zarr", cfg, kind="mc", n_paths=n)
    assert store.meta.kind == "mc" and store.levels_complete == 2
    for level in (1, 2):
        data = store.read_level(level)
        assert data["paths"].shape == (n, 6, 2, 3)
        np.testing.assert_allclose(data["weight"], 1.0 / n, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(data["branch"], 0)
        np.testing.assert_array_equal(data["parent"], 0 if level == 1 else np.arange(n))
        assert np.all(np.isfinite(data["paths"])) and np.all(data["paths"] > 0)
        xr.open_zarr(tmp_path / "mc.zarr", group=f"level_{level:02d}")
    m = store.read_marginals()
    assert np.all(np.isfinite(m["quantiles"])) and m["quantiles"].shape[0] == 12
    # the marginal mean is the mean of the N paths themselves
    paths = np.concatenate([store.read_level(1)["paths"], store.read_level(2)["paths"]], 1)
    np.testing.assert_allclose(m["mean"], paths.astype(np.float64).mean(0), rtol=1e-5)
    # paths are own draws (a kNN bootstrap repeats a residual now and then), and batching
    # changes nothing
    assert len(np.unique(store.read_level(1)["paths"][:, 0, 0, 0])) > n // 2
    make_run(tmp_path / "mc5.zarr", run_config(**{"tree.depth": 2, "engine.batch_size": 5}),
             kind="mc", n_paths=n)
    assert_same_bytes(tmp_path / "mc.zarr", tmp_path / "mc5.zarr")


class Crash(RuntimeError):
    pass


def crashed_run(path: Path, cfg: Config | None = None, level: int = 2, after: int = 3,
                **kwargs) -> None:
    """Run into ``path`` and crash once ``after`` chunks of ``level`` are written."""
    written = []

    def crash(lv, chunk):
        written.append(lv)
        if lv == level and written.count(level) == after:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        make_run(path, cfg or run_config(), after_chunk=crash, **kwargs)


@pytest.mark.parametrize("checkpoint, resume_batch", [("kept", 7), ("lost", 3),
                                                       ("truncated", 7), ("empty", 3)])
def test_resume_after_a_crash_gives_the_same_bytes(reference, tmp_path, checkpoint,
                                                   resume_batch):
    path = tmp_path / "crash.zarr"
    crashed_run(path, checkpoint_seconds=0)
    store = ScenarioStore.open(path)
    assert store.levels_complete == 1
    assert store.chunks_done(2).sum() == 3
    partial = Path(str(path) + ".partial") / "level_02.npz"
    assert partial.is_file()  # saved on the way out
    # lost or damaged (a crash while the disk filled up): the marginals of finished tasks
    # are recomputed rather than trusted
    if checkpoint == "lost":
        partial.unlink()
    elif checkpoint == "truncated":
        partial.write_bytes(partial.read_bytes()[:100])
    elif checkpoint == "empty":
        partial.write_bytes(b"")
    # the engine section may change on resume (batch size here)
    stats = []
    resumed = make_run(path, run_config(**{"engine.batch_size": resume_batch}), resume=True,
                       after_chunk=lambda lv, c: stats.append((lv, c)))
    assert resumed.levels_complete == DEPTH
    assert sum(lv == 2 for lv, _ in stats) == store.n_chunks(2) - 3  # done chunks not rewritten
    assert_same_bytes(reference, path)
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["paths/c.1.0.0.0", "weight/c.2", "done/c.1"])
def test_resume_redoes_a_done_chunk_whose_data_did_not_reach_the_disk(reference, tmp_path,
                                                                      damage):
    """After a crash of the machine a done marker may be on disk while its chunk is not
    (or is empty): the resume reads the level's done chunks back and writes those again."""
    path = tmp_path / "crash.zarr"
    crashed_run(path)
    target = path / "level_02" / damage
    assert target.is_file()
    target.unlink() if damage.startswith("weight") else target.write_bytes(b"")
    store = ScenarioStore.open(path)
    if not damage.startswith("done"):  # (an empty marker does not decode at all)
        assert store.chunks_done(2).sum() == 3
    assert store.chunks_intact(2).sum() == 2
    rewritten = []
    make_run(path, run_config(), resume=True, after_chunk=lambda lv, c: rewritten.append((lv, c)))
    assert (2, int(damage.split(".")[1])) in rewritten
    assert_same_bytes(reference, path)


def test_a_chunk_write_failing_on_the_writer_thread_stops_the_run_and_resume_mends_it(
        reference, tmp_path, monkeypatch):
    """The driver hands chunks to the store's writer threads: a write that fails there (a
    full disk, here chunk 3 of level 2) stops the run with that error, its chunk stays
    unmarked, and a resume gives the clean run's bytes."""
    import errno

    from engine import store as store_module

    write_rows, failed = store_module._write_rows, []

    def fails_once(lv, rows, data, chunks):
        if lv.group.path == "level_02" and chunks.start == 3 and not failed:
            failed.append(chunks.start)
            raise OSError(errno.ENOSPC, "No space left on device")
        write_rows(lv, rows, data, chunks)

    monkeypatch.setattr(store_module, "_write_rows", fails_once)
    path = tmp_path / "full.zarr"
    with pytest.raises(OSError, match="No space left"):
        make_run(path, run_config())
    monkeypatch.setattr(store_module, "_write_rows", write_rows)
    store = ScenarioStore.open(path)
    assert store.levels_complete == 1
    assert failed == [3] and not store.chunks_done(2)[3]
    make_run(path, run_config(), resume=True)
    assert_same_bytes(reference, path)


def test_resume_with_another_sampler_is_refused(reference, tmp_path):
    """Config, data and seed may match while the fitted sampler differs (another --model, a
    model retrained elsewhere): the store's sampler fingerprint refuses the mix, and the
    store still resumes with the sampler that began it."""
    path = tmp_path / "crash.zarr"
    crashed_run(path, after=1)
    _, sampler = fitted_sampler()
    other = copy.deepcopy(sampler)
    other.scale_ = other.scale_ * 1.001  # another calibration: other draws
    with pytest.raises(StoreError, match="other paths than the one that began it"):
        make_run(path, run_config(), resume=True, sampler=other)
    assert ScenarioStore.open(path).levels_complete == 1  # refused before writing anything
    make_run(path, run_config(), resume=True)
    assert_same_bytes(reference, path)


def test_marginals_half_made_before_level_1_completes_are_made_again_on_resume(reference,
                                                                              tmp_path):
    """A crash while the marginals' arrays are made (the group there, an array not yet)
    is no damage: before a level is complete the resume makes them again."""
    path = tmp_path / "crash.zarr"
    crashed_run(path, level=1, after=1)
    assert ScenarioStore.open(path).levels_complete == 0
    shutil.rmtree(path / "marginals" / "quantiles")
    make_run(path, run_config(), resume=True)
    assert_same_bytes(reference, path)


@pytest.mark.parametrize("kind", ["tree", "mc"])
@pytest.mark.parametrize("lookahead", [0, 20])
def test_the_store_counts_the_marginal_days_each_level_writes_as_the_driver_plans(kind,
                                                                               lookahead):
    from engine.store import levels_with_marginals

    for depth in (1, 2, 3, 4):
        cfg = run_config(**{"tree.depth": depth, "tree.lookahead": lookahead})
        written = 0
        assert levels_with_marginals(kind, depth, lookahead, 0) == 0
        for level in range(1, depth + 1):
            plan = driver.level_plan(kind, level, depth, cfg, 5, (2, 3))
            assert plan.marginal_day0 == written * 5  # after the earlier levels' writes
            written += plan.marginal_days // 5
            assert levels_with_marginals(kind, depth, lookahead, level) == written


def test_a_depth_edited_by_hand_is_refused_before_the_resume_fits(reference, tmp_path):
    """The store's depth and its config's raised by hand to resume into a deeper tree: the
    marginals written for the old depth no longer fit, found as the store opens (a run
    opens it before the minutes of fitting), not after."""
    path = tmp_path / "deeper.zarr"
    shutil.copytree(reference, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["depth"] = DEPTH + 1
    meta["attributes"]["config"]["tree"]["depth"] = DEPTH + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    before = store_arrays(path)
    s = len(ScenarioStore.open(reference).level_days(1))
    with pytest.raises(StoreError, match=f"marginals holds {DEPTH * s} days x 7 quantile "
                       f"levels, but its run of depth {DEPTH + 1} covers {(DEPTH + 1) * s} days"):
        make_run(path, run_config(**{"tree.depth": DEPTH + 1}), resume=True,
                 sampler="not fitted: refused before it is used")
    after = store_arrays(path)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_check_passes_an_unfinished_store_on_its_written_chunks(tmp_path):
    path = tmp_path / "crash.zarr"

    def crash(level, chunk):
        if level == 2 and chunk == 2:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        make_run(path, run_config(), after_chunk=crash)
    report = check_store(ScenarioStore.open(path))
    assert report["ok"] and not report["finished"], report["problems"]
    two = report["levels"][1]
    assert (two["level"], two["complete"], two["chunks_written"]) == (2, False, 3)
    assert two["worst_branch_error"] is None  # no sums over a level in progress
    result = _invoke(["check", "--store", path])
    assert result.exit_code == 0
    meta = ScenarioStore.open(path).meta  # the options a resume must match, from the store
    assert (f"backfill run --store {path} --resume --start {meta.start_date} --depth "
            f"{meta.depth} --seed {meta.seed}`") in " ".join(result.stderr.split())


@pytest.mark.parametrize("lookahead", [None, 0])
def test_a_level_in_progress_half_written_to_the_marginals_is_not_damage(reference, tmp_path,
                                                                         lookahead):
    """A crash between the marginals' arrays of a level's days (quantiles written, mean
    and std not) is an unfinished run, not a damaged one: check passes it and the readers
    give the days the complete levels wrote (with the lookahead, the next level's too)."""
    cfg = run_config() if lookahead is None else run_config(**{"tree.lookahead": lookahead})
    path = tmp_path / "crash.zarr"
    crashed_run(path, cfg, after=1)
    store = ScenarioStore.open(path)
    assert store.levels_complete == 1
    s = len(store.level_days(1))
    quantiles = zarr.open_array(path / "marginals" / "quantiles", mode="r+")
    written = int(np.isfinite(quantiles[:]).all(axis=(1, 2, 3)).sum())
    assert written == (2 * s if cfg.tree.lookahead else s)
    assert store.final_marginal_days(DEPTH * s) == written
    full = quantiles[:]
    quantiles[written: written + 2] = full[written - 2: written]  # a next day, quantiles alone
    report = check_store(ScenarioStore.open(path))
    assert report["ok"], report["problems"]
    m = ScenarioStore.open(path).read_marginals()
    assert np.isnan(m["quantiles"][written:]).all()
    np.testing.assert_array_equal(m["quantiles"][:written], full[:written])
    result = _invoke(["marginals", "--store", path, "--out", tmp_path / "m.csv"])
    assert result.exit_code == 0, result.stderr
    assert pd.read_csv(tmp_path / "m.csv")["date"].nunique() == written


def _corrupt_parent(root: Path) -> None:
    arr = zarr.open_array(root / "level_03" / "parent", mode="r+")
    p = arr[:]
    p[7] = p[12]  # row 7 now hangs under another node: one child lost, one doubled
    arr[:] = p


def _corrupt_branch(root: Path) -> None:
    arr = zarr.open_array(root / "level_01" / "branch", mode="r+")
    b = arr[:]
    arr[:] = b[[0, 2, 1, 3, 4]]


def _corrupt_weight(root: Path) -> None:
    """Mass moved between two siblings: every level still sums to 1."""
    arr = zarr.open_array(root / "level_02" / "weight", mode="r+")
    w = arr[:]
    w[3], w[4] = w[3] + 1e-4, w[4] - 1e-4
    arr[:] = w


def _corrupt_path(root: Path) -> None:
    arr = zarr.open_array(root / "level_02" / "paths", mode="r+")
    arr[5, 2, 0, 0] = -0.1


def _corrupt_marginals(root: Path) -> None:
    arr = zarr.open_array(root / "marginals" / "quantiles", mode="r+")
    q = arr[:]
    q[4, 3] = q[4, 2] * 0.5
    arr[:] = q


def _garble(root: Path) -> None:
    (root / "level_03" / "paths" / "c.5.0.0.0").write_bytes(b"not a chunk")


def _garble_days(root: Path) -> None:
    """A level's day coordinate garbled (check read it outside the store's guard)."""
    (chunk,) = [f for f in (root / "level_01" / "day").rglob("*")
                if f.is_file() and f.name != "zarr.json"]
    chunk.write_bytes(b"garbage!")


def _lose(root: Path) -> None:
    (root / "level_02" / "paths" / "c.1.0.0.0").unlink()


def _lose_coordinate(root: Path) -> None:
    """A grid coordinate's chunk file lost: xarray would read the maturities as zeros."""
    (chunk,) = [f for f in (root / "level_01" / "maturity").rglob("*")
                if f.is_file() and f.name != "zarr.json"]
    chunk.unlink()


def _lose_level_metadata(root: Path) -> None:
    (root / "level_02" / "zarr.json").unlink()


def _root_attribute(**attrs):
    """Edit the store's root attributes by hand (zarr.json), as a user's script might."""
    def edit(root: Path) -> None:
        meta = json.loads((root / "zarr.json").read_text())
        meta["attributes"].update(attrs)
        (root / "zarr.json").write_text(json.dumps(meta))
    edit.__name__ = f"edit_{'_'.join(attrs)}"
    return edit


@pytest.mark.parametrize("corrupt, words", [
    (_corrupt_parent, ["level 3", "row 7 has parent"]),
    (_corrupt_branch, ["level 1", "row 1 has branch 2"]),
    (_corrupt_weight, ["level 3", "children of frontier node 3"]),
    (_corrupt_path, ["level 2", "row 5", "not a finite positive vol"]),
    (_corrupt_marginals, ["marginals", "quantiles fall"]),
    (_garble, ["level 3", "chunk 5", "cannot be read"]),
    (_garble_days, ["level_01/day cannot be read"]),
    (_lose, ["level_02/paths lacks 1"]),
    (_lose_coordinate, ["level_01/maturity lacks 1"]),
    (_lose_level_metadata, ["level_02 is missing"]),
    (_root_attribute(start_context=[[0.2]]), ["start context is not 12 days", "(1, 1)"]),
    (_root_attribute(grid={"moneyness": [1.0], "maturity_days": [30.0]}),
     ["start context", "1x1 grid"]),
])
def test_check_finds_each_kind_of_damage(reference, tmp_path, corrupt, words):
    assert check_store(ScenarioStore.open(reference))["ok"]
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    corrupt(path)
    with warnings.catch_warnings(record=True) as caught:  # the report says it: no more lines
        warnings.simplefilter("always")
        report = check_store(ScenarioStore.open(path))
    assert not caught, [str(w.message) for w in caught]
    assert not report["ok"]
    assert all(w in report["problems"][0] for w in words), report["problems"]
    err = _one_line_error(["check", "--store", path], *words)
    assert "cannot be trusted" in err


def test_a_start_context_edited_by_hand_is_refused_by_every_reader(reference, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    context = np.asarray(ScenarioStore.open(path).run_attr("start_context"))
    context[0, 0, 0] = -1.0
    _root_attribute(start_context=context.tolist())(path)
    for command in (["check"], ["var"], ["paths", "--out", tmp_path / "p.npz"],
                    ["marginals", "--out", tmp_path / "m.csv"],
                    ["plot", "--out", tmp_path / "f.png"]):
        _one_line_error([*command, "--store", path], "start context is not", "positive vols")


def test_a_path_value_made_nan_is_refused_by_every_reader(reference, tmp_path):
    """A chunk rewritten with a NaN after the run decodes fine: each reader of the paths
    refuses it (a VaR of NaN, or an export holding it, would pass the damage on)."""
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    arr = zarr.open_array(path / "level_02" / "paths", mode="r+")
    arr[5, -1, 0, 0] = np.nan
    for command in (["var"], ["var", "--json"], ["var", "--tail", tmp_path / "t.csv"],
                    ["paths", "--out", tmp_path / "p.npz"],
                    ["plot", "--out", tmp_path / "f.png", "--paths", "5"]):
        _one_line_error([*command, "--store", path], "level 2 row 5", "not a finite positive vol",
                        "backfill check", "damaged")
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("corrupt, words", [
    (_corrupt_marginals, ["quantiles fall as the level rises"]),
    (lambda root: zarr.open_array(root / "marginals" / "mean", mode="r+").__setitem__(
        (4,), np.nan) or zarr.open_array(root / "marginals" / "std", mode="r+").__setitem__(
        (4,), np.nan) or zarr.open_array(root / "marginals" / "quantiles",
                                         mode="r+").__setitem__((4,), np.nan),
     ["not written although their level is complete"]),
    (lambda root: zarr.open_array(root / "marginals" / "std", mode="r+").__setitem__(
        (3, 0, 0), np.nan), ["partly written"]),
])
def test_marginals_edited_after_the_run_are_refused_by_their_readers(reference, tmp_path,
                                                                      corrupt, words):
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    corrupt(path)
    for command in (["marginals", "--out", tmp_path / "m.csv"],
                    ["plot", "--out", tmp_path / "f.png"]):
        _one_line_error([*command, "--store", path], "marginals: on", *words, "backfill check",
                        "damaged")
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "f.png").exists()
    assert any(all(w in p for w in words) for p in check_store(ScenarioStore.open(path))["problems"])


def test_no_reader_writes_inside_the_store(reference, tmp_path):
    """A store's folder holds the store alone: an export written into it would be deleted
    by a later run with --overwrite, so each reader refuses one there (through a link too)."""
    path = tmp_path / "run.zarr"
    shutil.copytree(reference, path)
    (tmp_path / "link").symlink_to(path)
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    for flag, command, name in (("--out", ["marginals"], "m.csv"),
                                ("--out", ["paths"], "level_01/p.npz"),
                                ("--out", ["plot"], "f.png"),
                                ("--plot", ["var"], "v.png"),
                                ("--tail", ["var"], "t.csv")):
        _one_line_error([*command, flag, tmp_path / "link" / name, "--store", path],
                        f"{flag} ", "lies inside the store", "beside the store")
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before


@pytest.mark.parametrize("group", ["level_02", "marginals"])
def test_a_group_whose_metadata_does_not_decode_is_one_store_error(reference, tmp_path, group):
    """A machine crash can leave a group's zarr.json empty: every reader, check included,
    says so in one line."""
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    (path / group / "zarr.json").write_bytes(b"")
    for command in (["check"], ["var"], ["paths", "--out", tmp_path / "p.npz"],
                    ["marginals", "--out", tmp_path / "m.csv"]):
        _one_line_error([*command, "--store", path], "cannot be read", "damaged")


def test_a_garbled_chunk_read_among_many_is_one_line_every_time(reference, tmp_path):
    """zarr reads a level's chunks concurrently; when one fails, the others' pending reads
    must not be reported at exit (they were, now and then, as asyncio tracebacks)."""
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    _garble(path)
    for _ in range(6):
        r = subprocess.run(backfill_cmd("paths", "--store", path, "--out", tmp_path / "p.npz"),
                           check=False, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("value", ["x", 1.5, None, [1], 4])
def test_a_levels_complete_attribute_edited_by_hand_is_one_store_error(reference, tmp_path,
                                                                       value):
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    _root_attribute(levels_complete=value)(path)
    for command in (["check"], ["var"], ["paths", "--out", tmp_path / "p.npz"]):
        _one_line_error([*command, "--store", path], "levels_complete is", "damaged")


class _FailingDraws:
    """The session sampler, whose kNN half raises a DataError from its ``fail_at``-th call on
    (from whichever thread makes it)."""

    def __init__(self, sampler, fail_at: int):
        import threading

        self._sampler, self._fail_at, self._calls = sampler, fail_at, 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def draw(self, *args, **kwargs):
        with self._lock:
            self._calls += 1
            fail = self._calls >= self._fail_at
        if fail:
            raise DataError("simulated bad draw")
        return self._sampler.draw(*args, **kwargs)


def test_inline_threads_give_the_same_bytes_and_a_failed_task_leaves_a_resumable_store(
        reference, tmp_path):
    """engine.threads > 1 expands several batches at once in this process: same bytes as one
    at a time; a task that raises in a worker thread (in a level with marginals and a
    lookahead) stops the run with that error, leaves the level's checkpoint, and the store
    resumes (with another thread count and batch size) to the same bytes."""
    make_run(tmp_path / "t3.zarr", run_config(**{"engine.threads": 3, "engine.batch_size": 2}))
    assert_same_bytes(reference, tmp_path / "t3.zarr")
    path = tmp_path / "fail.zarr"
    _, sampler = fitted_sampler()
    # draw calls: 3 in level 1, then 3 a task in level 2 (its own draws, the lookahead's,
    # its own again): level 2's three 2-node tasks make calls 4..12
    failing = _FailingDraws(sampler, fail_at=10)
    cfg = run_config(**{"engine.threads": 2, "engine.batch_size": 2})
    with pytest.raises(DataError, match="simulated bad draw"):
        make_run(path, cfg, sampler=failing, checkpoint_seconds=0)
    store = ScenarioStore.open(path)
    assert store.levels_complete == 1 and not store.chunks_done(2).all()
    assert (Path(str(path) + ".partial") / "level_02.npz").is_file()
    make_run(path, run_config(**{"engine.threads": 4, "engine.batch_size": 3}), resume=True)
    assert_same_bytes(reference, path)


def test_a_stopped_task_gives_up_at_its_next_slice():
    """The threaded backend's close() sets the stop event: a task then raises at its next
    slice of draws instead of finishing its batch."""
    import threading

    panel, sampler = fitted_sampler()
    cfg = run_config()
    c = cfg.data.context
    ctx = np.broadcast_to(panel.surface[-c:], (4, c) + panel.grid_shape).copy()
    batch = driver.Batch(0, 0, np.arange(4), np.zeros(4, np.int64), np.full(4, 0.25),
                         np.ones(4, bool), ctx)
    plan = driver.level_plan("tree", 1, DEPTH, cfg, 6, panel.grid_shape)
    stop = threading.Event()
    assert driver.expand_batch(sampler, batch, plan, stop=stop).n_nodes == 4
    stop.set()
    with pytest.raises(driver._Stopped):
        driver.expand_batch(sampler, batch, plan, stop=stop)


def test_resume_skips_finished_tasks(tmp_path):
    path = tmp_path / "skip.zarr"

    def crash(level, chunk):
        if level == 3 and chunk == 20:
            raise Crash("simulated crash")

    cfg = run_config(**{"engine.batch_size": 1})
    with pytest.raises(Crash):
        make_run(path, cfg, after_chunk=crash, checkpoint_seconds=0)
    _, sampler = fitted_sampler()
    store = ScenarioStore.open(path, "r+")
    stats = driver.run_store(store, sampler, cfg)
    # chunk c of level 3 holds children 4c..4c+3 of parents (4c)//5 .. (4c+3)//5: 21 chunks
    # written -> the parents of children 0..83 are done (their chunks and marginals)
    assert [s.level for s in stats] == [3]
    assert stats[0].nodes == 25 - 84 // 5


def test_incompatible_resume_is_refused(reference, tmp_path):
    panel, _ = fitted_sampler()
    c, i = 12, panel.n_days - 1
    kwargs = {"kind": "tree", "fingerprint": panel.fingerprint, "grid": panel.grid_dict(),
              "start_date": str(panel.dates[i]), "start_context": panel.surface[i - c + 1:i + 1],
              "resume": True}
    with pytest.raises(StoreError, match="seed"):
        driver.open_store(reference, config=run_config(seed=5), **kwargs)
    with pytest.raises(StoreError, match="tree.n_samples"):
        driver.open_store(reference, config=run_config(**{"tree.n_samples": 64}), **kwargs)
    with pytest.raises(StoreError, match="fingerprint"):
        driver.open_store(reference, config=run_config(), **{**kwargs, "fingerprint": "x"})
    with pytest.raises(StoreError, match="start date"):
        driver.open_store(reference, config=run_config(),
                          **{**kwargs, "start_date": str(panel.dates[i - 1])})
    with pytest.raises(StoreError, match="holds a tree run"):
        driver.open_store(reference, config=run_config(), n_paths=3, **{**kwargs, "kind": "mc"})
    with pytest.raises(ConfigError, match="--overwrite"):
        driver.open_store(reference, config=run_config(), overwrite=True, **kwargs)
    with pytest.raises(StoreError, match="not empty"):
        driver.open_store(reference, config=run_config(), **{**kwargs, "resume": False})
    with pytest.raises(StoreError, match="does not exist"):
        driver.open_store(tmp_path / "none.zarr", config=run_config(), **kwargs)
    # the engine section may differ: where and how wide a run goes cannot change its bytes
    driver.open_store(reference, config=run_config(**{"engine.batch_size": 99}), **kwargs)


def test_pruned_frontier_is_resampled_once_per_level(tmp_path):
    cfg = run_config(**{"tree.max_frontier": 10})
    store = make_run(tmp_path / "p7.zarr", cfg)
    assert [store.level_size(k) for k in (1, 2)] == [5, 25]
    assert store.level_size(3) <= 50 and store.level_size(3) % 5 == 0
    for k in (1, 2, 3):
        assert abs(store.read_level(k)["weight"].sum() - 1.0) < 1e-9
    assert np.all(np.diff(store.read_level(3)["parent"]) >= 0)
    make_run(tmp_path / "p2.zarr", run_config(**{"tree.max_frontier": 10,
                                                 "engine.batch_size": 2}))
    assert_same_bytes(tmp_path / "p7.zarr", tmp_path / "p2.zarr")
    cut = make_run(tmp_path / "w.zarr", run_config(**{"tree.min_weight": 0.03}))
    assert cut.level_size(3) < 125
    for pruned in (store, cut):  # the check rebuilds the pruned / resampled frontiers
        report = check_store(pruned)
        assert report["ok"], report["problems"]
        assert [lv["rows"] for lv in report["levels"]] == [pruned.level_size(k) for k in (1, 2, 3)]


def test_generic_sampler_uses_the_same_path(tmp_path):
    cfg = run_config(**{"tree.depth": 2})
    a = make_run(tmp_path / "hb.zarr", cfg, method="hist-bootstrap")
    assert a.levels_complete == 2
    make_run(tmp_path / "hb3.zarr", run_config(**{"tree.depth": 2, "engine.batch_size": 3}),
             method="hist-bootstrap")
    assert_same_bytes(tmp_path / "hb.zarr", tmp_path / "hb3.zarr")


@pytest.mark.parametrize("look", [False, True])
def test_expand_batch_equals_a_per_node_loop(look, monkeypatch):
    """The slow reference: each node alone (its own batch of one) gives the batch's rows,
    with the lookahead too (its marginals: the next level's days), also when the draws and
    the lookahead's decoding are cut into the smallest slices."""
    panel, sampler = fitted_sampler()
    cfg = run_config()
    plan = driver.LevelPlan("tree", 2, cfg.seed, M, 6, 64, (2, 3), cfg.tree, own=not look,
                            look=look)
    rng = np.random.default_rng(0)
    n = 9
    ctx = panel.surface[rng.integers(11, 380, n)[:, None] + np.arange(-11, 1)[None]]
    nodes = np.arange(10, 10 + n)
    w = np.full(n, 1.0 / n)
    whole = driver.expand_batch(sampler, driver.Batch(0, 0, nodes, nodes, w,
                                                      np.ones(n, bool), ctx), plan)
    monkeypatch.setattr(driver, "_DRAW_VALUES", 1000)  # one node a slice, 3 candidates a draw
    monkeypatch.setattr(driver, "_DECODE_ROWS", 4)
    sliced = driver.expand_batch(sampler, driver.Batch(0, 0, nodes, nodes, w,
                                                       np.ones(n, bool), ctx), plan)
    assert sliced.paths.tobytes() == whole.paths.tobytes()
    assert sliced.weight.tobytes() == whole.weight.tobytes()
    for name in ("counts", "total", "sum_iv", "sum_iv2", "vmin", "vmax"):
        np.testing.assert_array_equal(getattr(sliced.marginal, name),
                                      getattr(whole.marginal, name))
    acc = tree.MarginalAccumulator(6, (2, 3), 64)
    for i in range(n):
        one = driver.expand_batch(sampler, driver.Batch(i, i * K, nodes[i:i + 1],
                                                        nodes[i:i + 1], w[i:i + 1],
                                                        np.ones(1, bool), ctx[i:i + 1]), plan)
        rows = slice(i * K, (i + 1) * K)
        assert one.paths.tobytes() == whole.paths[rows].tobytes()
        assert one.weight.tobytes() == whole.weight[rows].tobytes()
        acc.merge(one.marginal)
    for name in ("counts", "total", "sum_iv", "sum_iv2", "vmin", "vmax"):
        np.testing.assert_array_equal(getattr(acc, name), getattr(whole.marginal, name))


def test_lookahead_candidates_are_distinct_paths_or_score_strata():
    # by default the candidates draw as many paths in all as the K children would
    assert driver.lookahead_samples(TreeConfig()) == 5 * 512 // 20
    assert driver.lookahead_samples(TreeConfig(n_samples=64)) == 16
    assert driver.lookahead_samples(TreeConfig(n_samples=8, branching=2)) == 8  # the floor
    assert driver.lookahead_samples(TreeConfig(lookahead_samples=40)) == 40
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 3, 2, 3))
    pick = np.array([2, 0, 2, 1, 0, 2, 3, 2])
    kept = base[pick]  # 4 distinct paths, drawn 1..4 times
    scores = kept[:, -1].mean(axis=(1, 2))
    index, prob, member = driver._candidates(kept, scores, 4)
    np.testing.assert_array_equal(index, [0, 1, 3, 6])  # in the order first drawn
    np.testing.assert_array_equal(prob, np.array([4, 2, 1, 1]) / 8)
    np.testing.assert_array_equal(member, [0, 1, 0, 2, 1, 0, 3, 0])
    # more distinct paths than allowed: equal strata of the score, each its middle path
    kept = rng.standard_normal((40, 3, 2, 3))
    scores = kept[:, -1].mean(axis=(1, 2))
    index, prob, member = driver._candidates(kept, scores, 8)
    np.testing.assert_array_equal(prob, np.full(8, 5 / 40))
    order = np.argsort(scores)
    for j in range(8):
        stratum = order[5 * j: 5 * j + 5]
        assert index[j] == stratum[2]
        np.testing.assert_array_equal(member[stratum], j)


def test_lookahead_marginals_and_children_follow_the_candidates_draws(tmp_path):
    """A depth-2 tree, rebuilt by hand from the sampler's public halves: level 1's marginals
    are the root's M draws; level 2's are the draws of the root's distinct paths (each one
    level on from its own context, its own stream, weighted by its share); the children are
    the cells' paths with the most typical next-level law."""
    cfg = run_config(**{"tree.depth": 2, "tree.lookahead": 64, "tree.lookahead_samples": 16})
    store = make_run(tmp_path / "look.zarr", cfg)
    panel, sampler = fitted_sampler()
    c, s = cfg.data.context, 6
    i = panel.n_days - 1
    ctx = panel.surface[i - c + 1: i + 1].astype(np.float64)
    point, keys = sampler.point_and_keys(np.log(ctx)[None])
    root = sampler.draw(point, keys, M, [node_rng(cfg.seed, 0, 0, TREE)])[0]  # (M, H, 2, 3)
    kept = root[:, :s]
    first: dict[bytes, int] = {}
    for j in range(M):
        first.setdefault(kept[j].tobytes(), j)
    assert 1 < len(first) < M  # the kNN law is discrete: repeated paths
    acc1 = tree.MarginalAccumulator(s, (2, 3), 64).add(0, kept[None], np.ones(1))
    acc2 = tree.MarginalAccumulator(s, (2, 3), 64)
    mean_next = {}
    for sub, (key, j) in enumerate(first.items()):
        share = sum(kept[q].tobytes() == key for q in range(M)) / M
        child = np.concatenate([ctx[s:], np.exp(kept[j]).astype(np.float32)])
        p, k = sampler.point_and_keys(np.log(child)[None])
        draws = sampler.draw(p, k, 16, [node_rng(cfg.seed, 0, 0, LOOKAHEAD, sub)])[:, :, :s]
        acc2.add(0, draws, np.array([share]))
        mean_next[key] = tree.resolve_score(cfg.tree.score)(draws).mean()
    got = store.read_marginals()
    for acc, days in ((acc1, slice(0, s)), (acc2, slice(s, 2 * s))):
        want = acc.finalize(driver.QUANTILE_LEVELS)
        for name in ("quantiles", "mean", "std"):
            np.testing.assert_array_equal(got[name][days], want[name].astype(np.float32))
    nxt = np.array([[mean_next[kept[q].tobytes()] for q in range(M)]])
    sel = tree.select_children(root[None], cfg.tree, next_scores=nxt)
    assert np.any(sel.index != tree.select_children(root[None], cfg.tree).index)
    level1 = store.read_level(1)
    np.testing.assert_array_equal(level1["paths"],
                                  np.exp(kept[sel.index[0]]).astype(np.float32))
    np.testing.assert_array_equal(level1["weight"], sel.weight[0])
    # without the lookahead, level 2's marginals are the children's own draws: they differ
    plain = make_run(tmp_path / "plain.zarr", run_config(**{"tree.depth": 2,
                                                            "tree.lookahead": 0}))
    other = plain.read_marginals()
    np.testing.assert_array_equal(other["mean"][:s], got["mean"][:s])
    assert not np.array_equal(other["mean"][s:], got["mean"][s:])


def test_a_level_2_node_is_expanded_from_its_own_history(tmp_path):
    """Level 2 rebuilt by hand for one level-1 node: its context is the start context's last
    days then the node's own stored days, it draws with its own stream (level 1, its row),
    and its children and their weights are the selection from those draws."""
    cfg = run_config(**{"tree.depth": 2, "tree.lookahead": 0})
    store = make_run(tmp_path / "two.zarr", cfg)
    _, sampler = fitted_sampler()
    c, s = cfg.data.context, 6
    start = np.asarray(store.run_attr("start_context"), dtype=np.float64)  # (C, 2, 3)
    one, two = store.read_level(1), store.read_level(2)
    for node in (1, 3):
        ctx = np.concatenate([start[s:], one["paths"][node].astype(np.float64)])[-c:]
        point, keys = sampler.point_and_keys(np.log(ctx)[None])
        draws = sampler.draw(point, keys, M, [node_rng(cfg.seed, 1, node, TREE)])
        sel = tree.select_children(draws, cfg.tree)
        rows = slice(node * K, (node + 1) * K)
        np.testing.assert_array_equal(two["parent"][rows], node)
        np.testing.assert_array_equal(
            two["paths"][rows], np.exp(draws[0, sel.index[0], :s]).astype(np.float32))
        np.testing.assert_allclose(two["weight"][rows], one["weight"][node] * sel.weight[0],
                                   rtol=1e-12)
        # from the start context instead (a tree that forgot its history): other children
        p0, k0 = sampler.point_and_keys(np.log(start)[None])
        forgot = sampler.draw(p0, k0, M, [node_rng(cfg.seed, 1, node, TREE)])
        assert not np.array_equal(forgot, draws)


def test_lookahead_with_a_short_stride_and_pruning(tmp_path):
    """Children keeping 2 of 6 days, a pruned frontier and quadrature selection (no cells:
    the lookahead makes only the marginals): every marginal day is written, and the bytes
    do not depend on the batch size."""
    over = {"tree.stride": 2, "tree.depth": 3, "tree.max_frontier": 3,  # level 2: 5 -> 3
            "tree.selection": "quadrature"}
    a = make_run(tmp_path / "a.zarr", run_config(**over))
    make_run(tmp_path / "b.zarr", run_config(**over, **{"engine.batch_size": 2}))
    assert_same_bytes(tmp_path / "a.zarr", tmp_path / "b.zarr")
    assert a.level_size(3) == 3 * K  # level 2's five nodes were resampled to three
    m = a.read_marginals()
    assert m["mean"].shape[0] == 3 * 2
    assert np.all(np.isfinite(m["quantiles"])) and np.all(m["std"] > 0)
    assert np.all(np.diff(m["quantiles"], axis=1) >= 0)


def test_marginal_sums_are_exact_for_any_partition_and_merge_order():
    rng = np.random.default_rng(3)
    n, m = 40, 50
    x = np.log(0.2) + 0.3 * rng.standard_normal((n, 1, 1, 2, 3)) \
        + 0.4 * rng.standard_normal((n, m, 4, 2, 3))
    w = rng.dirichlet(np.ones(n))
    whole = tree.MarginalAccumulator(4, (2, 3), bins=128).add(0, x, w)
    for trial in range(3):
        cuts = np.sort(rng.choice(np.arange(1, n), size=6, replace=False))
        parts = [tree.MarginalAccumulator(4, (2, 3), bins=128).add(0, x[a:b], w[a:b])
                 for a, b in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True)]
        acc = tree.MarginalAccumulator(4, (2, 3), bins=128)
        for j in rng.permutation(len(parts)):
            acc.merge(parts[j])
        for name in ("counts", "under", "over", "total", "sum_iv", "sum_iv2", "vmin", "vmax"):
            assert getattr(acc, name).tobytes() == getattr(whole, name).tobytes(), (trial, name)
    # a checkpoint round trip keeps every byte
    back = tree.MarginalAccumulator.from_arrays(whole.to_arrays())
    assert back.quantiles([0.1, 0.9]).tobytes() == whole.quantiles([0.1, 0.9]).tobytes()
    # probabilities only: more than 2 in total is refused (int64 could overflow)
    with pytest.raises(Exception, match="probability 2"):
        whole.add(0, x[:1], np.array([1.5]))


def test_weighted_var_es_matches_sorting():
    rng = np.random.default_rng(1)
    pnl = rng.standard_normal(1000)
    w = np.ones(1000)
    (var, es), = driver.weighted_var_es(pnl, w, [0.95])
    loss = np.sort(-pnl)
    assert var == np.quantile(-pnl, 0.95, method="inverted_cdf")
    np.testing.assert_allclose(es, loss[950:].mean(), rtol=1e-12)
    # the atom at VaR is split: two outcomes, loss 10 with probability 0.02
    (var, es), = driver.weighted_var_es(np.array([-10.0, 1.0]), np.array([0.02, 0.98]), [0.99])
    assert var == 10.0 and es == pytest.approx(10.0)
    (var, es), = driver.weighted_var_es(np.array([-10.0, 1.0]), np.array([0.02, 0.98]), [0.97])
    assert var == -1.0 and es == pytest.approx((0.02 * 10 + 0.01 * -1) / 0.03)
    with pytest.raises(ConfigError):
        driver.weighted_var_es(pnl, w, [1.5])



def test_es_is_never_below_var_where_the_tail_repeats_a_few_losses():
    """Paths that repeat a few drawn losses (an mc store): ES, a mean of losses at or beyond
    VaR, must not round below it (it did in 2,035 of these 9,000 cases)."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        atoms = rng.standard_normal(rng.integers(2, 30))
        n = int(rng.integers(50, 3000))
        pnl = atoms[rng.integers(0, len(atoms), n)]
        for var, es in driver.weighted_var_es(pnl, np.full(n, 1.0 / n), [0.9, 0.95, 0.99]):
            assert es >= var


# ---------------------------------------------------------------------------- the CLI

TOML = cli_toml(depth=2, seed=3, batch=7, chunk=4, checkpoint=30)


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def cli_stores(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, tree store, mc store) made by `backfill run` and `backfill mc`."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.toml"
    cfg.write_text(TOML)
    run, mc = root / "run.zarr", root / "mc.zarr"
    result = _invoke(["run", "--config", cfg, "--store", run, "--start", "2001-06-30"])
    assert result.exit_code == 0, result.output
    result = _invoke(["mc", "--config", cfg, "--store", mc, "--n-paths", "10", "--depth", "1"])
    assert result.exit_code == 0, result.output
    return cfg, run, mc


def test_cli_run_mc_and_exports(cli_stores, tmp_path):
    cfg, run, mc = cli_stores
    store = ScenarioStore.open(run)
    assert store.levels_complete == 2 and store.level_size(2) == 25
    assert store.meta.start_date == "2001-06-29"  # the last data day on or before (a Friday)
    assert ScenarioStore.open(mc).level_size(1) == 10
    # an existing store is neither overwritten nor resumed without being told
    result = _invoke(["run", "--config", cfg, "--store", run])
    assert result.exit_code == 2 and "--resume" in result.stderr
    result = _invoke(["run", "--config", cfg, "--store", run, "--resume", "--seed", "9"])
    assert result.exit_code == 2 and "seed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _invoke(["run", "--config", cfg, "--store", run, "--resume",
                      "--start", "2001-06-29"])
    assert result.exit_code == 0 and "complete" in result.output
    # exports
    for out in ("m.parquet", "m.csv"):
        result = _invoke(["marginals", "--store", run, "--out", tmp_path / out])
        assert result.exit_code == 0, result.output
    frame = pd.read_parquet(tmp_path / "m.parquet")
    assert list(frame.columns) == ["date", "moneyness", "maturity_days", "quantile", "iv"]
    assert len(frame) == 12 * 7 * 25 and frame["iv"].gt(0).all()
    result = _invoke(["paths", "--store", run, "--out", tmp_path / "p.npz"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "p.npz") as f:
        assert f["paths"].shape == (25, 12, 5, 5)
        assert abs(f["weight"].sum() - 1) < 1e-9
    result = _invoke(["paths", "--store", run, "--out", tmp_path / "P.NPZ"])  # the name given
    assert result.exit_code == 0 and (tmp_path / "P.NPZ").is_file(), result.output
    assert not (tmp_path / "P.NPZ.npz").exists()
    with np.load(tmp_path / "P.NPZ") as f:
        assert f["paths"].shape == (25, 12, 5, 5)
    result = _invoke(["paths", "--store", mc, "--out", tmp_path / "p.parquet"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 10 * 6 * 25
    result = _invoke(["var", "--store", run, "--levels", "0.95,0.99", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["level"] for r in rows] == [1, 2]
    assert all(r["es_0.99"] >= r["var_0.99"] - 1e-12 and r["var_0.99"] >= r["var_0.95"] - 1e-12
               for r in rows)
    result = _invoke(["var", "--store", mc])
    assert result.exit_code == 0 and "VaR 0.95" in result.stdout
    # a level given twice is one column; a level near 1 keeps its digits (not "VaR 1")
    result = _invoke(["var", "--store", run, "--levels", "0.95,0.95,0.999999999", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(k for k in json.loads(result.stdout)[0] if k.startswith("var_")) == \
        ["var_0.95", "var_0.999999999"]
    result = _invoke(["var", "--store", run, "--levels", "0.95,0.95,0.999999999"])
    assert result.stdout.count("VaR 0.95 ") == 1 and "VaR 0.999999999" in result.stdout
    # nearer 1 than float64 sums of weights can tell: refused, not an ES past the worst loss
    _one_line_error(["var", "--store", run, "--levels", "0.99999999999"], "0.99999999999",
                    "0.999999999")
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "fan.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fan.png").stat().st_size > 1000
    grid = ScenarioStore.open(run).meta.grid
    wing = min(grid["moneyness"])
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "wing.png", "--moneyness",
                      f"{wing - 0.01}", "--maturity", "1e9"])  # the nearest grid point
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # rich wraps long lines at 80 columns
    assert f"(moneyness {wing:g}, {max(grid['maturity_days']):g} days)" in said
    # the synthetic market's days after the start, drawn over the fan and counted: its
    # 400-day history ends on 2001-07-13, ten business days after the start
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "real.png", "--realised",
                      "synthetic"])
    assert result.exit_code == 0, result.output
    counted = re.search(r"realised inside q05-q95 on (\d+) of (\d+) days",
                        " ".join(result.stderr.split()))
    assert counted and int(counted[2]) == 10, result.stderr
    from engine.config import Config
    from engine.data.io import load_panel

    store = ScenarioStore.open(run)
    marg = store.read_marginals()
    truth = load_panel(Config.from_dict(store.meta.config).data, evaluation=True)
    i = int(np.argmin(np.abs(np.asarray(grid["moneyness"]) - 1)))
    j = int(np.argmin(grid["maturity_days"]))
    lo, hi = (list(marg["quantile"]).index(q) for q in (0.05, 0.95))
    inside = sum(marg["quantiles"][d, lo, i, j] <= truth.surface[t, i, j]
                 <= marg["quantiles"][d, hi, i, j]
                 for d, day in enumerate(marg["days"])
                 for t in np.flatnonzero(truth.dates == day))
    assert int(counted[1]) == inside
    # data that ends at the start, or on another grid, is refused
    m, t = np.meshgrid(grid["moneyness"], grid["maturity_days"], indexing="ij")
    early = pd.DataFrame({"date": "2001-06-29", "moneyness": m.ravel(),
                          "maturity_days": t.ravel(), "iv": 0.2})
    early.to_csv(tmp_path / "early.csv", index=False)
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "x.png", "--realised",
                     tmp_path / "early.csv"], "ends on the start 2001-06-29")
    early.assign(date="2001-06-28").to_csv(tmp_path / "before.csv", index=False)
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "x.png", "--realised",
                     tmp_path / "before.csv"], "no row on the start 2001-06-29")
    # other data on the store's grid: drawn, with a note that it is not the run's
    pd.concat([early, early.assign(date="2001-07-02")]).to_csv(tmp_path / "two.csv",
                                                                 index=False)
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "two.png", "--realised",
                      tmp_path / "two.csv"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "not the one the run started from" in said, said
    assert "realised inside q05-q95 on" in said and "of 1 day)" in said
    # a NaN there: refused as the run would have read it, without a data.fill these
    # commands cannot set
    holed = pd.concat([early, early.assign(date="2001-07-02")], ignore_index=True)
    holed.loc[len(early) + 3, "iv"] = np.nan
    holed.to_csv(tmp_path / "holed.csv", index=False)
    message = _one_line_error(["plot", "--store", run, "--out", tmp_path / "x.png",
                               "--realised", tmp_path / "holed.csv"], "NaN")
    assert "data.fill" not in message
    early.assign(date="2001-07-02", moneyness=early["moneyness"] * 1.5).to_csv(
        tmp_path / "other.csv", index=False)
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "x.png", "--realised",
                     tmp_path / "other.csv"], "is not the store's")
    for store_path in (run, mc):
        result = _invoke(["check", "--store", store_path, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["ok"] and report["finished"]
        assert all(abs(lv["weight_sum"] - 1) < 1e-9 for lv in report["levels"])
    result = _invoke(["check", "--store", run])
    assert result.exit_code == 0 and "children vs parent" in result.stdout
    odd = tmp_path / "odd_mc.zarr"  # an mc store whose path count is lost
    shutil.copytree(mc, odd)
    root = zarr.open_group(odd, mode="r+", use_consolidated=False)
    del root.attrs["n_paths"]
    _one_line_error(["check", "--store", odd], "level 1", "n_paths None")
    # user errors: one line, exit 2
    for args in (["marginals", "--store", run, "--out", tmp_path / "m.txt"],
                 ["var", "--store", tmp_path / "nope.zarr"],
                 ["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--start",
                  "1990-01-01"],
                 ["run", "--config", cfg, "--store", tmp_path / "y.zarr", "--backend", "spark"]):
        result = _invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_fit_once_then_run_and_mc_from_the_file(cli_stores, tmp_path):
    """`backfill fit` saves the sampler a run would fit; `run` / `mc --sampler` start where
    its fit ended and write the very bytes of a run that fitted its own; a file that does
    not fit the run (config, start, data, a model beside it) is refused in one line."""
    cfg, run, mc = cli_stores
    fitted, last = tmp_path / "s.pt", tmp_path / "last.pt"
    result = _invoke(["fit", "--config", cfg, "--start", "2001-06-30", "--out", fitted])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "up to 2001-06-29" in said
    assert ("--start 2001-06-30 is not a day of the data: taking the last day before it, "
            "2001-06-29 (1 calendar day earlier)") in said, said
    assert f"`backfill run --config {cfg} --sampler {fitted} --store S`" in said, said
    result = _invoke(["fit", "--config", cfg, "--seed", "4", "--out", tmp_path / "s4.pt"])
    said = " ".join(result.stderr.split())
    assert f"`backfill run --config {cfg} --seed 4 --sampler {tmp_path / 's4.pt'} --store S`" \
        in said, said
    result = _invoke(["run", "--config", cfg, "--store", tmp_path / "t.zarr", "--sampler",
                      fitted])
    assert result.exit_code == 0, result.output
    assert "fitting sampler" not in result.output  # loaded, not fitted again
    said = " ".join(result.output.split())
    assert "note: the data runs on to 2001-07-13 (10 more days)" in said, said
    assert_same_bytes(run, tmp_path / "t.zarr")
    assert ScenarioStore.open(tmp_path / "t.zarr").meta.start_date == "2001-06-29"
    result = _invoke(["run", "--config", cfg, "--store", tmp_path / "t.zarr", "--resume",
                      "--sampler", fitted])
    assert result.exit_code == 0 and "complete" in result.output, result.output
    result = _invoke(["fit", "--config", cfg, "--start", "31 Dec 2001", "--out", last])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "up to 2001-07-13" in said, result.output
    assert ("--start 31 Dec 2001 is after the last day of the data: taking that day, "
            "2001-07-13 (171 calendar days earlier)") in said, said
    result = _invoke(["mc", "--config", cfg, "--store", tmp_path / "mc.zarr", "--n-paths",
                      "10", "--depth", "1", "--sampler", last])
    assert result.exit_code == 0, result.output
    assert_same_bytes(mc, tmp_path / "mc.zarr")
    # refused: another start, a fit key changed, a model beside it, other data
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--sampler",
                     fitted, "--start", "2001-07-13"], "up to 2001-06-29", "starts on 2001-07-13")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--sampler",
                     fitted, "--seed", "9"], "seed = 3", "has 9")
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace("[sampler]\n", "[sampler]\nk = 7\n"))
    _one_line_error(["run", "--config", other, "--store", tmp_path / "a.zarr", "--sampler",
                     fitted], "sampler.k = 0", "has 7")
    model = tmp_path / "m.pt"
    assert _invoke(["train", "--config", cfg, "--out", model]).exit_code == 0
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--sampler",
                     fitted, "--model", model], "pass one of the two")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--sampler",
                     model], "is a model checkpoint, not a sampler file", "pass it to --model")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--model",
                     fitted], "is a sampler file, not a model checkpoint", "pass it to --sampler")
    # refused after the note's condition (the data runs on past the fit): still one line
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "t.zarr", "--sampler",
                     fitted], "--resume")
    # outputs fit must not write over
    _one_line_error(["fit", "--config", cfg, "--out", cfg], "is the --config file")
    import os

    os.mkfifo(tmp_path / "pipe")
    _one_line_error(["fit", "--config", cfg, "--out", tmp_path / "pipe"], "not a regular file")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "a.zarr", "--sampler",
                     tmp_path / "none.pt"], "not found", "backfill fit")
    from engine.data.io import load_panel

    panel = load_panel(Config.from_dict(ScenarioStore.open(run).meta.config).data)
    m, t = np.meshgrid(panel.moneyness, panel.maturity_days, indexing="ij")

    def write(surface, name, days=panel.n_days):
        pd.DataFrame({"date": np.repeat(panel.dates[:days].astype(str), m.size),
                      "moneyness": np.tile(m.ravel(), days),
                      "maturity_days": np.tile(t.ravel(), days),
                      "iv": surface[:days].reshape(-1)}).to_csv(tmp_path / name, index=False)
        return tmp_path / name

    # the same days from a file: the data is known by its bytes, not by its name
    result = _invoke(["run", "--config", cfg, "--data", write(panel.surface, "same.csv"),
                      "--store", tmp_path / "csv.zarr", "--sampler", fitted])
    assert result.exit_code == 0, result.output
    assert_same_bytes(run, tmp_path / "csv.zarr")
    # and so is a resume's: a copy of the file under another name, or the market it holds
    import shutil

    shutil.copy(tmp_path / "same.csv", tmp_path / "copy.csv")
    for data in (["--data", str(tmp_path / "copy.csv")], []):
        result = _invoke(["run", "--config", cfg, *data, "--store", tmp_path / "csv.zarr",
                          "--resume", "--sampler", fitted])
        assert result.exit_code == 0 and "complete" in result.output, result.output
    moved = panel.surface.copy()
    moved[5, 0, 0] *= 1.01  # one quote before the start
    _one_line_error(["run", "--config", cfg, "--data", write(moved, "moved.csv"), "--store",
                     tmp_path / "a.zarr", "--sampler", fitted], "fitted on other data",
                    f"(it was fitted on synthetic, this run reads {tmp_path / 'moved.csv'})")
    _one_line_error(["run", "--config", cfg, "--data", tmp_path / "moved.csv", "--store",
                     tmp_path / "csv.zarr", "--resume"], "cannot resume", "data fingerprint")
    short = write(panel.surface, "short.csv", days=panel.n_days - 20)  # ends before the fit
    _one_line_error(["run", "--config", cfg, "--data", short, "--store", tmp_path / "a.zarr",
                     "--sampler", fitted], "up to 2001-06-29, a day this data does not have",
                    f"its last day on or before is {panel.dates[-21]}")
    assert not (tmp_path / "a.zarr").exists()


def test_a_start_early_in_the_data_fits_on_every_window_before_it(cli_stores, tmp_path):
    """A run holds nothing out: where the history up to --start is too short for the three
    splits (45 days: calibration keeps 3 after its embargo), the CVAE learns from all its
    windows (a note says so); below the residual bank's least history (41 days here) the
    fit is refused before any training, naming the first --start that gives enough."""
    cfg, _, _ = cli_stores
    result = _invoke(["fit", "--config", cfg, "--start", "2000-03-03", "--out",
                      tmp_path / "early.pt"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0, result.output
    assert "the 45 days up to 2000-03-03 are too few for the train / calibration / test" in said
    assert "training the CVAE on 28 windows" in said, said  # 45 - 12 - 6 + 1
    # fit replaces an earlier fit, and refuses to write over any other file, before fitting
    again = _invoke(["fit", "--config", cfg, "--start", "2000-03-03", "--out",
                     tmp_path / "early.pt"])
    assert again.exit_code == 0, again.output
    ours = tmp_path / "ours.pt"
    for content, what in ((b"date,moneyness\n", "not a backfill sampler file"),
                          (None, "a model checkpoint")):
        if content is None:
            torch.save({"state_dict": {}, "meta": "{}"}, ours)
        else:
            ours.write_bytes(content)
        before = ours.read_bytes()
        args = ["fit", "--config", cfg, "--start", "2000-03-03", "--out", ours]
        _one_line_error(args, f"--out {ours} exists and is {what}", "delete the file first")
        assert "training" not in _invoke(args).output and ours.read_bytes() == before
    # a config's own mistake in the splits is still refused, not taken for a short history
    half = tmp_path / "half.toml"
    half.write_text(cfg.read_text().replace("[data]\n", "[data]\ncalibration_start = "
                                                          "\"2001-01-02\"\n"))
    _one_line_error(["fit", "--config", half, "--out", tmp_path / "h.pt"],
                    "set both data.calibration_start and data.test_start")
    args = ["fit", "--config", cfg, "--start", "2000-02-11", "--out", tmp_path / "none.pt"]
    _one_line_error(args, "give at least 41 days", "up to the start 2000-02-11: a --start on or "
                    "after 2000-02-28 gives it enough")  # the 41st business day
    assert "training the CVAE" not in _invoke(args).output
    assert not (tmp_path / "none.pt").exists()
    # and one with too few episodes for a kNN law (no embargo: the bank would fit)
    e0 = tmp_path / "e0.toml"
    e0.write_text(cfg.read_text().replace("[data]\n", "[data]\nembargo = 0\n"))
    args = ["fit", "--config", e0, "--start", "2000-02-14", "--out", tmp_path / "none.pt"]
    _one_line_error(args, "holds 8 episodes", "a --start on or after")
    assert "training the CVAE" not in _invoke(args).output


def test_the_store_size_bound_and_its_note(tmp_path):
    """Every level's float32 paths and node arrays: a tree's level k holds K x its frontier
    (capped by tree.max_frontier), an mc run's n_paths; a run whose bound passes half the
    disk's free space is told before it starts."""
    import io
    import types

    from rich.console import Console

    from engine.cli import _size_note

    per_node = 6 * 2 * 3 * 4 + 25  # horizon 6, a 2x3 grid; node, parent, branch, weight
    cfg = Config.from_dict({"data": {"horizon": 6}, "tree": {"depth": 3, "branching": 5}})
    assert driver.store_size_bound("tree", cfg, (2, 3)) == ((5 + 25 + 125) * per_node, 125)
    capped = Config.from_dict({"data": {"horizon": 6},
                               "tree": {"depth": 3, "branching": 5, "max_frontier": 10}})
    assert driver.store_size_bound("tree", capped, (2, 3)) == ((5 + 25 + 50) * per_node, 50)
    assert driver.store_size_bound("mc", cfg, (2, 3), 7) == (3 * 7 * per_node, 7)
    inputs = types.SimpleNamespace(grid={"moneyness": [0.9, 1.1],
                                         "maturity_days": [30, 60, 90]})
    said = io.StringIO()
    console = Console(file=said, width=400)
    _size_note(tmp_path / "a" / "s.zarr", "tree", cfg, inputs, None, console)
    assert said.getvalue() == ""  # a few KB
    deep = Config.from_dict({"data": {"horizon": 6}, "tree": {"depth": 30}})
    _size_note(tmp_path / "a" / "s.zarr", "tree", deep, inputs, None, console)
    note = said.getvalue()
    assert note.startswith("note: this run writes up to ") and " TB before compression" in note
    assert f"its level 30 alone holds {5 ** 30:,} nodes" in note and "tree.max_frontier" in note, note


def test_the_note_on_paths_beyond_the_history_s_range(cli_stores, monkeypatch):
    """``beyond_history``: per level, the probability of the nodes whose path rises above the
    history's highest vol at some grid point, and of those that fall below its lowest (brute
    force over the level), and the note `run` prints from them (none where every path stays
    within the history's range)."""
    from engine.cli import _beyond_history_note, _percent

    _, run, mc = cli_stores
    for path in (run, mc):
        store = ScenarioStore.open(path)
        first = store.read_level(1)["paths"]
        first = first.reshape(-1, *first.shape[2:])  # every day of every level-1 path
        lo, hi = np.quantile(first, 0.1, axis=0), np.quantile(first, 0.9, axis=0)  # (n_m, n_tau)
        got = driver.beyond_history(store, lo, hi)
        assert [b.level for b in got] == list(range(1, store.levels_complete + 1))
        for b in got:
            block = store.read_level(b.level)
            above = (block["paths"] > hi).any(axis=(1, 2, 3))
            below = (block["paths"] < lo).any(axis=(1, 2, 3))
            assert b.above == pytest.approx(block["weight"][above].sum(), abs=1e-12)
            assert b.below == pytest.approx(block["weight"][below].sum(), abs=1e-12)
            assert (0 < b.above < 1 and 0 < b.below < 1) or b.level > 1
            assert np.array_equal(b.top, block["paths"].max(axis=(0, 1)))
            assert np.array_equal(b.bottom, block["paths"].min(axis=(0, 1)))
        history = np.stack([lo, hi])  # two days: the lowest is lo, the highest hi
        note = " ".join(_beyond_history_note(store, history).split())
        levels = f"levels 1-{len(got)}" if len(got) > 1 else "level 1"
        top = np.max([b.top for b in got], axis=0)
        bottom = np.min([b.bottom for b in got], axis=0)
        assert (f"rise above the highest vol of the history at some grid point hold "
                f"{', '.join(_percent(b.above) for b in got)} of the probability of {levels}; "
                f"the farthest above it (by ratio) is {top.flat[np.argmax(top / hi)]:.4g}") in note, note
        assert (f"fall below the lowest vol of the history at some grid point hold "
                f"{', '.join(_percent(b.below) for b in got)} of the probability of {levels}; "
                f"the farthest below it (by ratio) is {bottom.flat[np.argmin(bottom / lo)]:.4g}") in note, note
        assert "more than the data reader takes" not in note  # vols far below 5
        # one side alone, and none at all
        wide_low = np.stack([np.zeros_like(lo) + bottom.min() / 2, hi])
        assert "fall below" not in _beyond_history_note(store, wide_low)
        assert "rise above" not in _beyond_history_note(store, np.stack([lo, hi + top.max()]))
        assert _beyond_history_note(store, np.stack([lo * 0 + bottom.min() / 2,
                                                     hi + top.max()])) is None
        # vols beyond what the data reader takes as input are named as such
        bound = float(np.median(top))
        monkeypatch.setattr(data_io, "IV_MAX", bound)
        note = " ".join(_beyond_history_note(store, history).split())
        assert (f"(vols above {bound:g}, {100 * bound:g} vol points, at "
                f"{int((top > bound).sum())} grid point(s): more than the data reader takes "
                "as input)") in note, note
        monkeypatch.undo()


def test_the_oracle_runs_one_level_and_refuses_more_before_any_work(cli_stores, tmp_path):
    """The true law knows only the market's own windows: level 1 (from the last day) runs;
    a deeper run is refused at once, not after writing level 1."""
    cfg, _, _ = cli_stores
    oracle = tmp_path / "oracle.toml"
    oracle.write_text(cfg.read_text().replace("[sampler]\n", "[sampler]\nmethod = \"oracle\"\n"))
    result = _invoke(["mc", "--config", oracle, "--store", tmp_path / "one.zarr", "--depth",
                      "1", "--n-paths", "5"])
    assert result.exit_code == 0, result.output
    for kind in ("run", "mc"):
        _one_line_error([kind, "--config", oracle, "--store", tmp_path / "two.zarr"],
                        "sampler.method = 'oracle'", "level 2 of 2", "--depth 1")
    assert not (tmp_path / "two.zarr").exists()


def _one_line_error(args: list, *words: str) -> str:
    result = _invoke(args)
    assert result.exit_code == 2, (args, result.output)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words), (words, err)
    return err


def test_cli_refuses_damaged_stores_and_unwritable_outputs(cli_stores, tmp_path):
    cfg, run, _ = cli_stores
    # a lost chunk file would read back as NaN paths: every reader and --resume refuse
    lost = tmp_path / "lost.zarr"
    shutil.copytree(run, lost)
    (lost / "level_02" / "paths" / "c.0.0.0.0").unlink()
    for args in (["paths", "--store", lost, "--out", tmp_path / "p.npz"],
                 ["var", "--store", lost], ["marginals", "--store", lost, "--out",
                                           tmp_path / "m.csv"],
                 ["run", "--config", cfg, "--store", lost, "--resume", "--start", "2001-06-29"]):
        _one_line_error(args, "damaged", "level_02/paths", "--overwrite")
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "m.csv").exists()
    # a chunk that does not decode, and lost marginals
    garbled = tmp_path / "garbled.zarr"
    shutil.copytree(run, garbled)
    (garbled / "level_02" / "weight" / "c.0").write_bytes(b"not a chunk")
    _one_line_error(["var", "--store", garbled], "cannot be read", "level_02")
    # a weight chunk swapped for another level's decodes, but its weights are no longer
    # probabilities summing to 1: not exported as if they were
    swapped = tmp_path / "swapped.zarr"
    shutil.copytree(run, swapped)
    shutil.copyfile(run / "level_01" / "weight" / "c.0", swapped / "level_02" / "weight" / "c.0")
    for args in (["paths", "--store", swapped, "--out", tmp_path / "s.npz"],
                 ["var", "--store", swapped]):
        _one_line_error(args, "level 2's weight", "backfill check", "--overwrite")
    assert not (tmp_path / "s.npz").exists()
    shutil.rmtree(garbled / "marginals" / "quantiles")
    _one_line_error(["plot", "--store", garbled, "--out", tmp_path / "f.png"],
                    "damaged", "marginals/quantiles")
    # bad flags and outputs that cannot be written, refused before any work
    _one_line_error(["paths", "--store", run, "--out", tmp_path / "new" / "p.npz", "--level",
                     "0"], "1..2")
    assert not (tmp_path / "new").exists()
    _one_line_error(["var", "--store", run, "--levels", ""], "--levels")
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "f.png", "--maturity", "nan"],
                    "--maturity")
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "f.png", "--moneyness", "-1"],
                    "--moneyness -1.0", "strike / spot")
    _one_line_error(["marginals", "--store", run, "--out", cfg / "m.csv"], "is a file")
    (tmp_path / "folder.csv").mkdir()
    _one_line_error(["marginals", "--store", run, "--out", tmp_path / "folder.csv"], "folder")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "z.zarr", "--depth", "0"],
                    "--depth 0", "tree.depth")
    _one_line_error(["mc", "--config", cfg, "--store", tmp_path / "z.zarr", "--n-paths",
                     str(10**14)], "--n-paths")
    empty = ScenarioStore.create(tmp_path / "empty.zarr", config={}, seed=0,
                                 grid={"moneyness": [1.0], "maturity_days": [30.0]},
                                 fingerprint="x", start_date="2001-06-29", kind="tree",
                                 depth=2, chunk_nodes=4)
    _one_line_error(["var", "--store", empty.path], "no complete level")
    _one_line_error(["var", "--store", cfg], "is a file", "pass the store's directory")
    # a run stopped in level 1 (its marginals made, no day written): nothing to export or
    # plot, not an empty file with exit 0
    empty.create_marginals(4, [0.05, 0.5, 0.95])
    _one_line_error(["marginals", "--store", empty.path, "--out", tmp_path / "m.csv"],
                    "no complete level", "--resume")
    _one_line_error(["plot", "--store", empty.path, "--out", tmp_path / "f.png"],
                    "no complete level")
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "f.png").exists()


def test_cli_var_of_a_position_file(cli_stores, tmp_path):
    """--position: a CSV of vegas per grid point; all ones gives the default's figures, one
    point gives the VaR of that point's weighted P&L computed here from the store."""
    _, run, _ = cli_stores
    store = ScenarioStore.open(run)
    grid = store.meta.grid
    m, t = np.meshgrid(grid["moneyness"], grid["maturity_days"], indexing="ij")
    ones = tmp_path / "ones.csv"
    pd.DataFrame({"moneyness": m.ravel(), "maturity_days": t.ravel(), "vega": 1.0}).to_csv(
        ones, index=False)
    default = _invoke(["var", "--store", run, "--json"])
    held = _invoke(["var", "--store", run, "--json", "--position", ones])
    assert held.exit_code == 0, held.output
    figures = [{k: v for k, v in r.items() if k != "position"} for r in json.loads(held.stdout)]
    assert figures == [{k: v for k, v in r.items() if k != "position"}
                       for r in json.loads(default.stdout)]
    assert {r["position"] for r in json.loads(held.stdout)} == {str(ones)}
    assert {r["position"] for r in json.loads(default.stdout)} == {"long 1 vega per grid point"}
    # short 2.5 vega at one point (written with spaces and a grid value's own digits)
    i, j = 1, 2
    one = tmp_path / "one.csv"
    one.write_text(f"moneyness, maturity_days, vega\n{grid['moneyness'][i]!r}, "
                   f"{grid['maturity_days'][j]!r}, -2.5\n")
    result = _invoke(["var", "--store", run, "--json", "--position", one, "--levels", "0.9"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    start = driver.start_context_of(store)[-1, i, j]
    for row in rows:
        last = store.read_level(row["level"])["paths"][:, -1, i, j].astype(np.float64)
        weight = store.read_level(row["level"])["weight"]
        (var, es), = driver.weighted_var_es(-2.5 * (last - start), weight, [0.9])
        assert row["var_0.9"] == pytest.approx(var, abs=1e-12)
        assert row["es_0.9"] == pytest.approx(es, abs=1e-12)
    # against what came: the synthetic history runs 10 rows past the start, so level 1
    # (6 days) gets its realised P&L, rank and breaches, level 2 (12 days) none
    from engine.config import Config
    from engine.data.io import load_panel

    result = _invoke(["var", "--store", run, "--json", "--position", one, "--realised",
                      "synthetic"])
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    truth = load_panel(Config.from_dict(store.meta.config).data, evaluation=True)
    at = int(np.flatnonzero(truth.dates == np.datetime64(store.meta.start_date))[0])
    real = -2.5 * (truth.surface[at + 6, i, j] - start)
    assert first["realised_pnl"] == pytest.approx(real, abs=1e-12)
    assert first["realised_date"] == first["date"] == str(truth.dates[at + 6])[:10]
    # the model steps one data row a day: where the data skip a weekday (a holiday), a
    # level's realised P&L is its data's row 6 after the start, dated as in the data; a
    # gap of weeks is noted
    def tidy(days):
        mm, tt = np.meshgrid(grid["moneyness"], grid["maturity_days"], indexing="ij")
        return pd.concat([pd.DataFrame({"date": str(truth.dates[d])[:10], "moneyness": mm.ravel(),
                                        "maturity_days": tt.ravel(),
                                        "iv": truth.surface[d].ravel()}) for d in days])

    tidy([at, *range(at + 1, at + 3), *range(at + 4, at + 11)]).to_csv(tmp_path / "hol.csv",
                                                                      index=False)
    result = _invoke(["var", "--store", run, "--json", "--position", one, "--realised",
                      tmp_path / "hol.csv"])
    assert result.exit_code == 0, result.output
    moved = json.loads(result.stdout)[0]
    assert moved["date"] == first["date"] and moved["realised_date"] == str(truth.dates[at + 7])[:10]
    assert moved["realised_pnl"] == pytest.approx(-2.5 * (truth.surface[at + 7, i, j] - start),
                                                  abs=1e-12)
    table = _invoke(["var", "--store", run, "--realised", tmp_path / "hol.csv"])
    said = " ".join(table.stderr.split())
    assert table.exit_code == 0 and "realised on" in table.stdout, table.output
    assert f"level 1: row 6, {moved['realised_date']}" in said, said
    assert f"labels that step {moved['date']}" in said and "jumps from" not in said, said
    assert "the data skip days the store's weekdays hold" in said, said
    # rows on a weekend make a row's date earlier than the store's weekday; a gap after
    # the deepest level's last day (12 rows on) is no matter to `var`
    after = tidy(range(at, at + 11))
    days = sorted(after["date"].unique())  # the start, then a row on every calendar day
    calendar = {d: str(np.datetime64(days[0]) + k) for k, d in enumerate(days)}
    weekend = after.assign(date=after["date"].map(calendar))
    late = pd.concat([after, tidy([at + 10]).assign(date="2001-07-16"),
                      tidy([at + 10]).assign(date="2001-07-17"),
                      tidy([at + 10]).assign(date="2002-03-01")])
    weekend.to_csv(tmp_path / "weekend.csv", index=False)
    late.to_csv(tmp_path / "late.csv", index=False)
    said = " ".join(_invoke(["var", "--store", run, "--realised", tmp_path / "weekend.csv"])
                    .stderr.split())
    assert f"row 6, {calendar[days[6]]}" in said, said
    assert "the data hold days the store's weekdays skip: weekends" in said, said
    said = " ".join(_invoke(["var", "--store", run, "--realised", tmp_path / "late.csv"])
                    .stderr.split())
    assert "jumps from" not in said and "labels that step" not in said, said
    gap = tidy([at, at + 1]).assign(date=lambda f: np.where(
        f["date"] == str(truth.dates[at + 1])[:10], "2001-08-01", f["date"]))
    gap.to_csv(tmp_path / "gap.csv", index=False)
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "gap.png", "--realised",
                      tmp_path / "gap.csv"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "jumps from 2001-06-29 to 2001-08-01" in said, said
    assert "its last, 2001-08-01, at 2001-07-02" in said, said
    last = store.read_level(1)["paths"][:, -1, i, j].astype(np.float64)
    weight = store.read_level(1)["weight"]
    assert first["realised_rank"] == pytest.approx(weight[-2.5 * (last - start) <= real].sum())
    for a in ("0.95", "0.99"):
        assert first[f"breach_{a}"] == (-real > first[f"var_{a}"])
    assert set(first) == set(second)  # one schema: None where the data end first
    assert second["realised_pnl"] is None and second["breach_0.95"] is None
    drawn = _invoke(["var", "--store", run, "--realised", "synthetic", "--plot",
                     tmp_path / "var.png", "--json"])
    assert drawn.exit_code == 0 and (tmp_path / "var.png").stat().st_size > 1000, drawn.output
    assert [r["var_0.95"] for r in json.loads(drawn.stdout)] == \
        [r["var_0.95"] for r in json.loads(_invoke(["var", "--store", run, "--json"]).stdout)]
    _one_line_error(["var", "--store", run, "--plot", tmp_path / "var.jpg"], "var.jpg")
    table = _invoke(["var", "--store", run, "--realised", "synthetic"])
    assert table.exit_code == 0 and "realised P&L" in table.stdout
    assert "the data end before that level's last day" in " ".join(table.stderr.split())
    # a store from the market's last day, with test_days = 0: nothing comes after its start
    _one_line_error(["var", "--store", cli_stores[2], "--realised", "synthetic"],
                    "the store's market runs on past its history for data.synthetic.test_days "
                    "= 0 days; run it with more")
    table = _invoke(["var", "--store", run, "--position", one])
    assert table.exit_code == 0 and "one.csv (1 grid point with a vega)" in table.stdout
    # a grid value as float32 gave it (0.800000011920929) still matches
    near = tmp_path / "near.csv"
    near.write_text(f"moneyness,maturity_days,vega\n{float(np.float32(grid['moneyness'][i]))!r},"
                    f"{grid['maturity_days'][j]},-2.5\n")
    result = _invoke(["var", "--store", run, "--json", "--position", near, "--levels", "0.9"])
    assert result.exit_code == 0, result.output
    assert [r["var_0.9"] for r in json.loads(result.stdout)] == [r["var_0.9"] for r in rows]
    # bad files: one line each, exit 2
    head = "moneyness,maturity_days,vega\n"
    point = f"{grid['moneyness'][0]},{grid['maturity_days'][0]}"
    m0, t0 = grid["moneyness"][0], grid["maturity_days"][0]
    bad = {"off": (head + "0.123,30,1\n", ("moneyness 0.123", "not on the store's grid")),
           "percent": (head + f"{100 * m0:g},{t0},1\n",
                       (f"it reads as {m0:.10g}, the grid's {m0:.10g}, if it is in percent",)),
           "years": (head + f"{m0},{t0 / 365:.3f},1\n",
                     (f"maturity_days {float(f'{t0 / 365:.3f}')!r}", f"near the grid's {t0:.10g}",
                      "if it is in years")),
           "twice": (head + f"{point},1\n\n{point},2\n", ("line 4", "again", "line 2")),
           "text": (head + f"{point},lots\n", ("'lots'", "line 2")),
           "blank": (head + f"{point},\n", ("vega is empty", "line 2")),
           "true": (head + f"{point},True\n", ("'True'",)),
           "wide": (head + f"{point},1,\n", ("line 2 has 4 fields", "header has 3")),
           "cols": ("strike,maturity_days,vega\n1,30,1\n", ("'strike'", "moneyness")),
           "dup": ("moneyness,maturity_days,vega,Vega\n1,30,1,2\n", ("'Vega'", "once")),
           "nl": ('"money\nness",maturity_days,vega\n1,30,1\n', ("'money\\nness'",)),
           "header": (head, ("no rows",)), "empty": ("", ("empty",))}
    for name, (text, words) in bad.items():
        (tmp_path / f"{name}.csv").write_text(text)
        _one_line_error(["var", "--store", run, "--position", tmp_path / f"{name}.csv"], *words)
    (tmp_path / "latin.csv").write_bytes(head.encode() + b"1,30,\xe91\n")
    _one_line_error(["var", "--store", run, "--position", tmp_path / "latin.csv"], "UTF-8")
    for path, words in ((tmp_path / "nope.csv", ("not found",)),
                        (tmp_path, ("not a regular file",))):
        _one_line_error(["var", "--store", run, "--position", path], *words)


def test_tail_shares_split_the_atom_at_var_as_es_does():
    """Four scenarios of 0.25 each: the worst 10% lies inside the worst one's 25%, so at 0.9
    it has the whole tail; at 0.6 the tail is the worst one's 0.25 and 0.15 of the atom at
    VaR (the second worst), and its shares times the losses give the ES."""
    pnl, weight = np.array([-1.0, -4.0, 2.0, -3.0]), np.full(4, 0.25)
    nodes, share = driver.tail_shares(pnl, weight, 0.9)
    assert nodes.tolist() == [1] and share.tolist() == pytest.approx([1.0])
    nodes, share = driver.tail_shares(pnl, weight, 0.6)
    assert nodes.tolist() == [1, 3] and share == pytest.approx([0.25 / 0.4, 0.15 / 0.4])
    (_, es), = driver.weighted_var_es(pnl, weight, [0.6])
    assert es == pytest.approx(share @ -pnl[nodes])
    rng = np.random.default_rng(3)
    pnl, weight = rng.normal(size=500), rng.random(500)
    for a in (0.5, 0.95, 0.99, 0.999):
        nodes, share = driver.tail_shares(pnl, weight, a)
        (var, es), = driver.weighted_var_es(pnl, weight, [a])
        assert share.sum() == pytest.approx(1.0, abs=1e-12) and np.all(share >= 0)
        assert share @ -pnl[nodes] == pytest.approx(es, rel=1e-12)
        assert np.all(np.diff(-pnl[nodes]) <= 0) and -pnl[nodes[-1]] == var  # worst first
        assert np.all(-np.delete(pnl, nodes) <= var)


def test_tail_shares_and_es_stay_whole_where_the_weights_sum_past_1():
    """Weights whose float sum rounds past 1: at a level near 1 the shares still sum to 1 and
    the ES stays within the losses (from the cdf alone they summed to 1.9)."""
    weight = np.array([0.7, 0.66, 0.7, 0.4])
    assert np.cumsum(weight / weight.sum())[-1] > 1
    pnl = np.array([-1.0, -2.0, -3.0, -9.0])
    for a in (0.99, 0.999999, driver.MAX_VAR_LEVEL):
        nodes, share = driver.tail_shares(pnl, weight, a)
        (var, es), = driver.weighted_var_es(pnl, weight, [a])
        assert nodes.tolist() == [3] and share.sum() == pytest.approx(1.0, abs=1e-9)
        assert var == 9.0 and es == pytest.approx(9.0, abs=1e-12)
    with pytest.raises(ConfigError, match="must lie in"):
        driver.weighted_var_es(pnl, weight, [1 - 1e-12])
    # equal weights with n (1 - a) whole: the tail is the worst n (1 - a) nodes exactly, the
    # VaR node's share 0 (not a rounding remainder that counts it in)
    rng = np.random.default_rng(2)
    for n, a in ((100, 0.99), (10, 0.9), (2000, 0.99), (2000, 0.95), (40, 0.95)):
        pnl = rng.normal(size=n)
        nodes, share = driver.tail_shares(pnl, np.ones(n), a)
        whole = round(n * (1 - a))
        assert (share > 0).sum() == whole and share[share > 0] == pytest.approx(1 / whole)
        assert set(nodes[share > 0]) == set(np.argsort(pnl)[:whole])


def test_cli_var_tail_writes_the_scenarios_behind_each_level_es(cli_stores, tmp_path):
    """--tail F: the nodes at or beyond each level's VaR at the lowest level, worst first; the
    file alone gives back each level's ES, its P&Ls and the store's surfaces."""
    _, run, _ = cli_stores
    store = ScenarioStore.open(run)
    grid = store.meta.grid
    book = tmp_path / "book.csv"
    book.write_text(f"moneyness,maturity_days,vega\n{grid['moneyness'][1]!r},"
                    f"{grid['maturity_days'][2]!r},-2.5\n{grid['moneyness'][3]!r},"
                    f"{grid['maturity_days'][0]!r},4\n")
    result = _invoke(["var", "--store", run, "--json", "--position", book, "--levels",
                      "0.95,0.8", "--tail", tmp_path / "tail.csv"])
    assert result.exit_code == 0, result.output
    assert "at or beyond VaR 0.8" in " ".join(result.stderr.split())
    rows = {r["level"]: r for r in json.loads(result.stdout)}
    vega = driver.read_position(book, grid)
    start = driver.start_context_of(store)[-1]
    frame = pd.read_csv(tmp_path / "tail.csv", parse_dates=["date"])
    assert list(frame.columns) == ["level", "date", "path", "weight", "pnl", "tail_share",
                                   "moneyness", "maturity_days", "iv", "iv_start"]
    assert sorted(frame["level"].unique()) == sorted(rows) == [1, 2]
    for level, got in frame.groupby("level", sort=True):
        nodes = got["path"].drop_duplicates().to_numpy()
        per = got.groupby("path", sort=False).first().loc[nodes]
        assert len(got) == len(nodes) * 25  # a row per grid point of each scenario
        # the file's surfaces are the store's, and its P&Ls follow from them
        last = store.read_level(level)["paths"][:, -1]
        iv = got["iv"].to_numpy().reshape(len(nodes), 5, 5).astype(np.float32)  # as stored
        np.testing.assert_array_equal(iv, last[nodes])
        np.testing.assert_allclose(got["iv_start"].to_numpy().reshape(len(nodes), 5, 5),
                                   np.broadcast_to(start, iv.shape), rtol=1e-12)
        pnl_all = ((last.astype(np.float64) - start) * vega).reshape(len(last), -1).sum(-1)
        np.testing.assert_allclose(per["pnl"], pnl_all[nodes], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(per["weight"], store.complete_weights(level)[nodes],
                                   rtol=1e-12)
        # worst first, every node outside no worse than the VaR, and the shares give the ES
        var, es = rows[level]["var_0.8"], rows[level]["es_0.8"]
        assert np.all(np.diff(-per["pnl"].to_numpy()) <= 1e-12)
        assert -per["pnl"].iloc[-1] == pytest.approx(var, abs=1e-12)
        assert np.all(-np.delete(pnl_all, nodes) <= var + 1e-12)
        assert per["tail_share"].sum() == pytest.approx(1.0, abs=1e-9)
        assert rows[level]["tail_losses_0.8"] == per.loc[per["tail_share"] > 0, "pnl"].nunique()
        assert (per["tail_share"] * -per["pnl"]).sum() == pytest.approx(es, rel=1e-9)
        assert (got["date"] == pd.Timestamp(store.level_days(level)[-1])).all()
    # parquet holds the same; a wrong suffix is refused before any work
    assert _invoke(["var", "--store", run, "--position", book, "--levels", "0.95,0.8",
                    "--tail", tmp_path / "tail.parquet"]).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "tail.parquet"), frame,
                                  check_dtype=False)
    _one_line_error(["var", "--store", run, "--tail", tmp_path / "tail.txt"], "--tail",
                    "tail.txt")
    # never over an input; a book that cannot lose, or beyond any real vega, is refused
    _one_line_error(["var", "--store", run, "--position", book, "--tail", book],
                    "is the --position file")
    assert book.read_text().startswith("moneyness,maturity_days,vega")
    flat = tmp_path / "flat.csv"
    flat.write_text(f"moneyness,maturity_days,vega\n{grid['moneyness'][1]!r},"
                    f"{grid['maturity_days'][2]!r},0\n")
    _one_line_error(["var", "--store", run, "--position", flat], "holds no vega")
    flat.write_text(f"moneyness,maturity_days,vega\n{grid['moneyness'][1]!r},"
                    f"{grid['maturity_days'][2]!r},1e308\n")
    _one_line_error(["var", "--store", run, "--position", flat], "vega 1e+308", "beyond")
    # a tail that lies on one loss is marked: its VaR and ES are that loss
    table = _invoke(["var", "--store", run, "--levels", "0.5,0.999"])
    deep = json.loads(_invoke(["var", "--store", run, "--levels", "0.5,0.999", "--json"]).stdout)
    assert [r["tail_losses_0.999"] for r in deep] == [1, 1] and all(
        r["tail_losses_0.5"] > 1 for r in deep)
    assert table.exit_code == 0 and table.stdout.count("†") == 4  # VaR and ES, two levels
    assert "that tail lies on one loss" in " ".join(table.stderr.split())
    assert "†" not in _invoke(["var", "--store", run, "--levels", "0.5"]).output


def test_spread_nodes_stand_at_the_weighted_quantiles():
    """The nodes at the (k + 1/2) / n weighted quantiles, by a plain scan of the sorted
    values; a node heavy enough to hold two of them is taken once."""
    rng = np.random.default_rng(8)
    for n_nodes, n in ((50, 5), (7, 7), (300, 20), (3, 10)):
        values, weights = rng.normal(size=n_nodes), rng.random(n_nodes)
        got = driver.spread_nodes(values, weights, n)
        order = np.argsort(values, kind="stable")
        want = []
        for k in range(n):
            acc = 0.0
            for node in order:
                acc += weights[node] / weights.sum()
                if acc >= (k + 0.5) / n - 1e-12:
                    break
            if node not in want:
                want.append(node)
        assert got.tolist() == want
        assert np.all(np.diff(values[got]) >= 0)  # lowest first
    heavy = driver.spread_nodes(np.arange(4.0), np.array([0.01, 0.97, 0.01, 0.01]), 4)
    assert heavy.tolist() == [1]


def test_cli_readers_name_the_grid_and_catch_a_user_s_slips(cli_stores, tmp_path):
    """check shows the grid a position names; plot says where it moved an off-grid point
    and refuses a percent moneyness; var refuses tail probabilities for levels and hints
    at swapped position columns; the tail note fits the store's kind."""
    _, run, mc = cli_stores
    grid = ScenarioStore.open(run).meta.grid
    mny, mat = grid["moneyness"], grid["maturity_days"]
    report = json.loads(_invoke(["check", "--store", run, "--json"]).stdout)
    assert report["grid"] == {"moneyness": mny, "maturity_days": mat}
    table = _invoke(["check", "--store", run])
    assert table.exit_code == 0
    assert ("grid: moneyness " + ", ".join(f"{v:.10g}" for v in mny) + "; maturity_days "
            + ", ".join(f"{v:.10g}" for v in mat)) in table.stdout
    # plot: a point off the grid is moved to the nearest, and said so; percent is refused
    asked = (mat[0] + mat[1]) / 2 - 1  # nearer the first
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "f.png", "--maturity",
                      str(asked)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and f"--maturity {asked:g} is not on the store's grid" in said
    assert f"plotting the nearest, {mat[0]:.10g}" in said, said
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "f.png", "--maturity",
                      str(mat[1])])
    assert result.exit_code == 0 and "not on the store's grid" not in result.stderr
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "g.png", "--moneyness", "100"],
                    "--moneyness 100 lies beyond the store's grid", "reads as percent", "e.g. 1")
    assert not (tmp_path / "g.png").exists()
    # var: tail probabilities for confidence levels; columns whose header is out of order
    _one_line_error(["var", "--store", run, "--levels", "0.01,0.05"], "0.01 is below 0.5",
                    "pass 0.99 for the worst 1%")
    swapped = tmp_path / "swapped.csv"
    # (a maturity of 91 also reads as 0.91 in percent, near a moneyness of 0.9)
    swapped.write_text(f"maturity_days,moneyness,vega\n{mny[0]!r},{mat[1]!r},1\n")
    _one_line_error(["var", "--store", run, "--position", swapped],
                    "is one of the grid's maturity_days", "order")
    # a tail on one loss: a tree's points to mc paths, an mc store's to a deeper level
    tree = " ".join(_invoke(["var", "--store", run, "--levels", "0.999"]).stderr.split())
    paths = " ".join(_invoke(["var", "--store", mc, "--levels", "0.999"]).stderr.split())
    assert "`backfill mc` paths of the same sampler" in tree
    assert "residual paths, which more --n-paths repeat" in paths and "backfill mc" not in paths


def test_cli_plot_draws_scenario_paths(cli_stores, tmp_path):
    """--paths N: the deepest level's whole paths at the plotted point, rebuilt from the
    parents (checked here against the paths export), spread over the last day's vol."""
    _, run, _ = cli_stores
    store = ScenarioStore.open(run)
    days, drawn, weight = driver.scenario_paths(store, 1, 2, 4)
    assert drawn.shape == (4, 12) and len(days) == 12
    every, weights = terminal_paths(store)
    last = every[:, -1, 1, 2]
    nodes = driver.spread_nodes(last, weights, 4)
    np.testing.assert_array_equal(drawn, every[nodes][:, :, 1, 2])
    np.testing.assert_array_equal(weight, weights[nodes])
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "p.png", "--paths", "4"])
    assert result.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 1000, result.output
    assert "; 4 scenario paths" in " ".join(result.stderr.split())
    assert _invoke(["plot", "--store", run, "--out", tmp_path / "none.png"]).exit_code == 0
    assert (tmp_path / "p.png").read_bytes() != (tmp_path / "none.png").read_bytes()
    _one_line_error(["plot", "--store", run, "--out", tmp_path / "x.png", "--paths", "101"],
                    "--paths 101", "0 to 100")
    # more than the level's distinct quantile nodes: fewer drawn, and said so
    result = _invoke(["plot", "--store", run, "--out", tmp_path / "p.png", "--paths", "100"])
    grid = store.meta.grid  # the plotted point: moneyness nearest 1, the shortest maturity
    i = int(np.argmin(np.abs(np.asarray(grid["moneyness"]) - 1.0)))
    j = int(np.argmin(grid["maturity_days"]))
    drawn = len(driver.spread_nodes(every[:, -1, i, j], weights, 100))
    assert result.exit_code == 0 and drawn < 100
    assert f"{drawn} scenario paths of the 100 asked" in " ".join(result.stderr.split())


def test_cli_an_unreachable_cluster_address_fails_at_once(cli_stores, tmp_path, monkeypatch):
    """ray.init retries an address nobody answers on for minutes; nothing listens on port 1."""
    cfg, _, _ = cli_stores
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        _one_line_error(["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--backend",
                         "ray", "--address", address], "cannot reach the Ray cluster",
                        "127.0.0.1:1")
    # --address auto joins RAY_ADDRESS: a stopped cluster's is refused at once too, and a
    # run that would start its own Ray while RAY_ADDRESS is set is refused before its fit
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--backend",
                     "ray", "--address", "auto"], "cannot reach the Ray cluster at '127.0.0.1:1'",
                    "(RAY_ADDRESS, which --address auto joins)")
    result = _invoke(["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--backend", "ray"])
    assert result.exit_code == 2 and "RAY_ADDRESS is set (127.0.0.1:1)" in result.stderr
    assert "pass --address auto" in result.stderr and "training" not in result.output
    monkeypatch.delenv("RAY_ADDRESS")
    for address in ("ray://", "ray://127.0.0.1:notaport"):  # refused, not waited on
        _one_line_error(["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--backend",
                         "ray", "--address", address], "is not ray://HOST:PORT")
    # an address the inline backend would silently ignore
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "x.zarr", "--address",
                     "auto"], "--address", "--backend ray")
    # and one in the config: refused where the file also says inline; a note where
    # --backend inline overrides the file (here the run then stops at the existing store)
    both = tmp_path / "both.toml"
    both.write_text(TOML.replace('backend = "inline"', 'backend = "inline"\naddress = "auto"'))
    _one_line_error(["run", "--config", both, "--store", tmp_path / "x.zarr"],
                    "engine.address = 'auto'", "engine.backend = \"ray\"")
    ray_file = tmp_path / "ray.toml"
    ray_file.write_text(TOML.replace('backend = "inline"', 'backend = "ray"\naddress = "auto"'))
    result = _invoke(["run", "--config", ray_file, "--store", cli_stores[1], "--backend",
                      "inline"])
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert "note: engine.address = 'auto'" in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_cli_bad_input_found_by_the_fit_leaves_stores_alone(cli_stores, tmp_path):
    """--overwrite deletes the old store only once the run is ready to start, and a new
    store is made only then: a bad checkpoint leaves the old store whole and no stub."""
    cfg, run, _ = cli_stores
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    kept = tmp_path / "kept.zarr"
    shutil.copytree(run, kept)
    _one_line_error(["run", "--config", cfg, "--store", kept, "--start", "2001-06-29",
                     "--model", bad, "--overwrite"], "checkpoint")
    assert_same_bytes(kept, run)
    _one_line_error(["run", "--config", cfg, "--store", tmp_path / "new.zarr",
                     "--model", bad], "checkpoint")
    assert not (tmp_path / "new.zarr").exists()


def test_cli_notes_a_model_that_learned_past_the_start(cli_stores, tmp_path):
    """Without --model a run trains on the history before its start; a given model that
    learned from later days is the user's choice, but said, not silent."""
    cfg, _, _ = cli_stores
    model = tmp_path / "m.pt"
    assert _invoke(["train", "--config", cfg, "--out", model]).exit_code == 0
    trained_to = load_checkpoint(model)[0].train_end
    before = str(np.busday_offset(np.datetime64(trained_to, "D"), -40, roll="backward"))
    for start, noted in ((before, True), (None, False)):
        result = _invoke(["run", "--config", cfg, "--model", model, "--depth", "1",
                          "--store", tmp_path / f"{start}.zarr"]
                         + (["--start", start] if start else []))
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())
        assert ("learned from days up to" in said) == noted, result.output
        assert not noted or f"up to {trained_to}, after the start {start}" in said


def test_cli_a_sampler_that_diverges_leaves_the_old_store_alone(tmp_path):
    """Data that validate (vols of 1e-300 are positive) but make the fitted sampler draw
    vols that overflow: found from the start context before --overwrite deletes anything."""
    days = np.arange(np.datetime64("2020-01-01"), np.datetime64("2020-04-30"))
    grid = [(m, t) for m in (0.9, 1.0) for t in (30.0, 90.0, 180.0)]
    rng = np.random.default_rng(0)
    good = pd.DataFrame([(str(d), m, t, 0.2 + 0.01 * rng.random()) for d in days
                         for m, t in grid], columns=["date", "moneyness", "maturity_days", "iv"])
    bad = good.copy()
    bad.loc[::7, "iv"] = 1e-300
    good.to_csv(tmp_path / "good.csv", index=False)
    bad.to_csv(tmp_path / "bad.csv", index=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('seed = 3\n[data]\ncontext = 10\nhorizon = 5\n'
                   '[sampler]\nmethod = "knn"\nembedding = "features"\npoint = "pca-ar"\n'
                   'k = 1000\n[tree]\ndepth = 2\nbranching = 2\nn_samples = 16\n'
                   'lookahead = 0\n[engine]\nbackend = "inline"\n[store]\nchunk_nodes = 4\n')
    kept, copy_of = tmp_path / "kept.zarr", tmp_path / "copy.zarr"
    result = _invoke(["run", "--config", cfg, "--data", tmp_path / "good.csv", "--store", kept])
    assert result.exit_code == 0, result.output
    shutil.copytree(kept, copy_of)
    result = _invoke(["run", "--config", cfg, "--data", tmp_path / "bad.csv", "--store", kept,
                      "--overwrite"])
    assert result.exit_code == 2  # after the fit's progress lines, the one error line:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite and positive" in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert_same_bytes(copy_of, kept)
    assert ScenarioStore.open(kept).levels_complete == 2


def test_an_online_calibrated_sampler_runs_the_tree(tmp_path):
    """sampler.conformal = 'online': the tree samples with the scale issued on the start day
    (the end of the history), byte for byte the same for any batch size."""
    panel, split = fitted_sampler()
    cfg = run_config(**{"tree.depth": 2, "sampler.conformal": "online"})
    online = split.recalibrated(cfg, panel)
    assert not np.array_equal(online.scale_, split.scale_)
    make_run(tmp_path / "a.zarr", cfg, sampler=online)
    make_run(tmp_path / "b.zarr", cfg.model_copy(update={"engine": cfg.engine.model_copy(
        update={"batch_size": 2})}), sampler=online)
    assert_same_bytes(tmp_path / "a.zarr", tmp_path / "b.zarr")
    split_cfg = run_config(**{"tree.depth": 2})
    make_run(tmp_path / "split.zarr", split_cfg)
    a, s = store_arrays(tmp_path / "a.zarr"), store_arrays(tmp_path / "split.zarr")
    assert not np.array_equal(a["level_01/paths"], s["level_01/paths"])


def test_decoders_on_two_kinds_of_device_are_refused():
    """Decoders on two GPU models (or GPUs and CPUs) round differently: which one took a task
    would decide the bytes, so such a run stops before its first level, in one line."""
    driver._check_one_decoder_kind({"cuda NVIDIA H100 80GB HBM3"})  # one kind: fine
    with pytest.raises(ConfigError, match=r"cuda NVIDIA A10G and cuda NVIDIA H100 .* one GPU "
                                          r"model"):
        driver._check_one_decoder_kind({"cuda NVIDIA H100 80GB HBM3", "cuda NVIDIA A10G"})
