"""The `backfill` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.errors import BackfillError

if TYPE_CHECKING:
    import numpy as np

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Calibrated scenarios of implied-volatility surfaces.")
config_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect the config.")
app.add_typer(config_app, name="config")


def _path(value: str | Path) -> Path:
    """A path flag's value, ``~`` expanded; an empty one is refused (``Path("")`` would be
    the working directory). Typer also hands it the converted value and the default:
    returned as they are."""
    if isinstance(value, Path):
        return value
    if not value.strip():
        raise typer.BadParameter("the path is empty; pass a file or folder name, or leave the "
                                 "flag out where it is optional")
    return Path(value).expanduser()  # a quoted ~/f, which the shell left as it is


_path_option = functools.partial(typer.Option, parser=_path)

ConfigOpt = Annotated[Path | None, _path_option("--config", "-c", help="TOML config file.")]
DataOpt = Annotated[str | None, typer.Option(help="'synthetic' or a CSV / Parquet / NPZ file.")]
ModelOpt = Annotated[Path | None, _path_option("--model", help="A trained checkpoint (.pt).")]
SeedOpt = Annotated[int | None, typer.Option(help="Run seed (overrides the config's).")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _quiet_exit_after_an_error() -> None:
    """Before the process exits on an error (``main`` only: nothing global changes for
    in-process callers). A read that failed on one chunk leaves zarr's reads of the others
    pending on its event loop, and asyncio would report each at exit ("Task was destroyed
    but it is pending!", "coroutine ... was never awaited", "Event loop is closed" while
    collecting them): the error line already says what went wrong."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if inspect.iscoroutine(unraisable.object) or (
                isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def user_errors(fn):
    """Turn BackfillError into one stderr line and exit 2; no traceback for user mistakes.

    A file that cannot be read or written (OSError) and an allocation the machine cannot
    hold (MemoryError) are one line too; BACKFILL_TRACEBACK=1 shows their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackfillError as err:
            fail(str(err))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as err:
            if os.environ.get("BACKFILL_TRACEBACK"):
                raise
            fail(_os_error(err))
        except MemoryError as err:
            if os.environ.get("BACKFILL_TRACEBACK"):
                raise
            fail(f"out of memory ({str(err).strip() or 'MemoryError'}); lower the sizes "
                 "asked for (tree.n_samples, tree.depth or tree.max_frontier, --n-paths, "
                 "store.marginal_bins, evaluate.n_samples)")

    return wrapper


def _os_error(err: OSError) -> str:
    """One line for an OSError, with the fix that fits its kind."""
    import errno

    from engine.errors import first_line

    what = err.strerror or first_line(err)
    if isinstance(err, (ConnectionError, TimeoutError)):
        return (f"lost a connection ({type(err).__name__}: {what}); check that the Ray "
                "cluster is up, then rerun (a store resumes with --resume)")
    where = f" {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write{where}: {what}; free disk space, then rerun (a store of run or "
                "mc resumes with --resume)")
    return f"cannot access{where}: {what}; check the path and its permissions"


def _nearest_existing(path: Path) -> Path:
    """``path`` itself, or the nearest folder above it that exists (the root at worst)."""
    return next(p for p in (path, *path.parents) if p.exists() or p == p.parent)


def _writable_dir(folder: Path, flag: str) -> None:
    """Prove, before any long work and without making anything, that ``folder`` (or the
    nearest existing folder above it, where the command will make it) takes a new file."""
    import tempfile

    from engine.errors import ConfigError

    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{flag}: {existing} is a file, not a folder; pass a path in a "
                          "writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".backfill-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"{flag}: cannot write in folder {existing} ({err.strerror or err}); "
                          "pass a path in a writable folder") from None


def _out_file(out: Path, flag: str = "--out") -> Path:
    """``out`` names a file this command will write: refuse now one that cannot be."""
    from engine.errors import ConfigError

    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; pass a file path")
    if out.exists() and not out.is_file():  # a device or a pipe: never replaced by a file
        raise ConfigError(f"{flag} {out} exists and is not a regular file; pass a file path")
    _writable_dir(out.parent, f"{flag} {out}")
    return out


def _out_dir(out: Path) -> Path:
    """``out`` names a folder this command will write its files into."""
    from engine.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder path (it is created)")
    _writable_dir(out, f"--out {out}")
    return out


# the config key each command-line flag overrides (so a bad value names its flag)
_FLAGS = {"data.source": "--data", "seed": "--seed", "tree.depth": "--depth",
          "engine.backend": "--backend", "engine.address": "--address",
          "train.epochs": "--epochs", "data.horizon": "--horizon",
          "evaluate.n_samples": "--n-samples", "evaluate.methods": "--methods",
          "evaluate.horizons": "--horizons"}


def _config(config: Path | None, flags: dict[str, str] = _FLAGS, **overrides):
    from engine.config import load_config

    return load_config(config, {k: v for k, v in overrides.items() if v is not None}, flags)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _table_console():
    """Stdout for a table; to a pipe or file, wide enough that rich does not wrap it."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


