"""Runs started by `mlflow run`: the launcher's run, process and experiment, and the
status the launcher overwrites (a detached helper, `lossgeo/run/settle.py`, sets it again)."""

from __future__ import annotations

import os
from pathlib import Path

from lossgeo.errors import UserInputError
from lossgeo.run.periodic import Periodic

from .store import client


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
            f"({default!r}); choose it with `mlflow run --experiment-name {name}` instead"
        )
    return name or default


def launcher_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


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

    subprocess.Popen(
        [sys.executable, "-m", "lossgeo.run.settle", run_id, status, str(pid or launcher_pid())],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def mark_launcher_run_rejected(message: str) -> None:
    """Bad input under `mlflow run`: the launcher created its run before our code started
    (and marks it FAILED when we exit), so all we can do is say why on that run. Deleting
    it would crash the launcher's own status update."""
    run_id = launcher_run_id()
    if run_id:
        client().set_tag(run_id, "rejected_input", message)


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
            self.gone = (
                f"interrupted: the `mlflow run` launcher (pid {self.pid}) ended before this run"
            )
            os.kill(os.getpid(), self._signal)

    def stop(self) -> None:
        self._periodic.stop()
