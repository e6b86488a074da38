"""Data sets as normalised in-memory tensors, batched by indexing.

torchvision's per-sample PIL path costs more than the model on MNIST, so each split is
decoded once into a float tensor. Splits and the probe set are deterministic given the seed.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import DataUnavailableError

# Per-channel (mean, std) of the training images, the usual constants.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            else:
                idx = order[start:start + batch_size].to(self.x.device)
                yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    probe: Split
    in_channels: int
    image_size: int
    n_classes: int

    def to(self, device: torch.device | str) -> "DataBundle":
        return DataBundle(self.name, self.train.to(device), self.val.to(device),
                          self.test.to(device), self.probe.to(device), self.in_channels,
                          self.image_size, self.n_classes)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $LOSSGEO_DATA_DIR, else ./data."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ.get("LOSSGEO_DATA_DIR") or "data")


def _normalise(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> normalised float32."""
    mean, std = NORMALISATION[name]
    x = images.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), the format MNIST-like data sets ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _debian_fashion_mnist(train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    prefix = "train" if train else "t10k"
    images = DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    labels = DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        return None
    x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return x, y


def _torchvision_split(name: str, root: Path, train: bool, download: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    errors: list[str] = []
    for attempt_download in ([False, True] if download else [False]):
        try:
            ds = cls(root=str(root), train=train, download=attempt_download)
            break
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError...
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        hint = {"mnist": "MNIST/raw/", "fashion-mnist": "FashionMNIST/raw/",
                "cifar10": "cifar-10-batches-py/"}[name]
        extra = (" or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else "")
        raise DataUnavailableError(
            f"dataset {name}: files not found under {root.resolve()}/{hint} and download failed "
            f"({errors[-1]}); put torchvision's files there, pass --data-dir or set "
            f"LOSSGEO_DATA_DIR{extra}")
    data = ds.data
    if isinstance(data, np.ndarray):  # CIFAR-10: (N, H, W, C) uint8
        x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    else:
        x = data.unsqueeze(1)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x, y


def load_split_raw(name: str, root: Path, train: bool, download: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels of one official split."""
    if name not in NORMALISATION:
        raise DataUnavailableError(
            f"dataset: must be one of {', '.join(NORMALISATION)} (got {name!r})")
    if name == "fashion-mnist" and not (root / "FashionMNIST" / "raw").exists():
        found = _debian_fashion_mnist(train)
        if found is not None:
            return found
    return _torchvision_split(name, root, train, download)


def load_data(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
              val_size: int = 5000, train_subset: int = 0, probe_size: int = 2048,
              download: bool = True) -> DataBundle:
    """Loads a data set once into normalised tensors with deterministic splits.

    val is carved from the official training set by a seeded permutation; train_subset
    (0 = all) then limits the remaining training split; the probe set is a fixed seeded
    subset of that training split, identical for every epoch and run with this seed.
    """
    root = resolve_data_dir(data_dir)
    x_all, y_all = load_split_raw(name, root, train=True, download=download)
    x_test, y_test = load_split_raw(name, root, train=False, download=download)
    n_all = int(y_all.shape[0])
    if val_size >= n_all:
        raise DataUnavailableError(
            f"val_size: must be >= 1 and < {n_all} for {name} (got {val_size})")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_all, generator=gen)
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    x_all = _normalise(x_all, name)
    train = Split(x_all[train_idx], y_all[train_idx])
    val = Split(x_all[val_idx], y_all[val_idx])
    test = Split(_normalise(x_test, name), y_test)
    probe_order = torch.randperm(len(train), generator=gen)[:min(probe_size, len(train))]
    probe = train.subset(probe_order)
    return DataBundle(name=name, train=train, val=val, test=test, probe=probe,
                      in_channels=int(x_all.shape[1]), image_size=int(x_all.shape[-1]),
                      n_classes=10)
