"""What a newcomer tripped on: each case once broken, now one line and exit 2 (or the right
file in the right place), and nothing written where nothing should be."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.run.experiment import run_training

from .conftest import copy_store, make_fake_mnist, tiny_config

TINY_TRAIN = [
    "train",
    "--train-subset",
    "200",
    "--val-size",
    "100",
    "--probe-size",
    "32",
    "--hidden",
    "8",
    "--epochs",
    "1",
    "--curvature",
    "false",
    "--sharpness",
    "false",
    "--landscape",
    "false",
    "--noise-scale",
    "false",
]


def one_line(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_unreachable_tracking_server_fails_fast_in_one_line(tracking, fake_data_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.time()
    result = CliRunner().invoke(cli, TINY_TRAIN + ["--data-dir", str(fake_data_dir)])
    one_line(result, "no MLflow tracking server answers at http://127.0.0.1:9")
    assert time.time() - started < 15


def test_runs_land_in_one_default_experiment_that_compare_finds(tracking, fake_data_dir):
    first = run_training(tiny_config(fake_data_dir, epochs=1))
    c = MlflowClient()
    assert c.get_experiment(c.get_run(first.run_id).info.experiment_id).name == "Default"
    result = CliRunner().invoke(cli, ["compare", "--out", "cmp"])
    assert result.exit_code == 0, result.output
    comparison = c.search_runs(["0"], "tags.kind = 'comparison'")
    assert len(comparison) == 1


def test_compare_and_report_without_finished_runs_write_nothing(tracking, fake_data_dir):
    c = MlflowClient()
    exp = c.create_experiment("unfinished")
    c.create_run(exp)  # RUNNING, no metrics
    for command in (
        ["compare", "--experiment", "unfinished", "--out", "cmp"],
        ["report", "--experiment", "unfinished", "--out", "tex"],
    ):
        result = CliRunner().invoke(cli, command)
        one_line(result, "no finished training runs in experiment 'unfinished' (1 RUNNING)")
    assert not (tracking / "cmp").exists() and not (tracking / "tex").exists()
    assert len(c.search_runs([exp])) == 1


def test_remeasuring_a_run_without_checkpoint_is_one_line(tracking, fake_data_dir):
    c = MlflowClient()
    run = c.create_run(c.create_experiment("bare"))
    for key, value in tiny_config(fake_data_dir).to_params().items():
        c.log_param(run.info.run_id, key, value)
    for command in ("curvature", "landscape"):
        result = CliRunner().invoke(cli, [command, "--run-id", run.info.run_id])
        one_line(result, f"run {run.info.run_id} (RUNNING) has no checkpoint/model.pt")


def read_only_folder(tmp_path):
    """A folder this process cannot write into: chmod 555, except that root writes through
    permission bits, so as root a folder the kernel refuses (/proc/sys) or a skip."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    if not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("running as root with no read-only folder to point MLflow at")


def test_read_only_artifact_location_is_refused_before_the_run(tracking, fake_data_dir):
    location = read_only_folder(tracking) / "lossgeo-artifacts"
    c = MlflowClient()
    exp = c.create_experiment("ro", artifact_location=str(location))
    result = CliRunner().invoke(
        cli, TINY_TRAIN + ["--data-dir", str(fake_data_dir), "--experiment", "ro"]
    )
    one_line(result, f"stores artifacts under {location}, which is not writable")
    assert c.search_runs([exp]) == []


def test_truncated_mnist_file_is_named_corrupt(tmp_path, storeless):
    root = make_fake_mnist(tmp_path / "data", n_train=200, n_test=50)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    result = CliRunner().invoke(
        cli, TINY_TRAIN + ["--data-dir", str(root), "--train-subset", "50", "--val-size", "20"]
    )
    one_line(result, f"file {images} is corrupt (5000 bytes, its header says 156816)")
    assert not (storeless / "mlflow.db").exists()


