"""`lossgeo connect RUN_A RUN_B`: mode connectivity between two logged runs, as a new run.

A quadratic Bezier curve between the two runs' final weights is trained on their training
data with their loss and optimizer family (`geometry.connectivity`); train and test loss and
accuracy are evaluated along it and along the straight line, optionally again after weight
matching (MLPs), and lambda_max at a few points of the curve. Everything is checked before
the new run exists: runs that do not exist, runs without a checkpoint (a FAILED run's
included), different architectures or losses, alignment of a model that is not an MLP.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, replace
from typing import Callable

import pandas as pd
import torch
from torch import nn

from lossgeo import figures as plots
from lossgeo.config import TrainConfig
from lossgeo.curvature.params import ParameterSpace
from lossgeo.data import DataBundle, Split
from lossgeo.errors import UserInputError
from lossgeo.geometry import connectivity as conn
from lossgeo.geometry.directions import weights_vector
from lossgeo.losses import LossFn
from lossgeo.run.experiment import check_same_surface, load_logged_run
from lossgeo.run.tracking import TrackedRun, resolve_experiment
from lossgeo.run.train import make_optimizer


@dataclass(frozen=True)
class ConnectSettings:
    """What `lossgeo connect` fits and evaluates (its command-line options)."""

    epochs: int = 5  # passes over the training data to fit each curve
    points: int = 21  # evenly spaced t in [0, 1] on each path
    align: bool = False  # also after weight matching (MLPs only)
    curvature_points: int = 3  # lambda_max at this many evenly spaced t of each curve (0: off)
    lr: float | None = None  # the curve's learning rate (default: run a's)
    batch_size: int | None = None  # the curve's mini-batch size (default: run a's)

    def check(self) -> None:
        """One-line UserInputError for a setting out of range, before anything runs."""
        for name in ("epochs", "points", "curvature_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserInputError(f"{name}: must be an integer (got {value!r})")
        if self.epochs < 1:
            raise UserInputError(f"epochs: must be >= 1 (got {self.epochs})")
        if self.points < 3:
            raise UserInputError(f"points: must be >= 3 (got {self.points})")
        if not 0 <= self.curvature_points <= self.points:
            raise UserInputError(
                f"curvature_points: must be in [0, points={self.points}] "
                f"(got {self.curvature_points})"
            )
        if self.lr is not None and not self.lr > 0:
            raise UserInputError(f"lr: must be > 0 (got {self.lr})")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise UserInputError(f"batch_size: must be an integer >= 1 (got {self.batch_size!r})")

    def params(self) -> dict[str, str]:
        """The settings as a run logs them (None as ''): what a resumed study compares."""
        return {k: "" if v is None else str(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class ConnectResult:
    """The new run's id, its paths (connect/path.csv) and barriers (its metrics)."""

    run_id: str
    paths: pd.DataFrame  # one row per path and t
    barriers: dict[str, float]  # connect/<path>_barrier


def _check_same_surface(config_a: TrainConfig, config_b: TrainConfig, a: nn.Module, b: nn.Module):
    check_same_surface(config_a, config_b)
    shapes_a = [tuple(p.shape) for p in a.parameters()]
    shapes_b = [tuple(p.shape) for p in b.parameters()]
    if shapes_a != shapes_b:
        raise UserInputError("run_b: its parameters' shapes differ from run_a's")


def training_split(data_a: DataBundle, data_b: DataBundle, same_seed: bool) -> Split:
    """Both runs' training data: run a's split, with run b's appended when their seeds
    drew different splits, so that each endpoint's own training loss is part of it."""
    if same_seed:
        return data_a.train
    return Split(
        torch.cat([data_a.train.x, data_b.train.x]), torch.cat([data_a.train.y, data_b.train.y])
    )


