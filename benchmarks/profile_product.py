"""Where a Hessian-vector product's time goes on a ladder rung: the training gradient, the
graph build, lossgeo's products (as `hessian_eigen` takes them, memory budget "auto") and a
plain retained-graph double backward, in one process; then the profiler's top operators over
one of lossgeo's products.

    python benchmarks/profile_product.py resnet18 [--products 3] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import LOSS, build_rung, gradient_seconds  # noqa: E402


def plain_products(model, x, y, vectors):
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    grads = torch.autograd.grad(LOSS(model(x), y), params, create_graph=True)
    build = time.perf_counter() - start
    times = []
    for v in vectors:
        parts = list(torch.split(v, [p.numel() for p in params]))
        start = time.perf_counter()
        torch.autograd.grad(
            grads, params, [a.view_as(p) for a, p in zip(parts, params)], retain_graph=True
        )
        times.append(time.perf_counter() - start)
    return build, times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rung")
    parser.add_argument("--products", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--weights", default="/tmp/lossgeo-scale-weights")
    args = parser.parse_args()
    from lossgeo.curvature.operators import HessianOperator

    model, x, y = build_rung(args.rung, Path(args.weights))
    g = gradient_seconds(model, x, y)
    print(f"{args.rung}: one training gradient {g:.2f} s", flush=True)
    n = sum(p.numel() for p in model.parameters())
    vectors = [
        torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(args.products)
    ]
    start = time.perf_counter()
    op = HessianOperator(model, LOSS, (x, y))
    made = time.perf_counter() - start
    print(f"lossgeo operator: {made:.2f} s to size ({op.method}; {op.memory_note})", flush=True)
    for i, v in enumerate(vectors):
        start = time.perf_counter()
        op @ v
        t = time.perf_counter() - start
        print(f"  lossgeo product {i}: {t:.2f} s = {t / g:.2f} gradients", flush=True)
    del op
    build, times = plain_products(model, x, y, vectors)
    print(
        f"plain double backward: graph {build:.2f} s = {build / g:.2f} gradients; products "
        + ", ".join(f"{t:.2f} s = {t / g:.2f}" for t in times),
        flush=True,
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        op = HessianOperator(model, LOSS, (x, y))
        op @ vectors[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            op @ vectors[-1]
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
