"""SIGINT and SIGTERM in the CLI: raised like Ctrl-C, so that runs end KILLED with what was
logged kept, but never inside a call to the tracking store.

Raised there, the interrupt can leave a SQLite connection mid-transaction, kept alive by the
exception's traceback: the run's own cleanup then waits out SQLite's busy timeout (20 s in
MLflow) on every write and gives up, and the run stays RUNNING (seen in CI: the process was
still retrying a minute after the signal). An interrupt that arrives inside a store call is
raised as soon as the call has returned, checked every `RECHECK_S` seconds.
"""

from __future__ import annotations

import signal
from types import FrameType

# the modules of a call to the tracking store: SQLAlchemy and the drivers under MLflow's store
STORE_MODULES = ("sqlalchemy", "mlflow.store", "sqlite3", "psycopg", "pymysql", "alembic")

RECHECK_S = 0.02


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised like Ctrl-C, so runs end KILLED with what was logged kept."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted ({signal.Signals(signum).name})")


# the signal that interrupted this process (click turns the exception into Abort)
RECEIVED: list[int] = []


def in_store_call(frame: FrameType | None) -> bool:
    """Whether `frame` or any frame below it runs code of a tracking-store module."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(STORE_MODULES):
            return True
        frame = frame.f_back
    return False


def _raise_when_out_of_store(signum: int, frame: FrameType | None) -> None:
    if in_store_call(frame) and hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _recheck)
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    raise Interrupted(signum)


def _recheck(_alarm: int, frame: FrameType | None) -> None:
    _raise_when_out_of_store(RECEIVED[0], frame)


def interrupt(signum: int, frame: FrameType | None) -> None:
    """The handler of SIGINT and SIGTERM."""
    if RECEIVED:  # a second signal while the first is still being deferred
        return
    RECEIVED.append(signum)
    # The cleanup that follows (metrics.csv, checkpoint, ending the run KILLED) must not be
    # cut short by a second signal, e.g. the SIGTERM `mlflow run` sends its child after Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _raise_when_out_of_store(signum, frame)


def install() -> None:
    """SIGTERM, and SIGINT unless it is ignored (a background job's), raise `Interrupted`."""
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
