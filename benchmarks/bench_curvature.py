"""lossgeo's curvature engine against PyHessian, same models, same 2048 probe samples,
one process. Run: python benchmarks/bench_curvature.py  (writes results/curvature.md)

Reports per model: time, HVPs, relative error of lambda_max against a tightly converged
reference (Lanczos, tol 1e-9); trace value, standard error, time; the cost of one HVP in
units of one gradient for each exact HVP method; and per-epoch curvature at default
settings as a fraction of one training epoch (full MNIST).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist, timed, trained, write  # noqa: E402

from lossgeo.config import TrainConfig  # noqa: E402
from lossgeo.curvature import HessianOperator, hessian_eigen, hessian_trace  # noqa: E402
from lossgeo.curvature.measure import measure_curvature  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.measurements import curvature_settings  # noqa: E402


def pyhessian_counting():
    import importlib

    importlib.import_module("pyhessian.hessian")
    ph = sys.modules["pyhessian.hessian"]  # the package re-exports a class of the same name

    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    return ph.hessian, counter


def gradient_seconds(model, x, y) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()
    step()
    return timed(step, repeat=3)[1]


def hvp_seconds(model, data, method, chunk) -> float:
    op = HessianOperator(model, cross_entropy, data, method=method, chunk_size=chunk)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    op.matvec(v)  # builds the retained graph for "graph"
    return timed(lambda: op.matvec(v), repeat=3)[1]


def epoch_seconds(model_name: str, full) -> float:
    config = TrainConfig(model=model_name)
    model = trained(model_name, full, epochs=0)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for x, y in full.train.batches(config.batch_size, shuffle=True, generator=gen):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def bench(model_name: str, full) -> list[str]:
    model = trained(model_name, full, epochs=1)
    probe = (full.probe.x, full.probe.y)
    rows = []
    ref = hessian_eigen(model, cross_entropy, probe, k=1, tol=1e-9, max_iter=300)
    lam_ref = float(ref.values[0])
    rel = lambda v: abs(v - lam_ref) / abs(lam_ref)  # noqa: E731

    PyHessian, counter = pyhessian_counting()
    counter["n"] = 0

    def run_pyhessian():
        comp = PyHessian(model, cross_entropy, data=probe, cuda=False)
        return comp.eigenvalues()  # defaults: maxIter=100, tol=1e-3, top_n=1
    (ph_vals, _), ph_time = timed(run_pyhessian)
    ph_hvp = counter["n"]
    ours, our_time = timed(lambda: hessian_eigen(model, cross_entropy, probe))  # tol 1e-4
    verified = hessian_eigen(model, cross_entropy, probe, verify=True)
    rows.append(f"| {model_name} | lambda_max | PyHessian power (tol 1e-3) | {ph_time:.2f} | "
                f"{ph_hvp} | {rel(ph_vals[0]):.1e} |")
    rows.append(f"| {model_name} | lambda_max | lossgeo Lanczos (tol 1e-4) | {our_time:.2f} | "
                f"{ours.n_hvp} | {rel(float(ours.values[0])):.1e} (residual "
                f"{float(verified.residuals[0]) / lam_ref:.1e}) |")
    rows.append(f"| {model_name} | lambda_max | **ratio PyHessian/lossgeo** | "
                f"**{ph_time / our_time:.1f}x** | | |")

    counter["n"] = 0

    def run_pyhessian_trace():
        comp = PyHessian(model, cross_entropy, data=probe, cuda=False)
        return comp.trace()  # defaults: maxIter=100, tol=1e-3
    ph_samples, ph_trace_time = timed(run_pyhessian_trace)
    n = len(ph_samples)
    ph_mean = sum(ph_samples) / n
    ph_se = float(torch.tensor(ph_samples).std()) / math.sqrt(n)
    rows.append(f"| {model_name} | trace | PyHessian Hutchinson ({n} vectors) | "
                f"{ph_trace_time:.2f} | {counter['n']} | {ph_mean:.1f} +- {ph_se:.1f} |")
    # the same estimator with the same number of vectors (same standard error in expectation)
    result, t = timed(lambda: hessian_trace(model, cross_entropy, probe, n_samples=n))
    rows.append(f"| {model_name} | trace | lossgeo Hutchinson ({n} vectors) | {t:.2f} | "
                f"{result.n_hvp} | {result.value:.1f} +- {result.stderr:.1f} |")
    rows.append(f"| {model_name} | trace | **ratio PyHessian/lossgeo** | "
                f"**{ph_trace_time / t:.1f}x** | | |")
    # Hutch++ with the same budget, rounded to a multiple of 3
    budget = max(6, 3 * (n // 3))
    result, t = timed(lambda: hessian_trace(model, cross_entropy, probe, method="hutch++",
                                            n_samples=budget))
    rows.append(f"| {model_name} | trace | lossgeo Hutch++ ({budget} products) | {t:.2f} | "
                f"{result.n_hvp} | {result.value:.1f} +- {result.stderr:.1f} |")

    grad_s = gradient_seconds(model, *probe)
    costs = []
    for method, chunk in (("graph", "auto"), ("graph", 2048), ("graph", 512), ("fwdrev", 2048),
                          ("fwdrev", 512)):
        costs.append(f"{method}/chunk {chunk}: {hvp_seconds(model, probe, method, chunk) / grad_s:.2f}")
    costs.append(f"PyHessian (one 2048 batch): {ph_trace_time / max(counter['n'], 1) / grad_s:.2f}")
    hvp_line = f"- {model_name}: one gradient on 2048 samples {grad_s * 1e3:.0f} ms; HVP cost in gradients: " + ", ".join(costs)

    settings = curvature_settings(TrainConfig(model=model_name))
    (metrics, _), curv_s = timed(lambda: measure_curvature(model, cross_entropy, probe, settings,
                                                           lr=0.1))
    ep_s = epoch_seconds(model_name, full)
    frac_line = (f"- {model_name}: per-epoch curvature at defaults {curv_s:.1f} s "
                 f"({int(metrics['curvature_n_hvp'])} products) vs one training epoch on 55k "
                 f"samples {ep_s:.1f} s: **{curv_s / ep_s:.2f} epochs**")
    return rows, hvp_line, frac_line


def main() -> None:
    full = mnist(train_subset=0, probe_size=2048)
    table = ["| model | quantity | method | seconds | HVPs | rel. error / estimate |",
             "|---|---|---|---|---|---|"]
    hvp_lines, frac_lines = [], []
    for name in sys.argv[1:] or ["mlp", "cnn"]:
        rows, hvp_line, frac_line = bench(name, full)
        table += rows
        hvp_lines.append(hvp_line)
        frac_lines.append(frac_line)
        print("\n".join(rows), flush=True)
    text = "\n".join([f"# Curvature benchmark ({time.strftime('%Y-%m-%d')}; {machine()})", "",
                      "Same trained model (1 epoch SGD), same 2048 MNIST probe samples, one process.",
                      "", *table, "", "HVP methods (cost of one product / one gradient):",
                      *hvp_lines, "", "Per-epoch curvature cost:", *frac_lines, ""])
    write("curvature.md", text)


if __name__ == "__main__":
    main()
