"""Shared set-up for the benchmarks: real MNIST, briefly trained models, timing."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from lossgeo.data import DataBundle, load_data
from lossgeo.losses import cross_entropy
from lossgeo.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def data_dir() -> str:
    for candidate in (
        os.environ.get("LOSSGEO_DATA_DIR"),
        str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        "data",
    ):
        if candidate and (Path(candidate) / "MNIST" / "raw").exists():
            return candidate
    raise SystemExit("MNIST not found: set LOSSGEO_DATA_DIR")


def mnist(train_subset: int = 0, probe_size: int = 2048) -> DataBundle:
    return load_data("mnist", data_dir(), seed=0, train_subset=train_subset, probe_size=probe_size)


def trained(
    name: str, data: DataBundle, epochs: int = 1, lr: float = 0.1, batch_size: int = 64
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for x, y in data.train.batches(batch_size, shuffle=True, generator=gen):
            opt.zero_grad()
            cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def timed(fn, repeat: int = 1):
    """(result of the last call, best wall time in seconds)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def write(name: str, text: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)
