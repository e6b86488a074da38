"""Command line: thin wrappers that parse, validate, call the library and set exit codes.

Options are generated from the config dataclass, so the CLI, MLproject and logged params
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from lossgeo.config import TrainConfig, config_fields
from lossgeo.errors import UserInputError
from lossgeo.run import interrupts
from lossgeo.run.interrupts import Interrupted


class IntegralNumber(click.ParamType):
    """An integer, also written as an integral float: `mlflow run` passes MLproject
    parameters of type float as given (`-P batch_size=32.0`), and 32.0 means 32. Anything
    else is passed on as read, for the config to reject in its own words."""

    name = "integer"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number


_CLICK_TYPES = {int: IntegralNumber(), float: click.FLOAT, bool: click.BOOL, str: click.STRING}


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
        func = click.option(
            f"--{field.name.replace('_', '-')}",
            field.name,
            type=_CLICK_TYPES[ftype],
            default=field.default,
            show_default=True,
            help=help_text,
        )(func)
    return func


def build_config(options: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in config_fields()}
    return TrainConfig(**{k: v for k, v in options.items() if k in names})


def fail(message: str) -> None:
    """One line on stderr, exit code 2; a run pre-created by `mlflow run` says why it failed."""
    click.echo(f"lossgeo: error: {message}", err=True)
    try:
        from lossgeo.run.tracking import mark_launcher_run_rejected

        mark_launcher_run_rejected(message)
    except Exception:  # the message above matters more than the cleanup
        pass
    sys.exit(2)


def reports_user_errors(command: Callable) -> Callable:
    """Bad input anywhere in a command becomes `fail`: one line, exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserInputError as exc:
            fail(str(exc))

    return wrapper


