"""The stability edge of the optimizer that is stepping, and the sharpness it governs.

On a quadratic with curvature lambda along an eigenvector, each optimizer below is stable
while lambda stays under a threshold set by its hyperparameters:

- SGD / GD: 2/lr.
- Heavy-ball momentum beta with dampening d (PyTorch: v = beta v + (1-d) g, w -= lr v):
  2(1+beta) / (lr (1-d)).
- Nesterov momentum beta (PyTorch's form, w -= lr (g + beta v)): (2+2beta) / ((1+2beta) lr)
  (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
  Stability", App. on momentum).
- Adam / AdamW with bias correction: (2+2beta1) / ((1-beta1) lr) = 38/lr at beta1 = 0.9, on
  the preconditioned Hessian P^-1/2 H P^-1/2 with P = sqrt(v_t / (1-beta2^t)) + eps frozen
  (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability", Sec. 2).
- RMSprop (momentum beta): 2(1+beta)/lr on the preconditioned Hessian, P = sqrt(v_t) + eps.

The SGD thresholds are checked in the tests by running torch.optim.SGD on quadratics just
below and above them. An optimizer not listed (or with parameter groups that disagree on a
hyperparameter, or a learning rate of 0 at the end of a schedule) gets no threshold and a note
saying why: never a wrong number. Wrappers that hold the stepping optimizer (Accelerate's
AcceleratedOptimizer under the Hugging Face Trainer, Lightning's LightningOptimizer) are
looked through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lossgeo.curvature.linear import LambdaOperator, LinearOperator
from lossgeo.curvature.params import ParameterSpace


@dataclass(frozen=True)
class StabilityEdge:
    """threshold: the sharpness above which the optimizer is unstable on a quadratic (None:
    not known, see `note`); preconditioned: whether it applies to the preconditioned Hessian
    (adaptive methods) rather than to lambda_max; rule: the formula, for the record."""

    threshold: float | None
    preconditioned: bool = False
    rule: str = ""
    note: str = ""


@dataclass(frozen=True)
class SGDStep:
    """The update of a loop whose optimizer lossgeo cannot read (a hand-written step, a
    wrapper it does not know): plain SGD at `lr` with heavy-ball `momentum`, whose edge is
    2(1+m)/lr. `Tracker(optimizer=SGDStep(0.1))`."""

    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        """Bad values fail here, in one line."""
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr: must be a number > 0 (got {self.lr!r})")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be a number in [0, 1) (got {self.momentum!r})")

    @property
    def edge(self) -> StabilityEdge:
        """2(1+m)/lr (Cohen et al. 2021 use 2/lr without momentum)."""
        return StabilityEdge(2 * (1 + self.momentum) / self.lr, rule="2(1+m)/lr")


def _group_setting(optimizer: torch.optim.Optimizer, key: str) -> object:
    values = {repr(group.get(key)) for group in optimizer.param_groups}
    if len(values) > 1:
        raise ValueError(key)
    value = optimizer.param_groups[0].get(key)
    return float(value) if isinstance(value, torch.Tensor) else value


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps, inside the wrappers trainers put around it (`.optimizer`
    for Accelerate, `._optimizer` for Lightning)."""
    for _ in range(4):  # wrappers of wrappers, but never a cycle
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def stability_edge(optimizer: torch.optim.Optimizer) -> StabilityEdge:
    """The threshold of `optimizer` at its current hyperparameters (read now, so that a
    learning-rate schedule is followed)."""
    optimizer = unwrap_optimizer(optimizer)
    kind = type(optimizer).__name__
    try:
        lr = float(_group_setting(optimizer, "lr"))  # type: ignore[arg-type]
        if lr <= 0:
            return StabilityEdge(None, note=f"{kind}: lr is {lr:g} now, so no threshold")
        if isinstance(optimizer, torch.optim.SGD):
            beta = float(_group_setting(optimizer, "momentum") or 0.0)  # type: ignore[arg-type]
            dampening = float(_group_setting(optimizer, "dampening") or 0.0)  # type: ignore[arg-type]
            if _group_setting(optimizer, "nesterov"):
                return StabilityEdge(
                    (2 + 2 * beta) / ((1 + 2 * beta) * lr), rule="(2+2b)/((1+2b)lr)"
                )
            if beta == 0:
                return StabilityEdge(2 / lr, rule="2/lr")
            return StabilityEdge(2 * (1 + beta) / (lr * (1 - dampening)), rule="2(1+b)/(lr(1-d))")
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            betas: tuple[float, float] = _group_setting(optimizer, "betas")  # type: ignore[assignment]
            beta1 = float(betas[0])
            if _group_setting(optimizer, "amsgrad"):
                return StabilityEdge(None, note=f"{kind} with amsgrad: no known threshold")
            return StabilityEdge(
                (2 + 2 * beta1) / ((1 - beta1) * lr), preconditioned=True, rule="(2+2b1)/((1-b1)lr)"
            )
        if isinstance(optimizer, torch.optim.RMSprop):
            if _group_setting(optimizer, "centered"):
                return StabilityEdge(None, note="centred RMSprop: no known threshold")
            beta = float(_group_setting(optimizer, "momentum") or 0.0)  # type: ignore[arg-type]
            return StabilityEdge(2 * (1 + beta) / lr, preconditioned=True, rule="2(1+b)/lr")
    except ValueError as exc:
        return StabilityEdge(
            None, note=f"{kind}: its parameter groups differ in {exc}, so no single threshold"
        )
    return StabilityEdge(None, note=f"{kind}: no known stability threshold")


def preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module, space: ParameterSpace
) -> tuple[torch.Tensor | None, str]:
    """(P, "") with P the flat diagonal preconditioner of an Adam/AdamW/RMSprop optimizer's
    current state, in `space`'s order, or (None, why) when there is none yet (before the
    first step) or the optimizer is not adaptive. The state is read, never changed. For a
    sharded (FSDP) model, its state's slices are gathered (collectively: every rank calls)."""
    from torch.distributed.tensor import DTensor

    optimizer = unwrap_optimizer(optimizer)
    named = dict(model.named_parameters())
    pieces = []
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name in space.names:
        parameter = named[name]
        state = optimizer.state.get(parameter, {})
        group = group_of.get(id(parameter))
        if group is None:
            return None, f"parameter {name} is not in the optimizer"
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            if "exp_avg_sq" not in state:
                return None, "the optimizer has not stepped yet (no second-moment state)"
            step = float(state["step"])
            _, beta2 = group["betas"]
            v_hat = state["exp_avg_sq"].detach() / (1 - beta2**step)
            p = v_hat.sqrt() + group["eps"]
        elif isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                return None, "the optimizer has not stepped yet (no second-moment state)"
            p = state["square_avg"].detach().sqrt() + group["eps"]
        else:
            return None, f"{type(optimizer).__name__} has no diagonal preconditioner"
        if isinstance(p, DTensor):  # a sharded (FSDP) parameter's state: gathered whole
            p = p.full_tensor()
        pieces.append(p.reshape(-1).to(space.dtype))
    return torch.cat(pieces), ""


def preconditioned_operator(op: LinearOperator, p: torch.Tensor) -> LambdaOperator:
    """P^-1/2 H P^-1/2 for a diagonal P > 0: its spectrum is that of P^-1 H."""
    if p.shape != (op.dim,) or not bool((p > 0).all()):
        raise ValueError(f"p: must be a positive vector of length {op.dim}")
    scale = p.to(dtype=op.dtype, device=op.device).rsqrt()
    return LambdaOperator(
        lambda v: scale * (op @ (scale * v)), op.dim, dtype=op.dtype, device=op.device
    )
