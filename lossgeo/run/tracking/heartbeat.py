"""Heartbeats of live runs, and ending runs whose process died without a word (SIGKILL,
a lost machine) once their heartbeat is stale."""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from lossgeo.run.periodic import Periodic

from .store import client

# A live run refreshes this tag (epoch milliseconds) every HEARTBEAT_INTERVAL seconds, so that
# a run whose process died without a word (SIGKILL, a lost machine) can be told from a live one.
HEARTBEAT_TAG = "lossgeo_heartbeat"


HEARTBEAT_INTERVAL_TAG = "lossgeo_heartbeat_interval"


END_REASON_TAG = "lossgeo_end_reason"


DEFAULT_STALE_AFTER = 300.0


def heartbeat_interval() -> float:
    """Seconds between heartbeats: $LOSSGEO_HEARTBEAT_INTERVAL, else 30."""
    return float(os.environ.get("LOSSGEO_HEARTBEAT_INTERVAL") or 30)


def _retrying(call: Any, attempts: int = 5) -> Any:
    """`call()`, tried again after a pause when the store refuses it (a SQLite store that
    another process holds locked: the end of a run must not be lost to it)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


class Heartbeat:
    """Refreshes a run's heartbeat tag from a daemon thread until `stop()`: the run is alive
    while the tag is recent. `runs cleanup` ends runs whose heartbeat went stale."""

    def __init__(self, c: MlflowClient, run_id: str, interval: float | None = None) -> None:
        self.client, self.run_id = c, run_id
        self.interval = interval or heartbeat_interval()
        self._beat(RunTag(HEARTBEAT_INTERVAL_TAG, f"{self.interval:g}"))
        self._periodic = Periodic(self._beat, self.interval, name=f"heartbeat-{run_id[:8]}")

    def _beat(self, *extra: RunTag) -> None:
        try:
            self.client.log_batch(
                self.run_id, tags=[RunTag(HEARTBEAT_TAG, str(int(time.time() * 1000))), *extra]
            )
        except Exception:
            # A missed beat is retried at the next interval. Several workers beat a study's
            # parent; MLflow's SQL store inserts a new tag after looking for it, so two first
            # beats at once can collide (measured: UniqueViolation on PostgreSQL), and the
            # other worker's beat refreshed the same tag anyway.
            pass

    def stop(self) -> None:
        self._periodic.stop()


def end_stale_runs(
    experiments: Iterable[str] | None = None,
    stale_after: float = DEFAULT_STALE_AFTER,
    *,
    min_intervals: float = 3,
    ended_by: str = "lossgeo runs cleanup",
) -> list[tuple[str, float]]:
    """Ends KILLED every RUNNING run whose heartbeat is older than `stale_after` seconds (and
    `min_intervals` of its own heartbeat intervals: 0 honours `stale_after` alone), with a
    tag saying why and who (`ended_by`); returns (run_id, age in s) of each. Runs without a
    heartbeat (not started by lossgeo) are left alone."""
    c = client()
    if experiments:
        ids = [
            e.experiment_id
            for name in experiments
            if (e := c.get_experiment_by_name(name)) is not None
        ]
    else:
        ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return []
    now = time.time()
    ended = []
    for run in c.search_runs(ids, "attributes.status = 'RUNNING'", max_results=50000):
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if not beat:
            continue
        interval = float(run.data.tags.get(HEARTBEAT_INTERVAL_TAG) or heartbeat_interval())
        age = now - int(beat) / 1000
        if age > max(stale_after, min_intervals * interval):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(beat) / 1000))
            c.set_tag(
                run.info.run_id,
                END_REASON_TAG,
                f"stale: no heartbeat since {since} ({age:.0f} s); the process was "
                f"killed or its machine lost; ended by {ended_by}",
            )
            c.set_terminated(run.info.run_id, status="KILLED")
            ended.append((run.info.run_id, age))
    return ended


def start_heartbeat(run_id: str) -> "Heartbeat":
    return Heartbeat(client(), run_id)
