"""A call repeated from a daemon thread: the heartbeats of MLflow runs and of Optuna trials."""

from __future__ import annotations

import threading
from typing import Callable


class Periodic:
    """Calls `beat` every `interval` seconds from a daemon thread until `stop()`. The caller
    makes the first call itself (so that its errors reach the caller); a failing later call
    counts as a missed beat, retried at the next interval."""

    def __init__(self, beat: Callable[[], None], interval: float, name: str) -> None:
        self._beat, self._interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # missed; the next interval tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
