"""The configuration: one pydantic model per component, read from one TOML file.

Every field has a default that runs on a laptop; unknown keys are refused. The
full config travels into every checkpoint and every store (``to_dict``), so any
output can be traced back to what made it.
"""

from __future__ import annotations

import datetime
import re
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.errors import ConfigError, first_line

# Seeds go to numpy's SeedSequence (any size) and to torch.manual_seed (as seed + a small
# offset, e.g. seed + 1000 + fold), which takes at most 2**64 - 1: 63 bits leave room for
# the offsets (and fit a signed int64 everywhere else).
MAX_SEED = 2**63 - 1


def _check_seed(seed: int) -> int:
    if seed > MAX_SEED:
        raise ValueError(f"a seed must be at most 2**63 - 1 = {MAX_SEED} (numpy and torch take "
                         "63-bit seeds); pick a smaller seed")
    return seed


Seed = Annotated[int, Field(ge=0), AfterValidator(_check_seed)]


def _number_kind(annotation) -> str | None:
    """'an integer' / 'a number' when a field holds ints / floats (alone, optional, or in a
    list or tuple), else None."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:  # e.g. list[Annotated[int, Field(ge=1)]]
        return _number_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        kinds = {_number_kind(a) for a in typing.get_args(annotation) if a not in (type(None), ...)}
        kinds.discard(None)
        return "a number" if "a number" in kinds else (kinds.pop() if kinds else None)
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    return None


def _holds_bool(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy's too


class _Section(BaseModel):
    # inf / nan are refused in every float field: no setting means "infinite".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_bool_numbers(cls, value, info: ValidationInfo):
        # pydantic's lax mode reads true as 1 and false as 0 in int and float fields
        kind = _number_kind(cls.model_fields[info.field_name].annotation)
        if kind is not None and _holds_bool(value):
            raise ValueError(f"found a boolean where {kind} is required; write {kind} "
                             "instead of true / false")
        return value


# year, month and optionally day (unpadded allowed), then optionally a time without zone:
# 2024-01-31, 2024-1-5, 2024-01 (its first day), 2024-01-31T00:00
_ISO_DAY = re.compile(r"(\d{4})-(\d{1,2})(?:-(\d{1,2}))?(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?")
# as a data file may write them: 2024/01/31, 2024.01.31, 20240131 (year first, so never
# ambiguous), or with the month's name: 31-Jan-2024, 31 January 2024, Jan 31, 2024
_YEAR_FIRST_DAY = re.compile(r"(\d{4})([/.])(\d{1,2})\2(\d{1,2})|(\d{4})(\d{2})(\d{2})")
_MONTH_NAMED = ("%d-%b-%Y", "%d %b %Y", "%d-%B-%Y", "%d %B %Y", "%b %d, %Y", "%B %d, %Y",
                "%b %d %Y", "%B %d %Y")


def iso_day(value) -> np.datetime64:
    """A day written year first, YYYY-MM-DD (also 2024/01/31, 2024.01.31, 20240131, as data
    files may write it), with the month's name (31-Jan-2024), or a date / datetime64
    object, as datetime64[D]; anything else is a ValueError: numpy alone would read
    '20200401' as the year 20,200,401, and other layouts in digits (04/01/2020) leave day
    and month to guesswork."""
    if isinstance(value, (datetime.date, np.datetime64)):
        day = np.datetime64(value, "D")
        if not np.isnat(day):
            return day
    elif isinstance(value, str):
        text = value.strip()
        if m := _ISO_DAY.fullmatch(text):
            ymd = int(m[1]), int(m[2]), int(m[3] or 1)
        elif m := _YEAR_FIRST_DAY.fullmatch(text):  # the numbers of whichever form matched
            ymd = tuple(int(g) for g in m.groups() if g is not None and g.isdigit())
        else:
            ymd = None
            for fmt in _MONTH_NAMED:
                try:
                    named = datetime.datetime.strptime(text, fmt).date()
                except ValueError:
                    continue
                return np.datetime64(named, "D")
        if ymd is not None:
            try:
                return np.datetime64(datetime.date(*ymd), "D")
            except ValueError:
                how = " read year first (YYYYMMDD)" if text.isdigit() else ""
                raise ValueError(f"{value!r} is no day of the calendar{how}; pass a real date, "
                                 "e.g. 2024-01-31") from None
    raise ValueError(f"{value!r} is not a date written YYYY-MM-DD (or 2024/01/31, 20240131, "
                     "31-Jan-2024); write it so, e.g. 2024-01-31")


def _iso_text(value):
    """A date field as YYYY-MM-DD: its text (or a TOML date, unquoted 2020-02-01) read by
    ``iso_day``, so every spelling of one day is one config."""
    return None if value is None else str(iso_day(value))


class SyntheticConfig(_Section):
    """The built-in synthetic market (hidden stochastic volatility + regime switching)."""

    n_days: int = Field(
        6000, ge=200, le=200_000,
        description="Business days of history to simulate (one stress episode every ~1.6 "
        "years); `backfill evaluate` scores a longer test span: see test_days.")
    seed: Seed = Field(7, description="Seed of the simulated history.")
    test_days: int = Field(
        24000, ge=0, le=1_000_000,
        description="Days simulated after the history for `backfill evaluate` only: its test "
        "split runs on through them (scored every `evaluate.window_stride` days), so the scores "
        "average over ~270 independent 90-day futures instead of the dozen a 20% split holds, "
        "and a method's miss is told apart from the luck of one test span. The split "
        "fractions still cut the n_days history, which is all the other commands see.")
    start_date: str = Field("2000-01-03", description="Date of the first simulated day.")

    _check_start_date = field_validator("start_date", mode="before")(_iso_text)


class DataConfig(_Section):
    """Where the surfaces come from and how they are windowed and split."""

    source: str = Field(
        "synthetic", description="'synthetic' or a path to a CSV / Parquet / NPZ file."
    )
    context: int = Field(60, ge=2, le=2000, description="Context length C in days.")
    horizon: int = Field(90, ge=1, le=2000, description="Forecast horizon H in days.")
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train / calibration / test shares of the days."
    )
    calibration_start: str | None = Field(
        None, description="First date of the calibration split: its first window forecasts "
        "from it; the train split ends one embargo before it (overrides fractions)."
    )
    test_start: str | None = Field(
        None, description="First date of the test split: its first window forecasts from "
        "it; fits see only days one embargo before it (overrides fractions)."
    )
    embargo: int | None = Field(
        None, ge=0, description="Days left out between splits; default one horizon."
    )
    fill: Literal["none", "previous"] = Field(
        "none", description="A file's missing grid points (rows absent, or iv NaN): 'none' "
        "refuses the file, naming the first; 'previous' carries each point's last quote "
        "forward, at most fill_limit dates in a row (a note counts them).")
    fill_limit: int = Field(5, ge=1, le=250, description="Most dates in a row data.fill = "
                            "'previous' fills at one grid point; a longer gap is refused.")
    synthetic: SyntheticConfig = SyntheticConfig()

    _check_dates = field_validator("calibration_start", "test_start", mode="before")(_iso_text)

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        f = self.split_fractions
        if any(x <= 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three positive shares summing to 1, got {f}")
        return self

    @property
    def embargo_days(self) -> int:
        return self.horizon if self.embargo is None else self.embargo


class ModelConfig(_Section):
    """The conditional VAE."""

    hidden: int = Field(64, ge=4, le=4096, description="Width of the context GRU and MLPs.")
    embed_dim: int = Field(32, ge=2, le=1024, description="Context embedding size (kNN space).")
    latent_dim: int = Field(8, ge=1, le=256, description="Size of z.")
    quantiles: list[float] = Field(
        [0.05, 0.5, 0.95], description="Quantile outputs; must include 0.5."
    )
    beta: float = Field(0.05, ge=0, le=1e3, description="Weight of KL(q || p) in the loss.")
    prior_mix: float = Field(
        0.3, ge=0, le=1, description="Share of steps where the decoder gets z from the prior."
    )
    dropout: float = Field(0.3, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_quantiles(self) -> ModelConfig:
        q = self.quantiles
        if 0.5 not in q or sorted(q) != q or len(set(q)) != len(q) or q[0] <= 0 or q[-1] >= 1:
            raise ValueError(f"quantiles must be strictly increasing in (0, 1) and hold 0.5, got {q}")
        return self


class TrainConfig(_Section):
    """Training of the CVAE."""

    epochs: int = Field(25, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=1 << 20)
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW's learning rate.")
    weight_decay: float = Field(1e-2, ge=0, le=10.0, description="AdamW's weight decay.")
    val_fraction: float = Field(
        0.15, ge=0, lt=0.5,
        description="Tail of the training windows held out (after an embargo) for early "
        "stopping and the reported validation loss; 0 = none.")
    window_stride: int = Field(1, ge=1, le=1_000_000,
                               description="Use every k-th training window.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, le=1024,
                         description="torch CPU threads; 0 = torch's default.")


class SamplerConfig(_Section):
    """The calibrated conditional sampler (kNN residual bootstrap + conformal)."""

    method: str = Field("knn-conformal", description="Sampler used by run / mc / demo.")
    k: int = Field(0, ge=0, le=1_000_000,
                   description="Neighbour episodes per query; 0 = a quarter of the "
                   "bank's episodes, within [20, 100].")
    episode_days: int = Field(0, ge=0, le=1_000_000,
                              description="Bank windows this close in time are one "
                              "episode (one neighbour at most); 0 = horizon / 3.")
    kernel: Literal["gaussian", "uniform"] = "gaussian"
    embedding: Literal["cvae", "features"] = Field(
        "cvae", description="kNN space: the CVAE embedding or hand-made features."
    )
    point: Literal["cvae", "pca-ar"] = Field(
        "cvae", description="The point forecast that the residual paths wrap."
    )
    n_folds: int = Field(5, ge=2, le=50, description="Time blocks of the cross-fitted bank.")
    coverage: float = Field(0.9, gt=0, lt=1, description="Nominal band the conformal step targets.")
    conformal: Literal["split", "online"] = Field(
        "split", description="knn-conformal's scale: 'split' = one conformal quantile per "
        "horizon over all history; 'online' = a weighted conformal quantile of the scores "
        "realised so far, recent ones weighted up (see online_memory_days).")
    online_memory_days: float = Field(250.0, ge=10, description="e-folding age, in days, of a "
                                      "realised score's extra weight in the online scale.")
    online_prior_episodes: float = Field(1.0, ge=0, description="Weight of all past scores "
                                         "pooled, as this many fresh horizon-long episodes.")
    ewma_lambda: float = Field(0.94, gt=0, lt=1, description="EWMA decay of fhs.")
    n_factors: int = Field(3, ge=1, le=20, description="PCA factors of pca-ar.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from engine.samplers import REGISTRY  # light: the samplers themselves load lazily

        if name not in REGISTRY:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(REGISTRY)}")
        return name


class TreeConfig(_Section):
    """The 5^N backfill tree."""

    depth: int = Field(4, ge=1, le=64)
    branching: int = Field(5, ge=2, le=64, description="K representative paths per node.")
    n_samples: int = Field(512, ge=8, le=1 << 16, description="M sampled paths per node.")
    selection: Literal["quantize", "quadrature", "quantiles"] = "quantize"
    score: Literal["last_day_mean", "kept_mean"] = Field(
        "last_day_mean", description="The scalar a node's paths are selected by: mean log-IV "
        "over the grid on the last kept day, or over every kept day.")
    weights: Literal["equal", "stratum", "moment"] = Field(
        "moment", description="Weights for selection='quantiles'."
    )
    stride: int = Field(0, ge=0, le=1_000_000,
                        description="Days a child keeps; 0 = the whole horizon.")
    weight_floor: float = Field(0.02, ge=0, lt=0.2, description="Floor of a child's share.")
    max_frontier: int = Field(0, ge=0, le=1 << 40,
                              description="Resample frontiers above this; 0 = never.")
    min_weight: float = Field(
        0.0, ge=0, lt=1, description="Drop nodes below this probability (0 = keep all; a "
        "level whose nodes all fall below keeps its heaviest).")
    lookahead: int = Field(
        20, ge=0, le=1024, description="Lookahead candidates per node (0 = off): the node's "
        "distinct sampled paths (or as many score strata when it has more), each drawn one "
        "level on from its own context; their draws make the next level's marginals, and "
        "each quantization cell is represented by its path with the most typical next-level "
        "law.")
    lookahead_samples: int = Field(
        0, ge=0, le=1 << 16, description="Paths drawn from each lookahead candidate's law; 0 = "
        "branching x n_samples / lookahead (at least 8): as many as the K children would draw "
        "(128 at the defaults).")

    @model_validator(mode="after")
    def _check_branching(self) -> TreeConfig:
        # a node's K children are K distinct paths out of its M draws (tree._check_log_paths)
        if self.branching > self.n_samples:
            raise ValueError(
                f"tree.branching = {self.branching} exceeds tree.n_samples = {self.n_samples}: "
                f"each node keeps {self.branching} of its {self.n_samples} sampled paths as "
                f"children; raise tree.n_samples to at least {self.branching} or lower "
                "tree.branching")
        return self


class EngineConfig(_Section):
    """Where and how the tree is computed."""

    backend: Literal["ray", "inline"] = "ray"
    address: str | None = Field(None, description="None starts a local Ray; 'auto' joins one.")
    n_decoders: int = Field(1, ge=1, le=4096,
                            description="Decoder actors (the CVAE's forward pass; "
                            "a GPU each where the cluster has them).")
    decoder_gpus: float | None = Field(
        None, ge=0, le=64, description="GPUs each decoder actor asks Ray for. Unset: a share "
        "of the GPUs the cluster has when the run starts (one each while there are enough; none "
        "on a CPU-only cluster). Set it (e.g. 1) where GPU nodes are not up yet (an "
        "autoscaling cluster): Ray then brings them up and the run waits for them. 0: decode "
        "on CPUs.")
    n_knn: int = Field(2, ge=1, le=4096,
                       description="kNN-residual actors: the draw, the children and "
                       "the marginal sums, most of a node's time; about one per free core.")
    batch_size: int = Field(256, ge=1, le=1 << 16, description="Frontier nodes per task.")
    max_in_flight: int = Field(4, ge=1, le=1024, description="Tasks in flight per actor.")
    num_cpus: int = Field(2, ge=1, le=4096,
                          description="CPUs of a local Ray started by the engine.")
    threads: int = Field(1, ge=0, le=1024,
                         description="Inline backend: batches expanded at once, in "
                         "threads of this process (a GPU machine without Ray); 0: one per core. "
                         "Same bytes for any value; memory holds up to two batches per thread.")
    checkpoint_seconds: float = Field(
        30.0, ge=0, description="Save the level in progress (done tasks, marginal sums) this "
        "often, so --resume after a hard kill reuses its finished chunks; 0: after every task.")

    @field_validator("decoder_gpus")
    @classmethod
    def _whole_or_share(cls, gpus: float | None) -> float | None:
        # Ray takes a share of one GPU in steps of 0.0001, or whole GPUs
        if gpus is None:
            return gpus
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"decoder_gpus = {gpus:g} must be at most 1 (a share of one GPU) "
                             "or a whole number of GPUs")
        if abs(gpus * 1e4 - round(gpus * 1e4)) > 1e-6:
            raise ValueError(f"decoder_gpus = {gpus:g} is finer than Ray's steps of 0.0001 of "
                             "a GPU; round it to 4 decimals")
        return gpus


class StoreConfig(_Section):
    """The Zarr v3 scenario store."""

    chunk_nodes: int = Field(2048, ge=1, le=1 << 16,
                             description="Nodes per chunk of a level's arrays (one "
                             "file per array and chunk: bigger chunks write faster).")
    marginal_bins: int = Field(2048, ge=64, le=1 << 14,
                               description="Histogram bins per (day, grid point).")


class EvalConfig(_Section):
    """`backfill evaluate`."""

    methods: list[str] = Field(
        ["cvae-prior", "cvae-scaled", "knn", "knn-conformal", "knn-conformal-online",
         "knn-conformal-pca", "knn-conformal-features",
         "hist-bootstrap", "fhs", "pca-ar", "oracle"],
        description="Methods scored; 'oracle' only on the synthetic market.",
    )
    horizons: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 5, 10, 20, 30, 60, 90], min_length=1,
        description="Days ahead scored (those beyond data.horizon are dropped, with a note).")
    n_samples: int = Field(1000, ge=10, le=1 << 16)
    window_stride: int = Field(
        0, ge=0, le=1_000_000,
        description="Score every k-th test window; 0 = the smallest stride that "
        "keeps at most `max_windows` windows.")
    max_windows: int = Field(1250, ge=1, le=1_000_000,
                             description="Cap of the automatic window stride.")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        from engine.samplers import known_methods

        unknown = [n for n in names if n not in known_methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(known_methods())}")
        return names


class Config(_Section):
    """The whole configuration."""

    seed: Seed = Field(0, description="Run seed: every random stream derives from it.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    tree: TreeConfig = TreeConfig()
    engine: EngineConfig = EngineConfig()
    store: StoreConfig = StoreConfig()
    evaluate: EvalConfig = EvalConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return parse_config(d)


def _format_validation_error(err: ValidationError, origin: str,
                             flags: dict[str, str] | None = None) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    # set by a command-line flag (one item of a list flag too): blame the flag, not the file
    key = next((k for k in (flags or {}) if loc == k or loc.startswith(f"{k}.")), None)
    if key is not None:
        msg = first["msg"].removeprefix("Value error, ")
        return f"{flags[key]} {first.get('input')!r}: invalid value for '{loc}': {msg}"
    if first["type"] == "extra_forbidden":
        return (f"{origin}: unknown key '{loc}'; remove it or fix its spelling "
                "(`backfill config show` lists every key)")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if isinstance(got, dict | BaseModel):  # a check across a section's keys: the message names them
        return f"{origin}: invalid value for '{loc}': {msg}"
    return f"{origin}: invalid value for '{loc}': {msg} (got {got!r})"


def parse_config(d: dict, origin: str = "config", flags: dict[str, str] | None = None) -> Config:
    """Validate a plain dict into a Config; any problem becomes one ConfigError line (naming
    the command-line flag, per ``flags`` {dotted key: flag}, where one set the bad value)."""
    try:
        return Config.model_validate(d)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin, flags)) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                flags: dict[str, str] | None = None) -> Config:
    """Read a TOML file (or the defaults), then apply dotted-key overrides (``flags``: the
    command-line flag that set each override, for error messages)."""
    raw: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            found = "not found" if not p.exists() else "is not a regular file"
            raise ConfigError(f"config file {p} {found}; pass an existing TOML file to --config")
        try:
            # TOML is UTF-8; a byte-order mark (Windows editors) is not part of it
            raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: not valid TOML ({err}); fix the syntax") from None
        except (RecursionError, ValueError) as err:  # arrays nested thousands deep, or an
            # integer of thousands of digits: valid TOML no config needs
            what = ("arrays nested too deep to read" if isinstance(err, RecursionError)
                    else f"a value too long to read ({first_line(err).split(';')[0]})")
            raise ConfigError(f"{p}: {what}; a config holds short numbers and flat lists, fix "
                              "that value") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    given = {k: f for k, f in (flags or {}).items() if (overrides or {}).get(k) is not None}
    return parse_config(raw, origin, given)


def unset_fields(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, description) of every field left unset (None), which TOML cannot write."""
    out = []

    def walk(model, prefix):
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            elif value is None:
                out.append((f"{prefix}{name}", field.description or ""))

    walk(cfg, "")
    return out


def show_toml(cfg: Config) -> str:
    """``to_toml``, with each unset field as a comment in its section (``config show``)."""
    lines = to_toml(cfg).splitlines()
    for dotted, description in unset_fields(cfg):
        *section, key = dotted.split(".")
        comment = "\n".join(textwrap.wrap(f"{key} = (unset) {' '.join(description.split())}",
                                         88, initial_indent="# ", subsequent_indent="#   "))
        header = f"[{'.'.join(section)}]"
        if not section:
            lines.insert(0, comment)
        elif header in lines:
            at = lines.index(header) + 1
            while at < len(lines) and lines[at] and not lines[at].startswith("["):
                at += 1  # after the section's own keys (a list spans lines: skipped too)
            lines.insert(at, comment)
    return "\n".join(lines) + "\n"


def to_toml(cfg: Config) -> str:
    """The effective config as TOML (None fields are omitted: TOML has no null)."""
    import tomli_w

    def strip_none(d):
        if isinstance(d, dict):
            return {k: strip_none(v) for k, v in d.items() if v is not None}
        return d

    return tomli_w.dumps(strip_none(cfg.to_dict()))
