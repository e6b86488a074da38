"""The step of the difference Hessian-vector product (HessianOperator(method="fd")).

Hv ~ (g(w + h v) - g(w - h v)) / 2h with h = step (1 + ||w||) / ||v||. Its error is a
truncation term, h^2/6 times the third derivative along v, plus the rounding of the two
gradients amplified by 1/h. So there is a best step for each dtype, and this script
measures it. The models are an MNIST MLP and a CNN (ReLU) and the MLP with tanh, after one
epoch of SGD, with 512 probe
images and 4 random unit vectors. The product is compared with the exact double-backward
product in float64, for steps from 1e-7 to 1e-1. The error is ||fd - exact|| / ||exact||,
the median over the vectors. Writes benchmarks/results/fd_step.md.

    python benchmarks/bench_fd_step.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist, trained, write  # noqa: E402

from lossgeo.curvature import Scope  # noqa: E402
from lossgeo.curvature.operators import HessianOperator  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.models import build_model  # noqa: E402

STEPS = [10.0**e for e in range(-7, 0)] + [3e-3, 3e-2, 3e-5, 3e-6]


def errors(model, probe, dtype: torch.dtype) -> dict[float, float]:
    exact_op = HessianOperator(
        copy.deepcopy(model).double(), cross_entropy, (probe[0].double(), probe[1])
    )
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(exact_op.dim, generator=gen, dtype=torch.float64) for _ in range(4)]
    vectors = [v / v.norm() for v in vectors]
    exact = [exact_op @ v for v in vectors]
    cast = copy.deepcopy(model).to(dtype)
    out = {}
    for step in sorted(STEPS):
        op = HessianOperator(
            cast,
            cross_entropy,
            (probe[0].to(dtype), probe[1]),
            fd_step=step,
            scope=Scope(hvp_method="fd"),
        )
        rel = [
            float((op @ v.to(dtype)).double().sub(e).norm() / e.norm())
            for v, e in zip(vectors, exact)
        ]
        out[step] = statistics.median(rel)
    return out


def trained_smooth(data) -> torch.nn.Module:
    """The MLP with tanh: no kinks, so the difference product's error is truncation and
    rounding only (ReLU's kinks make the gradient jump once w + h v crosses one)."""
    torch.manual_seed(0)
    model = build_model("mlp", activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for x, y in data.train.batches(64, shuffle=True, generator=gen):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def main() -> None:
    data = mnist(train_subset=5000, probe_size=512)
    probe = (data.probe.x, data.probe.y)
    lines = [
        f"# Difference-product step (`bench_fd_step.py`; {time.strftime('%Y-%m-%d')}; {machine()})",
        "",
        "Median relative error ||Hv_fd - Hv|| / ||Hv|| over 4 random unit vectors, "
        "against the exact double-backward product in float64; MNIST models after one "
        "epoch of SGD, 512 probe images; h = step (1 + ||w||) / ||v||.",
        "",
        "| model | dtype | " + " | ".join(f"{s:g}" for s in sorted(STEPS)) + " | best |",
        "|---|---|" + "---|" * (len(STEPS) + 1),
    ]
    for name in ("mlp", "cnn", "mlp-tanh"):
        model = trained_smooth(data) if name == "mlp-tanh" else trained(name, data, epochs=1)
        for dtype in (torch.float64, torch.float32):
            errs = errors(model, probe, dtype)
            best = min(errs, key=errs.get)
            lines.append(
                f"| {name} | {str(dtype).removeprefix('torch.')} | "
                + " | ".join(f"{errs[s]:.1e}" for s in sorted(STEPS))
                + f" | {best:g} ({errs[best]:.1e}) |"
            )
            print(lines[-1], flush=True)
    write("fd_step.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
