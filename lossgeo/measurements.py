"""Builds the per-epoch measurements a training run performs from its config.

Glue between the pure measurement modules and the training loop; no MLflow here.
"""

from __future__ import annotations

from .config import TrainConfig
from .train import Measurement


def build_measurements(config: TrainConfig) -> list[Measurement]:
    measurements: list[Measurement] = []
    return measurements
