"""Edge values of the config: each is refused up front with one clear line, not deep in a run.

Seeds beyond 63 bits, booleans in number fields, a min_weight that is no probability,
branching above n_samples, sizes that only allocate gigabytes, inf / nan.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import BaseModel

from engine.config import (
    MAX_SEED,
    Config,
    TreeConfig,
    _number_kind,
    iso_day,
    load_config,
    parse_config,
)
from engine.errors import ConfigError
from engine.samplers.knn import min_history
from engine.samplers.knn_conformal import KnnConformalSampler
from tests.conftest import cli_toml
from tests.test_cli import assert_one_line_error, invoke


def _nested(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    d: dict = {leaf: value}
    for key in reversed(parents):
        d = {key: d}
    return d


def _refused(dotted: str, value, *words: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(_nested(dotted, value))
    msg = str(err.value)
    assert "\n" not in msg and f"'{dotted}" in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


def _get(cfg: BaseModel, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def _number_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, kind) of every int / float field of the config tree."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _number_fields(ann, f"{prefix}{name}.")
        elif (kind := _number_kind(ann)) is not None:
            out.append((f"{prefix}{name}", kind))
    return out


NUMBER_FIELDS = _number_fields()


def test_the_walk_finds_the_number_fields():
    names = dict(NUMBER_FIELDS)
    assert names["tree.depth"] == "an integer" and names["train.lr"] == "a number"
    assert names["seed"] == names["data.synthetic.seed"] == "an integer"
    assert names["data.embargo"] == "an integer"  # int | None
    assert names["model.quantiles"] == names["data.split_fractions"] == "a number"
    assert names["evaluate.horizons"] == "an integer"
    assert "engine.backend" not in names and "data.source" not in names
    assert len(NUMBER_FIELDS) > 40


# ----------------------------------------------------------------------------- 1. seeds


@pytest.mark.parametrize("field", ["seed", "data.synthetic.seed"])
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**64, 10**20])
def test_seeds_beyond_63_bits_are_refused(field, value):
    _refused(field, value, "2**63 - 1", str(MAX_SEED), "smaller seed", str(value))


@pytest.mark.parametrize("field", ["seed", "data.synthetic.seed"])
def test_seed_range_ends_are_accepted(field):
    for value in (0, MAX_SEED):
        assert _get(parse_config(_nested(field, value)), field) == value
    _refused(field, -1, "greater than or equal to 0")


def test_the_largest_seed_works_in_numpy_and_torch():
    torch = pytest.importorskip("torch")
    np.random.default_rng(np.random.SeedSequence([MAX_SEED, 0x5E7]))
    # the fold models train with seed + 1000 + fold (fold < n_folds <= 50)
    torch.manual_seed(MAX_SEED + 1000 + 50)
    torch.Generator().manual_seed(MAX_SEED + 1000 + 50)


def test_cli_override_seed_is_checked_too():
    with pytest.raises(ConfigError, match="2\\*\\*63 - 1"):
        load_config(None, {"seed": 2**64})


# ----------------------------------------------------------------------------- 2. booleans


@pytest.mark.parametrize(("field", "kind"), NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_refused_in_number_fields(field, kind, value):
    default = _get(Config(), field)
    bad = [value] * len(default) if isinstance(default, list | tuple) else value
    _refused(field, bad, "boolean", kind, "true / false")


def test_numpy_bool_is_refused():
    _refused("tree.depth", np.True_, "boolean")


def test_booleans_are_refused_on_assignment():
    cfg = TreeConfig()
    with pytest.raises(ValueError, match="boolean"):
        cfg.depth = True
    assert cfg.depth == 4


def test_numbers_are_read_as_before():
    cfg = parse_config({"train": {"lr": 1, "weight_decay": 0}, "tree": {"depth": 3.0},
                        "model": {"beta": 1}, "data": {"split_fractions": [0.5, 0.25, 0.25]},
                        "evaluate": {"horizons": [1, 5]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.tree.depth == 3 and isinstance(cfg.tree.depth, int)
    assert cfg.model.beta == 1.0 and cfg.evaluate.horizons == [1, 5]
    _refused("tree.depth", 2.5, "fractional")


@pytest.mark.parametrize("field", ["train.lr", "model.beta", "engine.checkpoint_seconds",
                                   "sampler.online_memory_days"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_inf_and_nan_are_refused(field, value):
    _refused(field, value, "finite")


# ----------------------------------------------------------------------------- 3. probabilities


@pytest.mark.parametrize("value", [1.0, 2.0, 5])
def test_min_weight_must_be_a_probability_below_one(value):
    _refused("tree.min_weight", value, "less than 1")


def test_min_weight_in_range_is_accepted():
    for value in (0, 0.0, 0.001, 0.5, 0.999):
        assert parse_config(_nested("tree.min_weight", value)).tree.min_weight == value
    _refused("tree.min_weight", -0.1, "greater than or equal to 0")


@pytest.mark.parametrize(("field", "value"), [
    ("tree.weight_floor", 0.2), ("tree.weight_floor", 5), ("tree.weight_floor", -0.01),
    ("sampler.coverage", 0), ("sampler.coverage", 1), ("sampler.ewma_lambda", 1.5),
])
def test_other_probabilities_keep_their_bounds(field, value):
    _refused(field, value)


# ----------------------------------------------------------------------------- 4. branching


@pytest.mark.parametrize(("k", "m"), [(64, 8), (9, 8), (20, 16)])
def test_branching_above_n_samples_is_refused(k, m):
    with pytest.raises(ConfigError) as err:
        parse_config({"tree": {"branching": k, "n_samples": m}})
    msg = str(err.value)
    assert "\n" not in msg and "'tree'" in msg, msg
    for word in (f"tree.branching = {k}", f"tree.n_samples = {m}", f"at least {k}",
                 "lower tree.branching"):
        assert word in msg, (word, msg)
    assert "(got {" not in msg  # the section's dict is not echoed


@pytest.mark.parametrize(("k", "m"), [(8, 8), (2, 8), (5, 512), (64, 64)])
def test_branching_up_to_n_samples_is_accepted(k, m):
    tree = parse_config({"tree": {"branching": k, "n_samples": m}}).tree
    assert (tree.branching, tree.n_samples) == (k, m)


def test_lookahead_settings_do_not_depend_on_branching():
    # lookahead candidates are strata or distinct paths and their draws are only scored and
    # added to the marginals: no K-of-M choice, so no constraint against branching
    tree = parse_config({"tree": {"branching": 8, "n_samples": 8, "lookahead": 1,
                                  "lookahead_samples": 1}}).tree
    assert tree.lookahead == tree.lookahead_samples == 1


def test_branching_above_n_samples_is_refused_on_assignment():
    cfg = TreeConfig(n_samples=8, branching=8)
    with pytest.raises(ValueError, match="exceeds tree.n_samples"):
        cfg.branching = 9


# ----------------------------------------------------------------------------- 5. sizes

SIZE_BOUNDS = {
    "store.marginal_bins": 1 << 14,
    "store.chunk_nodes": 1 << 16,
    "engine.batch_size": 1 << 16,
    "engine.n_decoders": 4096,
    "engine.n_knn": 4096,
    "engine.num_cpus": 4096,
    "engine.max_in_flight": 1024,
    "engine.threads": 1024,
    "train.batch_size": 1 << 20,
    "train.threads": 1024,
    "evaluate.n_samples": 1 << 16,
    "evaluate.max_windows": 1_000_000,
    # bounds that were there before
    "tree.n_samples": 1 << 16,
    "tree.lookahead": 1024,
    "tree.lookahead_samples": 1 << 16,
    "tree.branching": 64,
    "tree.depth": 64,
    "sampler.n_folds": 50,
}


@pytest.mark.parametrize(("field", "bound"), list(SIZE_BOUNDS.items()))
def test_sizes_have_an_upper_bound(field, bound):
    cfg = parse_config(_nested(field, bound))
    assert _get(cfg, field) == bound
    for value in (bound + 1, 10**12):
        _refused(field, value, f"less than or equal to {bound}", str(value))


def test_bounds_keep_the_defaults_and_the_test_configs():
    cfg = Config()
    for field, bound in SIZE_BOUNDS.items():
        assert _get(cfg, field) <= bound, field
    assert parse_config({"store": {"marginal_bins": 64, "chunk_nodes": 4},
                         "engine": {"batch_size": 7}}).store.marginal_bins == 64


# ----------------------------------------------------------------------------- the CLI line


@pytest.mark.parametrize(("toml", "words"), [
    ("seed = 18446744073709551616\n", ["'seed'", "2**63 - 1"]),
    ("[data.synthetic]\nseed = 99999999999999999999\n", ["data.synthetic.seed", "2**63 - 1"]),
    ("[tree]\ndepth = true\n", ["tree.depth", "boolean", "an integer"]),
    ("[train]\nlr = false\n", ["train.lr", "boolean", "a number"]),
    ("[tree]\nmin_weight = 2.0\n", ["tree.min_weight", "less than 1", "2.0"]),
    ("[tree]\nbranching = 64\nn_samples = 8\n", ["tree.branching = 64", "tree.n_samples = 8"]),
    ("[store]\nmarginal_bins = 1000000000000\n", ["store.marginal_bins", "16384"]),
    ("[train]\nlr = inf\n", ["train.lr", "finite"]),
])
def test_config_show_gives_one_line_exit_2(tmp_path, toml, words):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert_one_line_error(invoke(["config", "show", "--config", str(path)]), words)


def test_config_show_still_accepts_the_defaults():
    proc = invoke(["config", "show"])
    assert proc.returncode == 0, proc.stderr



@pytest.mark.parametrize(("key", "value", "words"), [
    ("sampler.method", "foo", "unknown sampler 'foo'"),
    ("evaluate.methods", ["knn", "nope"], "unknown method(s) 'nope'"),
    ("evaluate.horizons", [0, 5], "greater than or equal to 1"),
    ("evaluate.horizons", [], "at least 1 item"),
    ("data.calibration_start", "notadate", "'notadate' is not a date"),
])
def test_names_and_dates_are_checked_when_the_config_loads(key, value, words):
    """`config show` (and every command) refuses them at once, not after a fit."""
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, {key: value})


@pytest.mark.parametrize("horizons, words", [
    ([0], "--horizons 0: invalid value for 'evaluate.horizons.0'"),
    ([1, -2], "--horizons -2: invalid value for 'evaluate.horizons.1'"),
])
def test_a_bad_item_of_a_list_flag_blames_the_flag(horizons, words):
    """Not the config file (or 'defaults'), which never held it."""
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, {"evaluate.horizons": horizons}, {"evaluate.horizons": "--horizons"})


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path):
    """As the data CSVs do: some Windows editors write one before UTF-8 text."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfseed = 3\n[tree]\ndepth = 2\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.tree.depth) == (3, 2)


