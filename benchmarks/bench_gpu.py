"""Curvature where models are trained: one script for a GPU machine (at most 8 minutes).

    python benchmarks/bench_gpu.py                 # on cuda when there is one; writes
                                                   # benchmarks/results/gpu.md
    python benchmarks/bench_gpu.py --tiny --out /tmp/gpu.md   # small shapes, CPU (tested)

Workloads:
1. A ResNet-18 (torchvision, 10 classes, BatchNorm in eval mode) on 4,096 CIFAR-shaped
   random images. lambda_max by lossgeo's Lanczos (tol 1e-4), and by PyHessian's power
   iteration and eigenthings' where they are installed, at tol 1e-3 and asked for 1e-5 (the
   accuracy Lanczos delivers). Also the Hutchinson trace with 20 vectors.
2. A GPT-2-small-shaped model (12 layers, 768 wide; `transformers`) on random tokens:
   lambda_max of the whole Hessian.
2b. The size ladder's ResNet-18 and GPT-2-small rungs (`bench_scale.py`): lambda_max at
   tol 1e-3 by lossgeo's `hessian_eigen` and by the peers installed (PyHessian,
   hessian-eigenthings v1), so that a lent GPU gives those figures in one script.
3. The default-like run: per-epoch curvature at lossgeo's defaults (probe 1,024, MNIST
   MLP shape) against one training epoch of 10,000 samples at batch 32.
Every figure is seconds, products and peak memory (CUDA's max allocated, else RSS).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lossgeo.curvature import (  # noqa: E402
    CurvatureSettings,
    HessianOperator,
    hutchinson,
    lanczos,
    measure_curvature,
)
from lossgeo.models import build_model  # noqa: E402

BUDGET_S = 8 * 60


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronised(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    synchronised(device)
    start = time.perf_counter()
    out = fn()
    synchronised(device)
    return out, time.perf_counter() - start


def resnet_rows(device: torch.device, tiny: bool) -> list[str]:
    from torchvision.models import resnet18

    n, side = (4, 16) if tiny else (4096, 32)
    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(device).eval()
    x = torch.randn(n, 3, side, side, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    top, s = timed(device, lambda: lanczos(op, k=1, tol=1e-4, max_iter=4 if tiny else 100))
    rows = [
        f"| ResNet-18, {n} images | lossgeo Lanczos (tol 1e-4) | {s:.2f} | {top.n_hvp} | "
        f"{float(top.values[0]):.4g} | {peak_memory_mb(device):.0f} |"
    ]
    trace, s = timed(device, lambda: hutchinson(op, 2 if tiny else 20, seed=0))
    rows.append(
        f"| ResNet-18, {n} images | lossgeo Hutchinson trace | {s:.2f} | "
        f"{trace.n_hvp} | {trace.value:.4g} +- {trace.stderr:.2g} | "
        f"{peak_memory_mb(device):.0f} |"
    )
    for name, run in peers(model, x, y, device, 4 if tiny else 200):
        for tol in (1e-3, 1e-5):
            (value, n_hvp), s = timed(device, lambda run=run, tol=tol: run(tol))
            rows.append(
                f"| ResNet-18, {n} images | {name} (tol {tol:g}) | {s:.2f} | {n_hvp} | "
                f"{value:.4g} | {peak_memory_mb(device):.0f} |"
            )
    return rows


def peers(model, x, y, device, max_iter: int = 200, loss=F.cross_entropy):
    """PyHessian's and eigenthings' power iteration, where they are installed."""
    found = []
    if importlib.util.find_spec("pyhessian") is not None:
        from pyhessian import hessian as pyhessian

        def run_pyhessian(tol):
            comp = pyhessian(model, loss, data=(x, y), cuda=device.type == "cuda")
            values, _ = comp.eigenvalues(top_n=1, tol=tol, maxIter=max_iter)
            return float(values[0]), -1  # PyHessian does not count its products

        found.append(("PyHessian power iteration", run_pyhessian))
    if importlib.util.find_spec("hessian_eigenthings") is not None:
        # the v1 API (1.0.0a5): an operator object and keyword-only solvers
        import hessian_eigenthings as he

        def run_eigenthings(tol):
            op = he.HessianOperator(model, [(x, y)], he.supervised_loss(loss))
            value, _, _, iterations, _ = he.power_iteration_one(
                op, tol=tol, max_iter=max_iter, seed=0
            )
            return float(value), int(iterations)

        found.append(("eigenthings v1 power iteration", run_eigenthings))

        def run_eigenthings_lanczos(tol):
            op = he.HessianOperator(model, [(x, y)], he.supervised_loss(loss))
            steps = min(max_iter, 20 if tol >= 1e-3 else 40)  # a step count, not a tolerance
            result = he.lanczos(op, k=1, which="LA", tol=tol, max_iter=steps, seed=0)
            return float(result.eigenvalues[0]), steps

        found.append(("eigenthings v1 Lanczos", run_eigenthings_lanczos))
    return found


def gpt2_rows(device: torch.device, tiny: bool) -> list[str]:
    if importlib.util.find_spec("transformers") is None:
        return ["| GPT-2-small shape | skipped: `transformers` is not installed | | | | |"]
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, batch, length = (2, 64, 2, 16) if tiny else (12, 768, 8, 128)
    torch.manual_seed(0)
    vocab = 512 if tiny else 50257
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=max(1, width // 64),
        vocab_size=vocab,
        n_positions=max(length, 32),
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = GPT2LMHeadModel(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    probe = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(batch)]
    op = HessianOperator(model, lambda m, b: m(**b).loss, probe)
    top, s = timed(device, lambda: lanczos(op, k=1, tol=1e-3, max_iter=8 if tiny else 60))
    n_params = sum(p.numel() for p in model.parameters())
    return [
        f"| GPT-2 shape ({layers} layers, {width} wide, {n_params / 1e6:.1f}M parameters), "
        f"{batch} x {length} tokens | lossgeo Lanczos (tol 1e-3) | {s:.2f} | {top.n_hvp} | "
        f"{float(top.values[0]):.4g} | {peak_memory_mb(device):.0f} |"
    ]


def ladder_rows(device: torch.device, tiny: bool) -> list[str]:
    """The size ladder's ResNet-18 (128 CIFAR-shaped images) and GPT-2-small (4 x 128
    tokens) rungs (`bench_scale.py`): lambda_max at tol 1e-3 by lossgeo and the peers."""
    from bench_scale import LOSS, NextToken

    rows = []
    torch.manual_seed(0)
    from torchvision.models import resnet18

    n, side = (4, 16) if tiny else (128, 32)
    model = resnet18(num_classes=10).to(device).eval()
    x = torch.randn(n, 3, side, side, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    runs = [("lossgeo hessian_eigen", lambda tol: _lossgeo_top(model, x, y, tol))]
    runs += peers(model, x, y, device, 4 if tiny else 200, loss=LOSS)
    if importlib.util.find_spec("transformers") is not None:
        from transformers import GPT2Config, GPT2LMHeadModel

        layers, width, vocab = (2, 64, 512) if tiny else (12, 768, 50257)
        config = GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=max(1, width // 64),
            vocab_size=vocab,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        config._attn_implementation = "eager"
        lm = NextToken(GPT2LMHeadModel(config)).to(device).eval()
        ids = torch.randint(0, vocab, (4, 16 if tiny else 128), device=device)
        targets = ids[:, 1:]
        runs_gpt = [("lossgeo hessian_eigen", lambda tol: _lossgeo_top(lm, ids, targets, tol))]
        runs_gpt += peers(lm, ids, targets, device, 4 if tiny else 200, loss=LOSS)
    else:
        runs_gpt = []
    for shape, found in ((f"ladder ResNet-18, {n} images", runs), ("ladder GPT-2-small", runs_gpt)):
        for name, run in found:
            (value, n_hvp), s = timed(device, lambda run=run: run(1e-3))
            rows.append(
                f"| {shape} | {name} (tol 1e-3) | {s:.2f} | {n_hvp} | {value:.6g} | "
                f"{peak_memory_mb(device):.0f} |"
            )
    return rows


def _lossgeo_top(model, x, y, tol: float) -> tuple[float, int]:
    from bench_scale import LOSS

    from lossgeo.curvature import hessian_eigen

    result = hessian_eigen(model, LOSS, (x, y), k=1, tol=tol)
    return float(result.values[0]), result.n_hvp


def default_run_rows(device: torch.device, tiny: bool) -> list[str]:
    n_train, probe = (256, 32) if tiny else (10_000, 1024)
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(32,) if tiny else (512, 256)).to(device)
    x = torch.randn(n_train, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (n_train,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch():
        model.train()
        for i in range(0, n_train, 32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            optimizer.step()

    _, train_s = timed(device, epoch)
    settings = CurvatureSettings(k=2, max_iter=20, trace_samples=2) if tiny else CurvatureSettings()
    measures, measure_s = timed(
        device, lambda: measure_curvature(model, F.cross_entropy, (x[:probe], y[:probe]), settings)
    )
    return [
        f"| default-like run: MLP, probe {probe}, {n_train} training samples | per-epoch "
        f"curvature {measure_s:.2f} s against a training epoch {train_s:.2f} s "
        f"({measure_s / train_s:.2f} epochs) | {measure_s:.2f} | {measures.n_hvp} | "
        f"{measures.lambda_max:.4g} | {peak_memory_mb(device):.0f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU, the tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    lines = [
        f"# Curvature at scale (`bench_gpu.py{' --tiny' if args.tiny else ''}`; "
        f"{time.strftime('%Y-%m-%d')}; {name}; torch {torch.__version__})",
        "",
        "| workload | method | seconds | products | value | peak memory MB |",
        "|---|---|---|---|---|---|",
    ]
    for workload in (resnet_rows, gpt2_rows, ladder_rows, default_run_rows):
        if time.perf_counter() - started > BUDGET_S:
            lines.append(
                f"| {workload.__name__} | skipped: the {BUDGET_S} s budget is spent | | | | |"
            )
            continue
        rows = workload(device, args.tiny)
        lines += rows
        print("\n".join(rows), flush=True)
    lines += ["", f"Total {time.perf_counter() - started:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
