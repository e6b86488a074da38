"""The built-in loop data-parallel under torchrun: `torchrun --nproc-per-node N -m lossgeo
train ...` trains one model on N processes into one MLflow run.

Every rank loads the same data and builds the same model from the seed. Each optimizer
step takes the same global mini-batch of `batch_size` samples on every rank (the shuffle is
seeded), and each rank computes its slice of it: the run means what it means on one
process (lr / batch_size is the same noise temperature). DistributedDataParallel averages
the ranks' gradients, so each rank weights its slice's mean loss by its share of the batch
times N: the average is the mean over the whole batch, uneven slices included. The probe
set is sharded for the curvature (collectively, `Tracker(process_group=...)`); evaluation
is sharded and summed. Rank 0 alone writes to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from lossgeo.curvature.distributed import all_reduce
from lossgeo.errors import UserInputError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank, world size and the process group (None for
    one process)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @property
    def logs(self) -> bool:
        """Whether this process writes the run (rank 0, or the only process)."""
        return self.rank == 0

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the first dimension (sizes differ by at most 1)."""
        return tensor.tensor_split(self.world)[self.rank] if self.world > 1 else tensor

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if self.group is None:
            return values
        return all_reduce(torch.tensor(values, dtype=torch.float64), self.group).tolist()


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextlib.contextmanager
def data_parallel(device: str) -> Iterator[tuple[Ranks, str]]:
    """The job's ranks and this rank's device: one process (no torchrun), or the process
    group torchrun describes (gloo on CPU, NCCL with CUDA), destroyed on the way out."""
    if not launched_by_torchrun():
        yield SINGLE, device
        return
    import torch.distributed as dist

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserInputError("device: cuda requested but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:  # rank 0 says it once (spikes, notes); errors still show
        logging.getLogger("lossgeo").setLevel(logging.ERROR)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device
    finally:
        dist.destroy_process_group()