def test_known_names_and_dates_still_load():
    cfg = load_config(None, {"evaluate.methods": ["knn-conformal-online", "oracle"],
                             "data.calibration_start": "2020-01-02", "sampler.method": "fhs"})
    assert cfg.sampler.method == "fhs" and cfg.data.calibration_start == "2020-01-02"


@pytest.mark.parametrize("dotted", ["data.calibration_start", "data.test_start",
                                    "data.synthetic.start_date"])
@pytest.mark.parametrize("value, words", [("2020401", "YYYY-MM-DD"), ("foo", "YYYY-MM-DD"),
                                          ("NaT", "YYYY-MM-DD"), ("04/01/2020", "YYYY-MM-DD"),
                                          ("2020/04.01", "YYYY-MM-DD"),
                                          ("2023-02-29", "no day of the calendar"),
                                          ("20230229", "no day of the calendar"),
                                          ("31012024", "read year first")])
def test_dates_in_the_config_must_be_written_year_first(dotted, value, words):
    """Day and month in digits not year first (04/01/2020) are guesswork; numpy alone would
    read '2020401' as the year 2,020,401."""
    _refused(dotted, value, words)


@pytest.mark.parametrize("value, day", [("2020-1-5", "2020-01-05"), ("2020-01", "2020-01-01"),
                                        ("2019-06-30T00:00", "2019-06-30"),
                                        ("20200401", "2020-04-01"), ("2020/04/01", "2020-04-01"),
                                        ("2020.4.1", "2020-04-01"), ("1-Apr-2020", "2020-04-01"),
                                        ("1 April 2020", "2020-04-01"),
                                        ("Apr 1, 2020", "2020-04-01")])