@config_app.command("show")
@user_errors
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective config as TOML (unset keys as comments)."""
    from engine.config import show_toml

    typer.echo(show_toml(_config(config)), nl=False)


@app.command()
@user_errors
def train(out: Annotated[Path, _path_option("--out", help="Where to save the checkpoint.")],
          config: ConfigOpt = None, data: DataOpt = None, seed: SeedOpt = None,
          epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
          horizon: Annotated[int | None, typer.Option(help="Override data.horizon.")] = None,
          ) -> None:
    """Train the CVAE on the train split and report validation and test errors."""
    from engine.pipeline import prepare, train_and_report

    cfg = _config(config, **{"data.source": data, "seed": seed, "train.epochs": epochs,
                             "data.horizon": horizon})
    _out_file(out)
    _not_an_input(out, "--out", {"--config": config, "--data": cfg.data.source})
    from engine import sampler_file

    sampler_file.check_replaceable(out, kind="checkpoint")  # an earlier train is replaced
    console = _console()
    train_and_report(prepare(cfg, console=console), out, console=console)


@app.command()
@user_errors
def demo(out: Annotated[Path, _path_option(help="Output folder.")] = Path("demo_out"),
         config: ConfigOpt = None, seed: SeedOpt = None) -> None:
    """The whole pipeline on the built-in synthetic market, with plots and a summary."""
    from engine.demo import DEMO_DEFAULTS, run_demo

    defaults = DEMO_DEFAULTS if config is None else {}
    cfg = _config(config, **{**defaults, "seed": seed})
    _check_address(cfg, config, None, None)
    given = cfg.data.source
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "synthetic"})})
    console = _console()
    if given != "synthetic":
        console.print(f"note: the demo runs on the built-in synthetic market (it compares "
                      f"with the true law); data.source = {given!r} in {config} is not used: "
                      "`backfill run` and `evaluate` read it", markup=False)
    run_demo(cfg, _out_dir(out), console=console)


@app.command()
@user_errors
def evaluate(out: Annotated[Path, _path_option("--out", help="Report folder.")],
             config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
             methods: Annotated[str | None, typer.Option(help="Comma-separated methods.")] = None,
             horizons: Annotated[str | None, typer.Option(help="e.g. 1,5,10,20,30,60,90")] = None,
             n_samples: Annotated[int | None, typer.Option("--n-samples")] = None,
             seed: SeedOpt = None,
             position: Annotated[Path | None, _path_option(
                 help="Backtest the VaR of this book instead of long 1 vega at every grid "
                 "point: a CSV of moneyness, maturity_days, vega (as `var --position`).")
             ] = None) -> None:
    """Fit every method on the same splits and score them on the same test windows."""
    from engine.evaluate import run_evaluation

    cfg = _config(config, **{
        "data.source": data, "seed": seed, "evaluate.n_samples": n_samples,
        "evaluate.methods": _csv(methods, str, "--methods"),
        "evaluate.horizons": _csv(horizons, int, "--horizons")})
    run_evaluation(cfg, _out_dir(out), model_path=model, console=_console(), position=position)


@app.command()
@user_errors
def diagnose(out: Annotated[Path, _path_option("--out", help="Report folder.")],
             config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
             seed: SeedOpt = None) -> None:
    """Why the raw CVAE is over-confident: sensitivity to z, KL, neighbour variance, budget."""
    from engine.diagnose import run_diagnose

    cfg = _config(config, **{"data.source": data, "seed": seed})
    run_diagnose(cfg, _out_dir(out), model_path=model, console=_console())


StoreOpt = Annotated[Path, _path_option("--store", help="The scenario store (a Zarr directory).")]
DepthOpt = Annotated[int | None, typer.Option(help="Levels of the tree (overrides tree.depth).")]
BackendOpt = Annotated[str | None, typer.Option(help="'ray' (default) or 'inline'.")]
AddressOpt = Annotated[str | None, typer.Option(
    help="Ray cluster: 'auto', host:port or ray://host:port; none starts a local Ray.")]
StartOpt = Annotated[str | None, typer.Option(
    help="Start date: the last data day on or before it (default: the last day).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted store.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")]
SamplerOpt = Annotated[Path | None, _path_option(
    "--sampler", help="A fitted sampler (`backfill fit`) instead of fitting one; the run "
    "starts where its fit ended.")]


def _check_address(cfg, config: Path | None, address_flag: str | None,
                   backend_flag: str | None) -> None:
    """A Ray cluster address with the inline backend: refused where --address asks for it or
    the config file asks for both, a note where --backend inline overrides the file's."""
    from engine.errors import ConfigError

    if cfg.engine.backend == "ray" or cfg.engine.address is None:
        return
    if address_flag is not None:
        raise ConfigError(f"--address {address_flag} joins a Ray cluster, but engine.backend is "
                          f"{cfg.engine.backend!r}; pass --backend ray too (or leave --address "
                          "out)")
    if backend_flag is None:
        raise ConfigError(f"{config}: engine.address = {cfg.engine.address!r} joins a Ray "
                          "cluster, but engine.backend is 'inline' (this process alone); set "
                          "engine.backend = \"ray\" or remove engine.address")
    _console().print(f"note: engine.address = {cfg.engine.address!r} in {config} is not used: "
                     "--backend inline runs in this process", markup=False)


def _expand(kind: str, store: Path, config, data, model, depth, backend, address, start, seed,
            resume: bool, overwrite: bool, n_paths: int | None = None,
            sampler_file: Path | None = None) -> None:
    from engine import driver
    from engine.errors import ConfigError, first_line
    from engine.pipeline import prepare
    from engine.tree import stride_days

    if backend is not None and backend not in ("ray", "inline"):
        raise ConfigError(f"--backend {backend!r} is not 'ray' or 'inline'")
    cfg = _config(config, **{"data.source": data, "seed": seed, "tree.depth": depth,
                             "engine.backend": backend, "engine.address": address})
    _check_address(cfg, config, address, backend)
    driver.check_private_ray(cfg.engine)
    stride_days(cfg.tree.stride, cfg.data.horizon)  # before a fit, and before --overwrite
    if cfg.sampler.method == "oracle" and cfg.tree.depth > 1:  # not after level 1's writes
        raise ConfigError(f"sampler.method = 'oracle' draws only from windows of the synthetic "
                          f"market's own history, and level 2 of {cfg.tree.depth} starts from "
                          "drawn paths; pass --depth 1, or choose another sampler.method")
    saved = None
    if sampler_file is not None:
        if model is not None:
            raise ConfigError(f"--model {model} and --sampler {sampler_file}: the sampler file "
                              "holds the models it was fitted with; pass one of the two")
        saved = driver.read_saved_sampler(sampler_file, cfg)
    console = _console()
    prep = prepare(cfg, console=console, run=True)
    if saved is None or start is not None:
        inputs = driver.run_inputs(prep, start, fitted=saved is not None)
    else:  # the run starts where the file's fit ended
        try:
            inputs = driver.run_inputs(prep, saved.start_date, fitted=True)
        except BackfillError as err:
            raise ConfigError(f"--sampler {sampler_file} was fitted on the history up to "
                              f"{saved.start_date}, which this data cannot start from "
                              f"({first_line(err)}); pass the data it was fitted on") from None
    note = None if saved is None else \
        driver.check_saved_sampler(saved, prep, inputs, start is not None)
    if inputs.start_note is not None:
        console.print(inputs.start_note, markup=False)

    def open_store():
        return driver.open_store(store, kind=kind, config=cfg, fingerprint=inputs.fingerprint,
                                 start_date=inputs.start_date, grid=inputs.grid,
                                 start_context=inputs.start_context, n_paths=n_paths,
                                 resume=resume, overwrite=overwrite)

    # Check the store (and a cluster address) before any training, so a wrong --resume or
    # path fails in a second; but create it (and --overwrite delete the old one) only once
    # the sampler is fitted: bad input found by the fit then leaves no stub behind.
    if resume:
        scenario = open_store()
        if scenario.levels_complete >= scenario.meta.depth:
            console.print(f"{scenario.path} is complete ({scenario.meta.depth} levels)",
                          markup=False)
            return
    else:
        driver.check_run_target(store, kind=kind, n_paths=n_paths, overwrite=overwrite)
        _writable_dir(store, f"--store {store}")
        _size_note(store, kind, cfg, inputs, n_paths, console)
    if cfg.engine.backend == "ray" and cfg.engine.address is not None:
        driver.connect_ray(cfg.engine)
    if saved is not None:
        if note is not None:  # after the store's checks: a refusal stays one line
            console.print(note, markup=False)
        sampler = driver.load_saved_sampler(saved, cfg, console)
    else:
        sampler = driver.fit_for_run(prep, inputs, model, console)
    if not resume:
        # a sampler that diverges from the start context is found before --overwrite deletes
        driver.sampler_probe(sampler, inputs.start_context, cfg.seed)
        scenario = open_store()
    console.print(f"{kind} from {inputs.start_date}: depth {cfg.tree.depth}, backend "
                  f"{cfg.engine.backend}, store {scenario.path}"
                  + (f" (resuming after level {scenario.levels_complete})" if resume else ""),
                  markup=False)
    try:
        stats = driver.run_store(scenario, sampler, cfg, console=console)
    except KeyboardInterrupt:
        console.print(f"{scenario.path} keeps its finished levels and chunks; finish it with "
                      f"{scenario.resume_command}", markup=False)
        raise
    for st in stats:
        done = st.frontier - st.nodes  # found done by a resume
        what = (f"{st.nodes} of its {st.frontier} nodes expanded ({done} done before), "
                f"{st.children} children in all," if done > 0 else
                f"{st.nodes} node{'s' * (st.nodes != 1)} expanded into {st.children}")
        console.print(f"level {st.level}: {what} in {st.seconds:.2f}s "
                      f"({st.nodes_per_second:,.1f} nodes/s)")
    console.print(f"wrote {scenario.path}", markup=False)
    note = _beyond_history_note(scenario, prep.panel.surface[:inputs.fit_days])
    if note is not None:
        console.print(note, markup=False)


