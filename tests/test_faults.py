"""Hard faults at depth 6, through the CLI in real processes: `kill -9` of the driver in the
middle of level 4, then `backfill run --resume`, gives the clean run's store bit for bit, with
no missing or doubled node. (A kill -9 of an actor process: tests/test_engine_ray.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from engine.store import ScenarioStore
from tests.conftest import backfill_cmd, cli_project
from tests.test_driver import assert_same_bytes

DEPTH, K = 6, 5


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return cli_project(tmp_path_factory.mktemp("faults"), DEPTH)


@pytest.fixture(scope="module")
def clean(project, tmp_path_factory) -> Path:
    cfg, model = project
    path = tmp_path_factory.mktemp("clean") / "run.zarr"
    r = subprocess.run(backfill_cmd("run", "--config", cfg, "--model", model, "--store", path),
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return path


def assert_whole_tree(path: Path) -> None:
    """Every level: weights sum to 1, and every node of the level above has exactly K
    children (no node missing, none doubled)."""
    store = ScenarioStore.open(path)
    assert store.levels_complete == DEPTH
    for level in range(1, DEPTH + 1):
        n = store.level_size(level)
        assert n == K ** level
        got = store.read_level(level, 0, n)
        assert abs(got["weight"].sum() - 1.0) < 1e-9
        per_parent = np.bincount(got["parent"], minlength=K ** (level - 1))
        assert per_parent.tolist() == [K] * K ** (level - 1), level
        assert (np.sort(got["branch"].reshape(-1, K), axis=1) == np.arange(K)).all()


def test_clean_run_is_a_whole_tree(clean):
    assert_whole_tree(clean)


def kill_in_level_4(run: list[str], path: Path) -> int:
    """Start ``run`` and kill -9 it once level 4 has a checkpoint (at least one task done) and
    a few chunks written; returns how many of level 4's chunks were on disk. A 2-core box can
    stall the watcher until level 4 is over: then it tries again from a fresh store."""
    done = path / "level_04" / "done"  # one file c.<i> per chunk of level 4 written
    ckpt = Path(str(path) + ".partial") / "level_04.npz"  # saved after each task
    for _ in range(3):
        proc = subprocess.Popen(run + ["--overwrite"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if ckpt.is_file() and len(list(done.glob("c.*"))) >= 7:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait(timeout=60)
        if proc.returncode == 0:  # the watcher stalled past level 4: try again
            continue
        assert proc.returncode == -signal.SIGKILL, f"the driver failed ({proc.returncode})"
        if ScenarioStore.open(path).levels_complete == 3:  # killed inside level 4
            return len(list(done.glob("c.*")))
    pytest.fail("three tries could not kill the driver inside level 4")


def test_kill_9_of_the_driver_in_level_4_then_resume_gives_the_clean_store(project, clean,
                                                                         tmp_path):
    cfg, model = project
    path = tmp_path / "killed.zarr"
    run = backfill_cmd("run", "--config", cfg, "--model", model, "--store", path)
    chunks_written = kill_in_level_4(run, path)
    assert 7 <= chunks_written <= K ** 4 // 25  # level 4: 625 rows in chunks of 25
    # what the kill left is consistent: every chunk on disk decodes and fits the tree
    check = backfill_cmd("check", "--store", path)
    r = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "not finished" in r.stderr, r.stdout + r.stderr

    r = subprocess.run(run + ["--resume"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = " ".join((r.stdout + r.stderr).split())  # rich wraps lines at 80 columns
    redone = re.search(r"level 4: (\d+) of its (\d+) nodes expanded \((\d+) done before\), "
                       rf"{K ** 4} children in all", out)
    assert redone, out[-2000:]
    # the tasks finished before the kill (checkpointed after every task) are not redone
    now, frontier, before = map(int, redone.groups())
    assert frontier == K ** 3 and now + before == frontier and now < frontier
    assert "level 3:" not in out  # complete levels are not touched
    assert_same_bytes(clean, path)
    assert_whole_tree(path)
    assert not Path(str(path) + ".partial").exists()
    r = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "not finished" not in r.stderr, r.stdout + r.stderr
