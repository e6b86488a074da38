"""`torchrun --nproc-per-node 2 -m lossgeo train`: the built-in loop data-parallel into one
MLflow run, with the metrics of the same run on one process."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import copy_store

SETTINGS = [
    "--train-subset", "200", "--val-size", "50", "--epochs", "2",
    "--batch-size", "33",  # 200 / 33: a last batch of 2, one sample a rank
    "--probe-size", "41",  # uneven shards: 21 + 20
    "--hidden", "16", "--measure-every-steps", "3", "--curvature-k", "2",
    "--trace-samples", "2", "--density-steps", "5", "--landscape-resolution", "3",
    "--sharpness-directions", "1", "--seed", "3",
]  # fmt: skip

pytestmark = pytest.mark.slow  # signals and processes: the full tier


def train(folder, data_dir, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": copy_store(folder),
        "OMP_NUM_THREADS": "1",
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    args = [*launcher, "-m", "lossgeo", "train", "--data-dir", str(data_dir), *SETTINGS]
    return subprocess.run(args, env=env, cwd=folder, capture_output=True, text=True, timeout=600)


def only_run(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"{len(runs)} runs"
    return client, runs[0]


def test_torchrun_trains_into_one_run_with_the_single_process_metrics(tmp_path, fake_data_dir):
    alone = train(tmp_path / "one", fake_data_dir, [sys.executable])
    assert alone.returncode == 0, alone.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    both = train(tmp_path / "two", fake_data_dir, torchrun)
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stdout.count("finished:") == 1  # rank 0 reports; rank 1 says nothing

    client, run = only_run(tmp_path / "two")
    _, single = only_run(tmp_path / "one")
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and "world_size" not in single.data.params
    # one value per step and epoch, not one per rank
    for metric in ("step/lambda_max", "train_loss", "lambda_max", "sharp_max"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert len(steps) == len(set(steps)) > 0, metric
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == list(range(3, 13, 3))  # 7 steps an epoch, 2 epochs
    # DDP over the slices of each batch is the same SGD: the same run up to float32
    # rounding; every measurement on the probe shards is that of the whole probe set
    for metric in (
        "train_loss", "test_acc", "lambda_max", "lambda_min", "hessian_trace",
        "step/lambda_max", "step/probe_loss", "step/batch_sharpness", "sharp_max",
        "grad_noise_scale",
        "eps_sharpness", "adaptive_sharpness", "pac_bayes_flatness",
    ):  # fmt: skip
        want, got = single.data.metrics[metric], run.data.metrics[metric]
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), metric
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "checkpoint", "plots", "spectrum"} <= paths
