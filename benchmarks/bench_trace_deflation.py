"""How much the per-epoch trace gains from deflating by the eigen solve's whole Krylov basis
instead of by its top-k Ritz pairs (`lossgeo.curvature.trace`), at the same products.

On the default MNIST MLP and CNN after one epoch of SGD, on the default probe set (1,024
images): the per-epoch eigen solve (top 5 and lambda_min, `measure_curvature`'s targets),
then Hutchinson with 20 probe vectors deflated each way, over several seeds. The per-probe
variance (pooled over the seeds) says how many probes each needs for a given standard
error; both estimate the same trace, so their means must agree within their errors.

Second table: the model-level estimators at equal products (30), `hessian_trace`'s
methods, over the same seeds: plain Hutchinson, Hutch++ (Meyer et al. 2021) and the
Krylov-aware estimator (Chen & Hallman 2023, `krylov_hutchinson`), by the spread of their
estimates.

Run: python benchmarks/bench_trace_deflation.py [--seeds 5]   (writes results/trace_deflation.md)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist, trained, write  # noqa: E402

from lossgeo.curvature.factories import hessian_operator  # noqa: E402
from lossgeo.curvature.lanczos import Extremes, LanczosRun, lanczos_extremes  # noqa: E402
from lossgeo.curvature.trace import (  # noqa: E402
    hutch_plus_plus,
    hutchinson,
    krylov_hutchinson,
)
from lossgeo.losses import cross_entropy  # noqa: E402

SAMPLES = 20
TARGETS = Extremes(
    k_top=5, k_bottom=1, tol=1e-4, rest_tol=1e-3, bottom_tol=1e-3, bottom_scale="spectrum"
)


def pooled(results) -> tuple[float, float, float]:
    """(mean of the estimates, its standard error, the per-probe variance pooled)."""
    means = [r.value for r in results]
    variance = sum(r.stderr**2 * r.n_hvp for r in results) / len(results)
    mean = sum(means) / len(means)
    return mean, math.sqrt(variance / (SAMPLES * len(results))), variance


EQUAL = 30
ESTIMATORS = {
    "Hutchinson": hutchinson,
    "Hutch++": hutch_plus_plus,
    "Krylov-aware": krylov_hutchinson,
}


def spread(op, seeds: int) -> str:
    """Mean and standard deviation over seeds of each estimator at EQUAL products."""
    cells = []
    for estimate in ESTIMATORS.values():
        values = [estimate(op, EQUAL, seed=seed).value for seed in range(seeds)]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        cells.append(f"{mean:.2f} (sd {sd:.2f})")
    return " | ".join(cells)


def rung(name: str, seeds: int) -> tuple[str, str]:
    data = mnist(probe_size=1024)
    model = trained(name, data)
    op = hessian_operator(model, cross_entropy, (data.probe.x, data.probe.y))
    run = LanczosRun(op, seed=0, max_steps=100)
    top, _ = lanczos_extremes(op, TARGETS, run=run)
    assert run.state is not None
    ritz = [
        hutchinson(op, SAMPLES, seed=seed, deflation=(top.values, top.vectors))
        for seed in range(seeds)
    ]
    krylov = [hutchinson(op, SAMPLES, seed=seed, deflation=run.state) for seed in range(seeds)]
    (m_r, se_r, v_r), (m_k, se_k, v_k) = pooled(ritz), pooled(krylov)
    ratio = v_k / v_r
    agree = abs(m_k - m_r) / math.hypot(se_k, se_r)
    return (
        f"| {name} | {run.state.size} | {m_r:.2f} +- {se_r:.2f} | {m_k:.2f} +- {se_k:.2f} | "
        f"{agree:.1f} | {ratio:.2f} | {math.ceil(SAMPLES * ratio)} |"
    ), f"| {name} | {spread(op, seeds)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    rows, equal = zip(*(rung(name, args.seeds) for name in ("mlp", "cnn")))
    write(
        "trace_deflation.md",
        f"# The per-epoch trace: deflation by the Krylov basis against the top-5 Ritz pairs\n\n"
        f"`python benchmarks/bench_trace_deflation.py --seeds {args.seeds}` ({machine()}): "
        f"MNIST models after one epoch of SGD, probe set 1,024 images, {SAMPLES} probes an "
        f"estimate, {args.seeds} seeds pooled.\n\n"
        "| model | basis vectors | top-5 Ritz deflation | Krylov deflation | "
        "difference / SE | variance ratio (Krylov / Ritz) | probes for the Ritz SE at "
        f"{SAMPLES} |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"`hessian_trace`'s estimators at {EQUAL} products each, {args.seeds} seeds: the mean "
        "and the standard deviation of the estimates.\n\n"
        "| model | " + " | ".join(ESTIMATORS) + " |\n|---|---|---|---|\n" + "\n".join(equal) + "\n",
    )


if __name__ == "__main__":
    main()
