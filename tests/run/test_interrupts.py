"""An interrupt is raised like Ctrl-C, but never inside a call to the tracking store: raised
there, it could leave a SQLite transaction open (kept alive by its traceback), and the run's
own cleanup then waited out the busy timeout on every write (a CI failure)."""

import os
import signal
import sqlite3
import time

import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from lossgeo.run import interrupts


@pytest.fixture
def handlers(monkeypatch):
    """lossgeo's handlers installed as the CLI installs them; the test's own restored after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    monkeypatch.setattr(interrupts, "RECEIVED", [])
    # as in a terminal's foreground job: a suite started in the background (`nohup ... &`)
    # inherits SIGINT ignored, and `install` rightly leaves an ignored SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in saved.items():
        signal.signal(s, handler)


def _signal_mid_statement(signum, on_key):
    """A listener that sends `signum` to this process while SQLAlchemy executes a statement
    about `on_key`, inside the store's own call (its transaction open)."""
    sent = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        if not sent and on_key in repr(parameters):
            sent.append(True)
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # Python runs the handler here, between these bytecodes
                pass

    return listener


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_inside_a_store_write_is_raised_once_the_write_is_done(
    tracking, handlers, signum
):
    c = MlflowClient()
    run_id = c.create_run("0").info.run_id
    listener = _signal_mid_statement(signum, "interrupted-write")
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", listener)
    try:
        with pytest.raises(interrupts.Interrupted) as raised:
            c.set_tag(run_id, "interrupted-write", "kept")
            time.sleep(5)  # the deferred interrupt arrives within RECHECK_S
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", listener)
    assert raised.value.signum == signum and interrupts.RECEIVED == [signum]
    # where it was raised: after set_tag returned, in the sleep, not inside the store
    where = [str(entry.path) for entry in raised.traceback]
    assert not [w for w in where if "sqlalchemy" in w or "mlflow" in w], where
    assert c.get_run(run_id).data.tags["interrupted-write"] == "kept"
    # no transaction left open: another connection writes at once (busy timeout 0)
    with sqlite3.connect(tracking / "mlflow.db", timeout=0) as other:
        other.execute("UPDATE runs SET name = 'free' WHERE run_uuid = ?", (run_id,))
    c.set_terminated(run_id, "KILLED")
    assert c.get_run(run_id).info.status == "KILLED"


def test_an_interrupt_outside_the_store_is_raised_at_once(handlers):
    started = time.perf_counter()
    with pytest.raises(interrupts.Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert time.perf_counter() - started < 1
    # a second signal during the cleanup is ignored, not raised again
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert interrupts.RECEIVED == [signal.SIGTERM]


def test_in_store_call_reads_the_whole_stack():
    import inspect

    assert not interrupts.in_store_call(inspect.currentframe())
    namespace = {"__name__": "sqlalchemy.orm.session", "inspect": inspect}
    exec("def probe(f): return f(inspect.currentframe())", namespace)
    assert namespace["probe"](interrupts.in_store_call)  # a store frame below ours
