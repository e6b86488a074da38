import dataclasses

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
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_creates_no_run(args, message, tracking,
                                                            fake_data_dir):
    base = ["train", "--data-dir", str(fake_data_dir), "--train-subset", "200",
            "--val-size", "100", "--probe-size", "64"]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    # nothing was written: no MLflow database, no artifacts
    assert not (tracking / "mlflow.db").exists() and not (tracking / "mlruns").exists()


def test_store_made_by_an_mlflow_server_needs_its_uri(tracking, fake_data_dir):
    """`mlflow ui` started first gives experiments mlflow-artifacts: locations; logging to
    the sqlite file directly cannot write there. One line, exit 2, and no run is created."""
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{tracking}/mlflow.db")
    exp_id = store.create_experiment("served", artifact_location="mlflow-artifacts:/served")
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(fake_data_dir),
                                      "--train-subset", "200", "--val-size", "100",
                                      "--probe-size", "64", "--experiment", "served"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "set MLFLOW_TRACKING_URI to that server" in lines[0], result.stderr
    assert "mlflow-artifacts:/served" in lines[0]
    assert store.search_runs([exp_id]) == []


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
