"""Mode connectivity: low-loss paths between two trained networks.

- The straight line (1 - t) w_a + t w_b (Frankle et al. 2020, linear mode connectivity).
- A quadratic Bezier curve (1 - t)^2 w_a + 2 t (1 - t) theta + t^2 w_b whose control point
  theta is trained so that the loss is low all along it (Garipov et al. 2018): each mini-batch
  draws t ~ U(0, 1) and steps theta on the loss at that point of the curve.
- Weight matching for MLPs (Ainsworth et al. 2023): the hidden units of network b permuted
  to line up with those of network a, which leaves b's function unchanged, so that the paths
  can be compared with and without the permutation symmetry (Entezari et al. 2022).

The barrier of a path is its largest training loss minus the mean of its endpoints' losses.
Weights are flat vectors in the order of `ParameterSpace`. Models with BatchNorm get their
running statistics recomputed at every evaluated point (`torch.optim.swa_utils.update_bn`),
as Garipov et al. do: the endpoints' statistics do not hold between them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from lossgeo.curvature.params import ParameterSpace
from lossgeo.data import Split
from lossgeo.losses import LossFn

PATH_COLUMNS = ("path", "t", "train_loss", "test_loss", "train_acc", "test_acc")


def linear_point(w_a: torch.Tensor, w_b: torch.Tensor, t: float) -> torch.Tensor:
    """The straight line (1 - t) w_a + t w_b at t."""
    return (1 - t) * w_a + t * w_b


def bezier_point(
    w_a: torch.Tensor, control: torch.Tensor, w_b: torch.Tensor, t: float
) -> torch.Tensor:
    """The quadratic Bezier curve at t: w_a at 0 and w_b at 1 exactly (the other two
    weights are exactly 0 there), differentiable in `control`."""
    return (1 - t) ** 2 * w_a + 2 * t * (1 - t) * control + t**2 * w_b


def _uses_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class PathModel:
    """A copy of the model whose trainable parameters are set to points of a path."""

    def __init__(self, model: nn.Module) -> None:
        """A deep copy of `model`: the caller's model and its statistics stay untouched."""
        self.model = copy.deepcopy(model)
        self.space = ParameterSpace(self.model)
        self.batch_norm = _uses_batch_norm(self.model)

    def loss_at(self, point: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn):
        """The loss of a mini-batch at `point`, differentiable in it (train mode: BatchNorm
        uses the batch's statistics, as in training)."""
        self.model.train()
        out = torch.func.functional_call(self.model, self.space.unflatten(point), (x,))
        return loss_fn(out, y)

    @torch.no_grad()
    def set(self, point: torch.Tensor, train: Split | None = None, batch_size: int = 512) -> None:
        """Load `point`; with BatchNorm, recompute the running statistics on `train`."""
        named = dict(self.model.named_parameters())
        for name, value in self.space.unflatten(point).items():
            named[name].copy_(value)
        if self.batch_norm and train is not None:
            torch.optim.swa_utils.update_bn((x for x, _ in train.batches(batch_size)), self.model)
        self.model.eval()

    @torch.no_grad()
    def evaluate(
        self, loss_fn: LossFn, split: Split, batch_size: int = 2048
    ) -> tuple[float, float]:
        """(mean loss, accuracy) at the loaded point, in eval mode."""
        self.model.eval()
        total, correct = 0.0, 0
        for x, y in split.batches(batch_size):
            out = self.model(x)
            total += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=-1) == y).sum())
        return total / len(split), correct / len(split)


