"""Shared curvature test cases: each is a small float64 problem with its exact Hessian.

A case is (model, loss_fn, data, reference), where `reference()` is the Hessian of the mean
loss over all samples with respect to the trainable parameters, by reverse-over-reverse
autograd (torch.autograd.functional.hessian: torch.func.hessian is wrong on LayerNorm in
PyTorch 2.14, see test_any_model.py). Cases cover: uneven batches, both losses, BatchNorm and
dropout (measured in eval mode), frozen parameters, dict batches with loss_fn(model, batch).
Build them under float64 (the `float64` fixture, or conftest's `float64_default()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lossgeo.curvature.batches import eval_mode
from lossgeo.curvature.params import ParameterSpace
from lossgeo.losses import cross_entropy, half_squared_error


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable
    data: Any
    mean_loss: Callable[[dict], torch.Tensor]  # of a full parameter dict

    def reference(self) -> torch.Tensor:
        space = ParameterSpace(self.model)

        def of_flat(flat):
            return self.mean_loss({**space.frozen, **space.unflatten(flat)})

        with eval_mode(self.model):
            return torch.autograd.functional.hessian(of_flat, space.flatten(space.values))


def _toy(n=9, d_in=4, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _pairs_case(name, model, loss_fn, x, y, split=(5,)):
    edges = [0, *split, len(y)]
    batches = [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    return Case(
        name, model, loss_fn, batches, lambda p: loss_fn(functional_call(model, p, (x,)), y)
    )


def all_cases() -> list[Case]:
    """Built under float64()."""
    x, y = _toy()
    cases = []
    for loss_name, loss_fn in (("cross_entropy", cross_entropy), ("mse", half_squared_error)):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        cases.append(_pairs_case(f"uneven-{loss_name}", mlp, loss_fn, x, y, split=(2, 7)))
    torch.manual_seed(1)
    bn = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)
    )
    bn.train()
    with torch.no_grad():  # running statistics that differ from a fresh BatchNorm's
        bn(torch.randn(32, 4) * 2 + 1)
    cases.append(_pairs_case("batchnorm-dropout", bn, cross_entropy, x, y))
    torch.manual_seed(2)
    frozen = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    frozen[0].requires_grad_(False)
    cases.append(_pairs_case("frozen-first-layer", frozen, cross_entropy, x, y))

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh())
            self.head = nn.Linear(5, 3)

        def forward(self, features, labels):
            return F.cross_entropy(self.head(self.body(features)), labels)

    torch.manual_seed(3)
    net = DictNet()
    batches = [{"features": x[:6], "labels": y[:6]}, {"features": x[6:], "labels": y[6:]}]
    cases.append(
        Case(
            "dict-batches",
            net,
            lambda model, batch: model(**batch),
            batches,
            lambda p: functional_call(net, p, (x, y)),
        )
    )
    return cases


CASE_NAMES = [
    "uneven-cross_entropy",
    "uneven-mse",
    "batchnorm-dropout",
    "frozen-first-layer",
    "dict-batches",
]


def case(name: str) -> Case:
    return next(c for c in all_cases() if c.name == name)
