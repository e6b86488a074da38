"""One training run as one MLflow run: validate, load, build, train, log everything."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any, Callable

import pandas as pd
import torch
import yaml
from torch import nn

from lossgeo import figures as plots
from lossgeo.config import TrainConfig
from lossgeo.data import DataBundle, load_data
from lossgeo.errors import UserInputError
from lossgeo.losses import LOSSES, LossFn
from lossgeo.models import build_model, scale_initialisation
from lossgeo.run.tracking import TrackedRun, resolve_experiment
from lossgeo.run.train import LoopContext, Measurement, train
from lossgeo.version import __version__


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    history: pd.DataFrame
    diverged_epoch: int | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "device: cuda requested but no CUDA device is available (allowed: auto, cpu, cuda)"
        )
    return torch.device(name)


def prepare(
    config: TrainConfig, device_name: str | None = None
) -> tuple[DataBundle, nn.Module, LossFn, torch.device]:
    """Everything that can fail on user input, done before any MLflow run exists.
    `device_name` overrides the config's device (a rank's own GPU under torchrun)."""
    device = resolve_device(device_name or config.device)
    data = load_data(
        config.dataset,
        config.data_dir,
        seed=config.seed,
        val_size=config.val_size,
        train_subset=config.train_subset,
        probe_size=config.probe_size,
        label_noise=config.label_noise,
    )
    config.check_against_data(len(data.train))
    torch.manual_seed(config.seed)
    model = model_for(config, data)
    if config.init_scale != 1.0:
        scale_initialisation(model, config.init_scale)
    return data.to(device), model.to(device), LOSSES[config.loss], device


def model_for(config: TrainConfig, data: DataBundle) -> nn.Module:
    """The config's model (architecture, widths, activation) for the data's input shape."""
    return build_model(
        config.model,
        data.in_channels,
        data.image_size,
        data.n_classes,
        hidden=config.hidden_widths,
        activation=config.activation,
    )


def default_measurements(config: TrainConfig) -> list[Measurement]:
    from lossgeo.run.measurements import build_measurements

    return build_measurements(config)


# settings a run name never carries: where data and runs live, and what the name leads with
_UNNAMED = {"model", "dataset", "lr", "batch_size", "data_dir", "experiment", "device"}
MAX_RUN_NAME = 64


def run_name(config: TrainConfig) -> str:
    """`mlp-mnist-lr0.1-b32`, then every other setting that differs from the defaults
    (`-epochs=5-measure_every_steps=20`), so that two runs with other settings are told
    apart in the run list; past MAX_RUN_NAME characters those are a 6-digit digest."""
    import hashlib

    base = f"{config.model}-{config.dataset}-lr{config.lr:g}-b{config.batch_size}"
    default = TrainConfig()
    changed = [
        f"{name}={_setting(value)}"
        for name, value in config.to_params().items()
        if name not in _UNNAMED and value != getattr(default, name)
    ]
    name = "-".join([base, *changed])
    if len(name) <= MAX_RUN_NAME:
        return name
    return f"{base}-{hashlib.sha1('-'.join(changed).encode()).hexdigest()[:6]}"


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_training(
    config: TrainConfig,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    measurements: list[Measurement] | None = None,
    on_run_created: Callable[[str], None] | None = None,
    prepared: tuple[DataBundle, nn.Module, LossFn, torch.device] | None = None,
    context: LoopContext = LoopContext(),
) -> RunOutcome:
    """Trains `config` as one MLflow run and returns its id and per-epoch history.
    `context.label` (a grid cell, a sweep trial) starts every line the run prints. Under
    torchrun every rank calls this with its `context.ranks`; rank 0 alone creates and
    writes the run (the others return an empty run id)."""
    ranks = context.ranks
    data, model, loss_fn, device = prepared or prepare(config)
    if measurements is None:
        measurements = default_measurements(config)
    if not ranks.logs:
        rows: list[dict[str, float]] = []
        trained = train(
            config, data, model, loss_fn, logger=_Recorder(None, rows),
            measurements=measurements, context=context,
        )  # fmt: skip
        return RunOutcome("", history_frame(rows), trained.diverged_epoch)
    all_tags = {
        "model": config.model,
        "dataset": config.dataset,
        "lossgeo_version": __version__,
        **(tags or {}),
    }
    run = TrackedRun(
        experiment=resolve_experiment(config.experiment),
        run_name=run_name(config),
        parent_run_id=parent_run_id,
        tags=all_tags,
    )
    if on_run_created is not None:
        on_run_created(run.run_id)
    with run:
        run.log_params(
            {
                **config.to_params(),
                "noise_temperature": config.noise_temperature,
                "n_params": sum(p.numel() for p in model.parameters()),
                "n_train": len(data.train),
                "resolved_device": str(device),
                **({"world_size": ranks.world} if ranks.world > 1 else {}),
            }
        )
        run.log_text("config.yaml", yaml.safe_dump(config.to_params(), sort_keys=False))
        history: list[dict[str, float]] = []
        result = None
        try:
            result = train(
                config,
                data,
                model,
                loss_fn,
                logger=_Recorder(run, history),
                measurements=measurements,
                context=context,
            )
        finally:
            # Whatever happened, what was logged also lands in metrics.csv, plots, checkpoint.
            frame = history_frame(history)
            log_run_outputs(run, frame, model, result.final_artifacts if result else {})
        assert result is not None  # train() returned (an exception would have left the block)
        run.set_tags({"diverged": "true" if result.diverged_epoch is not None else "false"})
        if config.target_train_loss > 0 or config.target_train_acc > 0:  # kept, and marked
            run.set_tags({"reached_target": str(result.steps_to_target is not None).lower()})
        log_spikes(run, frame)
    return RunOutcome(run_id=run.run_id, history=frame, diverged_epoch=result.diverged_epoch)


def log_spikes(run: TrackedRun, frame: pd.DataFrame) -> None:
    """Curvature spikes as a tag (epochs and reasons) and a count metric."""
    from lossgeo.geometry.spikes import detect_spikes

    spikes = detect_spikes(frame)
    if "lambda_max" in frame:
        run.log_metrics({"curvature_spike_count": float(len(spikes))})
        if spikes:
            run.set_tags(
                {
                    "curvature_spikes": "; ".join(f"epoch {s.epoch}: {s.reason}" for s in spikes)[
                        :5000
                    ]
                }
            )


class _Recorder:
    """Forwards to the tracked run (None: the ranks other than 0 under torchrun, which
    write nothing) and keeps the rows for metrics.csv."""

    def __init__(self, run: TrackedRun | None, history: list[dict[str, float]]) -> None:
        self.run, self.history = run, history

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log_epoch(epoch, metrics)
        self.history.append({"epoch": epoch, **metrics})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        if self.run is not None:
            self.run.set_tags(tags)

    def log_object(self, path: str, obj) -> None:
        if self.run is not None:
            self.run.log_object(path, obj)


def history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(history)
    if not frame.empty:
        frame["epoch"] = frame["epoch"].astype(int)
    return frame


def log_run_outputs(
    run: TrackedRun, frame: pd.DataFrame, model: nn.Module, final_artifacts: dict
) -> None:

    run.log_text("metrics.csv", frame.to_csv(index=False))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run.log_bytes("checkpoint/model.pt", buffer.getvalue())
    if frame.empty:
        return
    label = {"run": frame}
    run.log_figures(
        {
            "plots/loss_curves.png": plots.loss_curves(label),
            "plots/accuracy_curves.png": plots.accuracy_curves(label),
        }
    )
    run.log_figures(plots.artifact_figures(frame, final_artifacts))
    slice2d = final_artifacts.get("landscape/loss_slice_2d.pt")
    if slice2d is not None:
        run.log_text("plots/landscape_3d.html", plots.landscape_html(slice2d))


def config_from_params(params: dict[str, str], **overrides) -> TrainConfig:
    """Rebuilds the TrainConfig a run was trained with from its logged params."""
    import dataclasses

    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in params:
            continue
        raw = params[f.name]
        if raw in ("''", '""'):  # how `mlflow run` logs an empty -P value
            raw = ""
        kind: Any = type(f.default)
        try:
            if kind is bool:
                values[f.name] = raw.strip().lower() in ("true", "1", "yes")
            elif kind is int:
                values[f.name] = int(float(raw))
            else:
                values[f.name] = kind(raw)
        except ValueError:  # e.g. a launcher run rejected for `-P lr=abc`
            raise UserInputError(
                f"run: its logged parameter {f.name}={raw!r} is not a valid "
                "setting; the run was never trained from it"
            ) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except UserInputError as exc:
        raise UserInputError(f"run: its logged parameters are not valid settings ({exc})") from None


def load_logged_run(run_id: str, **overrides):
    """(config, data, model with the final checkpoint, loss_fn) of a logged run; the probe
    set is the one the run measured on (same seed, same data)."""
    from lossgeo.run.tracking import get_run, has_artifact, load_artifact_object

    run = get_run(run_id)
    if not has_artifact(run_id, "checkpoint/model.pt"):  # before any data is loaded
        raise UserInputError(
            f"run_id: run {run_id} ({run.info.status}) has no checkpoint/model.pt to measure; "
            "only runs that logged a checkpoint can be re-measured"
        )
    config = config_from_params(run.data.params, **overrides)
    data, model, loss_fn, _ = prepare(config)
    state = load_artifact_object(run_id, "checkpoint/model.pt", weights_only=True)
    model.load_state_dict(state)
    return config, data, model, loss_fn


def remeasure_curvature(run_id: str, **overrides) -> dict[str, float]:
    """Measures the final checkpoint of a logged run again (e.g. with other settings) and
    logs the results into that run under `remeasured/`."""
    from lossgeo.curvature.measure import measure_curvature
    from lossgeo.run.measurements import curvature_settings
    from lossgeo.run.names import curvature_artifacts, curvature_metrics

    config, data, model, loss_fn = load_logged_run(run_id, **overrides)
    # a run trained with `curvature: false` is measured too, with its (overridden) settings
    settings = curvature_settings(replace(config, curvature=True))
    assert settings is not None
    measures = measure_curvature(model, loss_fn, (data.probe.x, data.probe.y), settings, final=True)
    metrics = curvature_metrics(measures, lr=config.lr, momentum=config.momentum)
    artifacts = curvature_artifacts(measures, settings)
    run = TrackedRun(run_id=run_id)
    run.log_metrics({f"remeasured/{k}": v for k, v in metrics.items()}, step=config.epochs)
    run.set_tags(
        {
            "remeasured_settings": yaml.safe_dump(
                {k: v for k, v in overrides.items() if v is not None}, default_flow_style=True
            ).strip()
        }
    )
    for path, obj in artifacts.items():
        run.log_object(f"remeasured/{path}", obj)
    run.log_figures(plots.artifact_figures(pd.DataFrame(), artifacts), prefix="remeasured/")
    return metrics


def remeasure_pac_bayes(
    run_id: str, *, max_increase: float | None = None, data_dir: str | None = None
) -> dict[str, float]:
    """PAC-Bayes flatness of a logged run's final checkpoint on its probe set, logged into
    that run as top-level metrics at the step of its last measurement (the checkpoint's), so
    that runs trained before the measure existed are scored with it."""
    from lossgeo.geometry.landscape_measure import pac_bayes_measures
    from lossgeo.run.tracking import metric_history

    config, data, model, loss_fn = load_logged_run(run_id, data_dir=data_dir)
    increase = config.pac_bayes_increase if max_increase is None else max_increase
    if not increase > 0:
        raise UserInputError(f"max_increase: must be > 0 (got {increase})")
    metrics = pac_bayes_measures(
        model, loss_fn, (data.probe.x, data.probe.y), increase, seed=config.seed
    )
    history = metric_history(run_id, "lambda_max") or metric_history(run_id, "train_loss")
    run = TrackedRun(run_id=run_id)
    run.log_metrics(metrics, step=max((step for step, _ in history), default=0))
    run.set_tags({"pac_bayes_increase": str(increase)})
    return metrics


def remeasure_landscape(
    run_id: str,
    *,
    resolution: int | None = None,
    half_range: float | None = None,
    directions: str | None = None,
    on_test: bool = False,
    data_dir: str | None = None,
) -> dict:
    """A 2D/1D slice of a logged run's final checkpoint with other settings, logged into
    that run under `remeasured/` (trajectory-PCA planes need the training run itself)."""
    import dataclasses

    from lossgeo.geometry.landscape_measure import LandscapeData, measure_landscape
    from lossgeo.run.measurements import landscape_settings

    if directions == "pca":
        raise UserInputError(
            "landscape_directions: pca needs the trajectory, which only the "
            "training run has (allowed here: random, eigen)"
        )
    config, data, model, loss_fn = load_logged_run(run_id, data_dir=data_dir)
    changes: dict[str, Any] = {
        k: v
        for k, v in (
            ("resolution", resolution),
            ("half_range", half_range),
            ("directions", directions),
        )
        if v is not None
    }
    settings = dataclasses.replace(
        landscape_settings(config), sharpness=False, landscape=True, **changes
    )
    split = data.test if on_test else data.probe
    _, artifacts = measure_landscape(
        model,
        loss_fn,
        LandscapeData((data.probe.x, data.probe.y), (split.x, split.y)),
        settings,
        epoch=config.epochs,
        final=True,
    )
    run = TrackedRun(run_id=run_id)
    for path, obj in artifacts.items():
        run.log_object(f"remeasured/{path}", obj)
    run.log_figures(plots.artifact_figures(pd.DataFrame(), artifacts), prefix="remeasured/")
    return dict(artifacts["landscape/loss_slice_2d.pt"])  # type: ignore[call-overload]


# settings that make two runs' weights points of one loss surface
SAME_SURFACE = ("model", "dataset", "hidden", "activation", "loss")


def check_same_surface(config_a: TrainConfig, config_b: TrainConfig) -> None:
    """One-line UserInputError unless two runs' weights live on one loss surface (the same
    model, widths, activation, data set and loss): what interpolate and connect need."""
    for field in SAME_SURFACE:
        if getattr(config_a, field) != getattr(config_b, field):
            raise UserInputError(
                f"run_b: {field} differs from run_a's "
                f"({getattr(config_b, field)!r} vs {getattr(config_a, field)!r})"
            )


def interpolate_runs(
    run_a: str, run_b: str, *, points: int = 41, experiment: str = "", data_dir: str | None = None
) -> tuple[str, dict]:
    """Loss along (1 - alpha) w_a + alpha w_b between two logged runs' final checkpoints,
    logged as a new run. Both runs must share model, data set and seed (same probe set)."""

    from lossgeo.geometry.directions import weights_vector
    from lossgeo.geometry.landscape import interpolate

    config_a, data, model_a, loss_fn = load_logged_run(run_a, data_dir=data_dir)
    config_b, _, model_b, _ = load_logged_run(run_b, data_dir=data_dir)
    check_same_surface(config_a, config_b)
    alphas = torch.linspace(-0.25, 1.25, points, dtype=torch.float64)
    result = {
        split: interpolate(
            model_a,
            loss_fn,
            (part.x, part.y),
            weights_vector(model_a),
            weights_vector(model_b),
            alphas,
        ).as_dict()
        for split, part in (("test", data.test), ("probe", data.probe))
    }
    inside = (alphas >= 0) & (alphas <= 1)
    loss = result["test"]["loss"]
    barrier = float(loss[inside].max() - 0.5 * (loss[inside][0] + loss[inside][-1]))
    with TrackedRun(
        experiment=resolve_experiment(experiment),
        run_name=f"interpolate-{run_a[:6]}-{run_b[:6]}",
        tags={"kind": "interpolation", "model": config_a.model, "dataset": config_a.dataset},
    ) as run:
        run.log_params({"run_a": run_a, "run_b": run_b, "points": points})
        run.log_metrics(
            {
                "loss_barrier": barrier,
                "loss_a": float(loss[alphas == 0][0]),
                "loss_b": float(loss[alphas == 1][0]),
            }
        )
        run.log_object("landscape/interpolation.pt", result)
        run.log_figures({"plots/interpolation.png": plots.interpolation(result)})
    return run.run_id, result
