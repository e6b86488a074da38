"""A measurement that cannot fit even one sample at a time is skipped and tagged; training
goes on. Each measurement reports its peak memory."""

import torch.nn.functional as F

from lossgeo import SGDStep, StepSettings, Tracker
from lossgeo.curvature import CurvatureSettings

from .test_tracker import NullLogger, small_problem


def tracker_and_logger():
    model, x, y = small_problem()
    logger = NullLogger()
    tracker = Tracker(
        model,
        F.cross_entropy,
        (x[:32], y[:32]),
        optimizer=SGDStep(0.1),
        steps=StepSettings(every=1, batch_size=16),
        curvature=CurvatureSettings(k=1, trace_samples=2, density_steps=4),
        logger=logger,
    )
    return tracker, logger


def test_each_measurement_reports_its_peak_memory():
    tracker, logger = tracker_and_logger()
    epoch = tracker.epoch(0)
    step = tracker.step(1)
    assert epoch["curvature_peak_mb"] > 10 and step["step/peak_mb"] > 10  # a live process


def test_an_unfittable_measurement_is_skipped_and_tagged(monkeypatch):
    tracker, logger = tracker_and_logger()

    def too_large(*args, **kwargs):
        raise MemoryError("one probe sample does not fit in memory")

    monkeypatch.setattr(tracker, "measure_curvature", too_large)
    monkeypatch.setattr(tracker, "measure_step", too_large)
    metrics = tracker.epoch(1)
    assert "lambda_max" not in metrics and "curvature_peak_mb" not in metrics
    assert "does not fit" in logger.tags["curvature_skipped"]
    assert tracker.step(1) is None
    assert "does not fit" in logger.tags["step_curvature_skipped"]
