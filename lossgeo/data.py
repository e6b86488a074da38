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

from lossgeo.errors import DataUnavailableError

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

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size].to(self.x.device)
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
        return DataBundle(
            self.name,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.probe.to(device),
            self.in_channels,
            self.image_size,
            self.n_classes,
        )


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
    """Reads an IDX file (optionally gzipped), the format MNIST-like data sets ship in; a
    file whose length disagrees with its header (truncated, or not IDX) is named as corrupt."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # gzip: truncated stream or not gzip at all
        raise DataUnavailableError(
            f"dataset: file {path} is corrupt ({type(exc).__name__}: "
            f"{exc}); delete it and download it again"
        ) from None
    ndim = raw[3] if len(raw) >= 4 else 0
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or len(raw) != expected:
        raise DataUnavailableError(
            f"dataset: file {path} is corrupt ({len(raw)} bytes, its header says {expected}); "
            "delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# Where torchvision keeps the raw IDX files of the MNIST-like sets under the data root.
IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _idx_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images (N, 1, H, W) and labels from IDX files (plain or .gz) in `folder`, or None when
    they are not there. Read here rather than by torchvision, which reports a damaged file
    as "not found"."""
    prefix = "train" if train else "t10k"
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.exists()), None)
        if path is None:
            return None
        found.append(path)
    x = torch.from_numpy(read_idx(found[0]).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(found[1]).astype(np.int64))
    return x, y


def _debian_fashion_mnist(train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    return _idx_split(DEBIAN_FASHION_MNIST, train)


def _torchvision_split(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    errors: list[str] = []
    # A download that fails must not leave the empty folders torchvision made for it.
    top = root.absolute()
    folders = [top] + (
        [top / IDX_FOLDERS[name], top / IDX_FOLDERS[name] / "raw"] if name in IDX_FOLDERS else []
    )
    # ... and above them: torchvision makes every missing ancestor (/nonexistent of
    # /nonexistent/dd)
    missing = [f for f in folders if not f.exists()]
    missing += [a for a in top.parents if not a.exists()]
    for attempt_download in [False, True] if download else [False]:
        try:
            ds = cls(root=str(root), train=train, download=attempt_download)
            break
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError...
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        for folder in sorted(set(missing), key=lambda f: len(f.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        hint = {
            "mnist": "MNIST/raw/",
            "fashion-mnist": "FashionMNIST/raw/",
            "cifar10": "cifar-10-batches-py/",
        }[name]
        extra = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise DataUnavailableError(
            f"dataset {name}: files not found under {root.resolve()}/{hint} and download failed "
            f"({errors[-1]}); put torchvision's files there, pass --data-dir or set "
            f"LOSSGEO_DATA_DIR{extra}"
        )
    data = ds.data
    if isinstance(data, np.ndarray):  # CIFAR-10: (N, H, W, C) uint8
        x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    else:
        x = data.unsqueeze(1)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x, y


def load_split_raw(
    name: str, root: Path, train: bool, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels of one official split."""
    if name not in NORMALISATION:
        raise DataUnavailableError(
            f"dataset: must be one of {', '.join(NORMALISATION)} (got {name!r})"
        )
    if name in IDX_FOLDERS:
        found = _idx_split(root / IDX_FOLDERS[name] / "raw", train)
        if found is None and name == "fashion-mnist":
            found = _debian_fashion_mnist(train)
        if found is not None:
            return found
    return _torchvision_split(name, root, train, download)


def _noisy_labels(labels: torch.Tensor, share: float, seed: int, classes: int = 10) -> torch.Tensor:
    """`labels` with round(share * n) of them, chosen by a seeded permutation, replaced by
    uniform draws over the classes (a draw may give the true label back, as in Zhang et al.
    2017's partially random labels)."""
    if share == 0:
        return labels
    gen = torch.Generator().manual_seed(seed + 7919)  # apart from the split's stream
    chosen = torch.randperm(len(labels), generator=gen)[: round(share * len(labels))]
    noisy = labels.clone()
    noisy[chosen] = torch.randint(0, classes, (len(chosen),), generator=gen)
    return noisy


def load_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_size: int = 5000,
    train_subset: int = 0,
    probe_size: int = 2048,
    label_noise: float = 0.0,
    download: bool = True,
) -> DataBundle:
    """Loads a data set once into normalised tensors with deterministic splits.

    val is carved from the official training set by a seeded permutation; train_subset
    (0 = all) then limits the remaining training split; the probe set is a fixed seeded
    subset of that training split, identical for every epoch and run with this seed.
    `label_noise` replaces that share of the training split's labels (the probe set's with
    them) by uniform draws over the classes, seeded; val and test keep their true labels.
    """
    if not 0 <= label_noise < 1:
        raise DataUnavailableError(f"label_noise: must be in [0, 1) (got {label_noise})")
    root = resolve_data_dir(data_dir)
    x_all, y_all = load_split_raw(name, root, train=True, download=download)
    x_test, y_test = load_split_raw(name, root, train=False, download=download)
    n_all = int(y_all.shape[0])
    if val_size >= n_all:
        raise DataUnavailableError(
            f"val_size: must be >= 1 and < {n_all} for {name} (got {val_size})"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_all, generator=gen)
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    x_all = _normalise(x_all, name)
    train = Split(x_all[train_idx], _noisy_labels(y_all[train_idx], label_noise, seed))
    val = Split(x_all[val_idx], y_all[val_idx])
    test = Split(_normalise(x_test, name), y_test)
    probe_order = torch.randperm(len(train), generator=gen)[: min(probe_size, len(train))]
    probe = train.subset(probe_order)
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        probe=probe,
        in_channels=int(x_all.shape[1]),
        image_size=int(x_all.shape[-1]),
        n_classes=10,
    )
