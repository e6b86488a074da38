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

import contextlib
import time
from typing import Any, Iterator

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
    return all_reduce(tensor, group, "sum")


def all_reduce(tensor: torch.Tensor, group: Any, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over the ranks of `group` in place (op: sum, min, max), watched:
    a peer's failure ends the wait (see `collectively`)."""
    if group is not None:
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        watched(dist.all_reduce(tensor, op=ops[op], group=group, async_op=True))
    return tensor


def all_gather(value: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's `value`, in rank order (watched, as `all_reduce`)."""
    import torch.distributed as dist

    out = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    watched(dist.all_gather(out, value, group=group, async_op=True))
    return out


def watched(work: Any) -> None:
    """Wait for an asynchronous collective while watching the store for a peer's error:
    a rank that failed never joins the collective, so its peers would otherwise wait for
    the process group's timeout (30 minutes by default)."""
    pause, last_look = 2e-5, time.monotonic()
    while not work.is_completed():
        time.sleep(pause)
        pause = min(pause * 2, 5e-3)
        if time.monotonic() - last_look > 0.1:
            last_look = time.monotonic()
            message = _posted_error()
            if message is not None:
                raise RankFailed(message)
    work.wait()  # raises what the collective itself hit


def all_sum_float(value: float, group: Any) -> float:
    """The sum of a number over the ranks of `group` (the number itself for None)."""
    if group is None:
        return value
    return float(all_sum(torch.tensor([value], dtype=torch.float64), group)[0])


def all_sum_tensor(values: torch.Tensor, group: Any) -> torch.Tensor:
    """A float64 copy of `values` summed over the ranks of `group` (the copy alone for None):
    one all-reduce for many partial sums (losses at many points, a loss and its gradient)."""
    out = values.detach().to(torch.float64).clone()
    return out if group is None else all_sum(out, group)


def total_count(local: int, group: Any) -> int:
    """The number of samples over all ranks' shards (`local` for one process)."""
    return local if group is None else int(all_sum_float(float(local), group))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class RankFailed(RuntimeError):
    """A collective measurement failed on one rank; every rank raises this, with the
    failing rank's message."""


_ERROR_KEY = "lossgeo/measurement_error"
_SEEN_KEY = "lossgeo/measurement_error_seen"


@contextlib.contextmanager
def collectively(group: Any, what: str = "measurement") -> Iterator[None]:
    """Run a collective measurement so that an error on one rank ends it on every rank with
    the same message, instead of leaving the others waiting in a collective.

    The failing rank posts its message to the group's store; lossgeo's collectives are
    asynchronous and watched (`watched`), so a peer waiting in one sees the message within
    0.1 s and raises it. The ranks end with one small all-reduce, so a rank whose peer
    failed after the last collective learns it here, not in the training loop. Collectives
    lossgeo does not run (FSDP's own gathers in a forward pass) are not watched: there the
    launcher (torchrun, `mp.spawn`) ends the remaining processes once one has failed."""
    if group is None:
        yield
        return
    try:
        yield
        all_reduce(torch.zeros(1), group)  # every rank got through
    except RankFailed:
        _acknowledge()
        raise
    except Exception as error:
        raise _post_failure(group, what, error) from error


def _store() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _posted_error() -> str | None:
    store = _store()
    return store.get(_ERROR_KEY).decode() if store.check([_ERROR_KEY]) else None


def _acknowledge() -> None:
    _store().add(_SEEN_KEY, 1)


def _post_failure(group: Any, what: str, error: BaseException) -> RankFailed:
    """This rank's error, posted for the others (unless a peer posted first), who are
    given 10 s to read it before this rank goes on to raise (rank 0 may host the store)."""
    import torch.distributed as dist

    first_line = (str(error).splitlines() or [""])[0]
    message = f"{what} failed on rank {dist.get_rank()}: {type(error).__name__}: {first_line}"
    store = _store()
    posted = store.compare_set(_ERROR_KEY, "", message).decode()
    if posted != message:  # a peer failed first: its message, everywhere
        _acknowledge()
        return RankFailed(posted)
    deadline = time.monotonic() + 10.0
    while store.add(_SEEN_KEY, 0) < dist.get_world_size(group) - 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return RankFailed(message)
