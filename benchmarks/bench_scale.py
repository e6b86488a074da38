"""The size ladder: lossgeo against PyHessian, hessian-eigenthings v1 and curvlinops from the
MNIST MLP to a GPT-2-small shape, each library in its own process.

    python benchmarks/bench_scale.py            # the ladder; writes benchmarks/results/scale.md
    python benchmarks/bench_scale.py --quick    # the MNIST MLP and CNN rungs, 1-2 minutes
    python benchmarks/bench_scale.py --rungs resnet18,gpt2 --out /tmp/scale.md

Rungs: the MNIST MLP and CNN (probe 1,024 real MNIST images, one epoch of SGD), torchvision's
ResNet-18 on 128 CIFAR-shaped images, lossgeo's small ViT on 256 MNIST images, and a
GPT-2-small shape (transformers' config, random init, eager attention, 4 x 128 random tokens,
the next-token loss as cross-entropy over (B T, vocab) logits). Random init where no
weights could be downloaded.

Tasks on each rung: lambda_max asked at tol 1e-3 and 1e-4, the top 5 at tol 1e-3, and the
trace by Hutch++ at 30 products. Each library at its own stopping rule: lossgeo's Lanczos
(`hessian_eigen`), PyHessian's power iteration (`eigenvalues(tol=...)`, its maxIter 100),
eigenthings' Lanczos (`lanczos(max_iter=...)`: it takes a step count, not a tolerance; we
give it 20 steps for tol 1e-3 and 40 for 1e-4, the step counts its users pick), curvlinops
through scipy's ARPACK (`eigsh(op.to_scipy(), tol=...)`: curvlinops ships no eigensolver).

The reference is ARPACK (tol 1e-6, k=5) over plain double-backward products written here,
independent of every library. Error: |lambda - reference| / reference, for the top 5 the
largest over the five. Columns: seconds, products (PyHessian's counted by patching its
product function), products per training gradient (seconds per product over the seconds
of one forward and backward pass of the probe batch, graph build included), peak RSS of the
worker process. A library that fails or runs past its time limit says how in the row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNGS = ("mlp", "cnn", "resnet18", "vit", "gpt2")
# a GPT-2-small product takes seconds on 2 cores: lambda_max at 1e-3 only, and a top-1
# reference, keep the ladder within the hour
RUNG_TASKS = {"gpt2": ("lmax_1e-3",)}
REFERENCE_K = {"gpt2": 1}
# ARPACK's default Krylov space (ncv 20) of float64 vectors is 20 GB on GPT-2-small: the
# reference there runs restarted in 4 (it was killed for memory with the default)
REFERENCE_NCV = {"gpt2": 4}
QUICK_RUNGS = ("mlp", "cnn")
LIBRARIES = ("lossgeo", "pyhessian", "eigenthings", "curvlinops")
TASKS = ("lmax_1e-3", "lmax_1e-4", "top5", "trace")
TRACE_PRODUCTS = 30
EIGENTHINGS_STEPS = {"lmax_1e-3": 20, "lmax_1e-4": 40, "top5": 40}


class NextToken(nn.Module):
    """A causal LM as an (x, y) model: the logits of every position but the last, (B, T-1,
    vocab), against the targets ids[:, 1:], so that every library takes loss(model(x), y)
    and x and y split alike along the batch."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits[:, :-1]


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """Mean cross-entropy over every token of (B, T, vocab) logits (HF's LM loss); an
    nn.Module with `reduction`, as curvlinops asks."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


LOSS = TokenCrossEntropy()  # plain cross-entropy on (N, classes) logits too


def build_rung(name: str, weights_dir: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, x, y) of a rung; the MNIST models' weights are trained once by
    the parent and read from weights_dir."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name in ("mlp", "cnn"):
        from lossgeo.models import build_model

        model = build_model(name)
        model.load_state_dict(torch.load(weights_dir / f"{name}.pt"))
        probe = torch.load(weights_dir / "probe.pt")
        return model.eval(), probe["x"], probe["y"]
    if name == "resnet18":
        from torchvision.models import resnet18

        x = torch.randn(128, 3, 32, 32, generator=gen)
        return resnet18(num_classes=10).eval(), x, torch.randint(0, 10, (128,), generator=gen)
    if name == "vit":
        from lossgeo.models import build_model

        probe = torch.load(weights_dir / "probe.pt")
        return build_model("vit").eval(), probe["x"][:256], probe["y"][:256]
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, attn_implementation="eager")
        ids = torch.randint(0, config.vocab_size, (4, 128), generator=gen)
        model = NextToken(GPT2LMHeadModel(config)).eval()
        return model, ids, ids[:, 1:]
    raise SystemExit(f"rung: one of {', '.join(RUNGS)} (got {name!r})")


def prepare_mnist(weights_dir: Path) -> None:
    """The MNIST MLP and CNN after one epoch of SGD on 10,000 images, and a probe of 1,024."""
    from common import mnist, trained

    data = mnist(train_subset=10_000, probe_size=1024)
    for name in ("mlp", "cnn"):
        torch.save(trained(name, data).state_dict(), weights_dir / f"{name}.pt")
    x, y = data.probe.x, data.probe.y
    torch.save({"x": x, "y": y}, weights_dir / "probe.pt")


def gradient_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training gradient of the probe batch: the best of three."""
    best = float("inf")
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        LOSS(model(x), y).backward()
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


