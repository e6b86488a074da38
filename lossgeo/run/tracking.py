"""The only module that talks to MLflow.

Everything goes through an explicit `MlflowClient` and run id rather than the fluent
"active run", which is thread-local: Optuna trials in threads (n_jobs > 1) and worker
processes each create their child runs with an explicit parent id.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Literal

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lossgeo.errors import UserInputError
from lossgeo.run.periodic import Periodic

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
# A live run refreshes this tag (epoch milliseconds) every HEARTBEAT_INTERVAL seconds, so that
# a run whose process died without a word (SIGKILL, a lost machine) can be told from a live one.
HEARTBEAT_TAG = "lossgeo_heartbeat"
HEARTBEAT_INTERVAL_TAG = "lossgeo_heartbeat_interval"
END_REASON_TAG = "lossgeo_end_reason"
DEFAULT_STALE_AFTER = 300.0
# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
_MAX_METRICS, _MAX_PARAMS = 1000, 100


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


def heartbeat_interval() -> float:
    """Seconds between heartbeats: $LOSSGEO_HEARTBEAT_INTERVAL, else 30."""
    return float(os.environ.get("LOSSGEO_HEARTBEAT_INTERVAL") or 30)


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


def _open_store(uri: str) -> None:
    """A tracking server that does not answer fails fast, in one line, instead of after
    MLflow's minutes of retries; a SQLite store is created under a lock, because MLflow's
    schema creation is not safe against a second process doing the same (measured: three
    processes on a fresh mlflow.db all crashed in the migration and left the store broken)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                         params={"max_results": 1}, timeout=10)
        except requests.RequestException as exc:
            raise UserInputError(
                f"MLFLOW_TRACKING_URI: no MLflow tracking server answers at {uri} "
                f"({type(exc).__name__}); start it or point MLFLOW_TRACKING_URI elsewhere"
            ) from None
        return
    try:
        if uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///"):]).resolve().parent
            if not folder.is_dir():
                raise UserInputError(
                    f"MLFLOW_TRACKING_URI: folder {folder} of {uri} does not exist")
            with _folder_lock(folder):
                MlflowClient(tracking_uri=uri)  # creates and migrates the store if it is new
        else:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except UserInputError:
        raise
    except Exception as exc:  # a file that is no database, a refused file store, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "filesystem tracking backend" in text:
            text = ("MLflow 3 refuses the file store; migrate it with `mlflow migrate-filestore` "
                    "or set MLFLOW_ALLOW_FILE_STORE=true")
        raise UserInputError(f"MLFLOW_TRACKING_URI: cannot open the MLflow store {uri} "
                             f"({type(exc).__name__}: {text[:200]})") from None


def require_store() -> None:
    """For commands that only read runs: a store that does not exist is said in one line
    instead of created empty (a 1 MB mlflow.db and a minute of migrations, to find nothing)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        if not path.exists():
            raise UserInputError(
                f"MLflow: no store here ({path} does not exist); run where your mlflow.db is, "
                "or point MLFLOW_TRACKING_URI at it (sqlite:////abs/path/mlflow.db or "
                "http://host:5000)")
    client()


def default_experiment() -> str:
    """Where runs go when no experiment is named, the same for `mlflow run` and the CLI:
    the launcher's experiment under `mlflow run`, else $MLFLOW_EXPERIMENT_NAME, else
    MLflow's "Default"."""
    c = client()
    launcher = launcher_run_id()
    if launcher:
        return c.get_experiment(c.get_run(launcher).info.experiment_id).name
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return c.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"]).name
    return "Default"


def resolve_experiment(name: str | None) -> str:
    """The experiment a command writes to: `name`, else `default_experiment()`. Under
    `mlflow run` the launcher has already put its run in an experiment; another name would
    split the run tree across two experiments, so it is refused."""
    default = default_experiment()
    if name and launcher_run_id() and name != default:
        raise UserInputError(
            f"experiment: under `mlflow run` runs go to the launcher's experiment "
            f"({default!r}); choose it with `mlflow run --experiment-name {name}` instead")
    return name or default


