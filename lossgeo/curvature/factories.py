"""The operator for a model: exact products on a plain model, differences of gradients on an
FSDP-sharded one (`sharded.py`). Here, and not in `operators.py`, so that no module of the
package imports one that imports it back."""

from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from .batches import AnyLossFn, DataSource
from .distributed import unwrap
from .linear import LinearOperator
from .operators import MATRICES, CurvatureOperator, HessianBlockOperator, HessianOperator
from .scope import Scope
from .sharded import (
    ShardedHessianOperator,
    ShardedOutputCurvatureOperator,
    block_operator,
    is_sharded,
)

# a Hessian of the probe loss that also gives the loss and its gradient
AnyHessianOperator = Union[HessianOperator, ShardedHessianOperator]


def make_operator(
    matrix: str, model: nn.Module, loss_fn: AnyLossFn, data: DataSource, scope: Scope = Scope()
) -> CurvatureOperator:
    """The Hessian, GGN or empirical Fisher ("hessian", "ggn", "fisher") of this model
    (`scope.hvp_method` is the Hessian's only: the GGN's and Fisher's products are theirs)."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix: must be one of {', '.join(MATRICES)} (got {matrix!r})")
    if matrix == "hessian":
        return hessian_operator(model, loss_fn, data, scope)
    if is_sharded(unwrap(model)):  # FSDP: J v by differences, J^T u by backward
        return ShardedOutputCurvatureOperator(model, loss_fn, data, matrix=matrix, scope=scope)
    return MATRICES[matrix](model, loss_fn, data, scope=scope)


def hessian_operator(
    model: nn.Module, loss_fn: AnyLossFn, data: DataSource, scope: Scope = Scope()
) -> AnyHessianOperator:
    """The Hessian operator for this model: exact products, or, for a model with sharded
    parameters (FSDP2 `fully_shard`), differences of gradients (`sharded.py`)."""
    if is_sharded(unwrap(model)):
        return ShardedHessianOperator(model, loss_fn, data, scope=scope)
    return HessianOperator(model, loss_fn, data, scope=scope)


def hessian_block(op: AnyHessianOperator, names: Sequence[str]) -> LinearOperator:
    """The diagonal block of `op` for the parameters `names`: through the parent's retained
    graph, or, for a sharded model, by difference products of the whole Hessian."""
    if isinstance(op, HessianOperator):
        return HessianBlockOperator(op, names)
    return block_operator(op, names)