def check_out_folder(out_dir: str) -> None:
    """--out names a folder that exists and is writable, or one that can be made in a
    writable folder; anything else is one line before any work (it was a traceback after
    the analysis)."""
    path = Path(out_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UserInputError(f"out: {out_dir} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"out: {existing} is not a folder, so {out_dir} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"out: {existing} is not writable")


def reads_store(command: Callable) -> Callable:
    """A command that only reads logged runs: no store here is one line, never a new one."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lossgeo.run.tracking import require_store

        require_store()
        return command(*args, **kwargs)

    return wrapper


EXPERIMENT_HELP = (
    "MLflow experiment (default: the launcher's under `mlflow run`, else "
    "$MLFLOW_EXPERIMENT_NAME, else Default)"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """lossgeo: loss-landscape geometry tracked in MLflow."""


@cli.command("train")
@config_options
@reports_user_errors
def train_command(**options: Any) -> None:
    """Train one model as one MLflow run, measuring curvature on a schedule (data-parallel
    into the same one run under `torchrun --nproc-per-node N -m lossgeo train`)."""
    from lossgeo.run.experiment import prepare, run_training
    from lossgeo.run.parallel import data_parallel
    from lossgeo.run.tracking import resolve_experiment
    from lossgeo.run.train import LoopContext

    config = build_config(options)
    # under torchrun: one process group, each rank its slice of every batch, rank 0 logs
    with data_parallel(config.device) as (ranks, device):
        prepared = prepare(config, device)  # validated before anything is written
        if ranks.logs:
            _end_stale_runs(resolve_experiment(config.experiment))
        outcome = run_training(config, prepared=prepared, context=LoopContext(ranks=ranks))
    if not ranks.logs:
        return
    last = outcome.history.iloc[-1].to_dict() if not outcome.history.empty else {}
    summary = ", ".join(
        f"{k}={last[k]:.4f}"
        for k in ("train_loss", "test_loss", "test_acc", "lambda_max")
        if k in last
    )
    state = f"diverged at epoch {outcome.diverged_epoch}" if outcome.diverged_epoch else "finished"
    click.echo(f"run {outcome.run_id} {state}: {summary}")
    from lossgeo.run.tracking import tracking_uri, ui_link

    where = "" if tracking_uri().startswith("http") else "`mlflow ui`, then "
    click.echo(f"see it: {where}{ui_link(outcome.run_id)}")


def _end_stale_runs(experiment: str) -> None:
    """Runs left RUNNING by a killed process in this experiment end KILLED first."""
    from lossgeo.run.tracking import end_stale_runs

    for run_id, age in end_stale_runs([experiment], ended_by="lossgeo train, before its run"):
        click.echo(
            f"lossgeo: run {run_id} had no heartbeat for {age:.0f} s: ended KILLED", err=True
        )


@cli.group("runs")
def runs_group() -> None:
    """Housekeeping of logged runs."""


@runs_group.command("cleanup")
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    help="experiment name, repeatable (default: every experiment)",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    default=300,
    show_default=True,
    help="seconds without a heartbeat after which a RUNNING run counts as dead, "
    "taken as given: below three heartbeat intervals (3 x 30 s) a live run "
    "can be ended too",
)
@reports_user_errors
@reads_store
def runs_cleanup_command(experiments: tuple[str, ...], stale_after: float) -> None:
    """End KILLED the runs whose process died without ending them (SIGKILL, lost machine)."""
    from lossgeo.run.tracking import end_stale_runs

    ended = end_stale_runs(list(experiments) or None, stale_after=stale_after, min_intervals=0)
    for run_id, age in ended:
        click.echo(f"run {run_id}: no heartbeat for {age:.0f} s, ended KILLED")
    click.echo(f"{len(ended)} stale run(s) ended")


@cli.command("curvature")
@click.option("--run-id", required=True, help="MLflow run whose final checkpoint to measure")
@click.option("--curvature-k", type=int, default=None, help="top eigenvalues (default: the run's)")
@click.option("--curvature-tol", type=float, default=None, help="relative eigenvalue accuracy")
@click.option("--curvature-max-iter", type=int, default=None, help="maximum Lanczos steps")
@click.option("--trace-samples", type=int, default=None, help="Hutchinson vectors")
@click.option("--probe-size", type=int, default=None, help="probe samples (default: the run's)")
@click.option("--data-dir", default=None, help="data root (default: the run's)")
@reports_user_errors
@reads_store
def curvature_command(run_id: str, **overrides: Any) -> None:
    """Re-measure a logged run's final checkpoint; results go into that run."""
    from lossgeo.run.experiment import remeasure_curvature

    metrics = remeasure_curvature(run_id, **overrides)
    click.echo(
        f"run {run_id}: lambda_max={metrics['lambda_max']:.6g} "
        f"lambda_min={metrics['lambda_min']:.6g} trace={metrics['hessian_trace']:.6g} "
        f"({metrics['curvature_seconds']:.1f}s) logged under remeasured/"
    )


@cli.command("pac-bayes")
@click.option("--run-id", "run_ids", multiple=True, help="a logged run (repeatable)")
@click.option("--parent-run", default=None, help="every finished child run of a study's parent")
@click.option(
    "--max-increase",
    type=float,
    default=None,
    help="loss increase the noise may cause (default: the run's pac_bayes_increase)",
)
@click.option("--data-dir", default=None, help="data root (default: the runs')")
@reports_user_errors
@reads_store
def pac_bayes_command(
    run_ids: tuple[str, ...],
    parent_run: str | None,
    max_increase: float | None,
    data_dir: str | None,
) -> None:
    """PAC-Bayes flatness of logged runs' final checkpoints, logged into those runs."""
    from lossgeo.run.experiment import remeasure_pac_bayes
    from lossgeo.run.tracking import finished_children

    if max_increase is not None and not max_increase > 0:
        raise UserInputError(f"max_increase: must be > 0 (got {max_increase})")
    if bool(run_ids) == bool(parent_run):
        raise UserInputError("give --run-id (one or more) or --parent-run, not both")
    targets = list(run_ids) or finished_children(parent_run)  # type: ignore[arg-type]
    if not targets:
        raise UserInputError(f"parent_run: {parent_run} has no finished child runs")
    for run_id in targets:
        m = remeasure_pac_bayes(run_id, max_increase=max_increase, data_dir=data_dir)
        click.echo(
            f"run {run_id}: pac_bayes_flatness={m['pac_bayes_flatness']:.6g} "
            f"pac_bayes_mag_flatness={m['pac_bayes_mag_flatness']:.6g}"
        )


@cli.command("landscape")
@click.option("--run-id", required=True, help="MLflow run whose final checkpoint to slice")
@click.option(
    "--landscape-resolution",
    "resolution",
    type=int,
    default=None,
    help="grid points per axis (default: the run's)",
)
@click.option(
    "--landscape-range",
    "half_range",
    type=float,
    default=None,
    help="half-width r of [-r, r]^2 (default: the run's)",
)
@click.option(
    "--landscape-directions",
    "directions",
    type=click.Choice(["random", "eigen"]),
    default=None,
    help="plane (default: the run's)",
)
@click.option("--on-test", is_flag=True, help="slice on the test set instead of the probe set")
@click.option("--data-dir", default=None, help="data root (default: the run's)")
@reports_user_errors
@reads_store
def landscape_command(run_id: str, **options: Any) -> None:
    """Compute a loss slice of a logged run's final checkpoint; logged into that run."""
    from lossgeo.run.experiment import remeasure_landscape

    slice2d = remeasure_landscape(run_id, **options)
    click.echo(
        f"run {run_id}: {tuple(slice2d['loss'].shape)} slice "
        f"({slice2d['directions']}) logged under remeasured/landscape/"
    )


@cli.command("interpolate")
@click.option("--run-a", required=True, help="first MLflow run (alpha = 0)")
@click.option("--run-b", required=True, help="second MLflow run (alpha = 1)")
@click.option("--points", type=click.IntRange(min=3), default=41, show_default=True)
@click.option("--experiment", default="", help=EXPERIMENT_HELP)
@click.option("--data-dir", default=None, help="data root (default: the runs')")
@reports_user_errors
@reads_store
def interpolate_command(
    run_a: str, run_b: str, points: int, experiment: str, data_dir: str | None
) -> None:
    """Loss along the line between two runs' final weights, logged as a new run."""
    from lossgeo.run.experiment import interpolate_runs

    new_run, result = interpolate_runs(
        run_a, run_b, points=points, experiment=experiment, data_dir=data_dir
    )
    click.echo(f"run {new_run}: interpolation logged")


_CONNECT_OPTIONS = [
    click.option(
        "--epochs",
        type=IntegralNumber(),
        default=5,
        show_default=True,
        help="passes over the runs' training data to fit the Bezier curve",
    ),
    click.option(
        "--points",
        type=IntegralNumber(),
        default=21,
        show_default=True,
        help="evenly spaced t on each path",
    ),
    click.option(
        "--align/--no-align",
        default=False,
        show_default=True,
        help="also after permuting run b's hidden units to match run a's (weight matching, MLPs)",
    ),
    click.option(
        "--curvature-points",
        type=IntegralNumber(),
        default=3,
        show_default=True,
        help="lambda_max at this many evenly spaced points of each curve (0: off)",
    ),
    click.option(
        "--lr", type=float, default=None, help="the curve's learning rate (default: run a's)"
    ),
    click.option(
        "--batch-size",
        type=IntegralNumber(),
        default=None,
        help="the curve's mini-batch size (default: run a's)",
    ),
    click.option("--data-dir", default=None, help="data root (default: the runs')"),
]


def connect_options(func: Callable) -> Callable:
    """The curve's options, shared by `connect` and `connectivity`."""
    for option in reversed(_CONNECT_OPTIONS):
        func = option(func)
    return func


@cli.command("connect")
@click.argument("run_a")
@click.argument("run_b")
@connect_options
@click.option("--experiment", default="", help=EXPERIMENT_HELP)
@reports_user_errors
@reads_store
def connect_command(
    run_a: str,
    run_b: str,
    experiment: str,
    data_dir: str | None,
    **settings: Any,
) -> None:
    """Mode connectivity: a Bezier curve and the straight line between two runs' final
    weights, with their loss barriers, logged as a new run."""
    from lossgeo.run.connect import ConnectSettings, connect_runs

    result = connect_runs(
        run_a,
        run_b,
        ConnectSettings(**settings),
        experiment=experiment,
        data_dir=data_dir,
        report=click.echo,
    )
    for name, value in result.barriers.items():
        click.echo(f"{name} {value:.4g}")
    click.echo(f"run {result.run_id}: connect/path.csv and plots/connect.png logged")


@cli.command("connectivity")
@click.option("--parent-run", required=True, help="a study's parent run (grid or sweep)")
@connect_options
@click.option(
    "--out", "out_dir", default="connectivity", show_default=True, help="folder for the tables"
)
@reports_user_errors
@reads_store
def connectivity_command(
    parent_run: str, out_dir: str, data_dir: str | None, **settings: Any
) -> None:
    """Connect every pair of a study's runs (within each regime and across), then the
    barriers by kind of pair with 95% intervals; resumes where it stopped."""
    from lossgeo.analysis.comparison import study_connectivity
    from lossgeo.run.connect import ConnectSettings, connect_study

    check_out_folder(out_dir)
    connect_settings = ConnectSettings(**settings)
    folder, _ = connect_study(parent_run, connect_settings, data_dir=data_dir, report=click.echo)
    summary, paths = study_connectivity(parent_run, folder, out_dir)
    click.echo("barrier (max train loss on the path - mean of its ends), mean [95% t interval]:")
    for _, row in summary.iterrows():
        parts = [
            f"{path} {row[f'connect/{path}_barrier_mean']:.4g} "
            f"[{row[f'connect/{path}_barrier_ci_low']:.4g}, "
            f"{row[f'connect/{path}_barrier_ci_high']:.4g}]"
            for path in ("linear", "bezier", "linear_aligned", "bezier_aligned")
            if f"connect/{path}_barrier_mean" in row
        ]
        click.echo(f"  {row['kind']} ({row['n_pairs']} pairs): " + "; ".join(parts))
    click.echo("\n".join(str(p) for p in paths.values()))


def _load_spec(
    path: str, data_dir: str | None, overrides: tuple[str, ...], max_cells: int | None = None
):
    from lossgeo.studies.studyfile import MAX_CELLS, load_study_file, parse_overrides

    extra = parse_overrides(overrides)
    if data_dir:
        extra["data_dir"] = data_dir
    return load_study_file(path, extra, max_cells=max_cells or MAX_CELLS)


def set_option(func: Callable) -> Callable:
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="override a training parameter of the study's base, validated like the file "
        "(repeatable; one value may hold several: --set 'epochs=1 train_subset=2000')",
    )(func)


