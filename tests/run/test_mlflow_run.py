"""The README's main command, as a user runs it: `mlflow run . --env-manager local`."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import REPO, copy_store


def mlflow_run(tmp_path, *params, entry="main", experiment="e2e"):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO),
        "--env-manager",
        "local",
        "-e",
        entry,
    ] + (["--experiment-name", experiment] if experiment else [])
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.fixture
def e2e_experiment(tmp_path, monkeypatch):
    uri = copy_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))
    return client


def test_mlflow_run_main_entry_point(tmp_path, e2e_experiment, fake_data_dir):
    result = mlflow_run(
        tmp_path,
        "epochs=1",
        "train_subset=200",
        "val_size=100",
        "probe_size=32",
        "batch_size=32",
        "hidden=16",
        "curvature_k=2",
        "landscape_resolution=3",
        "sharpness_directions=1",
        "trace_samples=2",
        "density_steps=5",
        f"data_dir={fake_data_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = e2e_experiment.search_runs([e2e_experiment.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["epochs"] == "1" and run.data.tags["model"] == "mlp"
    for metric in ("train_loss", "test_acc", "lambda_max", "sharp_max", "grad_noise_scale"):
        history = e2e_experiment.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [0, 1]
    paths = {a.path for a in e2e_experiment.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "config.yaml", "checkpoint", "plots", "spectrum", "landscape"} <= paths


def test_mlflow_run_bad_input_says_why(tmp_path, e2e_experiment):
    result = mlflow_run(tmp_path, "lr=0")
    assert result.returncode != 0
    assert "lossgeo: error: lr: must be > 0 (got 0.0)" in result.stderr
    runs = e2e_experiment.search_runs([e2e_experiment.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["rejected_input"].startswith("lr: must be > 0")
    assert not runs[0].data.metrics


@pytest.mark.parametrize(
    "param,message",
    [
        ("lr=abc", "Invalid value for '--lr': 'abc' is not a valid float"),
        ("batch_size=2.5", "batch_size: must be an integer (got 2.5)"),
    ],
)
def test_mlflow_run_click_parse_errors_are_tagged_too(tmp_path, e2e_experiment, param, message):
    result = mlflow_run(tmp_path, param)
    assert result.returncode != 0 and f"lossgeo: error: {message}" in result.stderr
    runs = e2e_experiment.search_runs([e2e_experiment.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["rejected_input"].startswith(message)


@pytest.mark.slow
def test_mlflow_run_sweep_is_one_tree_and_finishes(tmp_path, fake_data_dir):
    """No experiment named: the launcher's run (Default), the study's parent, its trials and
    the CLI's runs all land in one experiment; the launcher's run is a worker under the
    parent, never an empty top-level run; the parent ends FINISHED."""
    from ..studies.test_study import write_study

    study = write_study(tmp_path, fake_data_dir, n_trials=2)
    copy_store(tmp_path)
    result = mlflow_run(
        tmp_path,
        f"study={study}",
        "set=epochs=1 landscape=false",
        f"storage=sqlite:///{tmp_path}/optuna.db",
        entry="sweep",
        experiment=None,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    runs = client.search_runs(["0"])
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("lossgeo_role"), []).append(r)
    assert sorted(by_role) == ["parent", "trial", "worker"]
    (parent,) = by_role["parent"]
    (worker,) = by_role["worker"]
    assert parent.info.status == "FINISHED" and worker.info.status == "FINISHED"
    assert worker.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert worker.data.metrics["worker_trials"] == 2
    assert [r.data.tags["mlflow.parentRunId"] for r in by_role["trial"]] == [parent.info.run_id] * 2
    assert {r.data.params["epochs"] for r in by_role["trial"]} == {"1"}
    top_level = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert top_level == [parent] or [r.info.run_id for r in top_level] == [parent.info.run_id]
