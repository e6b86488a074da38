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
from lossgeo.data import DataBundle, Split
from lossgeo.errors import UserInputError
from lossgeo.geometry import connectivity as conn
from lossgeo.geometry.directions import weights_vector
from lossgeo.losses import LossFn
from lossgeo.run.experiment import load_logged_run
from lossgeo.run.tracking import TrackedRun, resolve_experiment
from lossgeo.run.train import make_optimizer

# settings that make two runs' weights points of one loss surface
SAME_SURFACE = ("model", "dataset", "hidden", "activation", "loss")


@dataclass(frozen=True)
class ConnectSettings:
    """What `lossgeo connect` fits and evaluates (its command-line options)."""

    epochs: int = 5  # passes over the training data to fit each curve
    points: int = 21  # evenly spaced t in [0, 1] on each path
    align: bool = False  # also after weight matching (MLPs only)
    curvature_points: int = 3  # lambda_max at this many evenly spaced t of each curve (0: off)
    lr: float | None = None  # the curve's learning rate (default: run a's)

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


@dataclass
class ConnectResult:
    """The new run's id, its paths (connect/path.csv) and barriers (its metrics)."""

    run_id: str
    paths: pd.DataFrame  # one row per path and t
    barriers: dict[str, float]  # connect/<path>_barrier


def _check_same_surface(config_a: TrainConfig, config_b: TrainConfig, a: nn.Module, b: nn.Module):
    for field in SAME_SURFACE:
        if getattr(config_a, field) != getattr(config_b, field):
            raise UserInputError(
                f"run_b: {field} differs from run_a's "
                f"({getattr(config_b, field)!r} vs {getattr(config_a, field)!r})"
            )
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
) -> ConnectResult:
    """Fits and evaluates the paths between two logged runs and logs them as a new run
    tagged with both (see the module docstring); returns its id, paths and barriers."""
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
    curve_config = replace(config_a, lr=settings.lr or config_a.lr)
    experiment = resolve_experiment(experiment)
    tags = {
        "kind": "connect",
        "connect.run_a": run_a,
        "connect.run_b": run_b,
        "model": config_a.model,
        "dataset": config_a.dataset,
    }
    with TrackedRun(
        experiment=experiment, run_name=f"connect-{run_a[:6]}-{run_b[:6]}", tags=tags
    ) as run:
        run.log_params(
            {
                "run_a": run_a,
                "run_b": run_b,
                **dataclasses.asdict(settings),
                "lr": curve_config.lr,
                "optimizer": curve_config.optimizer,
                "batch_size": curve_config.batch_size,
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
                w_a,
                w_b,
                epochs=settings.epochs,
                batch_size=curve_config.batch_size,
                make_optimizer=lambda params: make_optimizer(curve_config, params),
                seed=config_a.seed,
                on_epoch=on_epoch,
            )
            run.log_object(
                f"connect/control_point{suffix}.pt",
                {k: v.clone() for k, v in conn.PathModel(model_a).space.unflatten(control).items()},
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
