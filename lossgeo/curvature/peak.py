"""The peak memory of one measurement: CUDA's max allocated where the model is on a GPU,
else the process's resident-set high-water mark (Linux VmHWM, reset before the measurement
through /proc/self/clear_refs; where that cannot be reset, the lifetime peak, which is an
upper bound)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.megabytes` (MiB) and `peak.kind`
    ("cuda_max_allocated" or "rss")."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.megabytes = float("nan")
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_max_allocated":
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.megabytes = _rss_peak_mb()