def _size_note(store: Path, kind: str, cfg, inputs, n_paths, console) -> None:
    """A note before a run whose store may not fit the disk (its size bound over half the
    free space where the store goes)."""
    import shutil

    from engine import driver

    grid = (len(inputs.grid["moneyness"]), len(inputs.grid["maturity_days"]))
    bound, deepest = driver.store_size_bound(kind, cfg, grid, n_paths)
    where = _nearest_existing(Path(os.path.abspath(store)).parent)
    free = shutil.disk_usage(where).free
    if 2 * bound <= free:
        return
    cap = "" if kind == "mc" or cfg.tree.max_frontier else \
        "; tree.max_frontier (e.g. 625) caps each level, "
    console.print(f"note: this run writes up to {_bytes(bound)} before compression (its level "
                  f"{cfg.tree.depth} alone holds {deepest:,} nodes), and {where} has "
                  f"{_bytes(free)} "
                  f"free: it may not fit{cap or '; '}a lower --depth"
                  f"{' or fewer --n-paths' if kind == 'mc' else ''} shrinks it", markup=False)


def _bytes(n: float) -> str:
    """Bytes in decimal units: 512 B, 1.5 GB, 3,700.2 TB."""
    if n < 1000:
        return f"{n:,.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if round(n, 1) < 1000 or unit == "TB":
            break
    return f"{n:,.1f} {unit}"


@contextlib.contextmanager
def _reading_chunks(scenario, label: str):
    """A transient progress bar over every chunk of the store's complete levels, for a pass
    that reads them all; yields its tick (call it after each chunk)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = _console()
    done = scenario.require_complete_level()
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("read", total=sum(scenario.n_chunks(k)
                                                   for k in range(1, done + 1)))
        yield lambda: progress.advance(task)


def _beyond_history_note(scenario, history: np.ndarray) -> str | None:
    """A note where a run's paths leave the range of vols its history holds at a grid point,
    on either side: how much of each level's probability does, and the farthest point."""
    import numpy as np

    from engine import driver
    from engine.data.io import IV_MAX

    lo, hi = history.min(axis=0), history.max(axis=0)  # (n_m, n_tau)
    with _reading_chunks(scenario, "paths against the history") as tick:
        levels = driver.beyond_history(scenario, lo, hi, tick)
    grid = scenario.meta.grid
    which = "level 1" if len(levels) == 1 else f"levels 1-{len(levels)}"

    def at(i: int, j: int) -> str:
        return f"moneyness {grid['moneyness'][i]:g}, {grid['maturity_days'][j]:g} days"

    parts = []
    for verb, edge, farthest, side in (
            ("rise above", "highest", "the farthest above it (by ratio) is", hi),
            ("fall below", "lowest", "the farthest below it (by ratio) is", lo)):
        up = side is hi
        mass = [b.above if up else b.below for b in levels]
        if not any(m > 0 for m in mass):
            continue
        drawn = (np.max if up else np.min)([b.top if up else b.bottom for b in levels], axis=0)
        i, j = np.unravel_index(int((np.argmax if up else np.argmin)(drawn / side)), side.shape)
        absurd = ""
        if up and drawn.max() > IV_MAX:
            absurd = (f" (vols above {IV_MAX:g}, {100 * IV_MAX:g} vol points, at "
                      f"{int((drawn > IV_MAX).sum())} grid point(s): more than the data reader "
                      "takes as input)")
        parts.append(f"nodes whose days {verb} the {edge} vol of the history at some grid "
                     f"point hold {', '.join(_percent(m) for m in mass)} of the probability of "
                     f"{which}; {farthest} {drawn[i, j]:.4g} at {at(i, j)}, where the "
                     f"history's {edge} is {side[i, j]:.4g}{absurd}")
    if not parts:
        return None
    return ("note: " + "; ".join(parts) + ". There the sampler extrapolates beyond what it has "
            "seen: weigh those tails with care (a longer history, more local neighbours or a "
            "shallower tree keep it nearer the data)")


