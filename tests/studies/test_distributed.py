"""Many workers on one study: a real PostgreSQL (Optuna storage and MLflow backend store) and
a real `mlflow server` on 127.0.0.1, worker processes started as a user would start them.

Needs LOSSGEO_TEST_POSTGRES=postgresql://user@127.0.0.1:PORT/postgres (.ci/run starts one)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
import yaml

from lossgeo.run.tracking import client as MlflowClient  # follows MLFLOW_TRACKING_URI

from .test_study import TINY_BASE

POSTGRES = os.environ.get("LOSSGEO_TEST_POSTGRES")
pytestmark = [
    pytest.mark.skipif(
        not POSTGRES, reason="LOSSGEO_TEST_POSTGRES not set (.ci/run starts a PostgreSQL server)"
    ),
    pytest.mark.slow,  # several workers on one study: the full tier
]


def create_database(name: str) -> str:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES.rsplit("/", 1)[0] + f"/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` with a PostgreSQL backend store, on 127.0.0.1."""
    backend = create_database(f"mlflow_{uuid.uuid4().hex[:8]}")
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
        if server.poll() is not None:
            raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-2000:])
    else:
        server.kill()
        raise RuntimeError("mlflow server did not start in 120 s")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    yield url
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def study_file(tmp_path, data_dir, epochs=2):
    path = tmp_path / "dist.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "dist",
                "kind": "sweep",
                "sampler": "random",
                "pruner": "none",
                "base": {**TINY_BASE, "epochs": epochs, "data_dir": str(data_dir)},
                "search_space": {
                    "lr": {"low": 0.01, "high": 0.2, "log": True},
                    "batch_size": {"choices": [16, 32]},
                },
            }
        )
    )
    return path


def worker(study_path, storage, tmp_path, name, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lossgeo",
            "sweep",
            "--study",
            str(study_path),
            "--storage",
            storage,
            "--experiment",
            "distributed",
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )


def check_one_child_run_per_trial(study: optuna.Study):
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    parents = client.search_runs([experiment], "tags.lossgeo_role = 'parent'")
    assert [r.info.run_id for r in parents] == [parent]
    by_trial = {}
    for run in children:
        by_trial.setdefault(run.data.tags["trial_number"], []).append(run)
    assert all(len(runs) == 1 for runs in by_trial.values())
    assert sorted(int(k) for k in by_trial) == sorted(t.number for t in study.trials)
    for trial in study.trials:
        run = by_trial[str(trial.number)][0]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "lambda_max")
            assert [m.step for m in history] == [0, 1, 2][: len(history)] and history
    return children


def test_two_workers_share_one_study_and_one_parent(mlflow_server, tmp_path, fake_data_dir):
    storage = create_database(f"optuna_{uuid.uuid4().hex[:8]}")
    path = study_file(tmp_path, fake_data_dir)
    workers = [worker(path, storage, tmp_path, f"w{i}", "--n-trials", "6") for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    study = optuna.load_study(study_name="dist", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 6 and len(states) == 6, states
    # both workers ran trials
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert all("study dist:" in log for log in logs)
    children = check_one_child_run_per_trial(study)
    assert len(children) == 6


def test_killed_worker_trial_is_failed_retried_and_study_completes(
    mlflow_server, tmp_path, fake_data_dir
):
    storage = create_database(f"optuna_{uuid.uuid4().hex[:8]}")
    path = study_file(tmp_path, fake_data_dir, epochs=40)
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    victim = worker(path, storage, tmp_path, "victim", "--n-trials", "2", *beat)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until its first trial is running
        try:
            study = optuna.load_study(study_name="dist", storage=storage)
            running = [
                t
                for t in study.trials
                if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs
            ]
            if running:
                break
        except KeyError:
            pass
        assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
        time.sleep(1)
    time.sleep(3)  # mid-trial
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = running[0]
    time.sleep(5)  # past the grace period without heartbeats
    short = study_file(tmp_path, fake_data_dir, epochs=2)
    rescuer = worker(short, storage, tmp_path, "rescuer", "--n-trials", "2", *beat)
    assert rescuer.wait(timeout=600) == 0, (tmp_path / "rescuer.log").read_text()[-3000:]
    study = optuna.load_study(study_name="dist", storage=storage)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed.number].state.name == "FAIL"
    retries = [
        t
        for t in study.trials
        if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number
    ]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == killed.params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    # the killed trial's MLflow run is marked failed, not left running
    assert MlflowClient().get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    check_one_child_run_per_trial(study)


def test_two_workers_run_every_point_of_a_designed_grid_once(
    mlflow_server, tmp_path, fake_data_dir
):
    """sampler: grid on PostgreSQL: each of the 6 points enqueued once and run once though
    two workers start together; never pruned; the parent ends FINISHED."""
    storage = create_database(f"optuna_{uuid.uuid4().hex[:8]}")
    path = tmp_path / "design.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "design",
                "kind": "sweep",
                "sampler": "grid",
                "n_trials": 50,
                "base": {**TINY_BASE, "epochs": 1, "data_dir": str(fake_data_dir)},
                "search_space": {
                    "lr": {"choices": {"log_space": [0.01, 0.1, 3]}},
                    "batch_size": {"choices": [16, 32]},
                },
            }
        )
    )
    workers = [worker(path, storage, tmp_path, f"g{i}") for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=600) == 0, (tmp_path / f"g{i}.log").read_text()[-3000:]
    study = optuna.load_study(study_name="design", storage=storage)
    points = sorted((t.params["lr"], t.params["batch_size"]) for t in study.trials)
    assert points == sorted((lr, b) for lr in (0.01, 0.0316228, 0.1) for b in (16, 32))
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    check_one_child_run_per_trial(study)
    parent = MlflowClient().get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
