"""Loss landscapes: the loss (and accuracy) at w + sum_k c_k d_k on a fixed data set.

Every point costs at most one forward pass over the data, without autograd and without
copying the model (parameters are passed to ``torch.func.functional_call``). Below that
floor: when the network's first parametrised layer is a Linear or Conv2d applied to the raw
input, its output is linear in its weights,

    layer(x; W + sum_k c_k D_k) = layer(x; W) + sum_k c_k layer_nobias(x; D_k) (+ bias parts),

so those products are computed once per data set and every grid point only runs the rest of
the network. On the MNIST MLP the first layer is most of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lossgeo.curvature.distributed import all_sum_tensor, resolve_group, total_count
from lossgeo.curvature.operators import DataSource, LossFn, ParameterSpace, as_batches, eval_mode


def axis(resolution: int, half_range: float) -> torch.Tensor:
    """`resolution` points on [-r, r]; 0 is added when the spacing misses it, so every
    grid contains the unperturbed weights."""
    if resolution < 1 or half_range <= 0:
        raise ValueError("resolution: must be >= 1 and range > 0")
    # integer offsets (2i - (N-1)) keep the centre of an odd grid at exactly 0
    offsets = torch.arange(resolution, dtype=torch.float64) * 2 - (resolution - 1)
    points = offsets * (half_range / max(resolution - 1, 1))
    if not (points == 0).any():
        points = torch.sort(torch.cat([points, torch.zeros(1, dtype=torch.float64)])).values
    return points


MIN_FAN_IN = 64


def _fan_in(layer: nn.Module) -> int:
    """Multiply-adds per output element."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    assert isinstance(layer, nn.Conv2d)
    return layer.in_channels // layer.groups * int(torch.tensor(layer.kernel_size).prod())


def _sequence(model: nn.Module) -> nn.Sequential | None:
    if isinstance(model, nn.Sequential):
        return model
    as_sequence = getattr(model, "as_sequence", None)
    return as_sequence() if callable(as_sequence) else None