@cli.command("grid")
@click.option(
    "--study",
    "study_path",
    default="studies/mnist_grid.yaml",
    show_default=True,
    help="grid study file (YAML)",
)
@click.option("--experiment", default="", help=EXPERIMENT_HELP)
@click.option("--data-dir", default=None, help="data root for every cell")
@set_option
@click.option(
    "--max-cells",
    type=click.IntRange(min=1),
    default=None,
    help="run a grid of more cells than the limit of 1000 (regimes x models x seeds)",
)
@reports_user_errors
def grid_command(
    study_path: str,
    experiment: str,
    data_dir: str | None,
    overrides: tuple[str, ...],
    max_cells: int | None,
) -> None:
    """Run every model x regime of a grid study as child runs of one parent run."""
    from lossgeo.studies.grid import run_grid

    spec = _load_spec(study_path, data_dir, overrides, max_cells)
    if spec.kind != "grid":
        raise UserInputError(f"study: {study_path} is a {spec.kind}, not a grid")
    parent = run_grid(spec, experiment=experiment)
    click.echo(f"grid {spec.name}: parent run {parent}\n{_next_steps(parent)}")


@cli.command("sweep")
@click.option(
    "--study",
    "study_path",
    default="studies/noise_temperature.yaml",
    show_default=True,
    help="sweep study file (YAML)",
)
@click.option("--n-trials", type=int, default=0, help="global trial budget (0: the file's)")
@click.option(
    "--storage", default="", help="Optuna storage URL (default sqlite:///studies/optuna.db)"
)
@click.option("--study-name", default="", help="study name (default: the file's)")
@click.option(
    "--n-jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="trials in parallel threads in this worker",
)
@click.option("--experiment", default="", help=EXPERIMENT_HELP)
@click.option("--data-dir", default=None, help="data root for every trial")
@click.option("--heartbeat-interval", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--grace-period", type=click.IntRange(min=2), default=30, show_default=True)
@set_option
@reports_user_errors
def sweep_command(
    study_path: str,
    n_trials: int,
    storage: str,
    study_name: str,
    data_dir: str | None,
    overrides: tuple[str, ...],
    **worker: Any,
) -> None:
    """Run (or join) an Optuna sweep; start the same command on many machines to share it."""
    # worker: n_jobs, experiment, heartbeat_interval, grace_period, passed on as they are
    from lossgeo.studies.sweep import run_sweep

    if n_trials < 0:
        raise UserInputError(f"n_trials: must be >= 0 (got {n_trials})")
    spec = _load_spec(study_path, data_dir, overrides)
    if spec.kind != "sweep":
        raise UserInputError(f"study: {study_path} is a {spec.kind}, not a sweep")
    study = run_sweep(
        spec,
        storage=storage or None,
        n_trials=n_trials or None,
        study_name=study_name or None,
        **worker,
    )
    from lossgeo.studies.sweep import PARENT_ATTR

    states = [t.state.name for t in study.trials]
    parent = study.user_attrs.get(PARENT_ATTR, "")
    click.echo(
        f"study {study.study_name}: "
        + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        + f"; parent run {parent}"
    )
    best = _best_trial(study)
    if best:
        click.echo(best)
    click.echo(_next_steps(parent))


def _best_trial(study: Any) -> str:
    """The best trial in a line (one objective), or the Pareto front's size (several)."""
    try:
        if len(study.directions) > 1:
            return f"Pareto front: {len(study.best_trials)} trial(s)"
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return ""
    params = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
    )
    return f"best: trial {best.number} ({params}), objective {best.value:.4g}"


