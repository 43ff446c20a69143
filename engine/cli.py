"""The `backfill` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.errors import BackfillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Calibrated scenarios of implied-volatility surfaces.")
config_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect the config.")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file.")]
DataOpt = Annotated[Optional[str], typer.Option(help="'synthetic' or a CSV / Parquet / NPZ file.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="A trained checkpoint (.pt).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Run seed (overrides the config's).")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn):
    """Turn BackfillError into one stderr line and exit 2; no traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackfillError as err:
            fail(str(err))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _config(config: Path | None, **overrides):
    from engine.config import load_config

    return load_config(config, {k: v for k, v in overrides.items() if v is not None})


def _console():
    from rich.console import Console

    return Console(stderr=True)


@config_app.command("show")
@user_errors
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective config as TOML."""
    from engine.config import to_toml

    typer.echo(to_toml(_config(config)))


@app.command()
@user_errors
def train(out: Annotated[Path, typer.Option("--out", help="Where to save the checkpoint.")],
          config: ConfigOpt = None, data: DataOpt = None, seed: SeedOpt = None,
          epochs: Annotated[Optional[int], typer.Option(help="Override train.epochs.")] = None,
          horizon: Annotated[Optional[int], typer.Option(help="Override data.horizon.")] = None,
          ) -> None:
    """Train the CVAE on the train split and report validation and test errors."""
    from engine.pipeline import prepare, train_and_report

    cfg = _config(config, **{"data.source": data, "seed": seed, "train.epochs": epochs,
                             "data.horizon": horizon})
    ctx = prepare(cfg)
    train_and_report(ctx, out, console=_console())


@app.command()
@user_errors
def demo(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo_out"),
         config: ConfigOpt = None, seed: SeedOpt = None) -> None:
    """The whole pipeline on the built-in synthetic market, with plots and a summary."""
    from engine.demo import run_demo

    cfg = _config(config, **{"data.source": "synthetic", "seed": seed})
    run_demo(cfg, out, console=_console())


@app.command()
@user_errors
def evaluate(out: Annotated[Path, typer.Option("--out", help="Report folder.")],
             config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
             methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods.")] = None,
             horizons: Annotated[Optional[str], typer.Option(help="e.g. 1,5,10,20,30,60,90")] = None,
             n_samples: Annotated[Optional[int], typer.Option("--n-samples")] = None,
             seed: SeedOpt = None) -> None:
    """Fit every method on the same splits and score them on the same test windows."""
    from engine.evaluate import run_evaluation

    cfg = _config(config, **{
        "data.source": data, "seed": seed, "evaluate.n_samples": n_samples,
        "evaluate.methods": _csv(methods, str, "--methods"),
        "evaluate.horizons": _csv(horizons, int, "--horizons")})
    run_evaluation(cfg, out, model_path=model, console=_console())


@app.command()
@user_errors
def diagnose(out: Annotated[Path, typer.Option("--out", help="Report folder.")],
             config: ConfigOpt = None, data: DataOpt = None, model: ModelOpt = None,
             seed: SeedOpt = None) -> None:
    """Why the raw CVAE is over-confident: sensitivity to z, KL, neighbour variance, budget."""
    from engine.diagnose import run_diagnose

    cfg = _config(config, **{"data.source": data, "seed": seed})
    run_diagnose(cfg, out, model_path=model, console=_console())


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
    app()


if __name__ == "__main__":
    main()