def check_artifact_access(artifact_uri: str, where: str) -> None:
    """Artifacts must be writable, checked before anything is logged instead of failing at
    the first artifact: an `mlflow server` / `mlflow ui` that created the store gives its
    experiments `mlflow-artifacts:` locations, which only a client talking to that server can
    write; a local folder must be writable by this user."""
    if artifact_uri.startswith("mlflow-artifacts:") and not tracking_uri().startswith("http"):
        raise UserInputError(
            f"MLflow: {where} keeps its artifacts on an MLflow server ({artifact_uri}) but the "
            f"tracking URI is {tracking_uri()}; set MLFLOW_TRACKING_URI to that server "
            "(e.g. http://127.0.0.1:5000 for `mlflow ui`)")
    local = _local_path(artifact_uri)
    if local is not None:
        existing = local
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserInputError(f"MLflow: {where} stores artifacts under {local}, which is not "
                                 f"writable ({existing} is read-only for this user)")


def _local_path(artifact_uri: str) -> Path | None:
    """The folder of a local artifact location (file: URI or plain path), else None."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        return Path(artifact_uri)
    return None


def launcher_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


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


def ui_link(run_id: str) -> str:
    """Where the run's experiment opens on its runs in the MLflow UI: the tracking server's
    address, else `mlflow ui`'s default. MLflow 3.17's UI picks its view from a global
    GenAI / Model training switch (its experimentKind tag no longer decides), which
    `workflowType=machine_learning` in the address sets."""
    run = get_run(run_id)
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return (f"{base}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning")


def mark_training_experiment(exp: Any, c: MlflowClient) -> None:
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def launcher_pid() -> int:
    """The `mlflow run` process that started us: the nearest ancestor whose command line
    names mlflow (it runs us through `bash -c`), else our parent."""
    pid = os.getppid()
    try:
        while pid > 1:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"mlflow" in cmdline:
                return pid
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):  # no /proc (not Linux)
        pass
    return os.getppid()


def settle_launcher_status(run_id: str, status: str, pid: int | None = None) -> None:
    """The launcher (process `pid`, found if not given) overwrites our final status after we
    exit (see lossgeo/run/settle.py); a detached helper sets it again once the launcher has
    gone."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-m", "lossgeo.run.settle", run_id, status,
                      str(pid or launcher_pid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


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


class TrackedRun:
    """One MLflow run; a context manager that ends it FINISHED, FAILED or KILLED.

    Under `mlflow run` it adopts the launcher's run (by default only a top-level run does;
    `adopt_launcher=True` also makes the launcher's run the child of `parent_run_id`);
    otherwise it creates one in `experiment` (as a child of `parent_run_id` when given).
    """

    def __init__(self, experiment: str = "Default", run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None, adopt_launcher: bool | None = None) -> None:
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
            mark_training_experiment(self.client.get_experiment(info.experiment_id),
                                     self.client)
            if run_name and run_id is None:  # `mlflow run` names its run after the entry point
                self.client.set_tag(adopted, "mlflow.runName", run_name)
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
        self._heartbeat = Heartbeat(self.client, self.run_id)
        if self.run_id == launcher_run_id():
            self._launcher_watch = LauncherWatch()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is None:
            status = "FINISHED"
        elif (issubclass(exc_type, KeyboardInterrupt)
              or getattr(exc_type, "mlflow_status", "") == "KILLED"):
            status = "KILLED"
            gone = self._launcher_watch.gone if self._launcher_watch is not None else None
            reason = {END_REASON_TAG: gone or str(exc) or "interrupted (SIGINT)"}
            _retrying(lambda: self.set_tags(reason))
        else:
            status = "FAILED"
        self.finish(status)
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
        self.log_bytes(path, _torch_bytes(obj))

    def log_bytes(self, path: str, data: bytes) -> None:
        _log_bytes(self.client, self.run_id, path, data)

    def log_text(self, path: str, text: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, path: str, figure: Any) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def log_file(self, local_path: str | os.PathLike, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path=directory)


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


class LauncherWatch:
    """Under `mlflow run`: once the launcher process is gone (`kill <its pid>` ends it at
    once and leaves us running, reparented), this process is sent SIGTERM, so that its run
    ends KILLED as if the launcher had passed the signal on, not FINISHED hours later."""

    def __init__(self, interval: float = 1.0) -> None:
        import signal

        self.pid = launcher_pid()
        self.gone: str | None = None
        self._signal = signal.SIGTERM
        self._periodic = Periodic(self._check, interval, name="launcher-watch")

    def _check(self) -> None:
        from lossgeo.run.settle import alive

        if self.gone is None and not alive(self.pid):
            self.gone = (f"interrupted: the `mlflow run` launcher (pid {self.pid}) ended "
                         "before this run")
            os.kill(os.getpid(), self._signal)

    def stop(self) -> None:
        self._periodic.stop()


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
            self.client.log_batch(self.run_id, tags=[
                RunTag(HEARTBEAT_TAG, str(int(time.time() * 1000))), *extra])
        except Exception:
            # A missed beat is retried at the next interval. Several workers beat a study's
            # parent; MLflow's SQL store inserts a new tag after looking for it, so two first
            # beats at once can collide (measured: UniqueViolation on PostgreSQL), and the
            # other worker's beat refreshed the same tag anyway.
            pass

    def stop(self) -> None:
        self._periodic.stop()


def end_stale_runs(experiments: Iterable[str] | None = None,
                   stale_after: float = DEFAULT_STALE_AFTER, *, min_intervals: float = 3,
                   ended_by: str = "lossgeo runs cleanup") -> list[tuple[str, float]]:
    """Ends KILLED every RUNNING run whose heartbeat is older than `stale_after` seconds (and
    `min_intervals` of its own heartbeat intervals: 0 honours `stale_after` alone), with a
    tag saying why and who (`ended_by`); returns (run_id, age in s) of each. Runs without a
    heartbeat (not started by lossgeo) are left alone."""
    c = client()
    if experiments:
        ids = [e.experiment_id for name in experiments
               if (e := c.get_experiment_by_name(name)) is not None]
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
            c.set_tag(run.info.run_id, END_REASON_TAG,
                      f"stale: no heartbeat since {since} ({age:.0f} s); the process was "
                      f"killed or its machine lost; ended by {ended_by}")
            c.set_terminated(run.info.run_id, status="KILLED")
            ended.append((run.info.run_id, age))
    return ended


# -- reading back --------------------------------------------------------------------------

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


def search_runs(experiment_names: Iterable[str] | None = None, filter_string: str = "",
                experiment_ids: Iterable[str] | None = None):
    """Runs as a pandas DataFrame (mlflow.search_runs)."""
    client()  # opens the store safely first
    with _fluent_uri(tracking_uri()):
        return mlflow.search_runs(
            experiment_names=list(experiment_names) if experiment_names else None,
            experiment_ids=list(experiment_ids) if experiment_ids else None,
            filter_string=filter_string, output_format="pandas", max_results=100000)


def find_runs(experiment: str, filter_string: str, *, order_by: list[str] | None = None,
              max_results: int = 50000) -> list:
    """Run entities of `experiment` matching an MLflow filter string."""
    c = client()
    return c.search_runs([experiment_id(experiment, c)], filter_string, order_by=order_by,
                         max_results=max_results)


def create_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    c = client()
    return c.create_run(experiment_id(experiment, c), run_name=run_name, tags=tags).info.run_id


def find_or_create_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """The id of the experiment's run carrying all of `tags` (the oldest, if several
    workers raced), else of a new FINISHED one named `run_name`: a folder of runs."""
    c = client()
    exp_id = experiment_id(experiment, c)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"],
                          max_results=1)
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


def start_heartbeat(run_id: str) -> "Heartbeat":
    return Heartbeat(client(), run_id)


class ActiveRunLogger:
    """Logs into the caller's active MLflow run (`with mlflow.start_run():` in their own
    code), on the tracking URI they set; without an active run nothing is logged (the
    Tracker still returns its metrics). The run is looked up at every call, so a Tracker
    made before `mlflow.start_run` logs into it."""

    def _run_id(self) -> str | None:
        run = mlflow.active_run()
        return None if run is None else run.info.run_id

    @property
    def active(self) -> bool:
        return self._run_id() is not None

    _marked: set[str] = set()  # experiments already tagged as model training

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        run = mlflow.active_run()
        if run is None:
            return
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
        return (f"MLflow run {run.info.run_id} in experiment {run.info.experiment_id} "
                f"at {mlflow.get_tracking_uri()}")
