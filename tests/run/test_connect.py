"""`lossgeo connect RUN_A RUN_B`: a new run tagged with both, its barriers, path.csv and
plot; bad input is one line, exit 2, and no run."""

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.run.experiment import run_training
from lossgeo.run.tracking import load_artifact_object
from lossgeo.run.tracking.queries import download_artifact

from ..conftest import tiny_config


def all_runs():
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(ids)}


def test_connect_logs_the_paths_between_two_runs(tracking, fake_data_dir):
    a = run_training(tiny_config(fake_data_dir, epochs=2, curvature=True, curvature_k=1))
    b = run_training(tiny_config(fake_data_dir, epochs=2, seed=1))
    result = CliRunner().invoke(
        cli,
        [
            "connect",
            a.run_id,
            b.run_id,
            "--epochs",
            "2",
            "--points",
            "5",
            "--align",
            "--curvature-points",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    new_run = result.output.strip().splitlines()[-1].split()[1].rstrip(":")
    run = MlflowClient().get_run(new_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["connect.run_a"] == a.run_id
    assert run.data.tags["connect.run_b"] == b.run_id
    metrics = run.data.metrics
    for name in ("linear", "bezier", "linear_aligned", "bezier_aligned"):
        assert f"connect/{name}_barrier" in metrics
    csv = download_artifact(new_run, "connect/path.csv", tracking / "out")
    paths = pd.read_csv(csv)
    assert list(paths.columns[:6]) == [
        "path",
        "t",
        "train_loss",
        "test_loss",
        "train_acc",
        "test_acc",
    ]
    assert set(paths["path"]) == {"linear", "bezier", "linear_aligned", "bezier_aligned"}
    assert len(paths) == 4 * 5
    # the paths start at run a's weights: its logged final test loss, on the same test set
    starts = paths[paths["t"] == 0.0]
    assert starts["test_loss"].to_numpy() == pytest.approx(
        a.history.iloc[-1]["test_loss"], rel=1e-5
    )
    # ... and end at run b's (aligned: the same function, so the same loss)
    ends = paths[paths["t"] == 1.0]
    assert ends["test_loss"].to_numpy() == pytest.approx(b.history.iloc[-1]["test_loss"], rel=1e-5)
    # each path's barrier is its largest train loss minus the mean of its ends
    for name, rows in paths.groupby("path"):
        losses = rows.sort_values("t")["train_loss"].to_numpy()
        expected = losses.max() - (losses[0] + losses[-1]) / 2
        assert metrics[f"connect/{name}_barrier"] == pytest.approx(expected, rel=1e-9)
    # lambda_max at 2 points of each curve: its ends, and at t = 0 run a's own
    curve = paths[paths["path"] == "bezier"].dropna(subset=["lambda_max"])
    assert curve["t"].tolist() == [0.0, 1.0]
    assert curve["lambda_max"].iloc[0] == pytest.approx(a.history.iloc[-1]["lambda_max"], rel=1e-3)
    control = load_artifact_object(new_run, "connect/control_point.pt")
    assert set(control) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    artifacts = {f.path for f in MlflowClient().list_artifacts(new_run, "plots")}
    assert "plots/connect.png" in artifacts


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "run_id: no run"),
        ("architecture", "run_b: hidden differs from run_a's"),
        ("no checkpoint", "has no checkpoint/model.pt"),
        ("align a CNN", "align: weight matching: only for MLPs"),
        ("points", "points: must be >= 3"),
    ],
)
def test_connect_bad_input_is_one_line_and_writes_nothing(tracking, fake_data_dir, case, message):
    model = "cnn" if case == "align a CNN" else "mlp"
    a = run_training(tiny_config(fake_data_dir, epochs=1, model=model))
    other = dict(hidden="8") if case == "architecture" else {}
    b = run_training(tiny_config(fake_data_dir, epochs=1, model=model, seed=1, **other))
    if case == "no checkpoint":
        client = MlflowClient()
        failed = client.create_run(client.get_run(a.run_id).info.experiment_id)
        client.set_terminated(failed.info.run_id, "FAILED")
        b_id = failed.info.run_id
    else:
        b_id = "0" * 32 if case == "missing" else b.run_id
    args = ["connect", a.run_id, b_id, "--epochs", "1"]
    args += ["--align"] if case == "align a CNN" else []
    args += ["--points", "2"] if case == "points" else []
    before = all_runs()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert all_runs() == before


@pytest.mark.slow  # a 4-run study and 18 connect runs: the full tier
def test_connectivity_connects_every_pair_of_a_study_once_and_summarises_by_kind(
    tmp_path, tracking, fake_data_dir
):
    import yaml

    from lossgeo.studies.study import run_grid
    from lossgeo.studies.studyfile import load_study_file

    body = {
        "name": "tiny-connect",
        "kind": "grid",
        "models": ["mlp"],
        "seeds": [0, 1],
        "base": {
            "hidden": "8",
            "train_subset": 64,
            "val_size": 32,
            "probe_size": 32,
            "epochs": 2,
            "curvature": False,
            "noise_scale": False,
            "sharpness": False,
            "pac_bayes": False,
            "landscape": False,
            "data_dir": str(fake_data_dir),
        },
        "regimes": {"high": {"lr": 0.1, "batch_size": 8}, "low": {"lr": 0.05, "batch_size": 64}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    parent = run_grid(load_study_file(path))
    args = ["connectivity", "--parent-run", parent, "--epochs", "1", "--points", "3"]
    args += ["--curvature-points", "0", "--align", "--batch-size", "16", "--out", "c"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    pairs = pd.read_csv(tracking / "c" / "connectivity_pairs.csv")
    # 4 runs, 6 pairs: one within each regime, four across
    assert pairs["kind"].value_counts().to_dict() == {
        "across high / low": 4,
        "within high": 1,
        "within low": 1,
    }
    summary = pd.read_csv(tracking / "c" / "connectivity.csv")
    across = summary.set_index("kind").loc["across high / low"]
    assert across["n_pairs"] == 4
    assert across["connect/bezier_barrier_mean"] == pytest.approx(
        pairs[pairs["kind"] == "across high / low"]["connect/bezier_barrier"].mean()
    )
    assert (
        across["connect/bezier_aligned_barrier_ci_low"]
        <= across["connect/bezier_aligned_barrier_mean"]
    )
    client = MlflowClient()
    assert "connectivity.csv" in {a.path for a in client.list_artifacts(parent)}
    # every connect run is a FINISHED child of one folder run, not of the study's parent
    connect_runs = set(pairs["connect_run"])
    folders = {client.get_run(r).data.tags["mlflow.parentRunId"] for r in connect_runs}
    assert len(folders) == 1 and parent not in folders
    # run again: nothing is connected twice
    before = all_runs()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("done before") == 6
    assert all_runs() == before
    # other settings connect again
    other = CliRunner().invoke(cli, [*args[:-2], "--out", "d", "--points", "4"])
    assert other.exit_code == 0, other.output
    assert len(all_runs() - before) == 6