def test_missing_data_dir_is_not_created(tmp_path, tracking, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    import lossgeo.data as data_mod

    def offline(*args, **kwargs):  # what this machine's network does, without the wait
        raise RuntimeError("offline")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(data_mod.DataUnavailableError, match="download failed"):
        data_mod.load_data("mnist", missing)
    assert not missing.exists()


def test_one_line_per_epoch_when_not_on_a_terminal(tmp_path, fake_data_dir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": copy_store(tmp_path)}
    env.pop("MLFLOW_RUN_ID", None)
    args = [a if a != "1" else "2" for a in TINY_TRAIN]  # two epochs
    result = subprocess.run(
        [sys.executable, "-m", "lossgeo", *args, "--data-dir", str(fake_data_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    assert "train_loss" in lines[0] and "test_acc" in lines[0]
    # the total, then where it went (once the total only)
    assert re.search(r", \d+\.\d s \(eval \d+\.\d\)$", lines[0]), lines[0]
    assert re.search(r", \d+\.\d s \(train \d+\.\d, eval \d+\.\d\)$", lines[1]), lines[1]


def test_default_install_logs_the_interactive_landscape(tracking, fake_data_dir):
    outcome = run_training(
        tiny_config(
            fake_data_dir, epochs=1, landscape=True, sharpness=False, landscape_resolution=3
        )
    )
    paths = {a.path for a in MlflowClient().list_artifacts(outcome.run_id, "plots")}
    assert "plots/landscape_3d.html" in paths


@pytest.mark.parametrize(
    "command",
    [["compare"], ["report", "--no-pdf"], ["curvature", "--run-id", "abc"], ["runs", "cleanup"]],
)
def test_read_only_commands_never_create_a_store(storeless, command):
    """`lossgeo report` in an empty folder took 48 s, made a 954 KB mlflow.db, then said
    there was nothing."""
    result = CliRunner().invoke(cli, command)
    one_line(result, f"MLflow: no store here ({storeless}/mlflow.db does not exist)")
    assert list(storeless.iterdir()) == []


def test_broken_stores_are_one_line(tracking, monkeypatch):
    (tracking / "mlflow.db").write_text("garbage")
    one_line(
        CliRunner().invoke(cli, ["compare"]),
        f"cannot open the MLflow store sqlite:///{tracking}/mlflow.db (DatabaseError",
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tracking}/mlruns")
    one_line(CliRunner().invoke(cli, ["compare"]), "MLflow 3 refuses the file store")


def test_unknown_run_and_unreachable_server_are_told_apart(tracking, monkeypatch):
    MlflowClient().search_experiments()  # the store exists
    one_line(
        CliRunner().invoke(cli, ["curvature", "--run-id", "abc"]),
        f"run_id: no run 'abc' in sqlite:///{tracking}/mlflow.db",
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    one_line(
        CliRunner().invoke(cli, ["curvature", "--run-id", "abc"]),
        "no MLflow tracking server answers at http://127.0.0.1:9",
    )


def test_lossgeo_tags_its_experiments_as_model_training(tracking, fake_data_dir):
    """MLflow 3's UI opened them in its GenAI view (an empty Traces page); the tag makes it
    show the runs. A kind the user set is left alone."""
    c = MlflowClient()
    mine = c.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    run_training(tiny_config(fake_data_dir, epochs=0))  # Default, which MLflow made
    run_training(tiny_config(fake_data_dir, epochs=0, experiment="new"))
    run_training(tiny_config(fake_data_dir, epochs=0, experiment="mine"))
    kinds = {e.name: e.tags.get("mlflow.experimentKind") for e in c.search_experiments()}
    assert kinds == {
        "Default": "custom_model_development",
        "new": "custom_model_development",
        "mine": "genai_development",
    }
    assert mine


def test_train_ends_with_a_link_that_opens_the_runs(tracking, fake_data_dir):
    result = CliRunner().invoke(cli, TINY_TRAIN + ["--data-dir", str(fake_data_dir)])
    assert result.exit_code == 0, result.output
    assert (
        "see it: `mlflow ui`, then http://127.0.0.1:5000/#/experiments/0"
        "?workflowType=machine_learning"
    ) in result.stdout


@pytest.mark.parametrize("command", ["compare", "report", "measures", "edge"])
def test_an_unusable_out_folder_is_one_line_before_any_work(tracking, command):
    """A read-only folder or a file as --out gave a traceback and exit 1 after the work."""
    import os

    a_file = tracking / "taken"
    a_file.write_text("x")
    locked = tracking / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    extra = ["--parent-run", "abc"] if command in ("measures", "edge") else []
    cases = [
        (str(a_file), f"out: {a_file} exists and is not a folder"),
        (str(a_file / "below"), f"out: {a_file} is not a folder, so {a_file}/below cannot be"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((str(locked / "new"), f"out: {locked} is not writable"))
    for out, message in cases:
        one_line(CliRunner().invoke(cli, [command, *extra, "--out", out]), message)
    assert sorted(p.name for p in tracking.iterdir()) == ["locked", "mlflow.db", "taken"]
