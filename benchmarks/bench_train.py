"""Seconds per training epoch on full MNIST (55,000 training images, batch 128) for the MLP
and the CNN, with lossgeo's in-memory pipeline and with torchvision's DataLoader +
ToTensor/Normalize, in one process. Run: python benchmarks/bench_train.py
(writes results/train.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, machine, mnist, write  # noqa: E402

from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.models import build_model  # noqa: E402

BATCH = 128


def epoch(model, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def torchvision_loader(train_indices: torch.Tensor):
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = torchvision.datasets.MNIST(data_dir(), train=True, transform=tf, download=False)
    subset = torch.utils.data.Subset(dataset, train_indices.tolist())
    return torch.utils.data.DataLoader(
        subset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def main() -> None:
    data = mnist()
    # the same 55,000 training images for both pipelines
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    loader = torchvision_loader(order[5000:])
    rows = [
        "| model | in-memory (lossgeo) s/epoch | DataLoader+ToTensor s/epoch | ratio |",
        "|---|---|---|---|",
    ]
    for name in ("mlp", "cnn"):
        torch.manual_seed(0)
        ours = epoch(
            build_model(name),
            data.train.batches(BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)),
        )
        torch.manual_seed(0)
        theirs = epoch(build_model(name), loader)
        rows.append(f"| {name} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x |")
        print(rows[-1], flush=True)
    write(
        "train.md",
        "\n".join(
            [
                f"# Training-epoch benchmark ({time.strftime('%Y-%m-%d')}; {machine()})",
                "",
                *rows,
                "",
            ]
        ),
    )


if __name__ == "__main__":
    main()
