"""`python -m lossgeo.run.settle RUN_ID STATUS PID`: once process PID has exited, set the run's
status to STATUS again.

Why: under `mlflow run`, the launcher sets its run FAILED (non-zero exit) or FINISHED after
our process exits, whatever the run already says. MLflow 3's `_maybe_set_run_terminated`
means to skip runs that have ended, but compares the status string with integer codes, so it
never does. An interrupted run would end FAILED instead of KILLED. This detached helper
outlives the launcher and puts the status right.
"""

from __future__ import annotations

import os
import sys
import time


def alive(pid: int) -> bool:
    """Whether process `pid` still runs: one that exited but was not yet reaped by its
    parent (a zombie) has done all it will do, and counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 said enough
        return True
    return state not in ("Z", "X")


def main(run_id: str, status: str, pid: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    from mlflow.tracking import MlflowClient

    # not lossgeo.run.tracking: it imports torch, seconds this helper need not spend
    c = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    for attempt in range(20):  # a store busy with the launcher's last write: try again
        try:
            if c.get_run(run_id).info.status != status:
                c.set_terminated(run_id, status=status)
            return
        except Exception:
            time.sleep(0.5 * (attempt + 1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