def _next_steps(parent: str) -> str:
    return (
        f"next: lossgeo compare --parent-run {parent}   (plots)\n"
        f"      lossgeo report --parent-run {parent}    (LaTeX report with verdicts)"
    )


@cli.command("compare")
@click.option("--experiment", default=None, help="MLflow experiment name")
@click.option("--parent-run", default=None, help="a grid's or sweep's parent run id")
@click.option("--out", "out_dir", default="plots", show_default=True)
@reports_user_errors
@reads_store
def compare_command(experiment: str | None, parent_run: str | None, out_dir: str) -> None:
    """Draw the comparison plots of logged runs into plots/ and log them to MLflow."""
    check_out_folder(out_dir)
    from lossgeo.analysis.comparison import compare

    paths = compare(experiment, parent_run, out_dir, say=_note)
    click.echo("\n".join(str(p) for p in paths.values()))


@cli.command("report")
@click.option("--experiment", default=None, help="MLflow experiment name")
@click.option("--parent-run", default=None, help="a grid's or sweep's parent run id")
@click.option("--out", "out_dir", default="latex", show_default=True)
@click.option("--no-pdf", is_flag=True, help="write the LaTeX sources only")
@reports_user_errors
@reads_store
def report_command(
    experiment: str | None, parent_run: str | None, out_dir: str, no_pdf: bool
) -> None:
    """Write a LaTeX research report from logged runs; compile it where pdflatex exists."""
    check_out_folder(out_dir)
    from lossgeo.analysis.comparison import report

    tex, pdf = report(experiment, parent_run, out_dir, compile_pdf=not no_pdf, say=_note)
    if pdf:
        click.echo(f"{tex}\n{pdf}")
    else:
        click.echo(f"{tex}\n({'--no-pdf' if no_pdf else 'pdflatex not found'}: sources only)")