# --- the libraries: each returns (values, products) or (trace, stderr, products) ---


def run_lossgeo(task: str, model, x, y):
    from lossgeo.curvature import hessian_eigen, hessian_trace

    if task == "trace":
        r = hessian_trace(model, LOSS, (x, y), method="hutch++", n_samples=30)
        return [r.value], r.n_hvp, {"stderr": r.stderr}
    k, tol = (5, 1e-3) if task == "top5" else (1, float(task.split("_")[1]))
    r = hessian_eigen(model, LOSS, (x, y), k=k, tol=tol)
    return r.values.tolist(), r.n_hvp, {"restarts": r.restarts}


def run_pyhessian(task: str, model, x, y):
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the package's name is the class
    count = [0]
    product = ph.hessian_vector_product

    def counted(*args):
        count[0] += 1
        return product(*args)

    ph.hessian_vector_product = counted
    comp = ph.hessian(model, LOSS, data=(x, y), cuda=False)
    if task == "trace":
        values = comp.trace(maxIter=TRACE_PRODUCTS, tol=0.0)
        return [float(sum(values) / len(values))], count[0], {"method": "Hutchinson"}
    k, tol = (5, 1e-3) if task == "top5" else (1, float(task.split("_")[1]))
    values, _ = comp.eigenvalues(top_n=k, tol=tol)
    return sorted(values, reverse=True), count[0], {}


def run_eigenthings(task: str, model, x, y):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(LOSS))
    count = [0]
    matvec = op.matvec

    def counted(v):
        count[0] += 1
        return matvec(v)

    op.matvec = counted
    if task == "trace":
        r = he.hutch_plus_plus(op, num_matvecs=TRACE_PRODUCTS, seed=0)
        return [float(r.estimate)], count[0], {}
    k = 5 if task == "top5" else 1
    tol = 1e-3 if task == "top5" else float(task.split("_")[1])
    r = he.lanczos(op, k=k, which="LA", tol=tol, max_iter=EIGENTHINGS_STEPS[task], seed=0)
    return sorted(map(float, r.eigenvalues), reverse=True), count[0], {}


def run_curvlinops(task: str, model, x, y):
    from curvlinops import HessianLinearOperator, hutchpp_trace
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, LOSS, params, [(x, y)], check_deterministic=False)
    count = [0]
    if task == "trace":
        matmat = op._matmat

        def counted(m):  # a list of per-parameter blocks, one column a vector
            count[0] += m[0].shape[-1]
            return matmat(m)

        op._matmat = counted
        return [float(hutchpp_trace(op, TRACE_PRODUCTS))], count[0], {}
    scipy_op = op.to_scipy()
    matvec = scipy_op.matvec

    def counted_vec(v):
        count[0] += 1
        return matvec(v)

    from scipy.sparse.linalg import LinearOperator

    wrapped = LinearOperator(scipy_op.shape, matvec=counted_vec, dtype=scipy_op.dtype)
    k, tol = (5, 1e-3) if task == "top5" else (1, float(task.split("_")[1]))
    values = eigsh(wrapped, k=k, which="LA", tol=tol, return_eigenvectors=False)
    return sorted(map(float, values), reverse=True), count[0], {}


