"""Opening the MLflow store: the tracking URI, a store created under a lock (MLflow's
schema migration is not safe against concurrent first starts), experiments."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from lossgeo.errors import UserInputError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


PARENT_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow 3's default: sqlite:///mlflow.db here."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# URI -> None once opened, or the one-line error it gave (not retried: a dead server would
# cost another timeout in the error path itself).
_store_state: dict[str, UserInputError | None] = {}


def client() -> MlflowClient:
    """A client for `tracking_uri()`; the first call per process and URI opens the store
    safely (see `_open_store`)."""
    uri = tracking_uri()
    if uri not in _store_state:
        try:
            _open_store(uri)
        except UserInputError as exc:
            _store_state[uri] = exc
            raise
        _store_state[uri] = None
    error = _store_state[uri]
    if error is not None:
        raise error
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on a folder (no lock file left beside the user's store)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# the key of the PostgreSQL advisory lock and the name of MySQL's named lock under which
# lossgeo lets MLflow create a database store's schema
SCHEMA_LOCK_KEY = 0x6C6F737367656F  # "lossgeo"
SCHEMA_LOCK_NAME = "lossgeo_mlflow_schema"


@contextlib.contextmanager
def _database_lock(uri: str):
    """A lock held in the database itself while MLflow creates its schema: PostgreSQL's
    session advisory lock, MySQL's GET_LOCK. MLflow's schema creation is not safe against a
    second process (three workers on a fresh PostgreSQL store: two crashed with
    UniqueViolation on pg_type). Other databases get no lock (see `_open_store`'s retry)."""
    import sqlalchemy

    dialect = uri.split(":", 1)[0].split("+", 1)[0]
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            values: dict[str, int | str]
            if dialect == "postgresql":
                take, give = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
                values = {"key": SCHEMA_LOCK_KEY}
            else:
                take, give = "SELECT GET_LOCK(:name, 600)", "SELECT RELEASE_LOCK(:name)"
                values = {"name": SCHEMA_LOCK_NAME}
            connection.execute(sqlalchemy.text(take), values)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(give), values)
    finally:
        engine.dispose()


def _open_database_store(uri: str, attempts: int = 3) -> None:
    """Creates or migrates a database store under `_database_lock`; where no lock exists
    for the database, a creation that lost a race is retried (the winner's schema is then
    there to find)."""
    for attempt in range(attempts):
        try:
            with _database_lock(uri):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            return
        except Exception as exc:
            lost_race = "already exists" in str(exc) or "UniqueViolation" in str(exc)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)


def _open_store(uri: str) -> None:
    """A tracking server that does not answer fails fast, in one line, instead of after
    MLflow's minutes of retries; a SQLite store is created under a lock, because MLflow's
    schema creation is not safe against a second process doing the same (measured: three
    processes on a fresh mlflow.db all crashed in the migration and left the store broken);
    a database store under a lock in the database (`_open_database_store`)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(
                f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                timeout=10,
            )
        except requests.RequestException as exc:
            raise UserInputError(
                f"MLFLOW_TRACKING_URI: no MLflow tracking server answers at {uri} "
                f"({type(exc).__name__}); start it or point MLFLOW_TRACKING_URI elsewhere"
            ) from None
        return
    try:
        if uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///") :]).resolve().parent
            if not folder.is_dir():
                raise UserInputError(
                    f"MLFLOW_TRACKING_URI: folder {folder} of {uri} does not exist"
                )
            with _folder_lock(folder):
                MlflowClient(tracking_uri=uri)  # creates and migrates the store if it is new
        else:
            _open_database_store(uri)
    except UserInputError:
        raise
    except Exception as exc:  # a file that is no database, a refused file store, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "filesystem tracking backend" in text:
            text = (
                "MLflow 3 refuses the file store; migrate it with `mlflow migrate-filestore` "
                "or set MLFLOW_ALLOW_FILE_STORE=true"
            )
        raise UserInputError(
            f"MLFLOW_TRACKING_URI: cannot open the MLflow store {uri} "
            f"({type(exc).__name__}: {text[:200]})"
        ) from None


def require_store() -> None:
    """For commands that only read runs: a store that does not exist is said in one line
    instead of created empty (a 1 MB mlflow.db and a minute of migrations, to find nothing)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).resolve()
        if not path.exists():
            raise UserInputError(
                f"MLflow: no store here ({path} does not exist); run where your mlflow.db is, "
                "or point MLFLOW_TRACKING_URI at it (sqlite:////abs/path/mlflow.db or "
                "http://host:5000)"
            )
    client()


def check_artifact_access(artifact_uri: str, where: str) -> None:
    """Artifacts must be writable, checked before anything is logged instead of failing at
    the first artifact: an `mlflow server` / `mlflow ui` that created the store gives its
    experiments `mlflow-artifacts:` locations, which only a client talking to that server can
    write; a local folder must be writable by this user."""
    if artifact_uri.startswith("mlflow-artifacts:") and not tracking_uri().startswith("http"):
        raise UserInputError(
            f"MLflow: {where} keeps its artifacts on an MLflow server ({artifact_uri}) but the "
            f"tracking URI is {tracking_uri()}; set MLFLOW_TRACKING_URI to that server "
            "(e.g. http://127.0.0.1:5000 for `mlflow ui`)"
        )
    local = _local_path(artifact_uri)
    if local is not None:
        existing = local
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserInputError(
                f"MLflow: {where} stores artifacts under {local}, which is not "
                f"writable ({existing} is read-only for this user)"
            )


def _local_path(artifact_uri: str) -> Path | None:
    """The folder of a local artifact location (file: URI or plain path), else None."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        return Path(artifact_uri)
    return None


# MLflow 3 UIs that read this tag open an experiment without it in their GenAI view (an empty
# "Traces" page); with it, on its runs. 3.17 decides by a global switch instead (`ui_link`).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(name: str, c: MlflowClient | None = None) -> str:
    """The id of experiment `name`, created if need be, and tagged as a model-training
    experiment where it has no kind yet (a user's own kind is left alone)."""
    c = c or client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            # Another worker created it between our lookup and create.
            exp = c.get_experiment_by_name(name)
            assert exp is not None
    mark_training_experiment(exp, c)
    return exp.experiment_id


def mark_training_experiment(exp: Any, c: MlflowClient) -> None:
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent calls read a process-wide URI: set it for the call only, so that
    lossgeo never changes the URI of the caller's own mlflow code."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
