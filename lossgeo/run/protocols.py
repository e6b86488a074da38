"""The two interfaces a training run plugs into: where metrics go (a logger) and what is
measured at an epoch (a measurement), with the state a measurement sees.

A user who sends lossgeo's metrics somewhere other than MLflow implements `MetricLogger`
(two methods; add `log_object(path, obj)` to receive artifacts too) and passes it to the
`Tracker`. lossgeo's own loop needs a `RunLogger`, the same protocol with per-epoch rows and
artifacts; `lossgeo.run.tracking.TrackedRun` (an MLflow run) and `ActiveRunLogger` (the
caller's active MLflow run) are the two implementations lossgeo ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lossgeo.data import DataBundle
from lossgeo.losses import LossFn
from lossgeo.run.parallel import SINGLE, Ranks


class MetricLogger(Protocol):
    """Receives metrics (at a step: an optimizer step, or an epoch) and run tags."""

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Record `metrics` at `step` (an optimizer step or an epoch)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (spikes, the attention backend)."""


class RunLogger(MetricLogger, Protocol):
    """A `MetricLogger` that also takes one epoch's row and torch-saveable artifacts."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Record one epoch's row (evaluation and measurements) at step=epoch."""

    def log_object(self, path: str, obj: Any) -> None:
        """Store a torch-saveable object as the artifact `path` (e.g. spectrum/eigen.pt)."""


@dataclass
class EpochState:
    """What a measurement sees: the model at the end of `epoch` (0 = initialisation)."""

    epoch: int
    is_last: bool
    model: nn.Module
    loss_fn: LossFn
    data: DataBundle
    # Flattened CPU copies of the weights after every epoch so far (for trajectory PCA).
    trajectory: list[torch.Tensor]
    # This epoch's evaluation metrics (read-only: measurements return theirs, the loop
    # records them).
    metrics: dict[str, float]
    # Results one measurement leaves for a later one this epoch (e.g. Hessian eigenvectors).
    cache: dict[str, Any] = field(default_factory=dict)
    # Under torchrun: this process's rank; a measurement takes its shard of the data
    # (`ranks.shard`) and measures collectively over `ranks.group`.
    ranks: Ranks = SINGLE


@dataclass
class MeasurementResult:
    """What one epoch measurement returns: metrics named as logged, and artifacts."""

    metrics: dict[str, float] = field(default_factory=dict)
    # artifact path inside the run (e.g. "spectrum/eigen.pt") -> torch-saveable object
    artifacts: dict[str, Any] = field(default_factory=dict)


class Measurement(Protocol):
    """One epoch measurement (noise scale, landscape, ...): a name (for the timing split) and
    a call on the epoch's state."""

    name: str

    def __call__(self, state: EpochState) -> MeasurementResult:
        """Measure the model in `state`."""