def run_reference(task: str, model, x, y):
    """ARPACK (tol 1e-6) over double backward through one retained gradient graph."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    # the math attention backend: the fused CPU kernel has no double backward (the ViT)
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(LOSS(model(x), y), params, create_graph=True)
    count = [0]

    def hvp(v):
        count[0] += 1
        vs, start = [], 0
        for p in params:
            vs.append(torch.as_tensor(v[start : start + p.numel()], dtype=p.dtype).view_as(p))
            start += p.numel()
        out = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out]).double().numpy()

    n = sum(p.numel() for p in params)
    k = int(task.removeprefix("top"))
    ncv = REFERENCE_NCV.get(os.environ.get("BENCH_RUNG", ""))
    values = eigsh(
        LinearOperator((n, n), matvec=hvp, dtype=np.float64), k=k, which="LA", tol=1e-6, ncv=ncv
    )
    return sorted(map(float, values[0]), reverse=True), count[0], {}


RUNNERS = {
    "lossgeo": run_lossgeo,
    "pyhessian": run_pyhessian,
    "eigenthings": run_eigenthings,
    "curvlinops": run_curvlinops,
    "reference": run_reference,
}


def worker(library: str, rung: str, task: str, weights_dir: Path) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, x, y = build_rung(rung, weights_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    grad_s = gradient_seconds(model, x, y)
    start = time.perf_counter()
    values, products, extra = RUNNERS[library](task, model, x, y)
    seconds = time.perf_counter() - start
    return {
        "values": values,
        "products": products,
        "seconds": seconds,
        "gradient_seconds": grad_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "n_params": sum(p.numel() for p in model.parameters()),
        **extra,
    }


def in_subprocess(library: str, rung: str, task: str, weights_dir: Path, limit_s: int) -> dict:
    """One library's run in a process of its own (its peak memory is its own)."""
    command = [sys.executable, __file__, "--worker", library, rung, task, str(weights_dir)]
    env = {**os.environ, "BENCH_RUNG": rung}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {limit_s} s"}
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        if done.returncode == -9 and not lines:
            return {"failed": "killed (exit -9: out of memory)"}
        return {"failed": (lines[-1] if lines else f"exit {done.returncode}")[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def error(result: dict, reference: dict | None, task: str) -> str:
    if reference is None or "failed" in reference or "failed" in result:
        return ""
    if task == "trace":
        return ""
    ref = reference["values"][: len(result["values"])]
    worst = max(abs(v - r) / abs(r) for v, r in zip(result["values"], ref))
    return f"{worst:.1e}"


def row(rung: str, library: str, task: str, result: dict, reference: dict | None) -> str:
    if "failed" in result:
        return f"| {rung} | {task} | {library} | fails: {result['failed']} | | | | | |"
    per = result["seconds"] / max(result["products"], 1) / result["gradient_seconds"]
    value = result["values"][0]
    if task == "trace" and "stderr" in result:
        shown = f"{value:.5g} +- {result['stderr']:.2g}"
    else:
        shown = f"{value:.6g}"
    note = f" ({result['restarts']} restarts)" if result.get("restarts") else ""
    return (
        f"| {rung} | {task} | {library}{note} | {result['seconds']:.1f} | {result['products']} "
        f"| {per:.2f} | {result['peak_rss_gib']:.2f} | {shown} | {error(result, reference, task)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MNIST MLP and CNN only")
    parser.add_argument("--rungs", default=None, help=f"comma-separated, of {', '.join(RUNGS)}")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--limit", type=int, default=900, help="seconds per library run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        library, rung, task, weights_dir = args.worker
        print(json.dumps(worker(library, rung, task, Path(weights_dir))))
        return
    rungs = args.rungs.split(",") if args.rungs else QUICK_RUNGS if args.quick else RUNGS
    libraries = [name for name in args.libraries.split(",") if name]  # "": the reference only
    tasks = ("lmax_1e-3", "trace") if args.quick else TASKS
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "scale.md"
    started = time.perf_counter()
    from common import machine

    lines = [
        f"# The size ladder (`bench_scale.py{' --quick' if args.quick else ''}`; "
        f"{time.strftime('%Y-%m-%d')}; {machine()})",
        "",
        "Seconds, products, products in training gradients (graph build included), the",
        "worker's peak RSS, the value (lambda_max, or the trace) and the relative error",
        "against ARPACK at tol 1e-6 over plain double-backward products (top 5: the worst",
        "of the five). Each library runs in its own process, one after another.",
        "",
        "| rung | task | library | seconds | products | gradients a product | peak RSS GiB "
        "| value | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = Path(tmp)
        prepare_mnist(weights_dir)
        for rung in rungs:
            top = f"top{REFERENCE_K.get(rung, 5)}"
            reference = in_subprocess("reference", rung, top, weights_dir, args.limit * 2)
            ref_line = (
                f"| {rung} | reference | ARPACK tol 1e-6 | {reference['seconds']:.1f} | "
                f"{reference['products']} | | {reference['peak_rss_gib']:.2f} | "
                f"{reference['values'][0]:.6g} | |"
                if "failed" not in reference
                else f"| {rung} | reference | fails: {reference['failed']} | | | | | | |"
            )
            lines.append(ref_line)
            print(ref_line, flush=True)
            write_table(out, lines, started, done=False)
            for task in RUNG_TASKS.get(rung, tasks):
                for library in libraries:
                    result = in_subprocess(library, rung, task, weights_dir, args.limit)
                    line = row(rung, library, task, result, reference)
                    lines.append(line)
                    print(line, flush=True)
                    write_table(out, lines, started, done=False)
    write_table(out, lines, started, done=True)
    print(f"wrote {out}")


def write_table(out: Path, lines: list[str], started: float, done: bool) -> None:
    """The table so far (a ladder stopped part way keeps its finished rows)."""
    seconds = time.perf_counter() - started
    end = f"Total {seconds:.0f} s." if done else f"Stopped part way, after {seconds:.0f} s."
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*lines, "", end]) + "\n")


if __name__ == "__main__":
    main()
