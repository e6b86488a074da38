"""The only module that talks to MLflow.

Everything goes through an explicit `MlflowClient` and run id rather than the fluent
"active run", which is thread-local: Optuna trials in threads (n_jobs > 1) and worker
processes each create their child runs with an explicit parent id.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .errors import UserInputError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
_MAX_METRICS, _MAX_PARAMS = 1000, 100


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow 3's default: sqlite:///mlflow.db here."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def check_artifact_access(artifact_uri: str, where: str) -> None:
    """An `mlflow server` / `mlflow ui` that created the store gives its experiments
    `mlflow-artifacts:` locations, which only a client talking to that server can write.
    Say so in one line before anything is logged, instead of failing at the first artifact."""
    if artifact_uri.startswith("mlflow-artifacts:") and not tracking_uri().startswith("http"):
        raise UserInputError(
            f"MLflow: {where} keeps its artifacts on an MLflow server ({artifact_uri}) but the "
            f"tracking URI is {tracking_uri()}; set MLFLOW_TRACKING_URI to that server "
            "(e.g. http://127.0.0.1:5000 for `mlflow ui`)")


def launcher_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def experiment_id(name: str, c: MlflowClient | None = None) -> str:
    c = c or client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our lookup and create.
        return c.get_experiment_by_name(name).experiment_id


def mark_launcher_run_rejected(message: str) -> None:
    """Bad input under `mlflow run`: the launcher created its run before our code started
    (and marks it FAILED when we exit), so all we can do is say why on that run. Deleting
    it would crash the launcher's own status update."""
    run_id = launcher_run_id()
    if run_id:
        client().set_tag(run_id, "rejected_input", message)


def _metric_batches(metrics: dict[str, float], step: int, timestamp: int) -> list[list[Metric]]:
    items = [Metric(key=k, value=float(v), timestamp=timestamp, step=step)
             for k, v in metrics.items() if v is not None]
    return [items[i:i + _MAX_METRICS] for i in range(0, len(items), _MAX_METRICS)]


def _stringify(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


class TrackedRun:
    """One MLflow run; a context manager that ends it FINISHED, FAILED or KILLED.

    Under `mlflow run` it adopts the launcher's run; otherwise it creates one in
    `experiment` (as a child of `parent_run_id` when given).
    """

    def __init__(self, experiment: str = "lossgeo", run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None) -> None:
        self.client = client()
        self._tags = dict(tags or {})
        adopted = run_id or (launcher_run_id() if parent_run_id is None else None)
        if adopted:
            self.run_id = adopted
            check_artifact_access(self.client.get_run(adopted).info.artifact_uri,
                                  f"run {adopted}")
        else:
            tags_all = dict(self._tags)
            if parent_run_id:
                tags_all[PARENT_TAG] = parent_run_id
            exp_id = experiment_id(experiment, self.client)
            check_artifact_access(self.client.get_experiment(exp_id).artifact_location,
                                  f"experiment {experiment!r}")
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags_all)
            self.run_id = run.info.run_id
        self.status: str | None = None

    def __enter__(self) -> "TrackedRun":
        if self._tags:
            self.set_tags(self._tags)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt) or getattr(exc_type, "mlflow_status", "") == "KILLED":
            status = "KILLED"
        else:
            status = "FAILED"
        self.finish(status)
        return False

    def finish(self, status: str = "FINISHED") -> None:
        if self.status is None:
            self.client.set_terminated(self.run_id, status=status)
            self.status = status

    # -- logging ---------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged the -P values as typed; MLflow forbids changing
        # a param, so only the ones it did not log are added.
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _stringify(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS])

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
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.log_bytes(path, buffer.getvalue())

    def log_bytes(self, path: str, data: bytes) -> None:
        directory, name = os.path.split(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            self.client.log_artifact(self.run_id, str(local), artifact_path=directory or None)

    def log_text(self, path: str, text: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, path: str, figure: Any) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def log_file(self, local_path: str | os.PathLike, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path=directory)


# -- reading back --------------------------------------------------------------------------

def download_artifact(run_id: str, path: str, dst: str | os.PathLike) -> Path:
    return Path(client().download_artifacts(run_id, path, str(dst)))


def load_artifact_object(run_id: str, path: str, weights_only: bool = True) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        return torch.load(local, map_location="cpu", weights_only=weights_only)


def get_run(run_id: str):
    return client().get_run(run_id)


def search_runs(experiment_names: Iterable[str] | None = None, filter_string: str = "",
                experiment_ids: Iterable[str] | None = None):
    """Runs as a pandas DataFrame (mlflow.search_runs)."""
    client()  # sets the tracking URI
    return mlflow.search_runs(experiment_names=list(experiment_names) if experiment_names else None,
                              experiment_ids=list(experiment_ids) if experiment_ids else None,
                              filter_string=filter_string, output_format="pandas",
                              max_results=100000)
