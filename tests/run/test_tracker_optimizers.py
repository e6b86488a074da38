"""The Tracker's stability edge follows the optimizer that steps: AdamW's preconditioned
sharpness against 38/lr, Nesterov's threshold, and a note (not a number) for the unknown."""

import pytest
import torch
import torch.nn.functional as F

from lossgeo import StepSettings, Tracker
from lossgeo.curvature import CurvatureSettings
from lossgeo.curvature.lanczos import lanczos
from lossgeo.curvature.operators import HessianOperator
from lossgeo.curvature.params import ParameterSpace
from lossgeo.curvature.stability import preconditioned_operator, preconditioner

from .test_tracker import NullLogger, small_problem


def run(optimizer_of, steps=4, every=2, epoch=False):
    model, x, y = small_problem()
    model.eval()  # no dropout noise: the checks below recompute on the same model
    optimizer = optimizer_of(model)
    logger = NullLogger()
    tracker = Tracker(
        model,
        F.cross_entropy,
        (x[:64], y[:64]),
        optimizer=optimizer,
        steps=StepSettings(every=every, batch_size=16),
        curvature=CurvatureSettings(k=1, trace_samples=2, density_steps=4) if epoch else None,
        logger=logger,
    )
    first = tracker.measure_step()  # before the first step: no Adam state yet
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:16]), y[:16]).backward()
        optimizer.step()
        tracker.step(step)
    return model, x, y, optimizer, logger, tracker, first


def test_adamw_logs_preconditioned_sharpness_threshold_and_edge_ratio_at_its_steps():
    model, x, y, adamw, logger, tracker, first = run(
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.999))
    )
    assert "step/preconditioned_lambda_max" not in first and "step/edge_ratio" not in first
    assert first["step/stability_threshold"] == pytest.approx(38 / 1e-3)
    assert "not stepped" in logger.tags["stability_edge_note"]
    assert [step for step, _ in logger.metrics] == [2, 4]
    last = logger.metrics[-1][1]
    # the same value from the optimizer's state now (nothing stepped since step 4)
    space = ParameterSpace(model)
    p, _ = preconditioner(adamw, model, space)
    op = HessianOperator(model, F.cross_entropy, (x[:64], y[:64]))
    expected = float(lanczos(preconditioned_operator(op, p), k=1, tol=1e-4).values[0])
    assert last["step/preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-3)
    assert last["step/edge_ratio"] == pytest.approx(
        last["step/preconditioned_lambda_max"] / (38 / 1e-3)
    )
    # Adam's scale: the preconditioned value is far above raw lambda_max (P ~ sqrt(v) << 1)
    assert last["step/preconditioned_lambda_max"] > 10 * last["step/lambda_max"]
    # batch sharpness in its preconditioned form, against the same threshold
    assert last["step/batch_edge_ratio"] == pytest.approx(
        last["step/batch_sharpness"] / (38 / 1e-3)
    )
    assert last["step/batch_sharpness"] > 10 * last["step/lambda_max"]
    # warm-started: the second solve starts from the first one's vector
    first_solve, second_solve = (
        m[1]["step/preconditioned_lambda_max_n_hvp"] for m in logger.metrics
    )
    assert tracker.warm_preconditioned.state.n_solves == 2
    assert second_solve <= first_solve


def test_nesterov_uses_its_own_threshold_and_an_unknown_optimizer_gets_a_note():
    *_, logger, tracker, _ = run(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True), epoch=True
    )
    last = logger.metrics[-1][1]
    threshold = (2 + 1.8) / (2.8 * 0.1)
    assert last["step/stability_threshold"] == pytest.approx(threshold)
    assert last["step/edge_ratio"] == pytest.approx(last["step/lambda_max"] / threshold)
    epoch = tracker.epoch(1)
    assert epoch["edge_ratio"] == pytest.approx(epoch["lambda_max"] / threshold)
    *_, logger, tracker, _ = run(lambda m: torch.optim.Adagrad(m.parameters(), lr=0.01))
    assert not any("edge_ratio" in key for _, m in logger.metrics for key in m)
    assert "Adagrad" in logger.tags["stability_edge_note"]


def test_each_measured_step_gets_a_regime_and_the_run_its_last_one():
    *_, logger, tracker, _ = run(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), steps=6, every=1
    )
    regimes = [m["step/regime"] for _, m in logger.metrics]
    assert len(regimes) == 6 and set(regimes) <= {0.0, 1.0, 2.0, 3.0}
    ratios = [m["step/batch_edge_ratio"] for _, m in logger.metrics]
    assert all(r < 0.9 for r in ratios) and regimes == [0.0] * 6  # far below the edge
    assert logger.tags["edge_regime"] == "below"
    assert logger.metrics[-1][1]["step/at_edge_share"] == 0.0


def test_the_builtin_loop_trains_with_adamw_and_logs_its_edge(tracking, fake_data_dir):
    from mlflow.tracking import MlflowClient

    from lossgeo.run.experiment import run_training

    from ..conftest import tiny_config

    config = tiny_config(
        fake_data_dir,
        epochs=1,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        measure_every_steps=2,
        curvature=True,
        curvature_k=1,
        trace_samples=2,
        density_steps=4,
        sharpness=False,
        landscape=False,
    )
    run_id = run_training(config).run_id
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["optimizer"] == "adamw"
    history = {
        key: [m.step for m in client.get_metric_history(run_id, key)]
        for key in ("preconditioned_lambda_max", "stability_threshold", "edge_ratio")
    }
    # epoch 0 is before the first step: threshold yes, preconditioned value no (noted)
    assert history["stability_threshold"] == [0, 1]
    assert history["preconditioned_lambda_max"] == history["edge_ratio"] == [1]
    assert "not stepped" in run.data.tags["stability_edge_note"]
    steps = client.get_metric_history(run_id, "step/preconditioned_lambda_max")
    assert steps and all(m.step % 2 == 0 for m in steps)
    metrics = run.data.metrics
    assert metrics["edge_ratio"] == pytest.approx(
        metrics["preconditioned_lambda_max"] * 1e-3 / 38, rel=1e-9
    )


def test_momentum_with_an_adaptive_optimizer_is_refused():
    from lossgeo.config import TrainConfig
    from lossgeo.errors import UserInputError

    with pytest.raises(UserInputError, match="momentum: only for optimizer sgd"):
        TrainConfig(optimizer="adam", momentum=0.9)
    with pytest.raises(UserInputError, match="optimizer: must be one of sgd, adam, adamw"):
        TrainConfig(optimizer="lion")


def test_spikes_under_adam_are_read_on_the_preconditioned_sharpness(monkeypatch):
    model, x, y, adamw, logger, tracker, _ = run(
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), steps=2, every=1
    )
    # a jump of the preconditioned value alone (raw lambda_max unchanged) is a spike
    original = tracker._edge_metrics

    def tripled(*args, **kwargs):
        out = original(*args, **kwargs)
        out["step/preconditioned_lambda_max"] *= 3
        return out

    monkeypatch.setattr(tracker, "_edge_metrics", tripled)
    metrics = tracker.step(3)
    assert metrics["step/spike"] == 1.0
    assert "lambda_max" in logger.tags["lossgeo_last_spike"]