class PerturbedLoss:
    """Loss and accuracy at base + coeffs @ directions, for many coefficient vectors.

    directions: (m, n) flat vectors (ParameterSpace order); base: flat weights (default:
    the model's). factorize: use the first-layer factorisation where the model allows it.
    process_group: `data` is this rank's shard of the data set; each point's loss and
    accuracy are over all shards (one all-reduce for all the points of a call).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataSource,
        directions: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        chunk_size: int | None = 2048,
        factorize: bool = True,
        process_group: Any = None,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.group = resolve_group(process_group)
        self.space = ParameterSpace(model)
        # an empty shard (more ranks than samples) takes part in the reduction alone
        self.batches = [b for b in as_batches(data, chunk_size) if len(b[1])]
        self.n = total_count(sum(len(y) for _, y in self.batches), self.group)
        self.directions = torch.atleast_2d(directions).to(self.space.dtype)
        if self.directions.shape[1] != self.space.dim:
            raise ValueError(
                f"directions: need {self.space.dim} entries per direction "
                f"(got {self.directions.shape[1]})"
            )
        self.base = (
            self.space.flatten(self.space.values) if base is None else base.to(self.space.dtype)
        )
        self._split = self._first_layer_split() if factorize else None
        self._cache: list | None = None

    # -- first-layer factorisation ---------------------------------------------------
    @property
    def factorized(self) -> bool:
        """Whether the first layer's output is computed once per slice (see the class)."""
        return self._split is not None

    def _first_layer_split(self):
        seq = _sequence(self.model)
        if seq is None:
            return None
        modules = list(seq)
        for i, module in enumerate(modules):
            if any(True for _ in module.parameters()):
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    return None
                if _fan_in(module) < MIN_FAN_IN:
                    # Cheap first layer (e.g. a 3x3 conv on one channel): combining its cached
                    # outputs costs as much memory traffic as recomputing it (measured on the
                    # MNIST CNN: 1.2x slower), so the plain path is used.
                    return None
                if any(any(True for _ in m.buffers()) for m in modules[:i]):
                    return None
                names = {id(p): n for n, p in self.model.named_parameters()}
                layer_names = [names[id(p)] for _, p in module.named_parameters()]
                tail = nn.Sequential(*modules[i + 1 :])
                tail_names = {local: names[id(p)] for local, p in tail.named_parameters()}
                return nn.Sequential(*modules[:i]), module, layer_names, tail, tail_names
        return None

    def _layer_output(
        self, layer: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        weight, bias = params["weight"], params.get("bias")
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        assert isinstance(layer, nn.Conv2d)
        return F.conv2d(
            x,
            weight,
            bias,
            layer.stride,
            layer.padding,  # type: ignore[arg-type]
            layer.dilation,
            layer.groups,
        )

    def _build_cache(self):
        stem, layer, layer_names, _, _ = self._split
        base = self.space.unflatten(self.base)
        dirs = [self.space.unflatten(d) for d in self.directions]
        local = lambda p: {n.rsplit(".", 1)[1]: p[n] for n in layer_names}  # noqa: E731
        cache = []
        with torch.no_grad():
            for x, y in self.batches:
                h = stem(x)
                z0 = self._layer_output(layer, h, local(base))
                zs = torch.stack([self._layer_output(layer, h, local(d)) for d in dirs])
                cache.append((z0, zs, y))
        return cache

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self, coeffs: torch.Tensor | Sequence[Sequence[float]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """coeffs: (P, m). Returns (loss, accuracy), each (P,), float64."""
        coeffs = torch.atleast_2d(torch.as_tensor(coeffs, dtype=torch.float64))
        # this shard's part of each point's mean loss, and its count of correct answers
        sums = torch.empty(len(coeffs), 2, dtype=torch.float64)
        with eval_mode(self.model):
            if self._split is not None and self._cache is None:
                self._cache = self._build_cache()
            for p, c in enumerate(coeffs):
                c_model = c.to(self.space.dtype).to(self.base.device)
                sums[p, 0], sums[p, 1] = self._evaluate(c_model)
        sums = all_sum_tensor(sums, self.group)
        return sums[:, 0], sums[:, 1] / self.n

    def _tail_pieces(self):
        """Base weights and directions of the layers after the first one only: the first
        layer's own weights never need forming in the factorised path."""
        if getattr(self, "_tail", None) is None:
            _, _, _, _, tail_names = self._split
            base = self.space.unflatten(self.base)
            dirs = [self.space.unflatten(d) for d in self.directions]
            self._tail = {
                local: (base[name], torch.stack([d[name] for d in dirs]))
                for local, name in tail_names.items()
            }
        return self._tail

    def _evaluate(self, c: torch.Tensor) -> tuple[float, float]:
        if self._split is None:
            params = self.space.unflatten(self.base + c @ self.directions)
            full = {**self.space.frozen, **params}
            outputs = ((functional_call(self.model, full, (x,)), y) for x, y in self.batches)
        else:
            tail = self._split[3]
            tail_params = {
                local: w + torch.tensordot(c, d, dims=1)
                for local, (w, d) in self._tail_pieces().items()
            }
            outputs = (
                (functional_call(tail, tail_params, (z0 + torch.tensordot(c, zs, dims=1),)), y)
                for z0, zs, y in self._cache or []
            )
        total, correct = 0.0, 0
        for out, y in outputs:
            # weights n_b / N: one batch gives exactly the plain mean loss
            total += float(self.loss_fn(out, y)) * (len(y) / self.n)
            correct += int((out.argmax(-1) == y).sum())
        return total, float(correct)


@dataclass(frozen=True)
class Surface2D:
    """loss[i, j] and acc[i, j] at w + x[i] d1 + y[j] d2."""

    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The artifact form (plain tensors: `torch.load(..., weights_only=True)` reads it)."""
        return {"x": self.x, "y": self.y, "loss": self.loss, "acc": self.acc}


@dataclass(frozen=True)
class Slice1D:
    """loss[i] and acc[i] at base + t[i] * direction; `axis` names t in the artifact ("t",
    or "alpha" for an interpolation (1 - alpha) w_a + alpha w_b)."""

    t: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor
    axis: str = "t"

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {self.axis: self.t, "loss": self.loss, "acc": self.acc}


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    directions: tuple[torch.Tensor, torch.Tensor],
    grid: tuple[torch.Tensor, torch.Tensor],
    *,
    factorize: bool = True,
    process_group: Any = None,
) -> Surface2D:
    """loss[i, j] and acc[i, j] at w + xs[i] d1 + ys[j] d2, for directions (d1, d2) and
    grid (xs, ys) (process_group: `data` is this rank's shard, see `PerturbedLoss`)."""
    (d1, d2), (xs, ys) = directions, grid
    evaluator = PerturbedLoss(
        model,
        loss_fn,
        data,
        torch.stack([d1, d2]),
        factorize=factorize,
        process_group=process_group,
    )
    loss, acc = evaluator(torch.cartesian_prod(xs.double(), ys.double()))
    shape = (len(xs), len(ys))
    return Surface2D(x=xs, y=ys, loss=loss.view(shape), acc=acc.view(shape))


def slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    direction: torch.Tensor,
    ts: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    factorize: bool = True,
    process_group: Any = None,
) -> Slice1D:
    """loss[i] and acc[i] at base + ts[i] * direction (process_group: see `PerturbedLoss`)."""
    evaluator = PerturbedLoss(
        model,
        loss_fn,
        data,
        direction,
        base=base,
        factorize=factorize,
        process_group=process_group,
    )
    loss, acc = evaluator(ts.double().view(-1, 1))
    return Slice1D(t=ts, loss=loss, acc=acc)


def interpolate(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    w_a: torch.Tensor,
    w_b: torch.Tensor,
    alphas: torch.Tensor,
    *,
    process_group: Any = None,
) -> Slice1D:
    """Linear interpolation (1 - alpha) w_a + alpha w_b (Goodfellow et al. 2015)."""
    out = slice_1d(model, loss_fn, data, w_b - w_a, alphas, base=w_a, process_group=process_group)
    return Slice1D(t=alphas, loss=out.loss, acc=out.acc, axis="alpha")
