"""Builds the per-epoch measurements a training run performs from its config.

Glue between the pure measurement modules and the training loop; no MLflow here. The
curvature is not among them: the `Tracker` measures it, in lossgeo's loop and in any other,
with the settings `curvature_settings(config)` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from lossgeo.config import TrainConfig
from lossgeo.curvature.measure import CurvatureSettings
from lossgeo.geometry.landscape_measure import LandscapeData, LandscapeSettings, measure_landscape
from lossgeo.geometry.noise import gradient_noise_scale
from lossgeo.run.protocols import EpochState, Measurement, MeasurementResult
from lossgeo.run.tracker import StepSettings


@dataclass
class LandscapeMeasurement:
    settings: LandscapeSettings
    on_test: bool = False
    name: str = "landscape"

    def __call__(self, state: EpochState) -> MeasurementResult:
        shard = state.ranks.shard  # the whole set on one process
        probe = (shard(state.data.probe.x), shard(state.data.probe.y))
        split = state.data.test if self.on_test else state.data.probe
        metrics, artifacts = measure_landscape(
            state.model,
            state.loss_fn,
            LandscapeData(probe, (shard(split.x), shard(split.y)), state.trajectory),
            self.settings,
            epoch=state.epoch,
            final=state.is_last,
            cache=state.cache,
            process_group=state.ranks.group,
        )
        return MeasurementResult(metrics=metrics, artifacts=artifacts)


@dataclass
class NoiseScaleMeasurement:
    name: str = "noise_scale"

    def __call__(self, state: EpochState) -> MeasurementResult:
        shard = state.ranks.shard
        result = gradient_noise_scale(
            state.model,
            state.loss_fn,
            (shard(state.data.probe.x), shard(state.data.probe.y)),
            process_group=state.ranks.group,
        )
        return MeasurementResult(
            metrics={"grad_noise_scale": result.b_simple, "grad_norm_sq": result.gradient_norm_sq}
        )


def landscape_settings(config: TrainConfig) -> LandscapeSettings:
    return LandscapeSettings(
        sharpness=config.sharpness,
        sharpness_directions=config.sharpness_directions,
        sharpness_radius=config.sharpness_radius,
        sharpness_eps=config.sharpness_eps,
        adaptive_radius=config.adaptive_radius,
        pac_bayes=config.pac_bayes and config.sharpness,  # one of the sharpness family
        pac_bayes_increase=config.pac_bayes_increase,
        landscape=config.landscape,
        resolution=config.landscape_resolution,
        half_range=config.landscape_range,
        directions=config.landscape_directions,
        every_epoch=config.landscape_every_epoch,
        seed=config.seed,
    )


def curvature_settings(config: TrainConfig) -> CurvatureSettings | None:
    """The per-epoch curvature settings of a run (None: `curvature: false`)."""
    if not config.curvature:
        return None
    return CurvatureSettings(
        k=config.curvature_k,
        tol=config.curvature_tol,
        max_iter=config.curvature_max_iter,
        trace_samples=config.trace_samples,
        density_steps=config.density_steps,
        alpha=config.effective_dim_alpha,
        seed=config.seed,
    )


def step_settings(config: TrainConfig) -> StepSettings:
    """The per-step settings of a run (`measure_every_steps` 0: no per-step set)."""
    return StepSettings(
        every=config.measure_every_steps,
        batch_size=config.batch_size,
        batch_sharpness_rse=config.batch_sharpness_rse,
        batch_sharpness_max=config.batch_sharpness_max,
        seed=config.seed,
    )


def build_measurements(config: TrainConfig) -> list[Measurement]:
    """The epoch measurements besides the curvature (which the Tracker takes first)."""
    measurements: list[Measurement] = []
    if config.noise_scale:
        measurements.append(NoiseScaleMeasurement())
    if config.sharpness or config.landscape:
        measurements.append(
            LandscapeMeasurement(landscape_settings(config), on_test=config.landscape_on_test)
        )
    return measurements
