"""The examples run as a user runs them and leave one MLflow run with per-step metrics."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, cwd):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def only_run(tracking):
    client = MlflowClient(f"sqlite:///{tracking}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_own_loop_example(tracking):
    out = run_example("own_loop.py", "--steps", "64", "--every", "16", cwd=tracking)
    client, run = only_run(tracking)
    assert run.info.run_id in out and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == [16, 32, 48, 64]
    assert "lambda_max" in run.data.metrics and "step/edge_ratio" in run.data.metrics


@pytest.mark.slow
def test_lightning_callback_example(tracking):
    pytest.importorskip(
        "lightning", reason="lightning not installed (pip install -e '.[lightning]')"
    )
    out = run_example("lightning_callback.py", "--epochs", "2", "--every", "16", cwd=tracking)
    client, run = only_run(tracking)
    assert run.info.run_id in out and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == [16, 32, 48, 64]  # 32 steps an epoch
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "lambda_max")]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_lightning_callback_example_under_ddp_on_two_processes(tracking):
    """Lightning's DDP strategy on 2 CPU processes: one MLflow run, the per-step and epoch
    metrics logged once (by rank 0), measured on the two probe shards together."""
    pytest.importorskip(
        "lightning", reason="lightning not installed (pip install -e '.[lightning]')"
    )
    out = run_example(
        "lightning_callback.py", "--epochs", "2", "--every", "8", "--devices", "2", cwd=tracking
    )
    client, run = only_run(tracking)
    assert run.info.run_id in out and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == [8, 16, 24, 32]  # 16 steps an epoch: each rank takes half the data
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "lambda_max")]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_huggingface_trainer_example(tracking):
    pytest.importorskip(
        "transformers", reason="transformers not installed (pip install -e '.[transformers]')"
    )
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    out = run_example(
        "huggingface_trainer.py",
        "--steps",
        "20",
        "--every",
        "10",
        "--output-dir",
        str(tracking / "out"),
        cwd=tracking,
    )
    client, run = only_run(tracking)
    assert run.info.run_id in out and "Hessian-vector products" in out
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == [10, 20]
    # AdamW inside Accelerate's wrapper: its edge is 38/lr at the example's constant 1e-3
    threshold = client.get_metric_history(run.info.run_id, "step/stability_threshold")
    assert [(m.step, round(m.value)) for m in threshold] == [(10, 38000), (20, 38000)]
    assert "step/preconditioned_lambda_max" in run.data.metrics


@pytest.mark.slow
def test_huggingface_trainer_example_under_torchrun(tracking):
    """The Trainer's DDP on 2 CPU processes: one MLflow run, each step logged once, the
    Tracker on the two probe shards together (a rank left out would hang the other)."""
    pytest.importorskip(
        "transformers", reason="transformers not installed (pip install -e '.[transformers]')"
    )
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "huggingface_trainer.py"),
            "--steps",
            "20",
            "--every",
            "10",
            "--output-dir",
            str(tracking / "out"),
        ],  # fmt: skip
        cwd=tracking,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(tracking)
    assert done.stdout.count("MLflow run") == 1 and run.info.run_id in done.stdout
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/lambda_max")]
    assert steps == [10, 20]
    # 24 sequences in batches of 4 a rank: 3 steps an epoch on 2 ranks (6 on one)
    assert re.search(r"'epoch': '?6\.66", done.stdout), done.stdout[-2000:]


@pytest.mark.slow
def test_adamw_warmup_spike_example(tracking):
    pytest.importorskip(
        "transformers", reason="transformers not installed (pip install -e '.[transformers]')"
    )
    out = run_example(
        "adamw_warmup_spike.py", "--steps", "8", "--every", "4", "--warmup", "4", cwd=tracking
    )
    client, run = only_run(tracking)
    assert run.info.run_id in out and "first warning: step" in out
    threshold = client.get_metric_history(run.info.run_id, "step/stability_threshold")
    assert [(m.step, round(m.value)) for m in threshold] == [(4, 190), (8, 190)]  # 38 / 0.2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(
        range(1, 9)
    )
    assert {"first_warning_step", "first_loss_spike_step"} <= set(run.data.tags)
