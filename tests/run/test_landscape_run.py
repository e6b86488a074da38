"""Sharpness and landscapes inside training runs, and the commands on logged runs."""

import importlib.util
import re

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.run.experiment import load_logged_run, run_training
from lossgeo.run.tracking import load_artifact_object

from ..conftest import tiny_config

SHARPNESS = ["sharp_mean", "sharp_max", "eps_sharpness", "adaptive_sharpness", "landscape_seconds"]


def landscape_config(data_dir, **overrides):
    base = dict(
        epochs=3,
        curvature=False,
        sharpness=True,
        landscape=True,
        landscape_resolution=5,
        sharpness_directions=2,
    )
    base.update(overrides)
    return tiny_config(data_dir, **base)


def test_run_logs_sharpness_every_epoch_and_final_landscape(tracking, fake_data_dir):
    outcome = run_training(landscape_config(fake_data_dir, landscape_directions="pca"))
    client = MlflowClient()
    for metric in SHARPNESS:
        assert [m.step for m in client.get_metric_history(outcome.run_id, metric)] == [0, 1, 2, 3]
    final = outcome.history.iloc[-1]
    assert final["sharp_max"] >= final["sharp_mean"]
    landscape = {a.path for a in client.list_artifacts(outcome.run_id, "landscape")}
    assert landscape == {
        "landscape/loss_slice_2d.pt",
        "landscape/loss_slice_1d.pt",
        "landscape/trajectory.pt",
    }
    plots = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert {"plots/landscape_2d.png", "plots/landscape_3d.png", "plots/landscape_1d.png"} <= plots
    # the interactive surface exists exactly when plotly is installed (the test extra has it)
    assert ("plots/landscape_3d.html" in plots) == (importlib.util.find_spec("plotly") is not None)
    slice2d = load_artifact_object(outcome.run_id, "landscape/loss_slice_2d.pt")
    trajectory = load_artifact_object(outcome.run_id, "landscape/trajectory.pt")
    assert slice2d["plane"] == "pca" and slice2d["loss"].shape == (5, 5)
    assert trajectory["coordinates"].shape == (4, 2)
    # the centre of the slice is the final checkpoint's probe loss
    _, data, model, loss_fn = load_logged_run(outcome.run_id)
    model.eval()
    with torch.no_grad():
        probe_loss = float(loss_fn(model(data.probe.x), data.probe.y))
    assert float(slice2d["loss"][2, 2]) == pytest.approx(probe_loss, rel=1e-6)
    # the path ends at the origin of the PCA plane
    assert torch.allclose(trajectory["coordinates"][-1], torch.zeros(2, dtype=torch.float64))


def test_landscape_and_interpolate_commands(tracking, fake_data_dir):
    a = run_training(landscape_config(fake_data_dir, epochs=1, landscape=False, sharpness=False))
    b = run_training(
        landscape_config(fake_data_dir, epochs=1, landscape=False, sharpness=False, seed=1)
    )
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "landscape",
            "--run-id",
            a.run_id,
            "--landscape-directions",
            "eigen",
            "--landscape-resolution",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    remeasured = load_artifact_object(a.run_id, "remeasured/landscape/loss_slice_2d.pt")
    assert remeasured["plane"] == "eigen" and remeasured["loss"].shape == (3, 3)
    result = runner.invoke(
        cli, ["interpolate", "--run-a", a.run_id, "--run-b", b.run_id, "--points", "7"]
    )
    assert result.exit_code == 0, result.output
    new_run = re.search(r"run (\w+): interpolation logged", result.output).group(1)
    curve = load_artifact_object(new_run, "landscape/interpolation.pt")["test"]
    assert float(curve["loss"][1]) == pytest.approx(a.history.iloc[-1]["test_loss"], rel=1e-5)
    assert float(curve["loss"][5]) == pytest.approx(b.history.iloc[-1]["test_loss"], rel=1e-5)
    assert "loss_barrier" in MlflowClient().get_run(new_run).data.metrics
    bad = runner.invoke(cli, ["landscape", "--run-id", a.run_id, "--landscape-directions", "pca"])
    assert bad.exit_code == 2
