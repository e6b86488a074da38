"""Curvature inside training runs: metric names, artifacts, and agreement with a direct
measurement of the logged checkpoint."""

import math

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.curvature import hessian_eigen
from lossgeo.curvature.measure import edge_ratio
from lossgeo.run.experiment import load_logged_run, run_training
from lossgeo.run.tracking import load_artifact_object

from ..conftest import tiny_config

PER_EPOCH = [
    "lambda_max",
    "lambda_min",
    "hessian_trace",
    "hessian_trace_se",
    "lambda_max_ggn",
    "lambda_max_fisher",
    "effective_dim",
    "edge_ratio",
    "curvature_seconds",
    "lambda_max/fc1",
    "lambda_max/fc2",
]


def test_edge_ratio_is_momentum_adjusted():
    assert edge_ratio(50.0, 0.04) == pytest.approx(1.0)
    assert edge_ratio(50.0, 0.04, momentum=0.9) == pytest.approx(1.0 / 1.9)


def test_curvature_is_logged_every_measured_epoch_and_matches_the_checkpoint(
    tracking, fake_data_dir
):
    config = tiny_config(
        fake_data_dir,
        epochs=2,
        curvature=True,
        curvature_k=3,
        curvature_tol=1e-6,
        density_steps=20,
        momentum=0.5,
    )
    outcome = run_training(config)
    client = MlflowClient()
    for metric in PER_EPOCH:
        assert [m.step for m in client.get_metric_history(outcome.run_id, metric)] == [0, 1, 2]
    final = outcome.history.iloc[-1]
    assert final["lambda_max"] >= final["lambda_2"] >= final["lambda_3"]
    assert final["lambda_min"] <= final["lambda_3"]
    assert final["edge_ratio"] == pytest.approx(final["lambda_max"] * 0.05 / (2 * 1.5))
    assert 0 < final["effective_dim"] <= 3
    spectrum = {a.path for a in client.list_artifacts(outcome.run_id, "spectrum")}
    assert spectrum == {"spectrum/eigen.pt", "spectrum/density.pt", "spectrum/esd.png"}
    eigen = load_artifact_object(outcome.run_id, "spectrum/eigen.pt")
    assert eigen["vectors"].shape == (3, 16 * 784 + 16 + 16 * 10 + 10)
    density = load_artifact_object(outcome.run_id, "spectrum/density.pt")
    assert torch.allclose(density["weights"].sum(dim=1), torch.ones(1, dtype=torch.float64))
    # the logged lambda_max is the checkpoint's, on the same probe set
    _, data, model, loss_fn = load_logged_run(outcome.run_id)
    direct = hessian_eigen(model, loss_fn, (data.probe.x, data.probe.y), tol=1e-6)
    assert float(direct.values[0]) == pytest.approx(final["lambda_max"], rel=1e-4)
    # the residual as a chart can show it: log10 of ||Hv - lambda v|| / |lambda|
    relative = float(eigen["residuals"][0]) / final["lambda_max"]
    assert final["lambda_max_residual_log10"] == pytest.approx(math.log10(relative))
    assert final["lambda_max_residual_log10"] < -2  # converged to tol 1e-6


def test_curvature_switch_off_logs_no_curvature(tracking, fake_data_dir):
    outcome = run_training(tiny_config(fake_data_dir, epochs=1, curvature=False))
    assert "lambda_max" not in MlflowClient().get_run(outcome.run_id).data.metrics


def test_remeasure_command_logs_into_the_run(tracking, fake_data_dir):
    outcome = run_training(tiny_config(fake_data_dir, epochs=1, curvature=True, density_steps=10))
    result = CliRunner().invoke(
        cli, ["curvature", "--run-id", outcome.run_id, "--curvature-k", "2", "--probe-size", "32"]
    )
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(outcome.run_id)
    assert "remeasured/lambda_max" in run.data.metrics
    assert "remeasured/lambda_2" in run.data.metrics
    assert "remeasured/lambda_3" not in run.data.metrics
    bad = CliRunner().invoke(cli, ["curvature", "--run-id", "nope"])
    assert bad.exit_code == 2 and "run_id: no run 'nope'" in bad.stderr
