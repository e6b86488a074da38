"""lossgeo's Tracker in a Hugging Face `Trainer`, through a `TrainerCallback`.

    pip install -e ".[transformers]"
    python examples/huggingface_trainer.py [--steps 40] [--every 10]

A tiny GPT-2 built from a config (random weights, nothing downloaded) learns a few hundred
synthetic tokens (a repeating pattern with noise). Every `--every` optimizer steps the
callback measures the Hessian of the attention weights of the first block (a parameter
filter) on a fixed probe set of dict batches, as the model itself computes its loss
(`model(**batch).loss`). PyTorch has no double backward through fused attention kernels,
so the products run under the math backend when needed; the run's tag
`lossgeo_attention_backend` says so. AdamW's edge is read through Accelerate's optimizer
wrapper: `step/preconditioned_lambda_max` against 38/lr (`step/edge_ratio`). Prints where the
MLflow run went and what tracking cost.

Under torchrun (`torchrun --nproc-per-node 2 examples/huggingface_trainer.py`) the Trainer
trains with DDP on CPU (gloo). The Tracker is then made when training begins, once the
Trainer has joined the process group: each rank gives it its shard of the probe set and
`process_group=True`, and rank 0 alone opens the MLflow run and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import mlflow
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from lossgeo import Scope, StepSettings, Tracker


class LossgeoCallback(TrainerCallback):
    """Runs `tracker.step(global_step)` after every optimizer step; keeps the time spent.
    The Tracker is made when training begins (`make_tracker(probe batches, group)`), when
    the Trainer has its optimizer and, under torchrun, its process group."""

    def __init__(self, make_tracker, probe: list) -> None:
        self.make_tracker, self.probe = make_tracker, probe
        self.tracker: Tracker | None = None
        self.seconds, self.products = 0.0, 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        probe, group = self.probe, None
        if args.world_size > 1:  # DDP: this rank's shard of the probe batches
            probe, group = probe[args.process_index :: args.world_size], True
        self.tracker = self.make_tracker(probe, group)
        self.tracker.optimizer = optimizer  # the learning rate for the edge ratios

    def on_step_end(self, args, state, control, **kwargs):
        started = time.perf_counter()
        assert self.tracker is not None  # made at on_train_begin
        metrics = self.tracker.step(state.global_step)
        if metrics and state.is_world_process_zero:
            self.seconds += time.perf_counter() - started
            self.products += int(
                metrics["step/lambda_max_n_hvp"]
                + metrics.get("step/lambda_max_cold_n_hvp", 0)
                + metrics["step/batch_sharpness_n"]
            )
            print(
                f"step {state.global_step}: lambda_max {metrics['step/lambda_max']:.4g}, "
                f"batch_sharpness {metrics['step/batch_sharpness']:.4g}, "
                f"edge_ratio {metrics.get('step/edge_ratio', float('nan')):.3g}"
            )


def token_batches(n_sequences: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.arange(length) % 7
    noise = torch.randint(0, vocab, (n_sequences, length), generator=gen)
    keep = torch.rand(n_sequences, length, generator=gen) < 0.8
    return torch.where(keep, pattern.expand(n_sequences, -1), noise)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--output-dir", default="hf_trainer_output")
    args = parser.parse_args()

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
    train_ids = token_batches(24, 32, config.vocab_size, seed=1)  # 768 tokens
    probe_ids = train_ids[:8]
    probe = [{"input_ids": ids, "labels": ids} for ids in probe_ids.split(4)]

    def make_tracker(probe_batches: list, group) -> Tracker:
        return Tracker(
            model,
            lambda model, batch: model(**batch).loss,
            probe_batches,
            steps=StepSettings(every=args.every),
            scope=Scope(params="transformer.h.0.attn", process_group=group),
        )

    callback = LossgeoCallback(make_tracker, probe)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",  # so AdamW's edge stays 38/lr = 38,000
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    started = time.perf_counter()
    rank_zero = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; 0 alone logs
    opened = mlflow.start_run(run_name="huggingface-trainer") if rank_zero else None
    with opened or contextlib.nullcontext() as run:
        Trainer(
            model=model, args=training, train_dataset=TokenDataset(train_ids), callbacks=[callback]
        ).train()
    total = time.perf_counter() - started
    tracker = callback.tracker
    if run is None or tracker is None:
        return
    print(
        f"tracking: {tracker.n_measurements} measurements, {callback.products} "
        f"Hessian-vector products, {callback.seconds:.2f} s of {total:.2f} s in all"
    )
    print(
        f"MLflow run {run.info.run_id} (experiment {run.info.experiment_id}) at "
        f"{mlflow.get_tracking_uri()}"
    )


if __name__ == "__main__":
    main()