def _percent(p: float) -> str:
    """A probability as a short percentage: 0%, <0.1%, 4.13%."""
    return "0%" if p == 0 else "<0.1%" if p < 1e-3 else f"{100 * p:.3g}%"


@app.command()
@user_errors
def fit(out: Annotated[Path, _path_option("--out", help="Where to save the fitted sampler.")],
        config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
        start: StartOpt = None, seed: SeedOpt = None) -> None:
    """Fit the run's sampler once (as `run` does) and save it for `run` / `mc --sampler`."""
    import shlex

    from engine import driver, sampler_file
    from engine.pipeline import prepare

    cfg = _config(config, **{"data.source": data, "seed": seed})
    _out_file(out)
    _not_an_input(out, "--out", {"--config": config, "--data": cfg.data.source, "--model": model})
    sampler_file.check_replaceable(out)  # an earlier fit is replaced, nothing else
    console = _console()
    prep = prepare(cfg, console=console, run=True)
    inputs = driver.run_inputs(prep, start)
    if inputs.start_note is not None:
        console.print(inputs.start_note, markup=False)
    sampler = driver.fit_for_run(prep, inputs, model, console)
    driver.sampler_probe(sampler, inputs.start_context, cfg.seed)  # a diverged fit: not saved
    path = driver.save_fitted_sampler(sampler, out, prep, inputs)
    same = "".join(f" {flag} {shlex.quote(str(v))}" for flag, v in
                   (("--config", config), ("--data", data), ("--seed", seed)) if v is not None)
    console.print(f"saved sampler {cfg.sampler.method} fitted on {inputs.fit_days} days up to "
                  f"{inputs.start_date} to {path} ({path.stat().st_size / 2**20:,.1f} MiB); "
                  f"use it with `backfill run{same} --sampler {shlex.quote(str(path))} --store "
                  "S` (or mc), with the same config and data", markup=False)


@app.command()
@user_errors
def run(store: StoreOpt, config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
        depth: DepthOpt = None, backend: BackendOpt = None, address: AddressOpt = None,
        start: StartOpt = None, seed: SeedOpt = None, resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False, sampler: SamplerOpt = None) -> None:
    """Expand the scenario tree (5^N paths with probabilities) into a Zarr store."""
    _expand("tree", store, config, data, model, depth, backend, address, start, seed, resume,
            overwrite, sampler_file=sampler)


@app.command()
@user_errors
def mc(store: StoreOpt,
       n_paths: Annotated[int, typer.Option("--n-paths", help="Monte Carlo paths.")] = 1000,
       config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
       depth: DepthOpt = None, backend: BackendOpt = None, address: AddressOpt = None,
       start: StartOpt = None, seed: SeedOpt = None, resume: ResumeOpt = False,
       overwrite: OverwriteOpt = False, sampler: SamplerOpt = None) -> None:
    """Brute-force chained Monte Carlo of the same sampler: the reference a tree must match."""
    _expand("mc", store, config, data, model, depth, backend, address, start, seed, resume,
            overwrite, n_paths=n_paths, sampler_file=sampler)


def _open_store(store: Path):
    from engine.store import ScenarioStore

    scenario = ScenarioStore.open(store)
    scenario.check_intact()  # a lost chunk file would read as NaN, not fail
    return scenario


def _open_finished_levels(store: Path):
    """A store to export from: intact, with a complete level and its root attributes as
    the run wrote them (a start context edited by hand means the store was tampered with)."""
    from engine import driver

    scenario = _open_store(store)
    scenario.require_complete_level()
    driver.start_context_of(scenario)
    return scenario


def _export_file(out: Path, allowed: tuple[str, ...], store: Path, flag: str = "--out") -> None:
    """A file a reader of ``store`` writes: of an ``allowed`` suffix, and not inside the
    store's folder, which holds the store alone (`run --overwrite` deletes the folder)."""
    import os

    from engine.errors import ConfigError

    _out_suffix(out, allowed, flag)
    folder = Path(os.path.realpath(Path(store).expanduser()))
    target = Path(os.path.realpath(out.expanduser()))
    if folder.is_dir() and (target == folder or folder in target.parents):
        raise ConfigError(f"{flag} {out} lies inside the store {store}, whose folder holds the "
                          "store alone (a run with --overwrite deletes it); write it beside the "
                          "store")


def _out_suffix(out: Path, allowed: tuple[str, ...], flag: str = "--out") -> str:
    suffix = out.suffix.lower()
    if suffix not in allowed:
        from engine.errors import ConfigError

        raise ConfigError(f"{flag} {out} has suffix {suffix or '(none)'!r}; use one of "
                          f"{', '.join(allowed)}")
    _out_file(out, flag)
    return suffix


@app.command()
@user_errors
def marginals(store: StoreOpt,
              out: Annotated[Path, _path_option("--out", help="F.parquet or F.csv")]) -> None:
    """Export the marginal quantiles: date, moneyness, maturity_days, quantile, iv."""
    from engine.store import marginals_frame

    _export_file(out, (".parquet", ".csv"), store)
    frame = marginals_frame(_open_finished_levels(store))
    _write_frame(frame, out)
    _console().print(f"wrote {len(frame)} rows to {out}", markup=False)


