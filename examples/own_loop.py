"""A plain PyTorch training loop with lossgeo's Tracker, logged into MLflow.

    python examples/own_loop.py [--steps 200] [--every 20]

Synthetic data (no download): a two-layer MLP learns a noisy linear rule with SGD. Every
`--every` steps the Tracker measures lambda_max (warm-started), batch sharpness, gradient
alignment and the edge ratios on a fixed probe set; at the end of each epoch, the epoch set
(top eigenvalues, trace, lambda_max per layer). Everything lands in one MLflow run, whose
location is printed at the end.
"""

from __future__ import annotations

import argparse

import mlflow
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo import StepSettings, Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = ((x[:, :5].sum(dim=1) + 0.5 * torch.randn(2048)) > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    probe = (x[:512], y[:512])  # a fixed training subset
    tracker = Tracker(
        model,
        F.cross_entropy,
        probe,
        optimizer=optimizer,
        steps=StepSettings(every=args.every, batch_size=args.batch_size),
    )
    steps_per_epoch = len(y) // args.batch_size

    with mlflow.start_run(run_name="own-loop") as run:
        mlflow.log_params({"lr": args.lr, "batch_size": args.batch_size})
        step = 0
        while step < args.steps:
            order = torch.randperm(len(y))
            for idx in order.split(args.batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                step += 1
                measured = tracker.step(step, loss=loss.item())
                if measured:
                    print(
                        f"step {step}: lambda_max {measured['step/lambda_max']:.3f}, "
                        f"batch_sharpness {measured['step/batch_sharpness']:.3f}, "
                        f"2/lr {2 / args.lr:.1f}, "
                        f"{measured['step/lambda_max_n_hvp']:.0f} products"
                    )
                if step % steps_per_epoch == 0:
                    epoch = tracker.epoch(step // steps_per_epoch)
                    print(
                        f"epoch {step // steps_per_epoch}: lambda_max "
                        f"{epoch['lambda_max']:.3f}, trace {epoch['hessian_trace']:.2f}"
                    )
                if step >= args.steps:
                    break
    print(
        f"MLflow run {run.info.run_id} (experiment {run.info.experiment_id}) at "
        f"{mlflow.get_tracking_uri()}: `mlflow ui` shows step/lambda_max against steps"
    )


if __name__ == "__main__":
    main()