@cli.command("measures")
@click.option("--parent-run", required=True, help="a grid's or sweep's parent run id")
@click.option("--out", "out_dir", default="measures", show_default=True)
@reports_user_errors
@reads_store
def measures_command(parent_run: str, out_dir: str) -> None:
    """Score every logged measure against the generalisation gap over a study's runs."""
    check_out_folder(out_dir)
    from lossgeo.analysis.comparison import score_study_measures

    table, paths = score_study_measures(parent_run, out_dir)
    shown = table[table["gap"] == "gen_gap"]
    click.echo(f"measures against gen_gap over {int(shown['n'].max())} runs, by Psi:")
    for _, row in shown.fillna(float("nan")).iterrows():
        click.echo(
            f"  {row['measure']:<24} Psi {row['psi']:+.2f} "
            f"[{row['psi_ci_low']:+.2f}, {row['psi_ci_high']:+.2f}]  tau {row['tau']:+.2f}  "
            f"sign error {row['sign_error']:.2f}"
        )
    click.echo("\n".join(str(p) for p in paths.values()))


@cli.command("edge")
@click.option("--parent-run", required=True, help="a grid's or sweep's parent run id")
@click.option("--out", "out_dir", default="edge", show_default=True)
@reports_user_errors
@reads_store
def edge_command(parent_run: str, out_dir: str) -> None:
    """Whether each run of a study reached its optimizer's stability edge and stayed."""
    check_out_folder(out_dir)
    from lossgeo.analysis.comparison import study_edge

    table, paths = study_edge(parent_run, out_dir)
    click.echo("second half of each run's measurements, governing sharpness / threshold:")
    for _, row in table.iterrows():
        click.echo(
            f"  {row['label']:<28} {row['governing']:<30} mean {row['ratio_second_half_mean']:.3f} "
            f"[{row['ratio_second_half_min']:.3f}, {row['ratio_second_half_max']:.3f}], "
            f"{row['share_second_half_within_band']:.0%} within 10%; "
            f"lambda_max/(2/lr) {row['lambda_max_over_2_lr_second_half_mean']:.3f}; "
            f"ends {row['final_regime']}: {row['verdict']}"
        )
    click.echo("\n".join(str(p) for p in paths.values()))