@app.command()
@user_errors
def paths(store: StoreOpt, out: Annotated[Path, _path_option("--out", help="F.npz or F.parquet")],
          level: Annotated[int | None, typer.Option(
              help="Level (default: the deepest complete one).")] = None) -> None:
    """Export full terminal paths (rebuilt from parent pointers) with their weights."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from engine.store import export_paths

    _export_file(out, (".npz", ".parquet"), store)
    scenario = _open_finished_levels(store)
    console = _console()
    with Progress(TextColumn("[bold]export"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("export", total=None)
        n, days = export_paths(scenario, out, level,
                               lambda k, total: progress.update(task, advance=k, total=total))
    console.print(f"wrote {n} paths of {days} days to {out}", markup=False)


@app.command(help="VaR and ES of a vega position at each level's horizon (default: long one "
             "vega at every grid point).\n\nP&L = sum over the grid of vega x (iv on the "
             "level's last day - iv at the start), in iv units; from the weighted distribution "
             "of the level's nodes. --position F reads the vegas from a CSV: moneyness, "
             "maturity_days, vega (P&L per 1.00 of iv), one row per grid point held (the rest "
             "hold none).")
@user_errors
def var(store: StoreOpt,
        levels: Annotated[str, typer.Option(help="Confidence levels, e.g. 0.95,0.99")] = "0.95,0.99",
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
        position: Annotated[Path | None, _path_option(
            help="CSV of moneyness, maturity_days, vega (P&L per 1.00 of iv, i.e. per vol "
            "point x 100), one row per grid point held; default: long 1 vega at every grid "
            "point.")] = None,
        realised: Annotated[str | None, typer.Option(
            help="A data file (or 'synthetic') that runs past the start: each level's realised "
            "P&L, where it ranks in the level's distribution and whether it breached each VaR.")
        ] = None,
        plot_out: Annotated[Path | None, _path_option(
            "--plot", help="Also draw each level's P&L distribution with its VaRs (and the "
            "realised P&L): F.png, .pdf or .svg.")] = None,
        tail: Annotated[Path | None, _path_option(
            help="Also write the scenarios that make each level's tail: the nodes at or "
            "beyond the VaR of the lowest --levels, worst first, with their weight, P&L, share "
            "of the tail (ES = sum of tail_share x loss) and surface on the level's last day "
            "(one row per grid point): F.csv or F.parquet.")] = None,
        ) -> None:
    from engine import driver

    alphas = list(dict.fromkeys(_csv(levels, float, "--levels")))  # one column per level
    low = [a for a in alphas if 0 < a < 0.5]
    if low:
        from engine.errors import ConfigError

        raise ConfigError(f"--levels {levels}: {low[0]:g} is below 0.5; --levels takes "
                          f"confidence levels, not tail probabilities: pass {1 - low[0]:g} for "
                          f"the worst {100 * low[0]:g}%")
    if plot_out is not None:
        _export_file(plot_out, (".png", ".pdf", ".svg"), store, "--plot")
    if tail is not None:
        _export_file(tail, (".csv", ".parquet"), store, "--tail")
        _not_an_input(tail, "--tail", {"--position": position, "--realised": realised})
    scenario = _open_store(store)
    vega = None if position is None else driver.read_position(position, scenario.meta.grid)
    surfaces = realised_days = None
    if realised is not None:  # the rows up to the deepest level's last day (not a gap after)
        reach = scenario.require_complete_level() * len(scenario.level_days(1))
        surfaces, realised_days = _realised_after_start(realised, scenario, reach)
    pnls: list = []
    tails: list = []

    def on_level(level, pnl, weight) -> None:
        if plot_out is not None:
            pnls.append((level, pnl, weight))
        if tail is not None:
            tails.append(driver.tail_scenarios(scenario, level, pnl, weight, min(alphas)))

    with _reading_chunks(scenario, "read chunks") as tick:
        rows = driver.vega_risk(scenario, alphas, vega, surfaces,
                                None if plot_out is None and tail is None else on_level,
                                tick, realised_days)
    from engine.metrics import LONG_VEGA

    held = LONG_VEGA if position is None else str(position)
    if tail is not None:
        _write_tail(tails, tail, min(alphas))
    if plot_out is not None:
        from engine.report import plot_pnl

        plot_out.parent.mkdir(parents=True, exist_ok=True)
        plot_pnl(pnls, rows, alphas, plot_out,
                 f"{scenario.meta.kind} from {scenario.meta.start_date}: {held}")
        _console().print(f"wrote {plot_out}", markup=False)
    if json_out:
        typer.echo(driver.to_json([{**r, "position": held} for r in rows]))
        return
    from rich.table import Table

    if vega is None:
        title = f"{LONG_VEGA}: loss in iv units (0.01 = 1 vol point)"
    else:
        n = int((vega != 0).sum())
        title = (f"{position.name} ({n} grid point{'' if n == 1 else 's'} with a vega): loss in "
                 "its P&L units (vega x change of iv)")
    table = Table(title=title)
    for col in ("level", "date", "days", "nodes", "mean P&L"):
        table.add_column(col, justify="right")
    for a in alphas:
        table.add_column(f"VaR {driver.level_label(a)}", justify="right")
        table.add_column(f"ES {driver.level_label(a)}", justify="right")
    if surfaces is not None:
        table.add_column("realised on", justify="right")
        table.add_column("realised P&L", justify="right")
        table.add_column("P(P&L <= it)", justify="right")
    for r in rows:
        cells = [str(r["level"]), r["date"], str(r["days_ahead"]), str(r["nodes"]),
                 f"{r['mean_pnl']:+.4f}"]
        for a in alphas:
            label = driver.level_label(a)
            breach = " *" if r.get(f"breach_{label}") else ""
            coarse = " †" if r[f"tail_losses_{label}"] == 1 else ""
            cells += [f"{r[f'var_{label}']:.4f}{breach}{coarse}", f"{r[f'es_{label}']:.4f}{coarse}"]
        if surfaces is not None:
            cells += ([r["realised_date"], f"{r['realised_pnl']:+.4f}",
                       f"{r['realised_rank']:.3f}"] if r.get("realised_pnl") is not None
                      else ["-", "-", "-"])
        table.add_row(*cells)
    _table_console().print(table)
    if any(r[f"tail_losses_{driver.level_label(a)}"] == 1 for r in rows for a in alphas):
        from engine.samplers import is_knn

        method = scenario.meta.config.get("sampler", {}).get("method", "")
        if scenario.meta.kind == "tree":
            fix = "read a deeper level, or `backfill mc` paths of the same sampler"
        elif is_knn(str(method)):
            fix = ("one context's law holds only its kNN neighbours' residual paths, which "
                   "more --n-paths repeat: read a deeper level, where the steps' draws combine")
        else:
            fix = "read a deeper level, or draw more --n-paths"
        _console().print("† that tail lies on one loss (one node, or paths that repeat one "
                         "drawn path): its ES is that loss, and the law's tail beyond it is not "
                         f"resolved; {fix}", markup=False)
    if surfaces is not None:
        _console().print("* the realised loss exceeded that VaR; '-': the data end before that "
                         "level's last day", markup=False)
        moved = [r for r in rows if r.get("realised_date") not in (None, r["date"])]
        if moved:
            r = moved[0]
            _console().print(
                f"note: the model steps one data row a day: a level's realised P&L is its "
                f"data's row N after the start, N its days ahead (level {r['level']}: row "
                f"{r['days_ahead']}, {r['realised_date']}: 'realised on'), while the store's "
                f"calendar of weekdays labels that step {r['date']} (the data "
                f"{_calendar_gap(r['realised_date'], r['date'])})", markup=False)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links), where both exist."""
    import os

    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def _not_an_input(out: Path, flag: str, inputs: dict) -> None:
    """Refuse an output that is one of the command's input files ({flag: path or None})."""
    from engine.errors import ConfigError

    for given_flag, given in inputs.items():
        if given is not None and _same_file(out, Path(given)):
            raise ConfigError(f"{flag} {out} is the {given_flag} file; write it to another "
                              "path")


