"""Curvature on several processes: parallel efficiency, and the cost of FSDP products.

1. Distributed lambda_max (Lanczos, tol 1e-4) of the MNIST MLP (ReLU, 512-256, one epoch
   of SGD) on 2,048 probe images: one process with 2 threads, one process with 1 thread,
   and 2 processes (gloo, 1 thread each) holding 1,024 images each. The efficiency is
   T(1 process, 1 thread) / (2 T(2 processes)); the all-reduce's share is the time spent in
   the products' all-reduce over the whole run.
2. FSDP2 (`fully_shard` on each layer, 2 gloo processes): the cost of one difference
   product in units of one training-style gradient (a forward and a backward pass of the
   sharded model on the rank's probe shard), and in units of the operator's own gradient
   (which also gathers the full gradient).

Writes benchmarks/results/distributed.md.

    python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist, trained, write  # noqa: E402

from lossgeo.curvature import Scope, hessian_eigen, operators  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402

PROBE = 2048
REPEAT = 3


# the FSDP timings are ~100 ms on 2 processes sharing 2 cores: best of 5 gave product
# costs of 1.9-2.8 training gradients from run to run, so each is the best of 15
FSDP_REPEATS = 15


def problem():
    data = mnist(train_subset=8192, probe_size=PROBE)
    return trained("mlp", data), data.probe.x, data.probe.y


def lambda_max(model, x, y, group) -> tuple[float, float, int]:
    """(best seconds, lambda_max, products) over REPEAT runs."""
    best, value, n_hvp = float("inf"), 0.0, 0
    for _ in range(REPEAT):
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        result = hessian_eigen(
            model, cross_entropy, (x, y), tol=1e-4, scope=Scope(process_group=group)
        )
        best = min(best, time.perf_counter() - start)
        value, n_hvp = float(result.values[0]), result.n_hvp
    return best, value, n_hvp


def timed_all_sum(spent: list[float]):
    original = operators.all_sum

    def all_sum(tensor, group):
        start = time.perf_counter()
        out = original(tensor, group)
        spent[0] += time.perf_counter() - start
        return out

    return all_sum


def data_parallel_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, x, y = problem()
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        spent = [0.0]
        operators.all_sum = timed_all_sum(spent)  # type: ignore[assignment]
        seconds, value, n_hvp = lambda_max(model, xs, ys, True)
        torch.save(
            {"seconds": seconds, "value": value, "n_hvp": n_hvp, "all_reduce": spent[0] / REPEAT},
            Path(out) / f"dp{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lossgeo.curvature.factories import hessian_operator, make_operator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, x, y = problem()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        op = hessian_operator(model, cross_entropy, (xs, ys), scope=Scope(chunk_size=None))
        ggn = make_operator("ggn", model, cross_entropy, (xs, ys), scope=Scope(chunk_size=None))
        fisher = make_operator(
            "fisher", model, cross_entropy, (xs, ys), scope=Scope(chunk_size=None)
        )
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))

        def training_gradient() -> None:
            model.zero_grad(set_to_none=True)
            cross_entropy(model(xs), ys).backward()

        timings = {}
        for name, fn in (
            ("training_gradient", training_gradient),
            ("operator_gradient", op.gradient),
            ("product", lambda: op @ v),
            ("ggn_product", lambda: ggn @ v),
            ("fisher_product", lambda: fisher @ v),
        ):
            best = float("inf")
            for _ in range(FSDP_REPEATS):
                dist.barrier()
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            timings[name] = best
        torch.save(timings, Path(out) / f"fsdp{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, prefix: str, world: int = 2) -> list[dict]:
    """Each rank's saved timings."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(fn, args=(world, os.path.join(out, "init"), out), nprocs=world)
        return [torch.load(Path(out) / f"{prefix}{r}.pt") for r in range(world)]


def main() -> None:
    where = machine()
    model, x, y = problem()
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        seconds, value, n_hvp = lambda_max(model, x, y, None)
        rows.append((f"1 process, {threads} thread(s)", seconds, value, n_hvp, None))
    ranks = spawn(data_parallel_worker, "dp")
    slowest = max(r["seconds"] for r in ranks)
    reduce_share = max(r["all_reduce"] for r in ranks) / slowest
    rows.append(
        (
            "2 processes (gloo), 1 thread each",
            slowest,
            ranks[0]["value"],
            ranks[0]["n_hvp"],
            reduce_share,
        )
    )
    one_thread = rows[1][1]
    fsdp = spawn(fsdp_worker, "fsdp")
    worst = {k: max(r[k] for r in fsdp) for k in fsdp[0]}

    lines = [
        "# Curvature on several processes",
        "",
        f"Machine: {where}. `python benchmarks/bench_distributed.py`.",
        "",
        f"## Distributed lambda_max: MNIST MLP, {PROBE} probe images, Lanczos tol 1e-4",
        "",
        "| set-up | seconds (best of 3) | lambda_max | products | all-reduce share |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, value, n_hvp, share in rows:
        shown = "" if share is None else f"{share:.1%}"
        lines.append(f"| {name} | {seconds:.2f} | {value:.6g} | {n_hvp} | {shown} |")
    lines += [
        "",
        f"- Parallel efficiency against one thread: {one_thread / (2 * slowest):.0%} "
        f"(T1 / (2 T2) = {one_thread:.2f} / (2 x {slowest:.2f})).",
        f"- Two processes against one process with 2 threads: {rows[0][1] / slowest:.2f}x.",
        "",
        "## FSDP2 difference products: MNIST MLP, fully_shard on each layer, 2 processes",
        "",
        f"| what | ms (best of {FSDP_REPEATS}, slowest rank) |",
        "|---|---|",
        f"| a training gradient (forward + backward, sharded grads) | "
        f"{worst['training_gradient'] * 1e3:.1f} |",
        f"| the operator's gradient (the same, plus the full gradient gathered) | "
        f"{worst['operator_gradient'] * 1e3:.1f} |",
        f"| one difference product | {worst['product'] * 1e3:.1f} |",
        f"| one GGN product (two forward passes, one backward) | "
        f"{worst['ggn_product'] * 1e3:.1f} |",
        f"| one empirical Fisher product (the same) | {worst['fisher_product'] * 1e3:.1f} |",
        "",
        f"- A product costs {worst['product'] / worst['training_gradient']:.2f} training "
        f"gradients, {worst['product'] / worst['operator_gradient']:.2f} operator gradients "
        "(target: at most 2.2).",
        f"- A GGN product costs {worst['ggn_product'] / worst['training_gradient']:.2f} "
        f"training gradients, a Fisher product "
        f"{worst['fisher_product'] / worst['training_gradient']:.2f}.",
        "",
    ]
    write("distributed.md", "\n".join(lines))


if __name__ == "__main__":
    main()
