"""Reading and managing runs by id: artifacts, searches, creating, ending and reopening
runs, metric histories, links to the UI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
import torch
from mlflow.entities import RunTag

from lossgeo.errors import UserInputError

from .heartbeat import END_REASON_TAG
from .store import PARENT_TAG, _fluent_uri, client, experiment_id, tracking_uri

# MLflow draws a "Downloading artifacts" bar for every file, three a run in `report`: lossgeo
# reads artifacts as part of a command that reports itself (a user's setting is kept)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ui_link(run_id: str) -> str:
    """Where the run's experiment opens on its runs in the MLflow UI: the tracking server's
    address, else `mlflow ui`'s default. MLflow 3.17's UI picks its view from a global
    GenAI / Model training switch (its experimentKind tag no longer decides), which
    `workflowType=machine_learning` in the address sets."""
    run = get_run(run_id)
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning"


def download_artifact(run_id: str, path: str, dst: str | os.PathLike) -> Path:
    return Path(client().download_artifacts(run_id, path, str(dst)))


def has_artifact(run_id: str, path: str) -> bool:
    folder = os.path.dirname(path) or None
    return path in {a.path for a in client().list_artifacts(run_id, folder)}


def load_artifact_object(run_id: str, path: str, weights_only: bool = True) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        return torch.load(local, map_location="cpu", weights_only=weights_only)


def get_run(run_id: str):
    """The run, or a one-line UserInputError when the store has no such run (a store that
    cannot be reached says so itself, in `client()`)."""
    c = client()
    try:
        return c.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserInputError(f"run_id: no run {run_id!r} in {tracking_uri()}") from None
        raise


def search_runs(
    experiment_names: Iterable[str] | None = None,
    filter_string: str = "",
    experiment_ids: Iterable[str] | None = None,
):
    """Runs as a pandas DataFrame (mlflow.search_runs)."""
    client()  # opens the store safely first
    with _fluent_uri(tracking_uri()):
        return mlflow.search_runs(
            experiment_names=list(experiment_names) if experiment_names else None,
            experiment_ids=list(experiment_ids) if experiment_ids else None,
            filter_string=filter_string,
            output_format="pandas",
            max_results=100000,
        )


def find_runs(
    experiment: str,
    filter_string: str,
    *,
    order_by: list[str] | None = None,
    max_results: int = 50000,
) -> list:
    """Run entities of `experiment` matching an MLflow filter string."""
    c = client()
    return c.search_runs(
        [experiment_id(experiment, c)], filter_string, order_by=order_by, max_results=max_results
    )


def finished_child_runs(parent_run_id: str) -> list:
    """The FINISHED child runs of a parent run (its experiment), oldest first, as runs."""
    c = client()
    parent = get_run(parent_run_id)
    return c.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )


def finished_children(parent_run_id: str) -> list[str]:
    """Ids of the FINISHED child runs of a parent run (its experiment), oldest first."""
    return [r.info.run_id for r in finished_child_runs(parent_run_id)]


def create_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    c = client()
    return c.create_run(experiment_id(experiment, c), run_name=run_name, tags=tags).info.run_id


def find_or_create_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """The id of the experiment's run carrying all of `tags` (the oldest, if several
    workers raced), else of a new FINISHED one named `run_name`: a folder of runs."""
    c = client()
    exp_id = experiment_id(experiment, c)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run_id = c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    c.set_terminated(run_id, status="FINISHED")
    return run_id


def delete_run(run_id: str) -> None:
    client().delete_run(run_id)


def end_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tags (e.g. why), then the terminal status."""
    c = client()
    if tags:
        c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    c.set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """RUNNING again (a study resumed), without the end reason of its earlier stop."""
    c = client()
    c.update_run(run_id, status="RUNNING")
    if END_REASON_TAG in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, END_REASON_TAG)


def run_experiment_name(run_id: str) -> str:
    c = client()
    return c.get_experiment(c.get_run(run_id).info.experiment_id).name


def experiment_exists(name: str) -> bool:
    return client().get_experiment_by_name(name) is not None


def run_metric_keys(run_id: str) -> list[str]:
    return list(client().get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of one metric."""
    return [(m.step, m.value) for m in client().get_metric_history(run_id, key)]