def _json_replaceable(out: Path, flag: str = "--json") -> None:
    """Refuse to write a JSON report over an existing file that is not a JSON object (data,
    a config, a model): only an earlier report is replaced."""
    import json

    from engine.errors import ConfigError

    if not out.is_file() or out.stat().st_size == 0:
        return
    try:
        ok = out.stat().st_size < (64 << 20) and isinstance(
            json.loads(out.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{flag} {out} exists and is not a JSON report, which this command "
                          "would overwrite; pass another path, or delete the file first")


def _write_frame(frame, out: Path) -> None:
    """A table to ``out`` (.csv or .parquet, by its suffix), staged beside it
    (``report.staged``): a failed write keeps an older file whole; a link is written
    through."""
    import os

    from engine.report import staged

    target = Path(os.path.realpath(out))
    with staged(target.parent) as stage:
        if target.suffix.lower() == ".csv":
            frame.to_csv(stage / target.name, index=False)
        else:
            frame.to_parquet(stage / target.name, index=False)


def _write_tail(frames: list, out: Path, a: float) -> None:
    """Each level's tail scenarios to ``out``."""
    import pandas as pd

    from engine.driver import level_label

    frame = pd.concat(frames, ignore_index=True)
    _write_frame(frame, out)
    n = frame.groupby("level")["path"].nunique()
    _console().print(f"wrote the scenarios at or beyond VaR {level_label(a)} to {out}: "
                     + ", ".join(f"{k} at level {lv}" for lv, k in n.items()), markup=False)


MAX_PLOT_PATHS = 100  # more lines than this are a smear, not paths one can follow


@app.command()
@user_errors
def plot(store: StoreOpt, out: Annotated[Path, _path_option("--out", help="fan.png")],
         maturity: Annotated[float | None, typer.Option(
             help="Maturity in days (nearest grid point; default the shortest).")] = None,
         moneyness: Annotated[float | None, typer.Option(
             help="Strike / spot (nearest grid point; default the one nearest 1, at the "
             "money).")] = None,
         realised: Annotated[str | None, typer.Option(
             help="A data file (or 'synthetic': the store's own simulated market, continued) "
             "whose days after the start are drawn over the fan, its k-th row after the start "
             "against the fan's k-th day: e.g. the file a backfill from a past date used.")
         ] = None,
         paths: Annotated[int, typer.Option(
             "--paths", help="Also draw this many (at most 100) whole scenario paths of the "
             "deepest level, spread over their last day's vol (the nodes at its 1/2n, 3/2n, .. "
             "weighted quantiles).")] = 0,
         ) -> None:
    """Fan chart: q05 / q50 / q95 of one grid point's vol over every day, from the marginals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from engine import driver
    from engine.errors import ConfigError

    if maturity is not None and not (np.isfinite(maturity) and maturity > 0):
        raise ConfigError(f"--maturity {maturity} is not a maturity in days; pass a positive "
                          "number (the nearest grid maturity is plotted)")
    if moneyness is not None and not (np.isfinite(moneyness) and moneyness > 0):
        raise ConfigError(f"--moneyness {moneyness} is not a strike / spot; pass a positive "
                          "number, e.g. 0.9 (the nearest grid moneyness is plotted)")
    if not 0 <= paths <= MAX_PLOT_PATHS:
        raise ConfigError(f"--paths {paths}: draw 0 to {MAX_PLOT_PATHS} scenario paths")
    _export_file(out, (".png", ".pdf", ".svg"), store)
    scenario = _open_finished_levels(store)
    m = scenario.read_marginals()
    grid = scenario.meta.grid
    if moneyness is not None and moneyness > max(5.0, max(grid["moneyness"])):
        raise ConfigError(f"--moneyness {moneyness:g} lies beyond the store's grid (up to "
                          f"{max(grid['moneyness']):.10g}) and reads as percent of the spot; "
                          f"pass strike / spot, e.g. {moneyness / 100:g}")
    i = int(np.argmin(np.abs(np.asarray(grid["moneyness"]) - (moneyness or 1.0))))
    mats = np.asarray(grid["maturity_days"])
    j = int(np.argmin(mats)) if maturity is None else int(np.argmin(np.abs(mats - maturity)))
    for flag, asked, axis, k in (("--moneyness", moneyness, grid["moneyness"], i),
                                 ("--maturity", maturity, grid["maturity_days"], j)):
        if asked is not None and not np.isclose(asked, axis[k], rtol=driver.GRID_RTOL, atol=0):
            _console().print(f"note: {flag} {asked:g} is not on the store's grid ("
                             f"{', '.join(f'{a:.10g}' for a in axis)}): plotting the "
                             f"nearest, {axis[k]:.10g}", markup=False)
    q = {lv: int(np.argmin(np.abs(m["quantile"] - lv))) for lv in (0.05, 0.5, 0.95)}
    band = m["quantiles"][:, :, i, j]  # (D, Q)
    ok = np.isfinite(band[:, q[0.5]])
    days = m["days"][ok].astype("datetime64[D]")
    history = driver.start_context_of(scenario)[:, i, j]
    start = np.datetime64(scenario.meta.start_date, "D")
    hist_days = np.busday_offset(start, -np.arange(len(history))[::-1], roll="backward")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(hist_days, history, color="black", lw=1.2, label="history (context)")
    ax.fill_between(days, band[ok, q[0.05]], band[ok, q[0.95]], color="tab:blue", alpha=0.25,
                    label="q05-q95")
    ax.plot(days, band[ok, q[0.5]], color="tab:blue", lw=1.5, label="median")
    said = ""
    if paths:
        path_days, drawn, _ = driver.scenario_paths(scenario, i, j, paths)
        for k, path in enumerate(drawn):
            ax.plot(path_days.astype("datetime64[D]"), path, color="tab:purple", lw=0.6,
                    alpha=0.7, label=f"{len(drawn)} scenario paths" if k == 0 else None)
        said = f"; {len(drawn)} scenario path{'s' * (len(drawn) != 1)}" + (
            f" of the {paths} asked (nodes heavy enough to stand at several quantiles, or too "
            "few nodes, are drawn once)" if len(drawn) < paths else "")
    if realised is not None:
        # the model steps a data row a day: the k-th row after the start is the fan's k-th day
        steps, step_days = _realised_after_start(realised, scenario, len(ok))
        steps = steps[:, i, j]
        shown = ok[:len(steps)]
        r_iv, r_band = steps[shown], band[:len(steps)][shown]
        ax.plot(m["days"][:len(steps)][shown].astype("datetime64[D]"), r_iv, color="tab:red",
                lw=1.2, marker="." if len(r_iv) == 1 else None, label="realised")
        inside = int(((r_iv >= r_band[:, q[0.05]]) & (r_iv <= r_band[:, q[0.95]])).sum())
        said += (f"; realised inside q05-q95 on {inside} of {len(r_iv)} "
                 f"day{'' if len(r_iv) == 1 else 's'}")
        labels = m["days"][:len(steps)].astype("datetime64[D]")
        if np.any(step_days != labels):  # the k-th data row is drawn on the fan's k-th day
            said += (f" (the data's k-th row after the start drawn on the fan's k-th day: its "
                     f"last, {step_days[-1]}, at {labels[-1]}; the data "
                     f"{_calendar_gap(step_days[-1], labels[-1])})")
    # where each level after the first starts: its marginals come from other nodes' draws,
    # so the band may step there (README, known limitations)
    done = scenario.require_complete_level()
    for level in range(2, done + 1):
        ax.axvline(scenario.level_days(level)[0], color="grey", lw=0.6, ls=":",
                   label="a level starts" if level == 2 else None)
    ax.set_title(f"{scenario.meta.kind} from {scenario.meta.start_date}: moneyness "
                 f"{grid['moneyness'][i]:g}, {mats[j]:g} days")
    ax.set_ylabel("implied volatility")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    _console().print(f"wrote {out} (moneyness {grid['moneyness'][i]:g}, {mats[j]:g} days"
                     f"{said})", markup=False)


def _calendar_gap(data_day, store_day) -> str:
    """Why the data's k-th row after the start is not the store's k-th weekday."""
    import numpy as np

    if np.datetime64(data_day, "D") > np.datetime64(store_day, "D"):
        return "skip days the store's weekdays hold: holidays, a gap"
    return "hold days the store's weekdays skip: weekends"


def _realised_after_start(source: str, scenario, n_steps: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The surfaces (steps, n_m, n_tau) of the data ``source`` on its (at most ``n_steps``;
    None: all) rows after the store's start day, which it must hold, on the store's grid, and
    their dates (steps,): the k-th row after the start is the model's k-th step (its date may
    differ from the store's k-th weekday: the data skips holidays). Notes if its start-day
    surface is not the one the run started from, and where its rows after the start leave a
    gap (``Panel.gap_note``)."""
    import numpy as np

    from engine import driver
    from engine.config import Config
    from engine.data.io import load_panel, read_panel
    from engine.errors import DataError

    data = Config.from_dict(scenario.meta.config).data
    if source == "synthetic":  # the store's own market, simulated on past its history
        if data.source != "synthetic":
            raise DataError(f"--realised synthetic: {scenario.path} was run on {data.source}, "
                            "not the synthetic market; pass that file")
        panel = load_panel(data, evaluation=True)
    else:  # read as the run read its data (data.fill, which its store's config decides)
        panel = read_panel(source, data.fill, data.fill_limit, fill_hint=False)
        if panel.fill_note is not None:
            _console().print(f"note: {panel.fill_note}", markup=False)
    grid = scenario.meta.grid
    same = (panel.moneyness.shape == np.shape(grid["moneyness"])
            and panel.maturity_days.shape == np.shape(grid["maturity_days"])
            and np.allclose(panel.moneyness, grid["moneyness"], rtol=driver.GRID_RTOL, atol=0)
            and np.allclose(panel.maturity_days, grid["maturity_days"], rtol=driver.GRID_RTOL,
                            atol=0))
    if not same:
        raise DataError(f"--realised {source}: its grid (moneyness "
                        f"{', '.join(f'{v:g}' for v in panel.moneyness)} x maturity "
                        f"{', '.join(f'{v:g}' for v in panel.maturity_days)}) is not the store's "
                        f"({', '.join(f'{v:g}' for v in grid['moneyness'])} x "
                        f"{', '.join(f'{v:g}' for v in grid['maturity_days'])}); pass the data "
                        "the run used, or a later version of it")
    start = np.datetime64(scenario.meta.start_date, "D")
    at = int(np.searchsorted(panel.dates, start))
    if at == len(panel.dates) or panel.dates[at] != start:
        raise DataError(f"--realised {source}: no row on the start {start} (its days run "
                        f"{panel.dates[0]} to {panel.dates[-1]}); pass the data the run used, "
                        "or a later version of it")
    steps = panel.surface[at + 1 :][:n_steps]
    dates = panel.dates[at + 1 :][:n_steps].astype("datetime64[D]")
    if steps.size == 0:
        how = ("the store's market runs on past its history for data.synthetic.test_days "
               f"= {data.synthetic.test_days} days; run it with more" if source == "synthetic"
               else "pass data that goes on past it")
        raise DataError(f"--realised {source}: it ends on the start {start}; {how}, or leave "
                        "--realised out")
    if not np.allclose(panel.surface[at], driver.start_context_of(scenario)[-1], rtol=1e-6,
                       atol=0):
        _console().print(f"note: {source}'s surface on {start} is not the one the run started "
                         "from: these are not the data it ran on", markup=False)
    gap = panel.slice_days(at, at + 1 + len(steps)).gap_note(consequence=(
        "its rows after the start stand for the model's steps, one a day, so from there on "
        "they are later than the store's days: fill the gap, or use data without it"))
    if gap is not None:
        _console().print(f"note: {gap}", markup=False)
    return steps, dates


@app.command(help="Read a whole store back and check it; exit 2 if anything fails.\n\n"
             "Every chunk decodes, no node is lost, doubled or given another parent, "
             "children's weights sum to their parent's, every vol is finite and positive, "
             "the marginals are complete and ordered.")
@user_errors
def check(store: StoreOpt,
          json_out: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
          ) -> None:
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from engine.audit import check_store
    from engine.store import REDO, ScenarioStore

    scenario = ScenarioStore.open(store)  # not _open_store: a lost chunk is one of the checks
    console = _console()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        report = check_store(scenario, progress)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        _table_console().print(_check_table(report))
    if not report["ok"]:
        more = report["n_problems"] - 1
        fail(f"{store} fails {report['n_problems']} check{'s' if more else ''}: "
             f"{report['problems'][0]}{f' (and {more} more)' if more else ''}; its data cannot "
             f"be trusted: {REDO}")
    if not report["finished"]:
        typer.echo(f"the run is not finished ({report['levels_complete']} of "
                   f"{report['depth']} levels complete); finish it with "
                   f"{scenario.resume_command}", err=True)


def _check_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['store']}: {report['kind']}, depth {report['depth']}, "
                        f"{report['levels_complete']} levels complete")
    for col in ("level", "days", "rows", "chunks", "weight sum", "children vs parent",
                "iv range", "problems"):
        table.add_column(col, justify="right")
    for lv in report["levels"]:
        err = lv["worst_branch_error"]
        iv = "" if lv["iv_min"] is None else f"{lv['iv_min']:.4f}..{lv['iv_max']:.4f}"
        table.add_row(str(lv["level"]), f"{lv['first_day']}..{lv['last_day']}",
                      f"{lv['rows']:,}", f"{lv['chunks_written']}/{lv['chunks']}",
                      f"{lv['weight_sum']:.12f}", "" if err is None else f"{err:.1e}",
                      iv, str(lv["n_problems"]) if lv["n_problems"] else "ok")
    m = report["marginals"]
    grid = report["grid"]
    table.caption = ((f"marginals: {m['days_written']} of {m['days']} days written"
                      if m.get("present") else "marginals: none")
                     + f"\nfrom {report['start_date']}; grid: moneyness "
                     + ", ".join(f"{v:.10g}" for v in grid["moneyness"]) + "; maturity_days "
                     + ", ".join(f"{v:.10g}" for v in grid["maturity_days"]))
    return table


