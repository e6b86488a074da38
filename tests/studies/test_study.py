"""Study files, grids and Optuna sweeps on the SQLite default (PostgreSQL: test_distributed)."""

import math
import os
import re
import threading

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.errors import UserInputError
from lossgeo.run.tracking import PARENT_TAG
from lossgeo.studies.study import PARENT_ATTR, run_grid, run_sweep
from lossgeo.studies.studyfile import load_study_file

from ..conftest import REPO, copy_store

TINY_BASE = {
    "model": "mlp",
    "hidden": "8",
    "epochs": 2,
    "train_subset": 200,
    "val_size": 100,
    "probe_size": 32,
    "batch_size": 32,
    "curvature_k": 1,
    "trace_samples": 2,
    "density_steps": 5,
    "sharpness_directions": 1,
    "landscape": False,
    "curvature_max_iter": 20,
}


def write_study(tmp_path, data_dir, **fields):
    body = {
        "name": "tiny",
        "kind": "sweep",
        "base": {**TINY_BASE, "data_dir": str(data_dir)},
        "search_space": {
            "lr": {"low": 0.01, "high": 0.3, "log": True},
            "batch_size": {"choices": [16, 32]},
        },
        "n_trials": 3,
        "sampler": "random",
    }
    body.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def lossgeo_worker(tmp_path, uri: str, *args: str, **env_extra: str):
    """`python -m lossgeo ARGS` in tmp_path on the store `uri`, outside any MLflow run, its
    output captured as text."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **env_extra}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, "-m", "lossgeo", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def killed_while_another_works(victim, start_worker) -> str:
    """Starts a second worker, SIGKILLs `victim` two seconds later, and returns what the
    survivor printed by its (successful) end."""
    import signal
    import time

    survivor = start_worker()
    time.sleep(2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, out[-3000:]
    return out


def test_shipped_study_files_are_valid():
    grid = load_study_file(REPO / "studies" / "mnist_grid.yaml")
    temps = [v["lr"] / v["batch_size"] for v in grid.regimes.values()]
    assert grid.kind == "grid" and set(grid.models) == {"mlp", "cnn"}
    assert max(temps) / min(temps) >= 100
    sweep = load_study_file(REPO / "studies" / "noise_temperature.yaml")
    assert sweep.kind == "sweep" and {p.name for p in sweep.search_space} == {"lr", "batch_size"}
    eos = load_study_file(REPO / "studies" / "edge_of_stability.yaml")
    assert eos.base["loss"] == "mse" and eos.base["batch_size"] == eos.base["train_subset"]
    adam = load_study_file(REPO / "studies" / "adam_edge_of_stability.yaml")
    assert adam.base["optimizer"] == "adam" and adam.base["batch_size"] == adam.base["train_subset"]
    # Andreyev & Beneventano's setting: ReLU MLP 2x512, init x0.2, 8,192 images, B 16, lr 0.01
    authors = load_study_file(REPO / "studies" / "edge_of_stochastic_stability_authors.yaml")
    base = authors.base
    assert (base["activation"], base["hidden"], base["init_scale"]) == ("relu", "512,512", 0.2)
    assert (base["train_subset"], base["lr"], base["loss"]) == (8192, 0.01, "mse")
    assert authors.regimes["B-16"]["batch_size"] == 16


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"sampler": "cmaes"}, "sampler: must be one of"),
        ({"objective": "accuracy"}, "objective: must be among"),
        (
            {"search_space": {"lr": {"low": 0.1, "high": 0.01}}},
            "search_space.lr: low must be < high",
        ),
        ({"search_space": {"lr": {"low": -1, "high": 0.1, "log": True}}}, "search_space.lr.low"),
        ({"search_space": {"dropout": {"low": 0, "high": 1}}}, "search_space.dropout"),
        ({"base": {"lr": -1}}, "base: lr: must be > 0"),
        ({"base": {"colour": 1}}, "base.colour: not a training parameter"),
        ({"n_trials": 0}, "n_trials: must be an integer >= 1"),
        ({"flavour": "x"}, "flavour: unknown field"),
        ({"kind": "grid"}, "regimes: a grid needs named regimes"),
        # the reliability pass: each of these was a traceback (exit 1) or a silent misreading
        ({"seed": "a"}, "seed: must be an integer >= 0 (got 'a')"),
        ({"base": {"lr": "abc"}}, "base: lr: must be a number (got 'abc')"),
        ({"base": {"seed": "a"}}, "base: seed: must be an integer (got 'a')"),
        ({"base": {"landscape": "no"}}, "base: landscape: must be true or false (got 'no')"),
        (
            {"search_space": {"batch_size": {"choices": ["a", "b"]}}},
            "search_space.batch_size.choices: batch_size: must be an integer (got 'a')",
        ),
        (
            {"search_space": {"lr": {"low": 0.01, "high": 0.1, "log": "no"}}},
            "search_space.lr.log: must be true or false (got 'no')",
        ),
        (
            {"search_space": {"lr": {"choices": {"log_space": [0.01, float("inf"), 3]}}}},
            "search_space.lr.choices: lr: must be a finite number",
        ),
        (
            {"kind": "grid", "regimes": {"a": {"batch_size": 16.5}}},
            "regimes.a: batch_size: must be an integer (got 16.5)",
        ),
        ({"kind": "grid", "regimes": {"a": {"lr": "abc"}}}, "regimes.a: lr: must be a number"),
    ],
)
def test_bad_study_file_one_line_exit_2_nothing_started(
    tmp_path, storeless, fake_data_dir, fields, message
):
    path = write_study(tmp_path, fake_data_dir, **fields)
    with pytest.raises(UserInputError, match=re.escape(message)):
        load_study_file(path)
    result = CliRunner().invoke(cli, ["sweep", "--study", str(path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (storeless / "mlflow.db").exists() and not (storeless / "studies").exists()


def test_sweep_on_sqlite_children_under_one_parent(tmp_path, tracking, fake_data_dir):
    spec = load_study_file(write_study(tmp_path, fake_data_dir))
    study = run_sweep(spec, n_trials=3)
    assert (tracking / "studies" / "optuna.db").exists()
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    parent = study.user_attrs[PARENT_ATTR]
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in study.trials
    )
    for trial in finished:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["trial_number"] == str(trial.number)
        assert trial.user_attrs["noise_temperature"] == pytest.approx(
            trial.params["lr"] / trial.params["batch_size"]
        )
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED" and "lambda_max" in trial.user_attrs
            assert "grad_noise_scale" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"runs.csv", "summary.csv", "correlations.csv", "plots", "optuna"} <= artifacts
    # joining again with the same budget runs nothing more
    again = run_sweep(spec, n_trials=3)
    assert len(again.trials) == len(study.trials)


@pytest.mark.slow
def test_diverged_trial_is_recorded_and_pruned_trial_run_is_killed(
    tmp_path, tracking, fake_data_dir
):
    path = write_study(
        tmp_path,
        fake_data_dir,
        search_space={"lr": {"choices": [1e6, 0.05]}, "batch_size": {"choices": [32]}},
        sampler="grid",
    )
    study = run_sweep(load_study_file(path), n_trials=2)
    by_lr = {t.params["lr"]: t for t in study.trials}
    diverged = by_lr[1e6]
    assert diverged.state.name == "COMPLETE" and math.isinf(diverged.value)
    assert diverged.user_attrs["state"] == "diverged" and "epoch" in diverged.user_attrs["reason"]
    run = MlflowClient().get_run(diverged.user_attrs["mlflow_run_id"])
    assert run.data.tags["diverged"] == "true"
    assert by_lr[0.05].user_attrs["state"] == "finished"


@pytest.mark.slow
def test_pruned_trial_run_ends_killed(tmp_path, tracking, fake_data_dir, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number >= 1)
    path = write_study(tmp_path, fake_data_dir, sampler="random")
    study = run_sweep(load_study_file(path), n_trials=2)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned
    assert MlflowClient().get_run(pruned[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.slow
def test_grid_runs_every_cell_and_summarises(tmp_path, tracking, fake_data_dir):
    path = write_study(
        tmp_path,
        fake_data_dir,
        kind="grid",
        models=["mlp"],
        search_space=None,
        n_trials=None,
        sampler=None,
        regimes={
            "high-noise": {"lr": 0.1, "batch_size": 8},
            "low-noise": {"lr": 0.01, "batch_size": 64},
        },
    )
    raw = yaml.safe_load(path.read_text())
    for key in ("search_space", "n_trials", "sampler"):
        raw.pop(key)
    path.write_text(yaml.safe_dump(raw))
    parent = run_grid(load_study_file(path))
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(r.data.tags["regime"] for r in children) == ["high-noise", "low-noise"]
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert {
        "plots/loss_curves.png",
        "plots/lambda_max.png",
        "plots/gen_gap_vs_lambda.png",
        "plots/noise_vs_lambda.png",
        "plots/sharpness.png",
    } <= plots
    # compare by parent run: the two cells only, plots logged as a child of the parent
    result = CliRunner().invoke(cli, ["compare", "--parent-run", parent, "--out", "cmp"])
    assert result.exit_code == 0, result.output
    assert len(list((tracking / "cmp").glob("*.png"))) == 7
    outputs = client.search_runs(
        [client.get_run(parent).info.experiment_id], "tags.kind = 'comparison'"
    )
    assert [r.data.tags["mlflow.parentRunId"] for r in outputs] == [parent]


def test_unreachable_storage_is_one_line_exit_2(tmp_path, tracking, fake_data_dir):
    path = write_study(tmp_path, fake_data_dir)
    result = CliRunner().invoke(
        cli, ["sweep", "--study", str(path), "--storage", "postgresql://nobody@127.0.0.1:1/none"]
    )
    assert result.exit_code == 2 and result.stderr.startswith("lossgeo: error: storage:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sweep_parent_is_running_while_a_worker_works_then_finished(
    tmp_path, tracking, fake_data_dir, monkeypatch
):
    import lossgeo.studies.sweep as study_mod

    seen = []
    real = study_mod.run_training

    def watching(config, *, parent_run_id, **kwargs):
        seen.append(MlflowClient().get_run(parent_run_id).info.status)
        return real(config, parent_run_id=parent_run_id, **kwargs)

    monkeypatch.setattr(study_mod, "run_training", watching)
    spec = load_study_file(write_study(tmp_path, fake_data_dir, pruner="none"))
    study = run_sweep(spec, n_trials=2)
    parent = MlflowClient().get_run(study.user_attrs[PARENT_ATTR])
    assert seen == ["RUNNING", "RUNNING"] and parent.info.status == "FINISHED"
    # a later worker with a larger budget reopens the study, and closes it again
    run_sweep(spec, n_trials=3)
    assert seen[2] == "RUNNING"
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"


def test_interrupted_last_worker_ends_the_parent_killed(
    tmp_path, tracking, fake_data_dir, monkeypatch
):
    import lossgeo.studies.sweep as study_mod

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt("interrupted (SIGTERM)")

    monkeypatch.setattr(study_mod, "run_training", interrupted)
    spec = load_study_file(write_study(tmp_path, fake_data_dir))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, n_trials=3)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tracking}/studies/optuna.db")
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL"]
    parent = MlflowClient().get_run(study.user_attrs[PARENT_ATTR])
    assert parent.info.status == "KILLED"
    assert "interrupted before the budget was done" in parent.data.tags["lossgeo_end_reason"]


def test_set_overrides_the_base_and_is_validated_like_the_file(tmp_path, storeless, fake_data_dir):
    from lossgeo.studies.studyfile import parse_overrides

    path = write_study(tmp_path, fake_data_dir)
    assert parse_overrides(["epochs=1 train_subset=150", "landscape=false"]) == {
        "epochs": 1,
        "train_subset": 150,
        "landscape": False,
    }
    spec = load_study_file(path, parse_overrides(["epochs=1 train_subset=150"]))
    assert spec.base["epochs"] == 1 and spec.config(lr=0.1).train_subset == 150
    # a typo in --set is the user's --set, never the study file's (it once said
    # "studies/x.yaml: base.epoch: not a training parameter")
    for bad, message in (
        (["lr=-1"], "error: set: lr: must be > 0"),
        (["colour=1"], "error: set: colour: not a training parameter"),
        (["epochs=abc"], "error: set: epochs: must be an integer (got 'abc')"),
        (["epochs=1.5"], "error: set: epochs: must be an integer (got 1.5)"),
        (["epochs"], "set: 'epochs' is not key=value"),
    ):
        result = CliRunner().invoke(cli, ["sweep", "--study", str(path), "--set", *bad])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (storeless / "mlflow.db").exists() and not (storeless / "studies").exists()
    result = CliRunner().invoke(
        cli,
        [
            "sweep",
            "--study",
            str(path),
            "--n-trials",
            "1",
            "--set",
            "epochs=1",
            "--set",
            "landscape=false",
        ],
    )
    assert result.exit_code == 0, result.output
    # the end says where the results are and what to run next (once only "1 complete")
    parent = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{storeless}/studies/optuna.db"
    ).user_attrs[PARENT_ATTR]
    assert f"study tiny: 1 complete; parent run {parent}" in result.stdout
    assert "best: trial 0 (batch_size=" in result.stdout and "), objective " in result.stdout
    assert f"next: lossgeo compare --parent-run {parent}" in result.stdout
    assert "[trial 0] epoch 1/1: train_loss" in result.stdout
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("Default").experiment_id],
        "tags.lossgeo_role = 'trial'",
    )[0]
    assert run.data.params["epochs"] == "1"


def test_an_unreachable_storage_does_not_hold_the_process_lock(tmp_path, tracking):
    from lossgeo.studies.study import BudgetLock

    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    with pytest.raises(sqlalchemy.exc.OperationalError):
        with BudgetLock("postgresql://nobody@127.0.0.1:1/none", "x"):
            pass
    # a later sweep in this process can still take the lock (in a thread: a held lock would
    # hang it, not the test)
    entered = threading.Event()

    def later_sweep():
        with BudgetLock(f"sqlite:///{tmp_path}/optuna.db", "y"):
            entered.set()

    thread = threading.Thread(target=later_sweep, daemon=True)
    thread.start()
    assert entered.wait(timeout=5)


def grid_file(tmp_path, data_dir, seeds):
    body = {
        "name": "tiny-grid",
        "kind": "grid",
        "models": ["mlp"],
        "seeds": seeds,
        "base": {**TINY_BASE, "data_dir": str(data_dir), "curvature": False},
        "regimes": {
            "high-noise": {"lr": 0.1, "batch_size": 8},
            "low-noise": {"lr": 0.01, "batch_size": 64},
        },
    }
    path = tmp_path / f"grid-{len(seeds)}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.slow
def test_grid_runs_every_cell_once_per_seed_and_resumes(tmp_path, tracking, fake_data_dir):
    import pandas as pd

    client = MlflowClient()
    parent = run_grid(load_study_file(grid_file(tmp_path, fake_data_dir, [0])))

    def children():
        return client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
        )

    first = {r.info.run_id for r in children()}
    assert len(first) == 2
    # the same study with one more seed: the finished (cell, seed 0) runs are not repeated
    assert run_grid(load_study_file(grid_file(tmp_path, fake_data_dir, [0, 1]))) == parent
    runs = children()
    assert first < {r.info.run_id for r in runs} and len(runs) == 4
    assert sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in runs) == [
        ("mlp/high-noise", "0"),
        ("mlp/high-noise", "1"),
        ("mlp/low-noise", "0"),
        ("mlp/low-noise", "1"),
    ]
    assert {r.data.params["seed"] for r in runs} == {"0", "1"}
    assert client.get_run(parent).info.status == "FINISHED"
    logged = client.get_run(parent).data.metrics
    assert {
        "verdict/H1_noise_temperature_vs_lambda_max",
        "verdict/H3_lambda_max_on_lr_and_B",
        "verdict/H4_edge_ratio",
    } <= set(logged)
    verdicts = pd.read_csv(client.download_artifacts(parent, "correlations.csv", str(tmp_path)))
    assert list(verdicts["hypothesis"].unique()) == ["H1", "H2", "H3", "H4"]
    summary = pd.read_csv(client.download_artifacts(parent, "summary.csv", str(tmp_path)))
    assert list(summary["cell"]) == ["mlp/high-noise", "mlp/low-noise"]
    assert list(summary["n_seeds"]) == [2, 2]
    per_run = {
        (r.data.tags["cell"], r.data.tags["seed"]): r.data.metrics["test_loss"] for r in runs
    }
    high = [per_run[("mlp/high-noise", s)] for s in ("0", "1")]
    assert summary.loc[0, "test_loss_mean"] == pytest.approx(sum(high) / 2)
    # a run of the same grid again runs nothing
    run_grid(load_study_file(grid_file(tmp_path, fake_data_dir, [0, 1])))
    assert len(children()) == 4


def test_cell_summary_t_interval_by_hand():
    import pandas as pd

    from lossgeo.analysis.statistics import cell_summary

    runs = pd.DataFrame(
        {
            "label": ["a", "a", "a", "b", "b", "c"],
            "tags.cell": ["A", "A", "A", "B", "B", "B"],
            "tags.reached_target": ["true", "true", "true", "true", "true", "false"],
            "lambda_max": [10.0, 12.0, 14.0, 3.0, 5.0, 100.0],
        }
    )
    summary = cell_summary(runs, metrics=["lambda_max"]).set_index("cell")
    # cell A: mean 12, s = 2, n = 3, t_{0.975, 2} = 4.302652729749464
    half = 4.302652729749464 * 2 / 3**0.5
    assert summary.loc["A", "lambda_max_mean"] == pytest.approx(12.0)
    assert summary.loc["A", "lambda_max_ci_low"] == pytest.approx(12.0 - half)
    assert summary.loc["A", "lambda_max_ci_high"] == pytest.approx(12.0 + half)
    # cell B: the run that missed its target is left out and counted; t_{0.975, 1} = 12.7062
    half = 12.706204736174707 * 2**0.5 / 2**0.5
    assert summary.loc["B", "n_seeds"] == 2 and summary.loc["B", "n_missed_target"] == 1
    assert summary.loc["B", "lambda_max_mean"] == pytest.approx(4.0)
    assert summary.loc["B", "lambda_max_ci_high"] == pytest.approx(4.0 + half)
    one = cell_summary(runs.iloc[:1], metrics=["lambda_max"])
    assert one.loc[0, "n_seeds"] == 1 and pd.isna(one.loc[0, "lambda_max_ci_low"])


def test_seeds_must_be_distinct_integers(tmp_path, fake_data_dir):
    for seeds in ([0, 0], ["a"], []):
        with pytest.raises(UserInputError, match="seeds: must be a list of distinct integers"):
            load_study_file(grid_file(tmp_path, fake_data_dir, seeds))


def test_a_factorial_grid_is_one_short_yaml(tmp_path, fake_data_dir):
    body = {
        "name": "design",
        "kind": "grid",
        "base": {**TINY_BASE, "data_dir": str(fake_data_dir)},
        "factors": {"lr": {"log_space": [0.0125, 0.1, 4]}, "batch_size": [16, 64]},
    }
    path = tmp_path / "design.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    spec = load_study_file(path)
    assert list(spec.regimes) == [
        "lr=0.0125,B=16",
        "lr=0.0125,B=64",
        "lr=0.025,B=16",
        "lr=0.025,B=64",
        "lr=0.05,B=16",
        "lr=0.05,B=64",
        "lr=0.1,B=16",
        "lr=0.1,B=64",
    ]
    assert spec.regimes["lr=0.05,B=64"] == {"lr": 0.05, "batch_size": 64}
    for factors, message in (
        ({"lr": {"log_space": [0, 1, 3]}}, "factors.lr.log_space"),
        ({"colour": [1]}, "factors.colour: not a training parameter"),
        ({"lr": [-1.0]}, "factors.lr: lr: must be > 0"),
        # once rounded to 16 and collapsed silently
        (
            {"batch_size": [16, 16.2, 32]},
            "factors.batch_size: batch_size: must be an integer (got 16.2)",
        ),
        ({"batch_size": [16, 16.0, 32]}, "factors.batch_size: duplicate level 16"),
        (
            {"batch_size": ["a", "b"]},
            "factors.batch_size: batch_size: must be an integer (got 'a')",
        ),
        ({"lr": {"log_space": [0.01, float("inf"), 3]}}, "factors.lr: lr: must be a finite number"),
    ):
        path.write_text(yaml.safe_dump({**body, "factors": factors}, sort_keys=False))
        with pytest.raises(UserInputError, match=re.escape(message)):
            load_study_file(path)


def test_a_designed_sweep_grid_is_never_pruned(tmp_path, fake_data_dir):
    space = {"lr": {"choices": {"log_space": [0.01, 0.1, 3]}}, "batch_size": {"choices": [32]}}
    spec = load_study_file(write_study(tmp_path, fake_data_dir, sampler="grid", search_space=space))
    assert spec.pruner == "none"
    assert {p.name: p.choices for p in spec.search_space}["lr"] == (0.01, 0.0316228, 0.1)
    with pytest.raises(UserInputError, match="pruner: a designed grid"):
        load_study_file(
            write_study(
                tmp_path, fake_data_dir, sampler="grid", search_space=space, pruner="median"
            )
        )


def test_resuming_a_grid_with_other_settings_is_refused(tmp_path, tracking, fake_data_dir):
    path = grid_file(tmp_path, fake_data_dir, [0])
    parent = run_grid(load_study_file(path))
    raw = yaml.safe_load(path.read_text())
    raw["base"]["epochs"] = 3
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["grid", "--study", str(path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "already has a finished run of mlp/high-noise seed 0 with epochs=2" in result.stderr
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(children) == 2 and client.get_run(parent).info.status == "FINISHED"


def test_invalid_yaml_names_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nkind: grid\nbase:\n  lr: [0.1\n  epochs: 1\n")
    with pytest.raises(UserInputError, match=r"broken\.yaml is not valid YAML at line 5"):
        load_study_file(path)


@pytest.mark.slow
def test_two_grid_workers_started_together_run_each_cell_once(tmp_path, fake_data_dir):
    """Two `lossgeo grid` on one study ran every cell twice (8 FINISHED runs for 4 (cell,
    seed) pairs), and the parent was FINISHED while the other worker's cell still ran.
    Real processes on one SQLite store, started together."""

    path = grid_file(tmp_path, fake_data_dir, [0, 1])
    uri = copy_store(tmp_path)  # the store, made once
    workers = [lossgeo_worker(tmp_path, uri, "grid", "--study", str(path)) for _ in range(2)]
    for w in workers:
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out[-3000:]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("Default").experiment_id])
    parents = [r for r in runs if r.data.tags.get("lossgeo_role") == "parent"]
    cells = [r for r in runs if r.data.tags.get("lossgeo_role") == "cell"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in cells) == [
        ("mlp/high-noise", "0"),
        ("mlp/high-noise", "1"),
        ("mlp/low-noise", "0"),
        ("mlp/low-noise", "1"),
    ]
    assert {r.info.status for r in cells} == {"FINISHED"}
    assert all(r.data.tags[PARENT_TAG] == parents[0].info.run_id for r in cells)


@pytest.mark.slow
def test_resuming_a_designed_grid_runs_the_interrupted_point(
    tmp_path, tracking, fake_data_dir, monkeypatch
):
    """After an interrupt during the first point (lr 0.05), a re-run ran lr 0.1 twice and
    never lr 0.05, and the parent ended FINISHED."""
    import lossgeo.studies.sweep as study_mod

    real = study_mod.run_training

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt("interrupted (SIGINT)")

    space = {"lr": {"choices": [0.05, 0.1]}, "batch_size": {"choices": [32]}}
    spec = load_study_file(write_study(tmp_path, fake_data_dir, sampler="grid", search_space=space))
    monkeypatch.setattr(study_mod, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    monkeypatch.setattr(study_mod, "run_training", real)
    study = run_sweep(spec)
    done = sorted(t.params["lr"] for t in study.trials if t.state.name == "COMPLETE")
    assert done == [0.05, 0.1]
    assert [t.params["lr"] for t in study.trials if t.state.name == "FAIL"] == [0.05]
    parent = MlflowClient().get_run(study.user_attrs[PARENT_ATTR])
    assert parent.info.status == "FINISHED"
    assert "lossgeo_end_reason" not in parent.data.tags  # the old interrupt's, forgotten


@pytest.mark.slow
def test_a_grid_worker_killed_mid_cell_is_taken_over_by_the_survivor(tmp_path, fake_data_dir):
    """SIGKILL one of two workers in its cell: the survivor exited 0 without a word and left
    that cell and the parent RUNNING. Now it waits, ends the dead cell KILLED once its
    heartbeat is stale, runs it, and closes the study."""
    import time

    body = yaml.safe_load(grid_file(tmp_path, fake_data_dir, [0]).read_text())
    # a cell long enough to be killed in, and nothing else measured
    body["base"].update(epochs=40, noise_scale=False, sharpness=False, pac_bayes=False)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(body))
    uri = copy_store(tmp_path)

    def worker():
        args = ("grid", "--study", str(path))
        return lossgeo_worker(tmp_path, uri, *args, LOSSGEO_HEARTBEAT_INTERVAL="1")

    c = MlflowClient(uri)

    def cells():
        return [
            r
            for r in c.search_runs([c.get_experiment_by_name("Default").experiment_id])
            if r.data.tags.get("lossgeo_role") == "cell"
        ]

    victim = worker()
    deadline = time.time() + 300
    while not any(r.info.status == "RUNNING" for r in cells()):
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.5)
    (dead,) = [r.info.run_id for r in cells() if r.info.status == "RUNNING"]
    out = killed_while_another_works(victim, worker)
    # it waited if its own cell ended before the dead one's heartbeat went stale
    assert f"its worker died (run {dead} ended KILLED); running it here" in out
    runs = cells()
    assert c.get_run(dead).info.status == "KILLED"
    assert "stale" in c.get_run(dead).data.tags["lossgeo_end_reason"]
    finished = sorted(
        (r.data.tags["cell"], r.data.tags["seed"]) for r in runs if r.info.status == "FINISHED"
    )
    assert finished == [("mlp/high-noise", "0"), ("mlp/low-noise", "0")]
    parent = c.get_run(runs[0].data.tags[PARENT_TAG])
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_sweep_worker_killed_mid_trial_is_retried_by_the_survivor(tmp_path, fake_data_dir):
    """SIGKILL one of two sweep workers mid-trial: the survivor printed "2 complete, 1
    running" and exited 0, leaving the trial RUNNING until a new worker was started by hand.
    Now it waits, the stale trial is failed and retried, and it runs the retry."""
    import time

    base = {**TINY_BASE, "data_dir": str(fake_data_dir), "epochs": 40}
    base.update(noise_scale=False, sharpness=False, pac_bayes=False, curvature=False)
    path = write_study(tmp_path, fake_data_dir, base=base, pruner="none")
    uri = copy_store(tmp_path)
    # stale only after 25 s: the survivor's own trial ends before, with the dead one RUNNING
    beat = ["--heartbeat-interval", "1", "--grace-period", "25"]

    def worker():
        return lossgeo_worker(
            tmp_path, uri, "sweep", "--study", str(path), "--n-trials", "2", *beat
        )

    storage = f"sqlite:///{tmp_path}/studies/optuna.db"
    c = MlflowClient(uri)
    victim = worker()
    deadline = time.time() + 300
    running = []
    while not running:  # the store, not the Optuna storage, which the victim is creating
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.5)
        running = [
            r
            for r in c.search_runs([c.get_experiment_by_name("Default").experiment_id])
            if r.info.status == "RUNNING" and "trial_number" in r.data.tags
        ]
    out = killed_while_another_works(victim, worker)
    study = optuna.load_study(study_name="tiny", storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], out[-3000:]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [str(t.number) for t in failed] == [running[0].data.tags["trial_number"]]
    assert "waiting for 1 trial(s) running elsewhere" in out
    assert "running" not in out.splitlines()[-4]  # the end line: "2 complete, 1 fail"
