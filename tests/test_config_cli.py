import dataclasses
import re

import pytest
import yaml
from click.testing import CliRunner

from lossgeo.cli import cli
from lossgeo.config import TrainConfig, config_fields
from lossgeo.errors import UserInputError

from .conftest import REPO

BAD_INPUTS = [
    (["--lr", "0"], "lr: must be > 0"),
    (["--lr", "-0.1"], "lr: must be > 0"),
    (["--batch-size", "0"], "batch_size: must be >= 1"),
    (["--batch-size", "100000"], "batch_size: must be >= 1 and <= training-set size 200"),
    (["--epochs", "-1"], "epochs: must be >= 0"),
    (["--probe-size", "201"], "probe_size: must be >= 1 and <= training-set size 200"),
    (["--model", "lenet"], "model: must be one of mlp, cnn, resnet, vit"),
    (["--dataset", "imagenet"], "dataset: must be one of mnist, fashion-mnist, cifar10"),
    (["--momentum", "1"], "momentum: must be in [0, 1)"),
    (["--momentum", "-0.5"], "momentum: must be in [0, 1)"),
    (["--device", "tpu"], "device: must be one of auto, cpu, cuda"),
    # the reliability pass: non-finite numbers ran (lr=inf "diverged", a NaN slice), a huge
    # seed and a one-sample noise scale were tracebacks
    (["--lr", "inf"], "lr: must be a finite number (got inf)"),
    (["--lr", "nan"], "lr: must be a finite number (got nan)"),
    (["--landscape-range", "inf"], "landscape_range: must be a finite number (got inf)"),
    (["--seed", "1180591620717411303424"], "seed: must be in [0, 9223372036854775807]"),
    (["--epochs", "1.5"], "epochs: must be an integer (got 1.5)"),
    (["--epochs", "abc"], "epochs: must be an integer (got 'abc')"),
    (["--probe-size", "1"], "probe_size: must be >= 2 for the gradient noise scale"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_creates_no_run(
    args, message, storeless, fake_data_dir
):
    base = [
        "train",
        "--data-dir",
        str(fake_data_dir),
        "--train-subset",
        "200",
        "--val-size",
        "100",
        "--probe-size",
        "64",
    ]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    # nothing was written: no MLflow database, no artifacts
    assert not (storeless / "mlflow.db").exists() and not (storeless / "mlruns").exists()


def test_store_made_by_an_mlflow_server_needs_its_uri(tracking, fake_data_dir):
    """`mlflow ui` started first gives experiments mlflow-artifacts: locations; logging to
    the sqlite file directly cannot write there. One line, exit 2, and no run is created."""
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{tracking}/mlflow.db")
    exp_id = store.create_experiment("served", artifact_location="mlflow-artifacts:/served")
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--data-dir",
            str(fake_data_dir),
            "--train-subset",
            "200",
            "--val-size",
            "100",
            "--probe-size",
            "64",
            "--experiment",
            "served",
        ],
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "set MLFLOW_TRACKING_URI to that server" in lines[0], result.stderr
    assert "mlflow-artifacts:/served" in lines[0]
    assert store.search_runs([exp_id]) == []


def test_integral_floats_are_integers_as_mlflow_passes_them(tracking, fake_data_dir):
    """MLproject declares every number a float, so `-P batch_size=32.0` reaches the CLI as
    "32.0"; it was refused. 32.0 means 32, 32.5 is refused, and the config holds ints."""
    from lossgeo.cli import IntegralNumber

    assert IntegralNumber().convert("32.0", None, None) == 32
    assert IntegralNumber().convert("1e3", None, None) == 1000
    config = TrainConfig(batch_size=32.0, epochs=1.0)  # type: ignore[arg-type]
    assert config.batch_size == 32 and type(config.batch_size) is int
    assert type(config.epochs) is int and type(TrainConfig(lr=1).lr) is float
    for bad, message in (
        ({"batch_size": 16.5}, "batch_size: must be an integer (got 16.5)"),
        ({"epochs": "1"}, "epochs: must be an integer (got '1')"),
        ({"curvature": "no"}, "curvature: must be true or false"),
        ({"lr": True}, "lr: must be a number (got True)"),
    ):
        with pytest.raises(UserInputError, match=re.escape(message)):
            TrainConfig(**bad)


def test_config_rejects_in_python_too():
    with pytest.raises(UserInputError, match="lr: must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(UserInputError, match="hidden"):
        TrainConfig(hidden="12,x")
    assert TrainConfig(hidden="200, 200").hidden_widths == (200, 200)


def test_mlproject_main_parameters_match_config():
    """One source of truth: MLproject's main entry point has exactly the config's fields,
    with the same defaults, and passes each one to the CLI."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]
    fields = {f.name: f.default for f in config_fields()}
    assert set(spec["parameters"]) == set(fields)
    for name, default in fields.items():
        declared = spec["parameters"][name]["default"]
        if isinstance(default, bool):
            assert str(declared).lower() == str(default).lower(), name
        else:
            assert type(default)(declared) == default, name
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"], name


def test_cli_help_lists_every_config_option():
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in out


def test_a_run_rejected_for_its_parameters_is_not_a_traceback_when_reread():
    """`lossgeo curvature --run-id` on a launcher run left FAILED by `-P lr=abc` crashed on
    float('abc')."""
    from lossgeo.run.experiment import config_from_params

    with pytest.raises(
        UserInputError, match=re.escape("run: its logged parameter lr='abc' is not a valid setting")
    ):
        config_from_params({"lr": "abc", "batch_size": "32"})
    with pytest.raises(UserInputError, match="run: its logged parameters are not valid"):
        config_from_params({"lr": "inf"})
    assert config_from_params({"batch_size": "32.0", "lr": "0.5"}).batch_size == 32


def test_runs_with_other_settings_get_other_names():
    """Two runs, one with measure_every_steps=20, were both `mlp-mnist-lr0.1-b32`."""
    from lossgeo.run.experiment import run_name

    assert run_name(TrainConfig()) == "mlp-mnist-lr0.1-b32"
    assert run_name(TrainConfig(data_dir="/x", experiment="e")) == "mlp-mnist-lr0.1-b32"
    assert (
        run_name(TrainConfig(measure_every_steps=20))
        == "mlp-mnist-lr0.1-b32-measure_every_steps=20"
    )
    assert (
        run_name(TrainConfig(epochs=5, landscape=False))
        == "mlp-mnist-lr0.1-b32-epochs=5-landscape=false"
    )
    many = TrainConfig(epochs=5, train_subset=400, val_size=100, probe_size=32, hidden="16")
    other = TrainConfig(epochs=5, train_subset=400, val_size=100, probe_size=32, hidden="32")
    assert len(run_name(many)) == len("mlp-mnist-lr0.1-b32-") + 6
    assert run_name(many) != run_name(other)


def test_an_interrupt_names_only_the_runs_this_process_ended(monkeypatch):
    """It said "runs ended KILLED" when no run existed yet, and on a torchrun rank whose
    run rank 0 owned (and left RUNNING when rank 0 was SIGKILLed)."""
    from lossgeo import cli as cli_module
    from lossgeo.run.tracking import logging as tracking_logging

    monkeypatch.setattr(tracking_logging, "ENDED_KILLED", [])
    assert cli_module._what_was_ended() == "no run of this process was running"
    monkeypatch.setattr(tracking_logging, "ENDED_KILLED", ["abc", "def"])
    assert cli_module._what_was_ended() == (
        "what was logged is kept; ended KILLED: run abc, run def"
    )
