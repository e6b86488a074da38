"""Command line: thin wrappers that parse, validate, call the library and set exit codes.

Options are generated from the config dataclass, so the CLI, MLproject and logged params
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import click

from .config import TrainConfig, config_fields
from .errors import UserInputError

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, bool: click.BOOL, str: click.STRING}


def _field_type(field: dataclasses.Field) -> type:
    return type(field.default)


def config_options(func: Callable) -> Callable:
    """Adds one --option per TrainConfig field (underscores become dashes)."""
    for field in reversed(config_fields()):
        ftype = _field_type(field)
        choices = field.metadata["choices"]
        help_text = field.metadata["help"]
        if choices:
            help_text += f" ({'|'.join(choices)})"
        func = click.option(f"--{field.name.replace('_', '-')}", field.name,
                            type=_CLICK_TYPES[ftype], default=field.default,
                            show_default=True, help=help_text)(func)
    return func


def build_config(options: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in config_fields()}
    return TrainConfig(**{k: v for k, v in options.items() if k in names})


def fail(message: str) -> None:
    """One line on stderr, exit code 2; a run pre-created by `mlflow run` says why it failed."""
    click.echo(f"lossgeo: error: {message}", err=True)
    try:
        from .tracking import mark_launcher_run_rejected

        mark_launcher_run_rejected(message)
    except Exception:  # the message above matters more than the cleanup
        pass
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """lossgeo: loss-landscape geometry tracked in MLflow."""


@cli.command("train")
@config_options
def train_command(**options: Any) -> None:
    """Train one model as one MLflow run, measuring curvature on a schedule."""
    from .experiment import prepare, run_training

    try:
        config = build_config(options)
        prepared = prepare(config)
    except UserInputError as exc:
        fail(str(exc))
    outcome = run_training(config, prepared=prepared)
    last = outcome.history.iloc[-1].to_dict() if not outcome.history.empty else {}
    summary = ", ".join(f"{k}={last[k]:.4f}" for k in ("train_loss", "test_loss", "test_acc",
                                                        "lambda_max") if k in last)
    state = f"diverged at epoch {outcome.diverged_epoch}" if outcome.diverged_epoch else "finished"
    click.echo(f"run {outcome.run_id} {state}: {summary}")


@cli.command("curvature")
@click.option("--run-id", required=True, help="MLflow run whose final checkpoint to measure")
@click.option("--curvature-k", type=int, default=None, help="top eigenvalues (default: the run's)")
@click.option("--curvature-tol", type=float, default=None, help="Ritz residual tolerance")
@click.option("--curvature-max-iter", type=int, default=None, help="maximum Lanczos steps")
@click.option("--trace-samples", type=int, default=None, help="Hutchinson vectors")
@click.option("--probe-size", type=int, default=None, help="probe samples (default: the run's)")
@click.option("--data-dir", default=None, help="data root (default: the run's)")
def curvature_command(run_id: str, **overrides: Any) -> None:
    """Re-measure a logged run's final checkpoint; results go into that run."""
    from .experiment import remeasure_curvature

    try:
        metrics = remeasure_curvature(run_id, **overrides)
    except UserInputError as exc:
        fail(str(exc))
    click.echo(f"run {run_id}: lambda_max={metrics['lambda_max']:.6g} "
               f"lambda_min={metrics['lambda_min']:.6g} trace={metrics['hessian_trace']:.6g} "
               f"({metrics['curvature_seconds']:.1f}s) logged under remeasured/")


@cli.command("landscape")
@click.option("--run-id", required=True, help="MLflow run whose final checkpoint to slice")
@click.option("--landscape-resolution", "resolution", type=int, default=None,
              help="grid points per axis (default: the run's)")
@click.option("--landscape-range", "half_range", type=float, default=None,
              help="half-width r of [-r, r]^2 (default: the run's)")
@click.option("--landscape-directions", "directions", type=click.Choice(["random", "eigen"]),
              default=None, help="plane (default: the run's)")
@click.option("--on-test", is_flag=True, help="slice on the test set instead of the probe set")
@click.option("--data-dir", default=None, help="data root (default: the run's)")
def landscape_command(run_id: str, **options: Any) -> None:
    """Compute a loss slice of a logged run's final checkpoint; logged into that run."""
    from .experiment import remeasure_landscape

    try:
        slice2d = remeasure_landscape(run_id, **options)
    except UserInputError as exc:
        fail(str(exc))
    click.echo(f"run {run_id}: {tuple(slice2d['loss'].shape)} slice "
               f"({slice2d['directions']}) logged under remeasured/landscape/")


@cli.command("interpolate")
@click.option("--run-a", required=True, help="first MLflow run (alpha = 0)")
@click.option("--run-b", required=True, help="second MLflow run (alpha = 1)")
@click.option("--points", type=click.IntRange(min=3), default=41, show_default=True)
@click.option("--experiment", default="lossgeo", show_default=True)
@click.option("--data-dir", default=None, help="data root (default: the runs')")
def interpolate_command(run_a: str, run_b: str, points: int, experiment: str,
                        data_dir: str | None) -> None:
    """Loss along the line between two runs' final weights, logged as a new run."""
    from .experiment import interpolate_runs

    try:
        new_run, result = interpolate_runs(run_a, run_b, points=points, experiment=experiment,
                                           data_dir=data_dir)
    except UserInputError as exc:
        fail(str(exc))
    click.echo(f"run {new_run}: interpolation logged")


def main() -> None:
    cli(prog_name="lossgeo")


if __name__ == "__main__":
    main()
