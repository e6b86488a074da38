"""Block products: seconds a vector when m vectors go through one batched double backward
(`HessianOperator.matmat`, `is_grads_batched`) against one vector at a time (`matvec`), on
the ladder's rungs, in one process (ratios; these machines are noisy). The graph is built
before timing; each figure is the best of `--repeat`.

    python benchmarks/bench_block.py [--rungs mlp,cnn,resnet18,vit] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import LOSS, build_rung, prepare_mnist  # noqa: E402


def best(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rungs", default="mlp,cnn,resnet18,vit")
    parser.add_argument("--blocks", default="2,4,8")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--weights", default="/tmp/lossgeo-scale-weights")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "block.md"))
    args = parser.parse_args()
    from lossgeo.curvature import HessianOperator

    weights = Path(args.weights)
    if not (weights / "probe.pt").exists():
        weights.mkdir(parents=True, exist_ok=True)
        prepare_mnist(weights)
    blocks = [int(b) for b in args.blocks.split(",")]
    lines = [
        f"# Block products (`bench_block.py`; {time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        "Seconds a vector through the retained graph: one vector at a time, and m vectors in "
        "one batched double backward; speed-up = one at a time / batched. Values agree to "
        "rounding (max relative difference).",
        "",
        "| rung | params | one at a time s | m | batched s a vector | speed-up | max rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for rung in args.rungs.split(","):
        model, x, y = build_rung(rung, weights)
        op = HessianOperator(model, LOSS, (x, y))
        lines += rung_rows(rung, op, blocks, args.repeat)
        del op
    Path(args.out).write_text("\n".join(lines) + "\n")


def rung_rows(rung: str, op, blocks: list[int], repeat: int) -> list[str]:
    """The table's rows of one rung."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.dim, max(blocks), generator=gen)
    op @ V[:, 0]  # the graph, built once
    one = best(lambda: op @ V[:, 0], repeat)
    looped = torch.stack([op @ V[:, j] for j in range(max(blocks))], dim=1)
    for m in blocks:
        try:
            seconds = best(lambda: op.matmat(V[:, :m]), repeat) / m  # noqa: B023
            out = op.matmat(V[:, :m])
            diff = float((out - looped[:, :m]).abs().max() / looped[:, :m].abs().max())
            row = f"{seconds:.3f} | {one / seconds:.2f} | {diff:.1e}"
        except RuntimeError as error:
            row = f"fails: {str(error).splitlines()[0][:80]} | | "
        rows.append(f"| {rung} | {op.dim:,} | {one:.3f} | {m} | {row} |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
