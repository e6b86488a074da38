"""What bf16 (and fp16) products cost in accuracy, on transformers.

`compute_dtype="bf16"` runs the forward passes of every product under autocast to bf16;
parameters, vectors and sums stay fp32. Against fp32 products (the default) this script
reports, for lambda_max (Lanczos, tol 1e-5), the second eigenvalue, the Hutchinson trace
(10 Rademacher vectors, the same seeds, so only the precision differs) and the overlap
|<v, v_fp32>| of the top eigenvector:

1. lossgeo's ViT (2 pre-norm encoder layers, 64 wide) after 300 Adam steps on MNIST,
   probe 256 images;
2. a GPT-2-shaped model (`transformers`, 4 layers, 128 wide, vocabulary 512) at
   initialisation on 16 random sequences of 32 tokens.

Run on CPU here (bf16 matmuls through oneDNN; the number format, hence the rounding, is
that of a GPU's bf16). Writes benchmarks/results/precision.md.

    python benchmarks/bench_precision.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist, write  # noqa: E402

from lossgeo.curvature import (  # noqa: E402
    HessianOperator,
    Scope,  # noqa: E402
    hutchinson,
    lanczos,
)
from lossgeo.models import build_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


def vit_problem():
    data = mnist(train_subset=8192, probe_size=256)
    torch.manual_seed(0)
    model = build_model("vit")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    steps = 0
    while steps < 300:
        for x, y in data.train.batches(64, shuffle=True, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
            if steps == 300:
                break
    return model.eval(), F.cross_entropy, (data.probe.x, data.probe.y)


def gpt2_problem():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=512, n_positions=32, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(2))

    def loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    return model, loss, [tokens]


def measure(model, loss_fn, data, compute_dtype) -> dict:
    op = HessianOperator(model, loss_fn, data, scope=Scope(compute_dtype=compute_dtype))
    start = time.perf_counter()
    top = lanczos(op, k=2, tol=1e-5, max_iter=80, seed=0)
    trace = hutchinson(op, 10, seed=1)
    return {
        "values": top.values.double(),
        "vector": top.vectors[0].double(),
        "trace": trace.value,
        "seconds": time.perf_counter() - start,
    }


def rows(name: str, problem) -> list[str]:
    model, loss_fn, data = problem
    results = {}
    for label, dtype in DTYPES.items():
        results[label] = measure(model, loss_fn, data, dtype)
        print(f"{name}, {label}: {results[label]['seconds']:.1f} s", flush=True)
    exact = results["fp32"]
    out = []
    for label, r in results.items():
        rel = (r["values"] / exact["values"] - 1).abs()
        unit = r["vector"] / r["vector"].norm()
        overlap = float(abs(unit @ (exact["vector"] / exact["vector"].norm())))
        trace_rel = abs(r["trace"] / exact["trace"] - 1)
        out.append(
            f"| {name} | {label} | {float(r['values'][0]):.6g} | {float(rel[0]):.1e} | "
            f"{float(rel[1]):.1e} | {trace_rel:.1e} | {overlap:.6f} | {r['seconds']:.1f} |"
        )
    return out


def main() -> None:
    torch.set_num_threads(2)
    lines = [
        "# bf16 and fp16 products against fp32",
        "",
        f"Machine: {machine()}. `python benchmarks/bench_precision.py`.",
        "",
        "Relative errors against fp32 products on the same model, data and seeds.",
        "",
        "| model | products | lambda_max | lambda_max error | lambda_2 error | "
        "trace error | top eigenvector overlap | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += rows("ViT, MNIST (300 Adam steps), probe 256", vit_problem())
    lines += rows("GPT-2-shaped (4 x 128), 16 x 32 random tokens", gpt2_problem())
    lines.append("")
    write("precision.md", "\n".join(lines))


if __name__ == "__main__":
    main()
