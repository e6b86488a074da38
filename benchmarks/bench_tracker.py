"""Per-step tracking cost (issue 12 item 2-3 targets; issue 13's "Your own model" figures).

A. Two settings, 600 steps each, the Tracker measuring every 10 steps, a cold solve (to
   tol / 10) every 10th measurement: the MNIST MLP under SGD (lr 0.1, batch 32, full
   training split, probe 1024), and the edge-of-stability setting under full-batch GD (MSE,
   tanh MLP, 2,000 images). Reported: products per warm lambda_max solve (after the first)
   against the cold solve's, the largest |cold gap| at the cold checks, and the seconds the
   light set takes against a training step.
B. A tiny GPT-2 (2 layers, width 32, random weights) trained with AdamW on synthetic tokens,
   the Tracker on the first block's attention weights every 10 steps: products and seconds
   per measurement against a training step.

Run: python benchmarks/bench_tracker.py   (prints Markdown tables)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mnist  # noqa: E402

from lossgeo import (
    Scope,
    StepSettings,
    Tracker,  # noqa: E402
)
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.models import build_model  # noqa: E402


class Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step=0):
        self.rows.append((step, metrics))

    def set_tags(self, tags):
        pass


def mnist_mlp(setting: str, every: int = 10, n_steps: int = 600) -> None:
    """setting "sgd": the default MLP, full training split, SGD lr 0.1, batch 32, probe 1024;
    "gd": the edge-of-stability setting, MSE, tanh MLP 784-200-200-10, full-batch GD with
    lr 0.04 on 2,000 images (the probe set is those images)."""
    from lossgeo.losses import half_squared_error

    if setting == "sgd":
        data = mnist(probe_size=1024)
        torch.manual_seed(0)
        model, loss_fn, lr, batch = build_model("mlp"), cross_entropy, 0.1, 32
        probe = (data.probe.x, data.probe.y)
    else:
        data = mnist(train_subset=2000, probe_size=2000)
        torch.manual_seed(0)
        model = build_model("mlp", hidden=(200, 200), activation="tanh")
        loss_fn, lr, batch = half_squared_error, 0.04, 2000
        probe = (data.train.x, data.train.y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = Recorder()
    tracker = Tracker(
        model,
        loss_fn,
        probe,
        optimizer=optimizer,
        steps=StepSettings(every=every, batch_size=32 if setting == "sgd" else 200),
        logger=recorder,
    )
    gen = torch.Generator().manual_seed(1)
    step, train_seconds, measure_seconds = 0, 0.0, 0.0
    started = time.perf_counter()
    while step < n_steps:
        for x, y in data.train.batches(batch, shuffle=True, generator=gen):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            t1 = time.perf_counter()
            train_seconds += t1 - t0
            if tracker.due(step):
                tracker.step(step, loss=float(loss.detach()))
                measure_seconds += time.perf_counter() - t1
            if step == n_steps:
                break
    total = time.perf_counter() - started
    rows = [m for _, m in recorder.rows]
    warm = [m["step/lambda_max_n_hvp"] for m in rows[1:]]
    cold = [m["step/lambda_max_cold_n_hvp"] for m in rows if "step/lambda_max_cold_n_hvp" in m]
    gaps = [abs(m["step/lambda_max_cold_gap"]) for m in rows if "step/lambda_max_cold_gap" in m]
    bs_n = [m["step/batch_sharpness_n"] for m in rows]
    per = [m["step/seconds"] for m in rows[1:]]
    what = (
        "MNIST MLP (535k parameters), full training split, SGD lr 0.1 B 32"
        if setting == "sgd"
        else "edge-of-stability setting: MSE, tanh MLP 784-200-200-10, full-batch GD lr 0.04 "
        "on 2,000 images"
    )
    print(
        f"\nA ({setting}). {what}, the first {step} steps, measured every {every} steps: "
        f"{len(rows)} measurements ({machine()})\n"
    )
    print("| quantity | value |\n|---|---|")
    print(
        f"| products per warm lambda_max solve (after the first), mean / max | "
        f"{statistics.mean(warm):.2f} / {max(warm):.0f} |"
    )
    print(f"| products of the first (cold) solve | {rows[0]['step/lambda_max_n_hvp']:.0f} |")
    print(f"| products per cold check, mean ({len(cold)} checks) | {statistics.mean(cold):.1f} |")
    print(f"| largest relative gap cold - warm at a cold check | {max(gaps):.1e} |")
    print(f"| mini-batches per batch-sharpness estimate, mean | {statistics.mean(bs_n):.1f} |")
    print(f"| seconds per measurement (light set), median | {statistics.median(per):.3f} |")
    print(f"| seconds per training step, mean | {train_seconds / step:.4f} |")
    print(
        f"| tracking share of the wall time | "
        f"{measure_seconds / total:.0%} ({measure_seconds:.1f} s of {total:.1f} s) |"
    )


def tiny_gpt2() -> None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("\nB. skipped: transformers not installed")
        return
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (64, 32), generator=gen)
    probe = [{"input_ids": b, "labels": b} for b in ids[:8].split(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recorder = Recorder()
    tracker = Tracker(
        model,
        lambda m, b: m(**b).loss,
        probe,
        steps=StepSettings(every=10),
        scope=Scope(params="transformer.h.0.attn"),
        logger=recorder,
    )
    train_seconds, steps = 0.0, 100
    for step in range(1, steps + 1):
        batch = ids[torch.randint(0, 64, (4,), generator=gen)]
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - t0
        tracker.step(step)
    rows = [m for _, m in recorder.rows]
    products = [
        m["step/lambda_max_n_hvp"]
        + m["step/batch_sharpness_n"]
        + m.get("step/lambda_max_cold_n_hvp", 0)
        for m in rows
    ]
    n_params = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.0.attn")
    )
    print(
        f"\nB. tiny GPT-2 ({sum(p.numel() for p in model.parameters()):,} parameters; "
        f"the filter keeps {n_params:,}), AdamW, {steps} steps, probe 8 x 32 tokens\n"
    )
    print("| quantity | value |\n|---|---|")
    print(
        f"| products per measurement (lambda_max + batch sharpness), mean after the first | "
        f"{statistics.mean(products[1:]):.1f} |"
    )
    print(
        f"| seconds per measurement, median | "
        f"{statistics.median(m['step/seconds'] for m in rows[1:]):.3f} |"
    )
    print(f"| seconds per training step, mean | {train_seconds / steps:.4f} |")
    print(
        f"| attention backend of the products | "
        f"{'math (fallback)' if tracker.math_attention else 'default'} |"
    )


if __name__ == "__main__":
    mnist_mlp("sgd")
    mnist_mlp("gd")
    tiny_gpt2()
