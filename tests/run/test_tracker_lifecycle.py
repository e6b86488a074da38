"""A user's own run once the Tracker logs into it ends as lossgeo's own runs do: FAILED on
an uncaught exception (MLflow's atexit handler ended it FINISHED outside `with`), KILLED on
SIGTERM (it stayed RUNNING for good) and on Ctrl-C, with a heartbeat for `runs cleanup`."""

import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

SETUP = """
import os, signal, time
import mlflow, torch
import torch.nn.functional as F
from lossgeo import SGDStep, StepSettings, Tracker

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
tracker = Tracker(
    model, F.cross_entropy, (x, y), optimizer=SGDStep(0.1),
    steps=StepSettings(every=1, batch_size=8),
)

def measured():
    tracker.step(1)
    print("run", mlflow.active_run().info.run_id, flush=True)
"""

# (the user's loop, the run's status, its end reason)
CASES = {
    # outside `with`: MLflow's atexit handler ended these two FINISHED
    "raise outside with": (
        "mlflow.start_run()\nmeasured()\nraise RuntimeError('boom')",
        "FAILED",
        "RuntimeError: boom",
    ),
    "ctrl-c outside with": (
        "mlflow.start_run()\nmeasured()\nraise KeyboardInterrupt",
        "KILLED",
        "KeyboardInterrupt",
    ),
    # inside `with`: MLflow ends an interrupted run FAILED
    "ctrl-c inside with": (
        "with mlflow.start_run():\n    measured()\n    raise KeyboardInterrupt",
        "KILLED",
        "KeyboardInterrupt",
    ),
    # the default SIGTERM left the run RUNNING for good
    "sigterm inside with": (
        "with mlflow.start_run():\n    measured()\n    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)",
        "KILLED",
        "SIGTERM",
    ),
    # SIGTERM inside a store write: ending the run from the handler waited on the write lock
    # that the interrupted write held
    "sigterm mid-write": (
        "with mlflow.start_run():\n    measured()\n"
        "    import sqlalchemy\n"
        "    def listener(conn, cursor, statement, parameters, context, executemany):\n"
        "        if 'mid-write' in repr(parameters):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            sum(range(1000))\n"
        "    sqlalchemy.event.listen(sqlalchemy.engine.Engine, 'before_cursor_execute', listener)\n"
        "    mlflow.set_tag('mid-write', 'kept')\n"
        "    time.sleep(30)",
        "KILLED",
        "SIGTERM",
    ),
    "finishes": ("mlflow.start_run()\nmeasured()\nmlflow.end_run()", "FINISHED", None),
}


# one process each: two cases in the quick tier, the rest in the full one
QUICK = ("raise outside with", "sigterm inside with", "sigterm mid-write")


@pytest.mark.parametrize(
    "case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_the_users_run_ends_as_the_process_did(tracking, case):
    loop, status, reason = CASES[case]
    done = subprocess.run(
        [sys.executable, "-c", SETUP + loop],
        env={**os.environ, "LOSSGEO_HEARTBEAT_INTERVAL": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_lines = [line for line in done.stdout.splitlines() if line.startswith("run ")]
    assert run_lines, done.stdout + done.stderr
    run = MlflowClient().get_run(run_lines[-1].split()[1])
    assert run.info.status == status, done.stderr
    if reason is None:
        assert done.returncode == 0 and "lossgeo_end_reason" not in run.data.tags
    else:
        assert reason in run.data.tags["lossgeo_end_reason"]
        assert done.returncode != 0
    if case.startswith("sigterm"):  # the process still ends as SIGTERM ends it
        assert done.returncode == -signal.SIGTERM
    if case == "sigterm mid-write":
        assert run.data.tags["mid-write"] == "kept"
    assert "lossgeo_heartbeat" in run.data.tags  # `runs cleanup` can tell when it died
