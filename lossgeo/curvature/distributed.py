"""Curvature over a probe set sharded across processes (torch.distributed).

Each rank holds its shard of the probe set. The mean loss over all N samples is
L = sum over ranks r of (N_r / N) L_r, so a product with its Hessian (or GGN, Fisher) is the
size-weighted sum of the shards' products: each rank weights its batches by n_b / N (N from
one all-reduce of the shard sizes) and one all-reduce (SUM) per product adds the ranks'
parts. The vectors the solvers draw are seeded, hence identical on every rank, and the
reduced products are identical too, so every rank runs the same Lanczos, Hutchinson and SLQ
steps and returns the same result.

`process_group`: None (one process), True (the default group) or a group. A model wrapped
in `DistributedDataParallel` is measured through its `.module`: the measurements take no
`backward()`, so DDP's gradient hooks would not fire, but its forward would also sync
buffers and expect a backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ProcessGroup = Any  # torch.distributed.ProcessGroup, or True for the default group


def resolve_group(process_group: ProcessGroup | bool | None) -> Any:
    """The process group to reduce over, or None for one process."""
    if process_group is None or process_group is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group: torch.distributed is not initialised (call "
            "torch.distributed.init_process_group first, or run under torchrun)"
        )
    return dist.group.WORLD if process_group is True else process_group


def all_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """The elementwise sum of `tensor` over the ranks of `group` (in place; returned)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_sum_float(value: float, group: Any) -> float:
    """The sum of a number over the ranks of `group` (the number itself for None)."""
    if group is None:
        return value
    return float(all_sum(torch.tensor([value], dtype=torch.float64), group)[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