@dataclass(frozen=True)
class CurveFit:
    """How a Bezier curve's control point is trained.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples a step.
        make_optimizer: the optimizer over [control point] (as the end points were trained).
        seed: the shuffles and the draws of t along the curve.
    """

    epochs: int
    batch_size: int
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    seed: int = 0

    def __post_init__(self) -> None:
        """Bad counts fail here, in one line, before any training."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size: must be >= 1 (got {self.epochs}, {self.batch_size})"
            )


def fit_bezier(
    model: nn.Module,
    loss_fn: LossFn,
    train: Split,
    ends: tuple[torch.Tensor, torch.Tensor],
    fit: CurveFit,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """The control point of a quadratic Bezier curve between the flat weights `ends` =
    (w_a, w_b), trained for `fit.epochs` passes over `train`: it starts at the midpoint
    (the straight line), and each mini-batch steps it on the loss at a uniform random t.
    `on_epoch(epoch, mean loss)` reports."""
    w_a, w_b = ends
    epochs, batch_size, seed = fit.epochs, fit.batch_size, fit.seed
    path = PathModel(model)
    control = ((w_a + w_b) / 2).detach().clone().requires_grad_(True)
    optimizer = fit.make_optimizer([control])
    shuffle = torch.Generator().manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + 1)
    for epoch in range(1, epochs + 1):
        total, n = 0.0, 0
        for x, y in train.batches(batch_size, shuffle=True, generator=shuffle):
            t = float(torch.rand((), generator=draws, dtype=torch.float64))
            optimizer.zero_grad(set_to_none=True)
            loss = path.loss_at(bezier_point(w_a, control, w_b, t), x, y, loss_fn)
            loss.backward()
            optimizer.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        if on_epoch is not None:
            on_epoch(epoch, total / n)
    return control.detach()


@dataclass(frozen=True)
class PathPoint:
    """Train and test loss and accuracy at one t of one path (a row of connect/path.csv)."""

    path: str
    t: float
    train_loss: float
    test_loss: float
    train_acc: float
    test_acc: float


def evaluate_path(
    model: nn.Module,
    loss_fn: LossFn,
    name: str,
    point_at: Callable[[float], torch.Tensor],
    ts: Sequence[float],
    splits: Mapping[str, Split],
) -> list[PathPoint]:
    """Train and test loss and accuracy at each t of a path (`splits` holds "train" and
    "test"; BatchNorm statistics are recomputed on "train" at each point)."""
    path = PathModel(model)
    rows = []
    for t in ts:
        path.set(point_at(t), splits["train"])
        train_loss, train_acc = path.evaluate(loss_fn, splits["train"])
        test_loss, test_acc = path.evaluate(loss_fn, splits["test"])
        rows.append(PathPoint(name, float(t), train_loss, test_loss, train_acc, test_acc))
    return rows


def barrier(train_losses: Sequence[float]) -> float:
    """The largest loss along a path minus the mean of its two endpoints' losses (the path's
    first and last points)."""
    if len(train_losses) < 2:
        raise ValueError("a barrier needs a path of at least 2 points")
    return float(max(train_losses) - (train_losses[0] + train_losses[-1]) / 2)


def _linear_chain(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of an MLP whose forward is Flatten, then Linear and elementwise
    activations in turn (lossgeo's `MLP`); a one-line ValueError for any other model."""
    sequence = getattr(model, "as_sequence", None)
    layers = list(sequence()) if callable(sequence) else []
    elementwise = (nn.Flatten, nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity)
    if not layers or not all(isinstance(m, (nn.Linear, *elementwise)) for m in layers):
        raise ValueError(
            f"weight matching: only for MLPs (Linear layers and elementwise activations; "
            f"got {type(model).__name__})"
        )
    return [m for m in layers if isinstance(m, nn.Linear)]


def weight_matching(
    model_a: nn.Module, model_b: nn.Module, *, max_rounds: int = 100, seed: int = 0
) -> list[np.ndarray]:
    """Permutations of model_b's hidden units that best line up its weights with model_a's
    (Ainsworth et al. 2023, weight matching): coordinate ascent over the hidden layers in
    random order, each a linear assignment (scipy) of the inner product of incoming weights,
    biases and outgoing weights, until a round changes nothing. perms[l][i] is the unit of
    b's hidden layer l that goes to position i."""
    layers_a, layers_b = _linear_chain(model_a), _linear_chain(model_b)
    if [m.weight.shape for m in layers_a] != [m.weight.shape for m in layers_b]:
        raise ValueError("weight matching: the two MLPs differ in their layer shapes")
    wa = [m.weight.detach().double().cpu() for m in layers_a]
    wb = [m.weight.detach().double().cpu() for m in layers_b]
    ba = [_bias(m) for m in layers_a]
    bb = [_bias(m) for m in layers_b]
    hidden = len(wa) - 1
    perms = [np.arange(wa[layer].shape[0]) for layer in range(hidden)]
    rng = np.random.default_rng(seed)
    for _ in range(max_rounds):
        changed = False
        for layer in rng.permutation(hidden):
            incoming = wb[layer] if layer == 0 else wb[layer][:, perms[layer - 1]]
            outgoing = wb[layer + 1] if layer + 1 == hidden else wb[layer + 1][perms[layer + 1]]
            similarity = (
                wa[layer] @ incoming.T
                + torch.outer(ba[layer], bb[layer])
                + wa[layer + 1].T @ outgoing
            )
            _, best = linear_sum_assignment(similarity.numpy(), maximize=True)
            gain = float(similarity[np.arange(len(best)), best].sum()) - float(
                similarity[np.arange(len(best)), perms[layer]].sum()
            )
            if gain > 1e-12 * max(1.0, float(similarity.abs().max())):
                perms[layer], changed = best, True
        if not changed:
            break
    return perms


def _bias(layer: nn.Linear) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=torch.float64)
    return layer.bias.detach().double().cpu()


@torch.no_grad()
def permuted(model: nn.Module, perms: Sequence[np.ndarray]) -> nn.Module:
    """A copy of an MLP with its hidden units permuted by `perms` (from `weight_matching`):
    rows of each hidden layer's weight and bias, columns of the next layer's weight. The
    function it computes is the same."""
    out = copy.deepcopy(model)
    layers = _linear_chain(out)
    if len(perms) != len(layers) - 1:
        raise ValueError(f"permuted: {len(layers) - 1} hidden layers, {len(perms)} permutations")
    for layer, perm in enumerate(perms):
        index = torch.as_tensor(perm, device=layers[layer].weight.device)
        layers[layer].weight.copy_(layers[layer].weight[index])
        if layers[layer].bias is not None:
            layers[layer].bias.copy_(layers[layer].bias[index])
        layers[layer + 1].weight.copy_(layers[layer + 1].weight[:, index])
    return out
