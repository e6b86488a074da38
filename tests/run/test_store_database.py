"""Several processes opening one fresh PostgreSQL MLflow store at once: MLflow's schema
creation is not safe against a second process (two of three workers crashed with
UniqueViolation on pg_type_typname_nsp_index); lossgeo serialises it with an advisory lock.
Needs LOSSGEO_TEST_POSTGRES (.ci/run starts a PostgreSQL server)."""

import os
import subprocess
import sys
import uuid

import pytest

POSTGRES = os.environ.get("LOSSGEO_TEST_POSTGRES")
pytestmark = [
    pytest.mark.skipif(
        not POSTGRES, reason="LOSSGEO_TEST_POSTGRES not set (.ci/run starts a PostgreSQL server)"
    ),
    pytest.mark.slow,  # three processes on a database: the full tier
]

OPEN = (
    "from lossgeo.run.tracking import client, create_run; "
    "client().search_experiments(); create_run('Default', 'probe', {}); print('opened')"
)


def fresh_database() -> str:
    import psycopg

    name = f"mlflow_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES.rsplit("/", 1)[0] + f"/{name}"


def test_three_processes_open_a_fresh_postgresql_store_together():
    uri = fresh_database()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(outputs)
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs(["0"])
    assert len(runs) == 3  # one store, every worker's run in it
