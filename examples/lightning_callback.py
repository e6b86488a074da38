"""lossgeo's Tracker in a PyTorch Lightning `Trainer`, through a `Callback`.

    pip install -e ".[lightning]"
    python examples/lightning_callback.py [--epochs 3] [--every 20] [--devices 2]

A LightningModule (a two-layer MLP on synthetic data, SGD) is trained by Lightning; the
callback calls the Tracker after every optimizer step and at the end of every epoch, inside
one MLflow run, whose location is printed at the end.

With `--devices 2` Lightning trains with its DDP strategy on 2 CPU processes (gloo). Each
rank then gives the Tracker its shard of the probe set and `process_group=True`: the
measurements are those of the whole probe set, taken collectively, and rank 0 alone starts
the MLflow run and logs to it.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import lightning as L
import mlflow
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossgeo import Scope, StepSettings, Tracker


class LossgeoCallback(L.Callback):
    """tracker.step(global step) after each optimizer step, tracker.epoch(epoch) after each
    epoch; the Tracker is made when training starts, from the module and its optimizer."""

    def __init__(self, probe, every_steps: int, batch_size: int) -> None:
        self.probe, self.every_steps, self.batch_size = probe, every_steps, batch_size
        self.tracker: Tracker | None = None

    def on_train_start(self, trainer, pl_module):
        x, y = self.probe
        if trainer.world_size > 1:  # DDP: this rank's shard, measured collectively
            x = x.tensor_split(trainer.world_size)[trainer.global_rank]
            y = y.tensor_split(trainer.world_size)[trainer.global_rank]
        self.tracker = Tracker(
            pl_module.net,
            F.cross_entropy,
            (x, y),
            optimizer=trainer.optimizers[0],
            steps=StepSettings(every=self.every_steps, batch_size=self.batch_size),
            scope=Scope(process_group=True if trainer.world_size > 1 else None),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        measured = self.tracker.step(trainer.global_step, loss=float(outputs["loss"]))
        if measured and trainer.is_global_zero:
            print(
                f"step {trainer.global_step}: lambda_max {measured['step/lambda_max']:.3f}, "
                f"batch_sharpness {measured['step/batch_sharpness']:.3f}"
            )

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = self.tracker.epoch(trainer.current_epoch + 1)
        if trainer.is_global_zero:
            print(f"epoch {trainer.current_epoch + 1}: lambda_max {epoch['lambda_max']:.3f}")


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = ((x[:, :5].sum(dim=1) + 0.5 * torch.randn(1024)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    callback = LossgeoCallback((x[:256], y[:256]), args.every, args.batch_size)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
    )
    # Lightning starts the other ranks by running this script again, with LOCAL_RANK set:
    # only rank 0 opens the MLflow run (the others' Trackers log nothing)
    rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
    with mlflow.start_run(run_name="lightning") if rank_zero else contextlib.nullcontext() as run:
        trainer.fit(Classifier(lr=0.2), loader)
    if run is not None:
        print(
            f"MLflow run {run.info.run_id} (experiment {run.info.experiment_id}) at "
            f"{mlflow.get_tracking_uri()}"
        )


if __name__ == "__main__":
    main()
