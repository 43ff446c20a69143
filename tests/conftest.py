"""Shared fixtures: a tiny config and a small toy panel that any sampler can fit quickly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import Config
from engine.data.panel import Panel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data {name} not found at {SHARED_DATA} (only in the project workspace)")
    return path


def tiny_config(**overrides) -> Config:
    """Context 12, horizon 6, a small model that trains in seconds."""
    d = {
        "data": {"context": 12, "horizon": 6, "synthetic": {"test_days": 0}},
        "model": {"hidden": 16, "embed_dim": 4, "latent_dim": 2},
        "train": {"epochs": 2, "batch_size": 64, "threads": 1},
        "sampler": {"n_folds": 3},
        "evaluate": {"n_samples": 50, "horizons": [1, 3, 6]},
    }
    for key, value in overrides.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return Config.model_validate(d)


def toy_panel(n_days: int = 400, shape=(2, 3), seed: int = 0) -> Panel:
    """Mean-reverting log-IV with a common level factor plus noise (no hidden-state oracle)."""
    rng = np.random.default_rng(seed)
    n_m, n_tau = shape
    level = np.empty(n_days)
    level[0] = np.log(0.2)
    for t in range(1, n_days):
        level[t] = level[t - 1] + 0.05 * (np.log(0.2) - level[t - 1]) + 0.04 * rng.standard_normal()
    skew = np.linspace(0.1, -0.1, n_m)[:, None] + np.linspace(0, 0.05, n_tau)[None, :]
    log_iv = level[:, None, None] + skew[None] + 0.01 * rng.standard_normal((n_days, n_m, n_tau))
    dates = np.datetime64("2010-01-04") + np.arange(n_days)
    return Panel(np.exp(log_iv), dates, np.linspace(0.9, 1.1, n_m),
                 np.array([30.0, 91.0, 182.0][:n_tau] + [365.0] * max(0, n_tau - 3)),
                 source="toy")


@pytest.fixture
def config() -> Config:
    return tiny_config()


@pytest.fixture
def panel() -> Panel:
    return toy_panel()


# ---------------------------------------------------------------- a tiny project for the CLI

CLI_TOML = """\
seed = {seed}

[data]
context = 12
horizon = 6

[data.synthetic]
n_days = 400
test_days = 0

[model]
hidden = 16
embed_dim = 4
latent_dim = 2

[train]
epochs = 1
batch_size = 64
threads = 1

[sampler]
n_folds = 2

[tree]
depth = {depth}
n_samples = 32

[engine]
backend = "inline"
batch_size = {batch}
checkpoint_seconds = {checkpoint}

[store]
chunk_nodes = {chunk}
marginal_bins = 64
"""


def cli_toml(depth: int, seed: int = 5, batch: int = 25, chunk: int = 25,
             checkpoint: float = 0) -> str:
    """CLI_TOML filled in: by default tasks of 25 nodes, chunks of 25 rows and a checkpoint
    after every task."""
    return CLI_TOML.format(depth=depth, seed=seed, batch=batch, chunk=chunk,
                           checkpoint=checkpoint)


def backfill_cmd(*args) -> list[str]:
    """`backfill ARGS` as a subprocess command line (this interpreter, this checkout)."""
    import sys

    return [sys.executable, "-m", "engine.cli", *map(str, args)]


def cli_project(directory: Path, depth: int) -> tuple[Path, Path]:
    """A tiny config (synthetic market of 400 days, M = 32, tasks of 25 nodes, chunks of 25
    rows, a checkpoint after every task) and a model trained for it: (config, model)."""
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "tiny.toml"
    cfg.write_text(cli_toml(depth))
    model = directory / "model.pt"
    r = subprocess.run(backfill_cmd("train", "--config", cfg, "--out", model),
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    # status and progress go to stderr: stdout carries only what a command was asked to print
    assert r.stdout == "" and "train" in r.stderr, r.stdout[-3000:]
    return cfg, model
