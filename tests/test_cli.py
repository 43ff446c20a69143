"""The `backfill` command line: user errors are one stderr line and exit status 2 (no traceback);
`config show` round-trips; `train` works end to end on tiny inputs.

Every bad input runs in-process through typer's CliRunner (cheap), and a representative subset
of them again as a real subprocess, the most faithful check of stderr and the exit status. The
subprocesses (each pays ~1.5 s of interpreter + torch start-up) are started once, side by side,
by the module fixture ``runs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from typer.testing import CliRunner

from engine.cli import app, main
from engine.config import Config, load_config
from engine.data.io import read_panel
from engine.model import load_checkpoint
from tests.conftest import SHARED_DATA, cli_toml, shared_file
from tests.test_data import tidy_frame

TINY_TOML = """\
seed = 3

[data]
context = 10
horizon = 5

[model]
hidden = 16
embed_dim = 4
latent_dim = 2

[train]
epochs = 2
batch_size = 64
threads = 1
"""

# Tiny model and epochs, the data settings left at their defaults (context 60, horizon 90).
TINY_MODEL_TOML = """\
[model]
hidden = 16
embed_dim = 4
latent_dim = 2

[train]
epochs = 1
batch_size = 128
threads = 1
"""


def _executable() -> str:
    beside = Path(sys.executable).with_name("backfill")
    return str(beside) if beside.is_file() else (shutil.which("backfill") or "backfill")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([_executable(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _with(df: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    df = df.copy()
    if isinstance(value, str):
        df[column] = df[column].astype(object)
    df.loc[row, column] = value
    return df


# name -> (file name, content: a frame or bytes, keywords the one error line must hold)
_BASE = tidy_frame(n_days=60, shape=(2, 3))
_DAY = _BASE.loc[14, "date"]  # the date of row 14
BAD_DATA = {
    "missing-grid-point": ("gap.csv", _BASE.drop(index=14), [_DAY, "grid points", "missing"]),
    "nan": ("nan.csv", _with(_BASE, 14, "iv", np.nan), [_DAY, "iv", "NaN or inf"]),
    "inf": ("inf.csv", _with(_BASE, 14, "iv", np.inf), [_DAY, "iv", "NaN or inf"]),
    "iv-zero": ("zero.csv", _with(_BASE, 14, "iv", 0.0), [_DAY, "iv = 0", "(0, 5]"]),
    "iv-negative": ("neg.csv", _with(_BASE, 14, "iv", -0.3), [_DAY, "iv = -0.3"]),
    "iv-too-big": ("big.csv", _with(_BASE, 14, "iv", 16.5), [_DAY, "iv = 16.5", "decimal"]),
    "duplicate": ("dup.csv", pd.concat([_BASE, _BASE.iloc[[14]]]), [_DAY, "duplicate"]),
    "too-short": ("short.csv", tidy_frame(n_days=12), ["12 days", "10 + 5 = 15"]),
    # 40 days, 60/20/20: calibration keeps days 29..31 after the embargo, 3 < horizon 5.
    "split-without-window": ("split.csv", tidy_frame(n_days=40),
                             ["calibration split has no complete window", "holds 3 days",
                              "needs at least 5"]),
    "empty": ("empty.csv", b"", ["empty"]),
    "header-only": ("header.csv", b"date,moneyness,maturity_days,iv\n", ["no rows"]),
    "binary": ("binary.csv", bytes(range(256)) * 8, ["cannot read", "binary.csv"]),
    "bad-parquet": ("bad.parquet", b"PAR1 this is not parquet", ["cannot read", "Parquet"]),
    "bad-npz": ("bad.npz", b"not an npz", ["cannot read", "NPZ"]),
    "missing-column": ("nocol.csv", _BASE.drop(columns="maturity_days"),
                       ["missing column 'maturity_days'"]),
    "bad-date": ("date.csv", _with(_BASE, 0, "date", "yesterday"), ["'date'", "yesterday"]),
}

# The bad inputs that also run as real subprocesses (the rest only in-process).
SUBPROCESS_CASES = ("missing-grid-point", "nan", "bad-date", "unknown-key")

BAD_CONFIG = {
    "unknown-key": ("[model]\nhiden = 3\n", ["unknown key", "model.hiden"]),
    "negative-horizon": ("[data]\nhorizon = -5\n", ["data.horizon", "-5"]),
    "invalid-toml": ("[model\nhidden = = 3\n", ["not valid TOML"]),
    "bad-fractions": ("[data]\nsplit_fractions = [0.5, 0.5, 0.5]\n", ["split_fractions"]),
    "deep-array": ("a = " + "[" * 5000 + "]" * 5000 + "\n", ["arrays nested too deep"]),
    "long-integer": ("[tree]\ndepth = " + "9" * 5000 + "\n", ["4300 digits", "fix that value"]),
    "huge-episode": ("[sampler]\nepisode_days = 999999999999999999999\n",
                     ["sampler.episode_days", "1000000"]),
}


def write_bad_inputs(root: Path) -> dict[str, list[str]]:
    """Write every bad input under ``root``; the `backfill` arguments of each case."""
    tiny = root / "tiny.toml"
    tiny.write_text(TINY_TOML)
    good = root / "good.csv"
    tidy_frame(n_days=120, shape=(2, 3), seed=5).to_csv(good, index=False)
    cases: dict[str, list[str]] = {}
    for name, (fname, content, _) in BAD_DATA.items():
        path = root / fname
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.to_csv(path, index=False)
        cases[name] = ["train", "--data", str(path), "--config", str(tiny), "--out", "m.pt"]
    cases["data-not-found"] = ["train", "--data", str(root / "nope.csv"), "--config", str(tiny),
                               "--out", "m.pt"]
    for name, (text, _) in BAD_CONFIG.items():
        (root / f"{name}.toml").write_text(text)
        cases[name] = ["train", "--data", str(good), "--config", str(root / f"{name}.toml"),
                       "--out", "m.pt"]
    cases["config-not-found"] = ["train", "--config", str(root / "nope.toml"), "--out", "m.pt"]
    cases["show-config-not-found"] = ["config", "show", "--config", str(root / "nope.toml")]
    cases["show-unknown-key"] = ["config", "show", "--config", str(root / "unknown-key.toml")]
    return cases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("cli")
    return root, write_bad_inputs(root)


@pytest.fixture(scope="module")
def runs(inputs) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root, cases = inputs
    tiny = root / "tiny.toml"
    (root / "tiny_model.toml").write_text(TINY_MODEL_TOML)
    jobs = {name: cases[name] for name in SUBPROCESS_CASES}
    jobs["show-config-not-found"] = cases["show-config-not-found"]
    jobs["show"] = ["config", "show"]
    jobs["show-tiny"] = ["config", "show", "--config", str(tiny)]
    jobs["train-good"] = ["train", "--data", str(root / "good.csv"), "--config", str(tiny),
                          "--out", "out/model.pt"]
    vix = SHARED_DATA / "vix_term_2011_2023.csv"
    spx = SHARED_DATA / "spx_surface_2006_2009.csv"
    if vix.is_file():
        jobs["train-vix"] = ["train", "--data", str(vix), "--config", str(tiny),
                             "--out", "vix.pt"]
    if spx.is_file():
        (root / "spx_shares.toml").write_text(
            TINY_MODEL_TOML + "\n[data]\nsplit_fractions = [0.7, 0.15, 0.15]\n")
        jobs["train-spx-default"] = ["train", "--data", str(spx), "--config",
                                     str(root / "tiny_model.toml"), "--out", "spx90.pt"]
        jobs["train-spx-shares"] = ["train", "--data", str(spx), "--config",
                                    str(root / "spx_shares.toml"), "--out", "spx90.pt"]
        jobs["train-spx-h30"] = ["train", "--data", str(spx), "--config",
                                 str(root / "tiny_model.toml"), "--horizon", "30",
                                 "--out", "spx30.pt"]

    def one(item):
        name, args = item
        cwd = root / f"run-{name}"
        cwd.mkdir()
        return name, (_run(args, cwd), cwd)

    # The training runs first: they are the longest.
    order = sorted(jobs.items(), key=lambda kv: not kv[0].startswith("train-"))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, order))


def invoke(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI in-process, shaped like a subprocess result.

    A warning would reach stderr in a real run (pytest captures it here), so any is an error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, args)
    assert not caught, [str(w.message) for w in caught]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an uncaught error: the real CLI would print a traceback
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(proc: subprocess.CompletedProcess, keywords: list[str]) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    line = lines[0]
    assert line.startswith("error:"), line
    for word in keywords:
        assert word in line, (word, line)
    return line


KEYWORDS = {
    **{name: words for name, (_, _, words) in BAD_DATA.items()},
    **{name: words for name, (_, words) in BAD_CONFIG.items()},
    "data-not-found": ["nope.csv", "not found"],
    "config-not-found": ["nope.toml", "not found"],
    "show-config-not-found": ["nope.toml", "not found"],
    "show-unknown-key": ["unknown key", "model.hiden"],
}


@pytest.mark.parametrize("name", list(KEYWORDS))
def test_bad_input_is_one_line_exit_2(inputs, tmp_path, monkeypatch, name):
    _, cases = inputs
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(cases[name]), KEYWORDS[name])
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("name", [*SUBPROCESS_CASES, "show-config-not-found"])
def test_bad_input_subprocess(runs, name):
    proc, cwd = runs[name]
    assert_one_line_error(proc, KEYWORDS[name])
    assert not (cwd / "m.pt").exists()


def test_outputs_never_replace_inputs_or_other_files(inputs, tmp_path):
    """train --out and bench --json refuse their own input files (named by flag or by the
    config's data.source) and an existing file of another kind, before any work; nothing
    is written over."""
    root, _ = inputs
    good, tiny = root / "good.csv", root / "tiny.toml"
    sourced = tmp_path / "sourced.toml"
    sourced.write_text(TINY_TOML.replace("[data]\n", f"[data]\nsource = {json.dumps(str(good))}\n"))
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    before = {p: p.read_bytes() for p in (good, tiny, sourced, other)}
    for args, words in [
        (["train", "--data", good, "--config", tiny, "--out", good], ["is the --data file"]),
        (["train", "--data", good, "--config", tiny, "--out", tiny], ["is the --config file"]),
        (["train", "--config", sourced, "--out", good], ["is the --data file"]),
        (["train", "--data", good, "--config", tiny, "--out", other],
         ["exists and is not a backfill checkpoint file", "which train would overwrite"]),
        (["fit", "--config", sourced, "--out", good], ["is the --data file"]),
        (["bench", "--config", tiny, "--json", tiny, "--quick"], ["is the --config file"]),
        (["bench", "--config", tiny, "--json", other, "--quick"],
         ["exists and is not a JSON report"]),
    ]:
        assert_one_line_error(invoke([str(a) for a in args]), words)
    assert {p: p.read_bytes() for p in before} == before


def test_config_show_round_trips(runs):
    proc, _ = runs["show"]
    assert proc.returncode == 0, proc.stderr
    parsed = tomllib.loads(proc.stdout)
    assert Config.model_validate(parsed) == Config()
    # the keys TOML cannot write (unset, None) are there as comments, in their sections
    lines = proc.stdout.splitlines()
    for section, key in [("data", "embargo"), ("data", "test_start"), ("engine", "address"),
                         ("engine", "decoder_gpus")]:
        at = lines.index(f"[{section}]")
        nxt = next(i for i in range(at + 1, len(lines)) if lines[i].startswith("["))
        assert any(ln.startswith(f"# {key} = (unset) ") for ln in lines[at:nxt]), (key, lines)
    assert max(len(ln) for ln in lines if ln.startswith("#")) <= 88


def test_config_show_reflects_the_file(runs, tmp_path):
    proc, _ = runs["show-tiny"]
    assert proc.returncode == 0, proc.stderr
    shown = Config.model_validate(tomllib.loads(proc.stdout))
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    assert shown == load_config(tmp_path / "tiny.toml")
    assert (shown.seed, shown.data.context, shown.data.horizon) == (3, 10, 5)
    assert (shown.model.hidden, shown.train.epochs) == (16, 2)
    assert shown.data.split_fractions == (0.6, 0.2, 0.2)  # defaults fill the rest


def assert_trained(proc: subprocess.CompletedProcess, checkpoint: Path) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "validation pinball" in text and "saved model to" in text, text
    assert checkpoint.is_file()


def test_train_good_file(runs):
    proc, cwd = runs["train-good"]
    checkpoint = cwd / "out" / "model.pt"
    assert_trained(proc, checkpoint)
    model, meta = load_checkpoint(checkpoint)
    panel = read_panel(Path(proc.args[proc.args.index("--data") + 1]))
    assert meta["fingerprint"] == panel.fingerprint and meta["fingerprint"] in proc.stderr
    assert (model.context, model.horizon, model.grid_shape) == (10, 5, (2, 3))
    assert Config.model_validate(meta["config"]).model.hidden == 16
    assert len(meta["history"]) == 2


def test_train_vix(runs):
    shared_file("vix_term_2011_2023.csv")
    proc, cwd = runs["train-vix"]
    assert_trained(proc, cwd / "vix.pt")
    model, _ = load_checkpoint(cwd / "vix.pt")
    assert model.grid_shape == (1, 4)


def test_spx_chosen_shares_leave_no_calibration_window(runs):
    # 70 / 15 / 15 of 847 days, set by the user: refused, naming shares that fit
    shared_file("spx_surface_2006_2009.csv")
    proc, cwd = runs["train-spx-shares"]
    assert_one_line_error(proc, ["split has no complete window", "calibration", "needs at least 90",
                                 "data.split_fractions = [0.5, 0.25, 0.25]"])
    assert not (cwd / "spx90.pt").exists()


def test_spx_default_shares_give_way_with_a_note(runs):
    # the same shares by default: the ones that fit serve instead, and a note says so
    shared_file("spx_surface_2006_2009.csv")
    proc, cwd = runs["train-spx-default"]
    assert_trained(proc, cwd / "spx90.pt")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "note: the default data.split_fractions [0.6, 0.2, 0.2]" in text, text
    assert "using [0.5, 0.25, 0.25] instead" in text, text


def test_train_spx_horizon_30(runs):
    shared_file("spx_surface_2006_2009.csv")
    proc, cwd = runs["train-spx-h30"]
    assert_trained(proc, cwd / "spx30.pt")
    model, _ = load_checkpoint(cwd / "spx30.pt")
    assert (model.context, model.horizon, model.grid_shape) == (60, 30, (7, 6))


@pytest.mark.parametrize("argv, words", [
    (["frobnicate"], ["No such command", "backfill --help"]),
    (["run", "--store", "x.zarr", "--depth", "two"], ["--depth", "backfill run --help"]),
    (["marginals", "--out", "x.csv"], ["--store"]),
    (["var", "--store", "x.zarr", "--bogus"], ["--bogus"]),
    # Path("") is the working directory: an empty path flag is refused, nothing read there
    (["run", "--store", "x.zarr", "--sampler", ""], ["the path is empty", "backfill run"]),
    (["evaluate", "--out", " "], ["the path is empty", "backfill evaluate"]),
    (["config", "show", "--config", ""], ["the path is empty", "backfill config show"]),
    (["marginals", "--store", "", "--out", "m.csv"], ["the path is empty", "backfill marginals"]),
])
def test_usage_errors_are_one_line_exit_2(monkeypatch, capsys, tmp_path, argv, words):
    """Through the installed entry point (``main``), not typer's boxed usage message; the
    working directory is left as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["backfill", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert list(tmp_path.iterdir()) == []


def _path_flags() -> list[tuple[str, str, object]]:
    """(command, parameter, its typer option) of every flag of every command typed Path."""
    import typing

    from engine import cli

    found = []
    groups = [("", app)] + [(g.name + " ", g.typer_instance) for g in app.registered_groups]
    for prefix, typer_app in groups:
        for command in typer_app.registered_commands:
            fn = command.callback
            for name, hint in typing.get_type_hints(fn, include_extras=True).items():
                if typing.get_origin(hint) is not typing.Annotated:
                    continue
                base, option = typing.get_args(hint)[:2]
                if Path in (typing.get_args(base) or (base,)):
                    found.append((prefix + (command.name or fn.__name__), name, option))
    assert {type(o).__name__ for _, _, o in found} == {"OptionInfo"}
    assert all(o.parser is cli._path for _, _, o in found), \
        [f"{c} {n}" for c, n, o in found if o.parser is not cli._path]
    return found


def test_every_path_flag_refuses_an_empty_value():
    """``Path("")`` is the working directory: an empty path flag would read or write there."""
    flags = _path_flags()
    assert len(flags) >= 18, flags
    assert {("run", "sampler"), ("fit", "out"), ("evaluate", "out"), ("config show", "config"),
            ("var", "tail")} <= {(c, n) for c, n, _ in flags}


def test_help_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["backfill", "var", "--help"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 0 and "--levels" in capsys.readouterr().out


def test_help_paragraphs_have_no_hard_line_breaks():
    """Rich keeps a help text's newlines, so a docstring wrapped at the source's width
    prints as ragged lines in `--help`: every command's and option's help paragraphs must
    be single lines."""
    import typer

    def commands(cmd, path=()):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, (*path, name))

    seen = 0
    for path, cmd in commands(typer.main.get_command(app)):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for paragraph in text.strip().split("\n\n"):
                assert "\n" not in paragraph, f"backfill {' '.join(path)}: {paragraph!r}"
        seen += 1
    assert seen > 10


def test_os_errors_get_the_fix_that_fits_them():
    import errno

    from engine.cli import _os_error

    assert "free disk space" in _os_error(OSError(errno.ENOSPC, "No space left", "run.zarr"))
    assert "Ray cluster" in _os_error(ConnectionError("reset by peer"))
    assert "permissions" in _os_error(PermissionError(errno.EACCES, "denied", "/x"))
    assert len(_os_error(OSError("line one\nline two")).splitlines()) == 1


def test_demo_runs_end_to_end_on_a_tiny_market(tmp_path):
    """The main job, shrunk: no validation windows, a CVAE without p05 / p95 heads, a
    depth-2 tree of 6-day levels. The oracle's share inside the tree's band is read at each
    level's last day, and the raw CVAE's band is named by the levels it has."""
    config = tomllib.loads(cli_toml(depth=2))
    config["model"]["quantiles"] = [0.1, 0.5, 0.9]
    config["train"]["val_fraction"] = 0
    (tmp_path / "demo.toml").write_text(tomli_w.dumps(config))
    out = tmp_path / "demo_out"
    result = invoke(["demo", "--config", str(tmp_path / "demo.toml"), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "no validation windows" in result.stderr  # the console's status goes to stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cvae_band"] == "p10/p50/p90"
    assert "its p10/p50/p90 band" in (out / "summary.txt").read_text()
    inside = summary["tree"]["oracle_inside_90"]
    assert list(inside) == ["6", "12"] and all(0 <= v <= 1 for v in inside.values())
    assert (out / "fan_6d.png").stat().st_size > 0 and (out / "tree_fan_12d.png").is_file()
    # a second demo into the same folder replaces its own tree.zarr; a folder of the user's
    # named so is refused before the training, and kept
    again = invoke(["demo", "--config", str(tmp_path / "demo.toml"), "--out", str(out)])
    assert again.returncode == 0, again.stderr
    theirs = tmp_path / "theirs"
    (theirs / "tree.zarr").mkdir(parents=True)
    (theirs / "tree.zarr" / "notes.txt").write_text("keep me")
    refused = invoke(["demo", "--config", str(tmp_path / "demo.toml"), "--out", str(theirs)])
    assert_one_line_error(refused, ["is not a backfill store", "another --out"])
    assert (theirs / "tree.zarr" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in theirs.iterdir()) == ["tree.zarr"]  # nothing trained
    # a config that names a Ray cluster but the inline backend asks for two things at once
    config["engine"]["address"] = "auto"
    (tmp_path / "both.toml").write_text(tomli_w.dumps(config))
    refused = invoke(["demo", "--config", str(tmp_path / "both.toml"), "--out",
                      str(tmp_path / "none")])
    assert_one_line_error(refused, ["engine.address = 'auto'", "'inline'"])
    assert not (tmp_path / "none").exists()
