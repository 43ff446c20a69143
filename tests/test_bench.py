"""`backfill bench --quick`: every key of the JSON is there and positive, the table is printed,
the temporary stores are gone; plus the cheap pieces (plans, the n_samples cap, the table
without Ray) in-process.

The end-to-end run is one real subprocess of the console script (tiny model, 500 synthetic
days, M = 16, inline and Ray), shared by the tests of this module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from engine import bench
from engine.config import load_config

TINY_TOML = """\
seed = 0

[data]
context = 12
horizon = 6

[data.synthetic]
n_days = 500

[model]
hidden = 16
embed_dim = 4
latent_dim = 2

[train]
epochs = 1
batch_size = 64
threads = 1

[tree]
n_samples = 16
"""


def _executable() -> str:
    beside = Path(sys.executable).with_name("backfill")
    return str(beside) if beside.is_file() else (shutil.which("backfill") or "backfill")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "tiny.toml").write_text(TINY_TOML)
    work = tmp / "work"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([_executable(), "bench", "--config", "tiny.toml", "--quick",
                           "--json", "out.json", "--workdir", str(work)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp / "out.json").read_text()), work


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.ray
def test_quick_bench_reports_every_number(quick):
    _, result, _ = quick
    for name in ("inline_nodes_per_s", "ray_nodes_per_s", "inline_nodes_per_s_from_level_2",
                 "ray_nodes_per_s_from_level_2"):
        assert set(result[name]) == {"5", "6", "7"}, name
        assert all(_positive(v) for v in result[name].values()), (name, result[name])
    assert set(result["peak_rss_mb"]) == {"6", "8", "9"}
    assert all(_positive(v) for v in result["peak_rss_mb"].values())
    assert _positive(result["peak_rss_baseline_mb"])
    assert set(result["knn_queries_per_s"]) == {"faiss", "brute"}
    assert all(_positive(v) for v in result["knn_queries_per_s"].values())
    for name in ("decoder_forecasts_per_s", "zarr_write_mb_s", "plain_write_mb_s"):
        assert _positive(result[name]), name
    dev = result["device"]
    assert dev["cpu"] and dev["cores"] >= 1 and dev["torch_device"] in ("cpu", "cuda")
    # --quick keeps the keys and says which depths it ran
    assert result["quick"] is True and result["ray"] is True and result["fsync"] is True
    assert result["depths"] == {"nodes_per_s": {"5": 2, "6": 3, "7": 4},
                                "peak_rss_mb": {"6": 2, "8": 3, "9": 4}}
    cfg = result["config"]
    assert (cfg["data"]["context"], cfg["data"]["horizon"]) == (12, 6)
    assert cfg["tree"]["n_samples"] == 16 and result["overrides"] == {}


@pytest.mark.ray
def test_quick_bench_runs_are_what_they_say(quick):
    _, result, work = quick
    det = result["details"]
    runs = {(r["backend"], r["depth"]): r for r in det["tree"]}
    assert set(runs) == {(b, d) for b in ("inline", "ray") for d in (2, 3, 4)}
    for (_, depth), r in runs.items():
        # a full 5-ary tree: 1 + 5 + ... + 5^(depth-1) frontier nodes
        assert r["nodes"] == sum(5 ** i for i in range(depth))
        assert [lv["level"] for lv in r["levels"]] == list(range(1, depth + 1))
        assert r["nodes_per_s"] == pytest.approx(r["nodes"] / r["seconds"])
    front = det["rss_runs"]["max_frontier"]
    by_depth = {r["depth"]: r for r in det["rss"]}
    assert by_depth[0]["nodes"] == 0 and by_depth[0]["expand"] is False
    for depth in (2, 3, 4):
        assert by_depth[depth]["levels_complete"] == depth
        assert by_depth[depth]["nodes"] <= sum(min(5 ** i, front) for i in range(depth))
    w = det["write"]
    assert w["fsync"] is True and w["bytes"] > 0 and w["rows"] % w["chunk_nodes"] == 0
    assert det["knn"]["same_ids"] == 1.0  # faiss and brute force agree on the neighbours
    assert not any(work.iterdir())  # every temporary store was removed


@pytest.mark.ray
def test_quick_bench_prints_one_table(quick):
    proc, _, _ = quick
    out = proc.stdout
    assert "backfill bench --quick" in out
    for row in ("tree expansions, inline", "tree expansions, ray", "decoder p50 forecasts",
                "kNN search, faiss", "kNN search, brute force", "write, zarr store",
                "write, plain file", "peak RSS, driver"):
        assert row in out, row
    assert "wrote out.json" in proc.stderr


@pytest.mark.ray
def test_table_without_ray_says_skipped(quick):
    _, result, _ = quick
    r = copy.deepcopy(result)
    r["ray"], r["ray_nodes_per_s"], r["ray_nodes_per_s_from_level_2"] = False, None, None
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(bench.render_table(r))
    assert console.export_text().count("skipped") == 3


def test_gpu_bench_compares_the_stores_of_each_thread_count():
    trees = [{"n_samples": 64, "depth": 5, "threads": 1, "digest": "a"},
             {"n_samples": 64, "depth": 5, "threads": 16, "digest": "a"},
             {"n_samples": 64, "depth": 6, "threads": 1, "digest": "b"},
             {"n_samples": 64, "depth": 6, "threads": 16, "digest": "c"},
             {"n_samples": 512, "depth": 5, "threads": 16, "digest": "d"}]  # alone: no verdict
    assert bench.same_bytes(trees) == {"M64_depth5": True, "M64_depth6": False}


@pytest.mark.parametrize("args, says", [(["--depths", "5"], "belong to --gpu"),
                                        (["--gpu", "--depths", "0,5"], "from 1 to 64"),
                                        (["--gpu", "--threads", "1,x"], "comma-separated"),
                                        (["--workdir", __file__], "is a file, not a folder")])
def test_bench_refuses_bad_options_in_one_line(args, says):
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert says in result.output and "Traceback" not in result.output


def test_plans_keep_the_keys():
    cfg = load_config(None)
    full = bench.plan_for(cfg, quick=False, ray=True)
    assert full.tree_depths == {"5": 5, "6": 6, "7": 7}
    assert full.rss_depths == {"6": 6, "8": 8, "9": 9} and full.rss_max_frontier == 625
    small = bench.plan_for(cfg, quick=True, ray=False)
    assert set(small.tree_depths) == {"5", "6", "7"} and set(small.rss_depths) == {"6", "8", "9"}
    assert max(small.tree_depths.values()) < 5 and small.write_mb < full.write_mb


def test_bench_config_caps_n_samples_and_says_so():
    cfg = load_config(None)  # tree.n_samples 512
    capped, overrides = bench.bench_config(cfg)
    assert capped.tree.n_samples == bench.DEFAULT_SAMPLES
    assert overrides == {"tree.n_samples": bench.DEFAULT_SAMPLES}
    same, none = bench.bench_config(capped)
    assert same is capped and none == {}
    chosen, overrides = bench.bench_config(cfg, n_samples=512)
    assert chosen.tree.n_samples == 512 and overrides == {}


def test_own_peak_rss_is_this_process():
    assert 10 < bench._own_peak_rss_mb() < 1e6


def test_gpu_bench_counts_what_a_node_decodes(tmp_path):
    """`bench --gpu` on whatever device torch has (the CPU here): the stage profile counts the
    contexts a lookahead node decodes (its own and each candidate's; a p50 forecast of each
    per fold model), the decoder half is timed as the engine runs it, and the decoder-alone
    ceiling is its rate over that count."""
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_executable(), "bench", "--gpu", "--config", "tiny.toml",
                           "--depths", "2", "--threads", "1", "--n-samples", "16",
                           "--json", "out.json", "--workdir", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    prof = result["stage_profile"]["16"]
    cfg = load_config(tmp_path / "tiny.toml")
    assert prof["point_models"] == cfg.sampler.n_folds
    # a node's candidates: more than one (its 16 draws are not all one path), at most lookahead
    assert 2.0 < prof["contexts_per_node"] <= 1 + min(cfg.tree.lookahead, 16)
    assert prof["lookahead"] and prof["forecasts_per_node"] == pytest.approx(
        prof["contexts_per_node"] * prof["point_models"])
    # what its kNN half draws: M paths twice (the choice's two passes) and lookahead_samples
    # for each candidate, of H days on the grid
    per_path = cfg.data.horizon * math.prod(result["details"]["grid"])
    n_look = max(8, -(-cfg.tree.branching * 16 // cfg.tree.lookahead))
    assert prof["sampled_values_per_node"] == pytest.approx(
        (2 * 16 + (prof["contexts_per_node"] - 1) * n_look) * per_path)
    assert "the kNN half draws" in proc.stdout
    half = result["decoder_half_contexts_per_s"]
    assert _positive(half) and half == result["details"]["decoder_half"]["per_s"]
    # five p50 forecasts and a key per context: slower than one model's forecasts alone
    assert half < result["decoder_forecasts_per_s"]["4096"]
    assert result["decoder_bound_nodes_per_s"]["16"] == pytest.approx(
        half / prof["contexts_per_node"])
    assert prof["decoder_bound_nodes_per_s"] == result["decoder_bound_nodes_per_s"]["16"]
    assert "decoder half alone" in proc.stdout and "contexts/s" in proc.stdout
    assert not list((tmp_path / "work").iterdir())  # its temporary stores are gone
