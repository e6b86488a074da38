"""Builds the per-epoch measurements a training run performs from its config.

Glue between the pure measurement modules and the training loop; no MLflow here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .curvature.measure import CurvatureSettings, measure_curvature
from .train import EpochState, Measurement, MeasurementResult


@dataclass
class CurvatureMeasurement:
    settings: CurvatureSettings
    lr: float
    momentum: float
    name: str = "curvature"

    def __call__(self, state: EpochState) -> MeasurementResult:
        probe = (state.data.probe.x, state.data.probe.y)
        metrics, artifacts = measure_curvature(state.model, state.loss_fn, probe,
                                               self.settings, lr=self.lr,
                                               momentum=self.momentum, final=state.is_last)
        return MeasurementResult(metrics=metrics, artifacts=artifacts)


def curvature_settings(config: TrainConfig) -> CurvatureSettings:
    return CurvatureSettings(k=config.curvature_k, tol=config.curvature_tol,
                             max_iter=config.curvature_max_iter,
                             trace_samples=config.trace_samples,
                             density_steps=config.density_steps,
                             alpha=config.effective_dim_alpha, seed=config.seed)


def build_measurements(config: TrainConfig) -> list[Measurement]:
    measurements: list[Measurement] = []
    if config.curvature:
        measurements.append(CurvatureMeasurement(curvature_settings(config), config.lr,
                                                 config.momentum))
    return measurements
