"""The lifecycle of a user's own MLflow run once the Tracker logs into it: a heartbeat, FAILED
on an uncaught exception, KILLED on SIGINT, SIGTERM, or a lost process.

lossgeo's own runs get this from `TrackedRun`. A user's run (`mlflow.start_run()` in their
code) got MLflow's: without a `with` block its atexit handler ended a crashed loop FINISHED,
and a SIGTERM left the run RUNNING for good, with no heartbeat for `runs cleanup` to read.

- A heartbeat (`Heartbeat`) from the first logged measurement, until the run is no longer
  RUNNING: `lossgeo runs cleanup` ends the run KILLED when its process died (SIGKILL).
- `sys.excepthook`: an uncaught exception ends the watched run FAILED (KeyboardInterrupt:
  KILLED), with the exception's line as `lossgeo_end_reason`. Inside `with
  mlflow.start_run()`, MLflow has already ended it FAILED; a KeyboardInterrupt becomes KILLED.
- SIGTERM, where its handler is still the default: the run is ended KILLED, then the signal
  is delivered again with the default action, so the process ends as it would have.

Python gives atexit handlers no exit status, so `sys.exit(3)` outside a `with` block still
ends the run as MLflow's handler does (FINISHED); inside `with`, MLflow ends it FAILED.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from lossgeo.run.interrupts import in_store_call

from .heartbeat import END_REASON_TAG, Heartbeat, _retrying


class _UserRunHeartbeat(Heartbeat):
    """A heartbeat that stops itself once the run has ended (the user's code ends it, not
    lossgeo)."""

    def _beat(self, *extra: RunTag) -> None:
        try:
            if self.client.get_run(self.run_id).info.status != "RUNNING":
                periodic = getattr(self, "_periodic", None)
                if periodic is not None:
                    periodic._stop.set()  # from its own thread: no join
                return
        except Exception:
            pass  # an unreachable store: a missed beat, as in Heartbeat
        super()._beat(*extra)


class ActiveRunWatch:
    """Process-wide: the user's run that the Tracker last logged into, and the hooks that
    end it as the process ends. `watch(run_id)` at every log call; cheap after the first."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._hooked = False
        self._lock = threading.Lock()
        self._ended_for_sigterm = threading.Event()

    def watch(self, run_id: str) -> None:
        if run_id == self.run_id:
            return
        with self._lock:
            if run_id == self.run_id:
                return
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.run_id = run_id
            self.heartbeat = _UserRunHeartbeat(MlflowClient(), run_id)
            if not self._hooked:
                self._install()
                self._hooked = True

    def _install(self) -> None:
        previous_hook = sys.excepthook

        def excepthook(
            kind: type[BaseException], error: BaseException, tb: TracebackType | None
        ) -> None:
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED", error)
            previous_hook(kind, error, tb)

        sys.excepthook = excepthook
        in_main = threading.current_thread() is threading.main_thread()
        if in_main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._ended_for_sigterm.is_set() or not in_store_call(frame):
            if not self._ended_for_sigterm.is_set():
                self.end("KILLED", None, reason="SIGTERM")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # ends the process as the default action does
            return
        # The main thread was inside a store call, maybe holding SQLite's write lock: ending
        # the run here would wait on it for good. A thread ends it once the call lets go,
        # then signals again.
        threading.Thread(target=self._end_then_signal, daemon=True, name="sigterm-end").start()

    def _end_then_signal(self) -> None:
        self.end("KILLED", None, reason="SIGTERM")
        self._ended_for_sigterm.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def end(self, status: str, error: BaseException | None, reason: str = "") -> None:
        """Ends the watched run with `status` and a reason tag, unless it ended otherwise
        already (FINISHED by the user's code, or KILLED); never raises (it runs as the
        process ends)."""
        run_id = self.run_id
        if run_id is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.stop()
        try:
            c = MlflowClient()
            current = c.get_run(run_id).info.status
            # MLflow's `with` block ends an interrupted run FAILED before the hook runs
            interrupted = status == "KILLED" and current == "FAILED"
            if current != "RUNNING" and not interrupted:
                return
            text = reason or (
                f"{type(error).__name__}: {error}".strip().splitlines()[0] if error else status
            )
            _retrying(lambda: c.set_tag(run_id, END_REASON_TAG, text[:500]))
            _retrying(lambda: c.set_terminated(run_id, status=status))
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status)  # MLflow's atexit handler would end it FINISHED
        except Exception:
            pass


ACTIVE_RUN_WATCH = ActiveRunWatch()
