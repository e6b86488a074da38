"""Optuna storage for sweeps: SQLite for one machine, PostgreSQL (or any RDB URL) for many
workers; the budget lock and the trials' heartbeats."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import optuna

from lossgeo.errors import UserInputError
from lossgeo.run.periodic import Periodic
from lossgeo.run.tracking import end_run

DEFAULT_STORAGE = "sqlite:///studies/optuna.db"


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL, its folder created; None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_storage(
    url: str | None = None, *, heartbeat_interval: int = 10, grace_period: int = 30
) -> optuna.storages.RDBStorage:
    url = url or DEFAULT_STORAGE
    # heartbeats and the retry callback are marked experimental by Optuna
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sqlite_file(url)
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=FailRunAndRetry(max_retry=3),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
        )
    except Exception as exc:  # bad URL, unreachable server, missing driver
        raise UserInputError(
            f"storage: cannot open {url} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


class BudgetLock:
    """Serialises "count the claimed trials, then ask for one" across workers, so that
    concurrent workers never overshoot the global budget (Optuna's MaxTrialsCallback checks
    only after a trial ends, and two workers then both start the last one: measured 7 of 6).
    PostgreSQL: a session advisory lock; SQLite: a file lock beside the database; other
    databases: a process-local lock only."""

    _local = threading.Lock()

    def __init__(self, url: str, study_name: str) -> None:
        import zlib

        self.url, self.key = url, zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        self._engine = None
        if url.startswith("postgresql"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def __enter__(self) -> "BudgetLock":
        self._local.acquire()
        try:
            if self._engine is not None:
                import sqlalchemy

                self._conn = self._engine.connect()
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            elif self.url.startswith("sqlite:///"):
                import fcntl

                self._file = open(f"{sqlite_file(self.url)}.lock", "a")
                fcntl.flock(self._file, fcntl.LOCK_EX)
        except BaseException:
            # e.g. an unreachable server: __exit__ will not run, and a held process-wide lock
            # would hang the next sweep in this process forever
            self._local.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._engine is not None:
                import sqlalchemy

                self._conn.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}
                )
                self._conn.close()
            elif self.url.startswith("sqlite:///"):
                import fcntl

                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
        finally:
            self._local.release()


def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int) -> Periodic:
    """Records the trial's heartbeat now and every `interval` s until `stop()`."""
    storage.record_heartbeat(trial_id)
    return Periodic(
        lambda: storage.record_heartbeat(trial_id), interval, name=f"trial-heartbeat-{trial_id}"
    )


class FailRunAndRetry:
    """Called by Optuna for a trial whose worker stopped sending heartbeats: its MLflow run
    is ended FAILED (it would otherwise stay RUNNING forever) and the trial is retried."""

    def __init__(self, max_retry: int = 3) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                end_run(run_id, "FAILED", {"failure": "worker lost: no heartbeat"})
            except Exception:  # the retry matters more than the bookkeeping
                pass
        self.retry(study, trial)