def _note(message: str) -> None:
    click.echo(f"lossgeo: {message}", err=True)


def _what_was_ended() -> str:
    """What an interrupt did to runs, truthfully: the runs this process ended KILLED (it
    once said "runs ended KILLED" when no run existed yet, and on a torchrun rank whose
    run was rank 0's)."""
    logging_module = sys.modules.get("lossgeo.run.tracking.logging")
    ended = list(getattr(logging_module, "ENDED_KILLED", []))
    if not ended:
        return "no run of this process was running"
    return f"what was logged is kept; ended KILLED: run {', run '.join(ended)}"


def main() -> None:
    """Entry point: click's own parse errors and signals handled like every other outcome."""
    interrupts.install()
    try:
        code = cli.main(prog_name="lossgeo", standalone_mode=False)
    except click.ClickException as exc:  # bad option value, unknown option, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lossgeo`: the help, as click does
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)  # UsageError and its kind know their command
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        fail(exc.format_message() + where)
    except (click.Abort, Interrupted):
        if not interrupts.RECEIVED:
            click.echo("lossgeo: aborted", err=True)
            sys.exit(1)
        signum = interrupts.RECEIVED[0]
        click.echo(f"lossgeo: {Interrupted(signum)}; {_what_was_ended()}", err=True)
        sys.exit(128 + signum)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
