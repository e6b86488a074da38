"""How often a cold Lanczos solve reports lambda_2 as lambda_max, with and without the guard
pair (`Extremes(guard=...)`), and what the guard costs in products.

The per-epoch secondary solves: lambda_max of each layer's Hessian block and of the GGN, k = 1
at tol 1e-3, on the default probe (1,024 MNIST training images) of the default MLP after 1 and
3 epochs of SGD on the default 10,000-image subset; SEEDS random starts per operator. The
reference is Lanczos converged to 1e-10. A failure is a relative error above the tolerance.

Run: python benchmarks/bench_lanczos_guard.py   (writes benchmarks/results/lanczos_guard.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, machine, trained, write  # noqa: E402

from lossgeo.curvature.lanczos import lanczos_top  # noqa: E402
from lossgeo.curvature.operators import GGNOperator, HessianBlockOperator, HessianOperator  # noqa: E402
from lossgeo.data import load_data  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.models import parameter_blocks  # noqa: E402

SEEDS = range(12)
TOL = 1e-3


def main() -> None:
    data = load_data("mnist", data_dir(), seed=0, train_subset=10000, probe_size=1024)
    probe = (data.probe.x, data.probe.y)
    counts = {guard: {"solves": 0, "failures": 0, "products": 0, "worst": 0.0} for guard in (0, 1)}
    for epochs in (1, 3):
        model = trained("mlp", data, epochs=epochs)
        hessian = HessianOperator(model, cross_entropy, probe)
        operators = {
            layer: HessianBlockOperator(hessian, names)
            for layer, names in parameter_blocks(model).items()
        }
        operators["ggn"] = GGNOperator(model, cross_entropy, probe)
        for op in operators.values():
            reference = float(lanczos_top(op, tol=1e-10, max_iter=300).values[0])
            for guard in (0, 1):
                for seed in SEEDS:
                    result = lanczos_top(op, tol=TOL, seed=seed, guard=guard)
                    error = (reference - float(result.values[0])) / reference
                    c = counts[guard]
                    c["solves"] += 1
                    c["failures"] += error > TOL
                    c["products"] += result.n_hvp
                    c["worst"] = max(c["worst"], error)
    lines = [
        f"# Lanczos guard pair ({time.strftime('%Y-%m-%d')}; {machine()})",
        "",
        "`python benchmarks/bench_lanczos_guard.py`: cold k = 1 solves at tol 1e-3 of the "
        "MLP's layer blocks and GGN after 1 and 3 epochs, 12 starts each.",
        "",
        "| guard | solves | below lambda_max by more than tol | worst relative error | "
        "products per solve |",
        "|---|---|---|---|---|",
    ]
    for guard, c in counts.items():
        lines.append(
            f"| {guard} | {c['solves']} | {c['failures']} | {c['worst']:.1e} | "
            f"{c['products'] / c['solves']:.1f} |"
        )
    write("lanczos_guard.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
