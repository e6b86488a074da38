"""The forward passes' precision: the compute dtype a measurement runs its products in,
and autocast switched off around a whole measurement (so that a measurement inside a
training loop's autocast region is still taken in the parameters' dtype)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

COMPUTE_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_compute_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """None (the parameters' own dtype), or bf16 / fp16 given as a dtype or a name."""
    if value is None or value in ("fp32", "float32", "none", ""):
        return None
    if isinstance(value, str):
        if value not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: must be bf16, fp16 or fp32 (None) (got {value!r})")
        return COMPUTE_DTYPES[value]
    if value not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype: must be torch.bfloat16 or torch.float16 (got {value})")
    return value


def precision(device: torch.device, compute_dtype: torch.dtype | None) -> Any:
    """The forward passes' precision: autocast to `compute_dtype`, or, for None, autocast
    switched off, so that a measurement taken inside a training loop's autocast region is
    still taken in the parameters' own dtype (fp32) unless asked otherwise."""
    if compute_dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=compute_dtype)


@contextlib.contextmanager
def outside_autocast() -> Iterator[None]:
    """Autocast switched off (CPU and CUDA) for a whole measurement: the solvers' own
    arithmetic (Lanczos' reorthogonalisation, Ritz vectors) in a training loop's autocast
    region would otherwise run in bf16 too."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def full_precision(function: Callable) -> Callable:
    """`function` run `outside_autocast` (the public measurements)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with outside_autocast():
            return function(*args, **kwargs)

    return wrapper
