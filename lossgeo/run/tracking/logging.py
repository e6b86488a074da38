"""Logging into a run: `TrackedRun` (a run lossgeo opened, with its heartbeat and its
end status) and `ActiveRunLogger` (the caller's active MLflow run, for the Tracker)."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .heartbeat import END_REASON_TAG, Heartbeat, _retrying
from .launcher import LauncherWatch, launcher_run_id, settle_launcher_status
from .lifecycle import ACTIVE_RUN_WATCH
from .store import (
    PARENT_TAG,
    check_artifact_access,
    client,
    experiment_id,
    mark_training_experiment,
)

# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
_MAX_METRICS, _MAX_PARAMS = 1000, 100


def _metric_batches(metrics: dict[str, float], step: int, timestamp: int) -> list[list[Metric]]:
    items = [
        Metric(key=k, value=float(v), timestamp=timestamp, step=step)
        for k, v in metrics.items()
        if v is not None
    ]
    return [items[i : i + _MAX_METRICS] for i in range(0, len(items), _MAX_METRICS)]


def _stringify(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _log_bytes(c: MlflowClient, run_id: str, path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        c.log_artifact(run_id, str(local), artifact_path=directory or None)


# the runs this process ended KILLED (an interrupted command says which, and only those)
ENDED_KILLED: list[str] = []


class TrackedRun:
    """One MLflow run; a context manager that ends it FINISHED, FAILED or KILLED.

    Under `mlflow run` it adopts the launcher's run (by default only a top-level run does;
    `adopt_launcher=True` also makes the launcher's run the child of `parent_run_id`);
    otherwise it creates one in `experiment` (as a child of `parent_run_id` when given).
    """

    def __init__(
        self,
        experiment: str = "Default",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        adopt_launcher: bool | None = None,
    ) -> None:
        self.client = client()
        self._tags = dict(tags or {})
        if adopt_launcher is None:
            adopt_launcher = parent_run_id is None
        adopted = run_id or (launcher_run_id() if adopt_launcher else None)
        if adopted and parent_run_id and not run_id:
            self._tags[PARENT_TAG] = parent_run_id
        if adopted:
            self.run_id = adopted
            info = self.client.get_run(adopted).info
            check_artifact_access(info.artifact_uri, f"run {adopted}")
            mark_training_experiment(self.client.get_experiment(info.experiment_id), self.client)
            if run_name and run_id is None:  # `mlflow run` names its run after the entry point
                self.client.set_tag(adopted, "mlflow.runName", run_name)
        else:
            tags_all = dict(self._tags)
            if parent_run_id:
                tags_all[PARENT_TAG] = parent_run_id
            exp_id = experiment_id(experiment, self.client)
            check_artifact_access(
                self.client.get_experiment(exp_id).artifact_location, f"experiment {experiment!r}"
            )
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags_all)
            self.run_id = run.info.run_id
        self.status: str | None = None

    def __enter__(self) -> "TrackedRun":
        if self._tags:
            self.set_tags(self._tags)
        self._heartbeat = Heartbeat(self.client, self.run_id)
        if self.run_id == launcher_run_id():
            self._launcher_watch = LauncherWatch()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is None:
            status = "FINISHED"
        elif (
            issubclass(exc_type, KeyboardInterrupt)
            or getattr(exc_type, "mlflow_status", "") == "KILLED"
        ):
            status = "KILLED"
            gone = self._launcher_watch.gone if self._launcher_watch is not None else None
            reason = {END_REASON_TAG: gone or str(exc) or "interrupted (SIGINT)"}
            _retrying(lambda: self.set_tags(reason))
        else:
            status = "FAILED"
        self.finish(status)
        if status == "KILLED":
            ENDED_KILLED.append(self.run_id)
        return False

    _heartbeat: "Heartbeat | None" = None
    _launcher_watch: "LauncherWatch | None" = None

    def keep_running(self) -> None:
        """Leave the run RUNNING when this process is done with it (a study's parent that
        another worker still works under): heartbeat stopped, no end status set."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._launcher_watch is not None:
            self._launcher_watch.stop()
        self.status = "RUNNING"

    def finish(self, status: str = "FINISHED") -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._launcher_watch is not None:
            self._launcher_watch.stop()
        if self.status is None:
            _retrying(lambda: self.client.set_terminated(self.run_id, status=status))
            self.status = status
            if status == "KILLED" and self.run_id == launcher_run_id():
                # once the launcher is gone, our parent is no longer it: name it
                watch = self._launcher_watch
                settle_launcher_status(self.run_id, status, watch.pid if watch else None)

    # -- logging ---------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged the -P values as typed; MLflow forbids changing
        # a param, so only the ones it did not log are added.
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _stringify(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """All of one epoch's metrics in one batched call, at step=epoch."""
        for batch in _metric_batches(metrics, epoch, int(time.time() * 1000)):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_epoch(step, metrics)

    def log_object(self, path: str, obj: Any) -> None:
        """Saves a torch-serialisable object (dict of tensors, state_dict) as artifact `path`."""
        self.log_bytes(path, _torch_bytes(obj))

    def log_bytes(self, path: str, data: bytes) -> None:
        _log_bytes(self.client, self.run_id, path, data)

    def log_text(self, path: str, text: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, path: str, figure: Any) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def log_figures(self, figures: Mapping[str, Any], prefix: str = "") -> None:
        """Log each matplotlib figure as `prefix + name` and close it (an open figure keeps
        its memory until closed, and a study draws dozens)."""
        import matplotlib.pyplot as plt

        for name, figure in figures.items():
            try:
                self.log_figure(prefix + name, figure)
            finally:
                plt.close(figure)

    def log_file(self, local_path: str | os.PathLike, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path=directory)


class ActiveRunLogger:
    """Logs into the caller's active MLflow run (`with mlflow.start_run():` in their own
    code), on the tracking URI they set; without an active run nothing is logged (the
    Tracker still returns its metrics). The run is looked up at every call, so a Tracker
    made before `mlflow.start_run` logs into it."""

    def _run_id(self) -> str | None:
        run = mlflow.active_run()
        if run is None:
            return None
        # from the first logged value on, the run gets lossgeo's lifecycle (`lifecycle.py`)
        ACTIVE_RUN_WATCH.watch(run.info.run_id)
        return run.info.run_id

    @property
    def active(self) -> bool:
        return self._run_id() is not None

    _marked: set[str] = set()  # experiments already tagged as model training

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        run = mlflow.active_run()
        if run is None:
            return
        ACTIVE_RUN_WATCH.watch(run.info.run_id)
        c = MlflowClient()
        if run.info.experiment_id not in self._marked:
            mark_training_experiment(c.get_experiment(run.info.experiment_id), c)
            self._marked.add(run.info.experiment_id)
        for batch in _metric_batches(metrics, step, int(time.time() * 1000)):
            c.log_batch(run.info.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        run_id = self._run_id()
        if run_id is not None:
            MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_object(self, path: str, obj: Any) -> None:
        run_id = self._run_id()
        if run_id is None:
            return
        _log_bytes(MlflowClient(), run_id, path, _torch_bytes(obj))

    def describe(self) -> str:
        """Where the metrics went, for the user's log."""
        run = mlflow.active_run()
        if run is None:
            return "no active MLflow run: nothing logged"
        return (
            f"MLflow run {run.info.run_id} in experiment {run.info.experiment_id} "
            f"at {mlflow.get_tracking_uri()}"
        )
