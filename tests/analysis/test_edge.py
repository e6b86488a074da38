"""Reading the stability edge off logged series: planted series whose verdict is known, and
`lossgeo edge` on the runs of a real (tiny) Adam grid."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.analysis.edge import edge_series, edge_summary, edge_table
from lossgeo.analysis.plots import edge_curves
from lossgeo.cli import cli
from lossgeo.studies.study import run_grid
from lossgeo.studies.studyfile import load_study_file


def long_history(run_id: str, series: dict[str, list[float]], steps: list[int]) -> pd.DataFrame:
    rows = [
        (run_id, run_id, step, metric, value)
        for metric, values in series.items()
        for step, value in zip(steps, values)
    ]
    return pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])


def adam_at_the_edge() -> pd.DataFrame:
    # full-batch Adam at lr 0.002: preconditioned sharpness rises to 38/lr = 19,000 and
    # hovers; raw lambda_max stays near 30, 0.03 of 2/lr
    ratios = [0.3, 0.6, 0.9, 1.05, 0.97, 1.0, 1.02, 0.99, 1.01, 0.98]
    return long_history(
        "adam",
        {
            "edge_ratio": ratios,
            "preconditioned_lambda_max": [19000 * r for r in ratios],
            "stability_threshold": [19000.0] * 10,
            "lambda_max": [30.0] * 10,
            "train_loss": [0.5 / (i + 1) for i in range(10)],
        },
        list(range(0, 250, 25)),
    )


def sgd_converging_first() -> pd.DataFrame:
    # the tanh MLP's mini-batch run: batch sharpness creeps up while the probe loss falls
    # to 4% of its start; lambda_max sits at 0.7 of 2/lr
    ratios = [0.30, 0.33, 0.36, 0.40, 0.42, 0.44, 0.45, 0.46]
    losses = [0.5, 0.3, 0.1, 0.05, 0.03, 0.024, 0.022, 0.02]
    return long_history(
        "sgd",
        {
            "step/batch_edge_ratio": ratios,
            "step/batch_sharpness": [50 * r for r in ratios],
            "step/edge_ratio": [0.7] * 8,
            "step/lambda_max": [35.0] * 8,
            "step/probe_loss": losses,
            "train_loss": [0.4],  # the epoch set's series is not read when a step set ran
        },
        list(range(25, 225, 25)),
    )


def test_adam_hovering_at_its_threshold_is_at_the_edge_and_raw_lambda_max_is_not():
    series = edge_series(adam_at_the_edge())
    assert series.governing == "preconditioned_lambda_max"
    summary = edge_summary(series, lr=0.002)
    assert summary["verdict"] == "at the edge"
    assert summary["share_second_half_within_band"] == 1.0
    assert summary["ratio_second_half_mean"] == pytest.approx(
        np.mean([1.0, 1.02, 0.99, 1.01, 0.98])
    )
    assert summary["lambda_max_over_2_lr_second_half_mean"] == pytest.approx(30 * 0.002 / 2)
    assert summary["final_regime"] == "at_edge" and summary["last_step"] == 225
    # the 3rd to 10th are in the band and the detector needs five in a row: 7th to 10th
    assert summary["at_edge_share"] == pytest.approx(0.4)


def test_mini_batch_sgd_is_read_on_batch_sharpness_and_converges_first():
    series = edge_series(sgd_converging_first())
    assert series.governing == "step/batch_sharpness" and len(series.ratio) == 8
    summary = edge_summary(series, lr=0.04)
    assert summary["verdict"] == "converged first"
    assert summary["final_regime"] == "converged_below"
    assert summary["lambda_max_over_2_lr_second_half_mean"] == pytest.approx(0.7)
    assert summary["final_loss"] == 0.02


def test_above_below_and_runs_without_an_edge():
    above = long_history("up", {"edge_ratio": [1.5] * 6, "lambda_max": [3.0] * 6}, list(range(6)))
    assert edge_summary(edge_series(above), lr=1.0)["verdict"] == "above"
    low = long_history("low", {"edge_ratio": [0.5] * 6, "train_loss": [1.0] * 6}, list(range(6)))
    assert edge_summary(edge_series(low), lr=None)["verdict"] == "below"
    assert math.isnan(
        edge_summary(edge_series(low), lr=None)["lambda_max_over_2_lr_second_half_mean"]
    )
    none = long_history("none", {"lambda_max": [1.0, 2.0]}, [0, 1])
    assert edge_series(none) is None
    # a run that diverged at its first epoch: one measurement, far above the edge
    blown = long_history("blown", {"edge_ratio": [3.8], "diverged_epoch": [1.0]}, [0])
    history = pd.concat([adam_at_the_edge(), sgd_converging_first(), none, blown])
    table = edge_table(history, {"adam": 0.002, "sgd": 0.04, "blown": 0.2})
    assert list(table["run_id"]) == ["adam", "sgd", "blown"]
    assert list(table["verdict"]) == ["at the edge", "converged first", "diverged"]


def test_the_figure_draws_each_run_against_one_threshold():
    history = pd.concat([adam_at_the_edge(), sgd_converging_first()])
    axes = edge_curves(history, {"adam": 0.002, "sgd": 0.04}).axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == [
        "adam: preconditioned_lambda_max",
        "adam: lambda_max / (2/lr)",
        "sgd: batch_sharpness",
        "sgd: lambda_max / (2/lr)",
        "the optimizer's threshold",
    ]
    assert list(axes.get_lines()[1].get_ydata()) == pytest.approx([0.03] * 10)


def test_edge_command_on_a_tiny_adam_grid(tmp_path, tracking, fake_data_dir):
    body = {
        "name": "tiny-adam",
        "kind": "grid",
        "models": ["mlp"],
        "base": {
            "model": "mlp",
            "hidden": "8",
            "train_subset": 64,
            "batch_size": 64,
            "val_size": 32,
            "probe_size": 64,
            "epochs": 6,
            "optimizer": "adam",
            "loss": "mse",
            "curvature_k": 1,
            "trace_samples": 2,
            "density_steps": 5,
            "noise_scale": False,
            "sharpness": False,
            "landscape": False,
            "data_dir": str(fake_data_dir),
        },
        "regimes": {"lr-1e-2": {"lr": 0.01}},
    }
    path = tmp_path / "adam.yaml"
    path.write_text(yaml.safe_dump(body))
    parent = run_grid(load_study_file(path))
    result = CliRunner().invoke(cli, ["edge", "--parent-run", parent, "--out", "e"])
    assert result.exit_code == 0, result.output
    assert "preconditioned_lambda_max" in result.output
    table = pd.read_csv(tracking / "e" / "edge.csv")
    # epoch 0 has no Adam state yet, so 6 of the 7 measured epochs carry an edge ratio
    assert len(table) == 1 and table.loc[0, "measurements"] == 6
    client = MlflowClient()
    assert "plots/edge.png" in {a.path for a in client.list_artifacts(parent, "plots")}
    assert "edge.csv" in {a.path for a in client.list_artifacts(parent)}


def test_edge_command_refuses_a_study_without_edge_ratios(tmp_path, tracking):
    client = MlflowClient()
    experiment = client.create_experiment("no-edge")
    parent = client.create_run(experiment, run_name="grid").info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_param(child, "lr", 0.1)
    client.log_metric(child, "lambda_max", 3.0)
    client.log_metric(child, "train_loss", 0.1)
    client.set_terminated(child, "FINISHED")
    result = CliRunner().invoke(cli, ["edge", "--parent-run", parent, "--out", "e"])
    assert result.exit_code == 2 and "edge ratio" in result.output, result.output
    assert not (tracking / "e").exists()