def test_year_first_config_dates_in_other_spellings_load_as_their_day(value, day):
    """Kept as YYYY-MM-DD: what reads them later (numpy) and a resume's comparison of
    configs see one spelling."""
    assert str(iso_day(value)) == day
    assert parse_config({"data": {"test_start": value}}).data.test_start == day
    assert parse_config({"data": {"synthetic": {"start_date": value}}}).data.synthetic \
        .start_date == day


@pytest.mark.parametrize("value", ["2020-01-05 junk", "2020-01-05T23:00-05:00"])
def test_a_config_date_with_more_than_a_plain_time_is_refused(value):
    _refused("data.test_start", value, "YYYY-MM-DD")


def test_an_unquoted_toml_date_is_read_as_its_day(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[data]\ncalibration_start = 2010-02-01\n"
                    "[data.synthetic]\nstart_date = 1999-12-31\n")
    cfg = load_config(path)
    assert cfg.data.calibration_start == "2010-02-01"
    assert cfg.data.synthetic.start_date == "1999-12-31"


def test_a_stride_beyond_the_horizon_is_refused_before_a_run_touches_its_store(tmp_path):
    """Found before the fit, so --overwrite deletes nothing; the commands that never use
    the stride (train, evaluate, diagnose) do not mind it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nhorizon = 5\n[tree]\nstride = 6\n")
    old = tmp_path / "old.zarr"
    old.mkdir()
    (old / "zarr.json").write_text("{}")
    proc = invoke(["run", "--config", str(cfg), "--store", str(old), "--overwrite"])
    assert_one_line_error(proc, ["tree.stride = 6", "horizon is 5"])
    assert (old / "zarr.json").read_text() == "{}"
    assert load_config(cfg).tree.stride == 6


def test_a_start_date_not_written_year_first_is_refused(tmp_path):
    proc = invoke(["run", "--store", str(tmp_path / "s.zarr"), "--start", "04/01/2020"])
    assert_one_line_error(proc, ["04/01/2020", "YYYY-MM-DD", "20240131"])
    proc = invoke(["run", "--store", str(tmp_path / "s.zarr"), "--start", "2001-02-30"])
    assert_one_line_error(proc, ["2001-02-30", "no day of the calendar"])


def test_a_start_with_too_little_history_asks_for_a_later_one(tmp_path):
    """Before any fit, and with the fix (the sampler's own refusal knows no --start)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(cli_toml(depth=1))
    first = np.datetime64(load_config(cfg).data.synthetic.start_date, "D")
    start = str(np.busday_offset(first, 14, roll="forward"))  # a context (12), not a horizon
    proc = invoke(["run", "--config", str(cfg), "--store", str(tmp_path / "s.zarr"),
                   "--start", start])
    config = load_config(cfg)
    need = min_history(config, config.sampler.point)  # the bank's, more than a window's 18
    day = np.busday_offset(first, need - 1, roll="forward")
    assert_one_line_error(proc, ["has only 15 days of history", "cross-fitted residual bank",
                                 f"needs at least {need}", f"pick a --start on or after {day}"])
    assert not (tmp_path / "s.zarr").exists()
    # a sampler that needs a window alone (no bank) asks for context + horizon days
    cfg.write_text(cli_toml(depth=1).replace("[sampler]\n",
                                             '[sampler]\nmethod = "hist-bootstrap"\n'))
    proc = invoke(["run", "--config", str(cfg), "--store", str(tmp_path / "s.zarr"),
                   "--start", start])
    assert_one_line_error(proc, ["has only 15 days of history", "context + horizon = 18",
                                 "pick a --start on or after"])


_FILE_SUFFIXES = {"pt", "pkl", "zarr", "json", "md", "png", "toml", "csv", "npz", "parquet"}


def _config_keys_named(text: str, sections: dict, modules: set[str]):
    """`section.key` spans of a message or document whose key the section lacks."""
    pat = re.compile(r"(?<![\w.])(" + "|".join(sections) + r")\.([a-z_]+)\b")
    for m in pat.finditer(text):
        sec, key = m.groups()
        if key in _FILE_SUFFIXES or (sec == "engine" and key in modules):
            continue  # tree.zarr, model.pt; engine.store (a module)
        if key in sections[sec].model_fields:  # not a property such as data.embargo_days
            continue
        if sec == "sampler" and hasattr(KnnConformalSampler, key):
            continue  # a sampler object's method: sampler.draw
        yield m.group(0)


def test_every_config_key_a_message_or_the_readme_names_exists():
    """A message that tells users to set `data.embargo_days` sends them to a key the config
    refuses: every `section.key` written in the code's strings and the READMEs' code spans
    must be one the config takes (methods such as `sampler.draw` aside)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sections = {n: f.annotation for n, f in Config.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    modules = {p.stem for p in (root / "engine").rglob("*.py")} | {
        p.name for p in (root / "engine").iterdir() if p.is_dir()}
    wrong = []
    for path in sorted([*(root / "engine").rglob("*.py"), *(root / "actors").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                wrong += [f"{path.name}:{node.lineno} {k}"
                          for k in _config_keys_named(node.value, sections, modules)]
    for path in (root / "README.md", root / "cluster" / "README.md"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for span in re.findall(r"`([^`]*)`", line):
                wrong += [f"{path.name}:{i} {k}" for k in _config_keys_named(span, sections, modules)]
    assert not wrong, wrong