def connect_runs(
    run_a: str,
    run_b: str,
    settings: ConnectSettings = ConnectSettings(),
    *,
    experiment: str = "",
    data_dir: str | None = None,
    report: Callable[[str], None] = print,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> ConnectResult:
    """Fits and evaluates the paths between two logged runs and logs them as a new run
    tagged with both (see the module docstring), a child of `parent_run_id` when given,
    with `tags` added; returns its id, paths and barriers."""
    settings.check()
    config_a, data_a, model_a, loss_fn = load_logged_run(run_a, data_dir=data_dir)
    config_b, data_b, model_b, _ = load_logged_run(run_b, data_dir=data_dir)
    _check_same_surface(config_a, config_b, model_a, model_b)
    pairs = {"": model_b}
    if settings.align:
        try:
            perms = conn.weight_matching(model_a, model_b, seed=config_a.seed)
        except ValueError as exc:
            raise UserInputError(f"align: {exc}") from None
        pairs["_aligned"] = conn.permuted(model_b, perms)
    train = training_split(data_a, data_b, config_a.seed == config_b.seed)
    splits = {"train": train, "test": data_a.test}
    curve_config = replace(
        config_a,
        lr=settings.lr or config_a.lr,
        batch_size=settings.batch_size or config_a.batch_size,
    )
    experiment = resolve_experiment(experiment)
    tags = {
        **(tags or {}),
        "kind": "connect",
        "connect.run_a": run_a,
        "connect.run_b": run_b,
        "model": config_a.model,
        "dataset": config_a.dataset,
    }
    with TrackedRun(
        experiment=experiment,
        run_name=f"connect-{run_a[:6]}-{run_b[:6]}",
        tags=tags,
        parent_run_id=parent_run_id,
    ) as run:
        run.log_params(
            {
                "run_a": run_a,
                "run_b": run_b,
                **settings.params(),
                "curve_lr": curve_config.lr,
                "curve_batch_size": curve_config.batch_size,
                "optimizer": curve_config.optimizer,
                "train_size": len(train),
            }
        )
        frames, barriers = [], {}
        for suffix, model_end in pairs.items():
            w_a, w_b = weights_vector(model_a), weights_vector(model_end)

            def on_epoch(epoch: int, loss: float, suffix: str = suffix) -> None:
                run.log_metrics({f"connect/fit_loss{suffix}": loss}, step=epoch)
                report(
                    f"curve{suffix.replace('_', ' ')}: epoch {epoch}/{settings.epochs}, "
                    f"mean loss along it {loss:.4g}"
                )

            control = conn.fit_bezier(
                model_a,
                loss_fn,
                train,
                (w_a, w_b),
                conn.CurveFit(
                    epochs=settings.epochs,
                    batch_size=curve_config.batch_size,
                    make_optimizer=lambda params: make_optimizer(curve_config, params),
                    seed=config_a.seed,
                ),
                on_epoch=on_epoch,
            )
            run.log_object(
                f"connect/control_point{suffix}.pt",
                {k: v.clone() for k, v in ParameterSpace(model_a).unflatten(control).items()},
            )
            ts = torch.linspace(0, 1, settings.points, dtype=torch.float64).tolist()
            paths: dict[str, Callable[[float], torch.Tensor]] = {
                f"linear{suffix}": functools.partial(conn.linear_point, w_a, w_b),
                f"bezier{suffix}": functools.partial(conn.bezier_point, w_a, control, w_b),
            }
            for name, point_at in paths.items():
                rows = pd.DataFrame(
                    dataclasses.asdict(r)
                    for r in conn.evaluate_path(model_a, loss_fn, name, point_at, ts, splits)
                )
                barriers[f"connect/{name}_barrier"] = conn.barrier(rows["train_loss"].tolist())
                frames.append(rows)
            frames[-1] = _with_lambda_max(
                frames[-1], model_a, loss_fn, data_a, paths[f"bezier{suffix}"], settings, config_a
            )
            for t, lam in frames[-1].dropna(subset=["lambda_max"])[["t", "lambda_max"]].values:
                run.log_metrics({f"connect/bezier{suffix}_lambda_max": lam}, step=round(100 * t))
        table = pd.concat(frames, ignore_index=True)
        run.log_metrics(barriers)
        run.log_text("connect/path.csv", table.to_csv(index=False))
        run.log_figures({"plots/connect.png": plots.connect_paths(table)})
    return ConnectResult(run.run_id, table, barriers)


def _with_lambda_max(
    rows: pd.DataFrame,
    model: nn.Module,
    loss_fn: LossFn,
    data: DataBundle,
    point_at: Callable[[float], torch.Tensor],
    settings: ConnectSettings,
    config: TrainConfig,
) -> pd.DataFrame:
    """`rows` with a lambda_max column: the top Hessian eigenvalue on run a's probe set at
    `curvature_points` evenly spaced points of the path (NaN elsewhere)."""
    from lossgeo.curvature.api import hessian_eigen

    rows = rows.assign(lambda_max=float("nan"))
    if settings.curvature_points == 0:
        return rows
    chosen = torch.linspace(0, len(rows) - 1, settings.curvature_points).round().long().unique()
    path = conn.PathModel(model)
    for index in chosen.tolist():
        path.set(point_at(float(rows["t"].iloc[index])), data.train)
        eig = hessian_eigen(
            path.model, loss_fn, (data.probe.x, data.probe.y), k=1, tol=config.curvature_tol
        )
        rows.loc[rows.index[index], "lambda_max"] = float(eig.values[0])
    return rows


@dataclass(frozen=True)
class StudyPair:
    """Two runs of one study to connect, and the kind of pair they make."""

    run_a: str
    run_b: str
    kind: str  # "within <regime>" or "across <regime> / <regime>"


def pair_kind(regime_a: str, regime_b: str) -> str:
    """ "within R" for two runs of one regime, else "across R1 / R2" in sorted order."""
    if regime_a == regime_b:
        return f"within {regime_a}"
    first, second = sorted((regime_a, regime_b))
    return f"across {first} / {second}"


def study_pairs(parent_run: str) -> list[StudyPair]:
    """Every pair of a study's FINISHED training runs of the same model that reached the
    study's target (a run that missed it is not at the study's fit), in a fixed order."""
    from lossgeo.run.tracking import finished_child_runs

    cells = []
    for run in finished_child_runs(parent_run):
        tags = run.data.tags
        if tags.get("lossgeo_role") != "cell" or tags.get("reached_target") == "false":
            continue
        cells.append(
            (tags.get("model", ""), tags.get("regime", ""), tags.get("seed", ""), run.info.run_id)
        )
    if len(cells) < 2:
        raise UserInputError(
            f"parent_run: {len(cells)} finished training run(s) at the study's fit under "
            f"{parent_run}; connecting needs two or more"
        )
    cells.sort()
    return [
        StudyPair(a[3], b[3], pair_kind(a[1], b[1]))
        for i, a in enumerate(cells)
        for b in cells[i + 1 :]
        if a[0] == b[0]
    ]


def connect_study(
    parent_run: str,
    settings: ConnectSettings = ConnectSettings(),
    *,
    data_dir: str | None = None,
    report: Callable[[str], None] = print,
) -> tuple[str, list[str]]:
    """`connect_runs` on every pair of a study (`study_pairs`), each tagged `connect.study`
    and `connect.kind`, as children of one folder run per study (`connectivity_folder`:
    the study's own tree keeps only its training runs). Resumable: a pair with a FINISHED
    connect run of the same settings is not run again. Returns (folder run id, the connect
    runs' ids, old and new)."""
    settings.check()
    pairs = study_pairs(parent_run)
    experiment, folder = connectivity_folder(parent_run)
    done = _finished_connections(folder, settings)
    ids = []
    for i, pair in enumerate(pairs, 1):
        found = done.get((pair.run_a, pair.run_b))
        if found:
            report(f"pair {i}/{len(pairs)} ({pair.kind}): done before, run {found}")
            ids.append(found)
            continue
        report(f"pair {i}/{len(pairs)} ({pair.kind}): {pair.run_a} - {pair.run_b}")
        result = connect_runs(
            pair.run_a,
            pair.run_b,
            settings,
            experiment=experiment,
            data_dir=data_dir,
            report=report,
            parent_run_id=folder,
            tags={"connect.study": parent_run, "connect.kind": pair.kind},
        )
        ids.append(result.run_id)
    return folder, ids


def connectivity_folder(parent_run: str) -> tuple[str, str]:
    """(experiment, id) of the FINISHED folder run that holds a study's connect runs, made
    the first time (`connectivity-<study>`, tagged `connect.study` and `lossgeo_role`)."""
    from lossgeo.run.tracking import client, find_or_create_run, get_run

    parent = get_run(parent_run)
    experiment = client().get_experiment(parent.info.experiment_id).name
    study = parent.data.params.get("study", parent_run[:8])
    folder = find_or_create_run(
        experiment,
        f"connectivity-{study}",
        {"connect.study": parent_run, "lossgeo_role": "connectivity"},
    )
    return experiment, folder


def _finished_connections(folder: str, settings: ConnectSettings) -> dict[tuple[str, str], str]:
    """(run_a, run_b) -> id of a FINISHED connect run in the folder with these settings."""
    from lossgeo.run.tracking import finished_child_runs

    wanted = settings.params()
    found = {}
    for run in finished_child_runs(folder):
        params = run.data.params
        if all(params.get(k) == v for k, v in wanted.items()):
            found[(params["run_a"], params["run_b"])] = run.info.run_id
    return found