@app.command()
@user_errors
def bench(config: ConfigOpt = None,
          data: Annotated[str | None, typer.Option(
              help="Data to fit on (default: the built-in synthetic market).")] = "synthetic",
          json_out: Annotated[Path | None, _path_option(
              "--json", help="Also write the numbers to this JSON file.")] = None,
          quick: Annotated[bool, typer.Option(
              "--quick", help="Small depths and sizes (tests, laptops); same keys.")] = False,
          no_ray: Annotated[bool, typer.Option(
              "--no-ray", help="Skip the Ray backend's runs.")] = False,
          n_samples: Annotated[int | None, typer.Option(
              "--n-samples", help="M paths per node of the tree runs (default: "
              "tree.n_samples, at most 64).")] = None,
          epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
          workdir: Annotated[Path | None, _path_option(
              help="Where the temporary stores go (default: the system temp dir).")] = None,
          gpu: Annotated[bool, typer.Option(
              "--gpu", help="The GPU part only: decoder on the torch device (CUDA where "
              "present), stage profile, inline trees at M = 64 and 512 "
              "(cluster/gpu_bench.sh).")] = False,
          depths: Annotated[str | None, typer.Option(
              help="--gpu: tree depths, comma-separated (default 5,6; 4,5 with --quick).")] = None,
          threads: Annotated[str | None, typer.Option(
              help="--gpu: engine.threads of the inline trees, comma-separated (default: 1 "
              "and one per core).")] = None,
          ) -> None:
    """Throughput and memory: tree nodes/s (inline, ray), decoder, kNN, store writes, peak RSS."""
    import json

    from engine.bench import render_gpu_table, render_table, run_bench, run_gpu_bench
    from engine.errors import ConfigError

    cfg = _config(config, **{"data.source": data, "train.epochs": epochs})
    if json_out is not None:
        _out_file(json_out, "--json")
        _not_an_input(json_out, "--json", {"--config": config, "--data": cfg.data.source})
        _json_replaceable(json_out)
    if workdir is not None:
        _writable_dir(workdir, f"--workdir {workdir}")
    if n_samples is not None and n_samples < 8:
        raise ConfigError(f"--n-samples {n_samples} is below 8 (tree.n_samples' minimum)")
    depth_list = _csv(depths, int, "--depths")
    thread_list = _csv(threads, int, "--threads")
    if (depth_list is not None or thread_list is not None) and not gpu:
        raise ConfigError("--depths and --threads belong to --gpu; the full bench's depths "
                          "are fixed, and its inline runs use engine.threads from --config")
    for flag, values, low, high in (("--depths", depth_list, 1, 64),
                                    ("--threads", thread_list, 1, 1024)):
        if values is not None and (not values or min(values) < low or max(values) > high):
            raise ConfigError(f"{flag} needs integers from {low} to {high}, got {values}")
    from engine.tree import stride_days

    stride_days(cfg.tree.stride, cfg.data.horizon)  # its trees need it: before the fit
    if gpu:
        samples = (n_samples,) if n_samples is not None else (64, 512)
        result = run_gpu_bench(cfg, samples=samples,
                               depths=tuple(depth_list or ((4, 5) if quick else (5, 6))),
                               threads=tuple(thread_list) if thread_list else None,
                               workdir=workdir, console=_console())
    else:
        result = run_bench(cfg, quick=quick, ray=not no_ray, n_samples=n_samples,
                           workdir=workdir, console=_console())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    _table_console().print(render_gpu_table(result) if gpu else render_table(result))
    if json_out is not None:
        _console().print(f"wrote {json_out}", markup=False)


def _csv(text: str | None, kind, flag: str):
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        from engine.errors import ConfigError

        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of "
                          f"{kind.__name__}s") from None


def main() -> None:
    # typer's usage errors (click's, or its own copy of click's in typer >= 0.20): one line
    # on stderr instead of a boxed usage message
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    no_args = getattr(sys.modules[usage_error.__module__], "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except no_args:
        code = 2  # `backfill` or `backfill config` alone: the help is printed already
    except usage_error as err:  # a flag typo, a missing option, an unknown command
        command = err.ctx.command_path if err.ctx is not None else "backfill"
        message = " ".join(err.format_message().split()).rstrip(".")
        typer.echo(f"error: {message}. See `{command} --help`.", err=True)
        code = 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    code = code if isinstance(code, int) else 0
    if code:
        _quiet_exit_after_an_error()
    sys.exit(code)


if __name__ == "__main__":
    main()
