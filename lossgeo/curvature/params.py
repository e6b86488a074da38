"""The parameter space a curvature matrix lives in: which parameters, and their flattening.

Frozen parameters (`requires_grad=False`) are never part of it: they are held fixed, like
the parameters a filter leaves out. A filter is a list of names or patterns; a parameter is
selected when a pattern equals its name, is a module path above it ("transformer.h.0"
selects every parameter of that block) or matches it as a shell glob ("*.attn.*").
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

import torch
from torch import nn


def matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def select_parameters(model: nn.Module, params: Sequence[str] | str | None = None) -> list[str]:
    """Names of the trainable parameters selected by `params` (all trainable ones if None),
    in the model's order. A pattern that selects no trainable parameter is an error, and so
    is a model on the meta device (shapes without values: "unsupported scalarType" at the
    first product, after an epoch of training)."""
    named = dict(model.named_parameters())
    on_meta = [n for n, p in named.items() if p.is_meta]
    if on_meta:
        raise ValueError(
            f"model: {len(on_meta)} parameter(s) on the meta device ({on_meta[0]}, ...) have "
            "no values to measure; materialise them first (model.to_empty(device=...), then "
            "load_state_dict)"
        )
    trainable = [n for n, p in named.items() if p.requires_grad]
    if params is None:
        if not trainable:
            raise ValueError("params: the model has no trainable parameter")
        return trainable
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params: an empty filter selects nothing")
    for pattern in patterns:
        if not any(matches(n, pattern) for n in trainable):
            frozen = [n for n in named if n not in trainable and matches(n, pattern)]
            why = f"only frozen ones ({', '.join(frozen[:3])})" if frozen else "none"
            raise ValueError(f"params: {pattern!r} matches no trainable parameter ({why})")
    return [n for n in trainable if any(matches(n, p) for p in patterns)]


class ParameterSpace:
    """Flattening between a dict of named parameters and one vector.

    names: exact names, patterns (see the module docstring) or None for every trainable
    parameter. `values` are detached copies: measurements never touch the model's tensors
    or their .grad; `frozen` holds every other parameter, detached, at its value."""

    def __init__(self, model: nn.Module, names: Sequence[str] | str | None = None) -> None:
        named = dict(model.named_parameters())
        self.names = select_parameters(model, names)
        self.values = {n: named[n].detach().clone() for n in self.names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.values}
        self.shapes = [self.values[n].shape for n in self.names]
        self.sizes = [self.values[n].numel() for n in self.names]
        self.dim = sum(self.sizes)
        first = self.values[self.names[0]]
        self.dtype, self.device = first.dtype, first.device

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        items = [tensors[n] for n in self.names] if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in items])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(vector, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            out[n] = slice(start, start + size)
            start += size
        return out
