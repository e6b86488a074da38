"""What every solver takes: a linear operator known by its products.

`SymmetricOperator` is the small core (as curvlinops' and eigenthings v1's are): `dim`,
`dtype`, `device`, `matvec` (one vector), `matmat` (the columns of an n x m block, in one
batched pass where the operator has one) and `op @ v` for either; an algebra of sums, scalar
multiples and compositions (`A + B`, `2 * A`, `A - B`, `A @ B`) that builds new operators
without a product; and `to_scipy()`, so that scipy's solvers run on it. The curvature
operators (operators.py) are such operators; `LambdaOperator` and `MatrixOperator` make one
from a function or a dense matrix. `LinearOperator` is the protocol the solvers read.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """What the solvers read: a square operator's size, dtype, device and `op @ v`."""

    @property
    def dim(self) -> int:
        """The side n of the n x n matrix."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its vectors."""

    @property
    def device(self) -> torch.device:
        """The device of its vectors."""

    def __matmul__(self, vector: torch.Tensor) -> torch.Tensor:
        """A v."""


class SymmetricOperator(abc.ABC):
    """An n x n matrix known by its products; symmetric unless `symmetric` says otherwise
    (a composition A @ B of symmetric matrices is not). `n_matvec` counts the vectors it
    was applied to, a block of m columns counting m."""

    symmetric: bool = True
    n_matvec: int = 0

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The side n of the n x n matrix."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of its vectors."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device of its vectors."""

    @abc.abstractmethod
    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """A v for one flat vector v."""

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """A V for an n x m block, column by column (operators with a batched product
        override this)."""
        return torch.stack([self._matvec(column) for column in block.unbind(1)], dim=1)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """A v (v of length `dim`)."""
        _check_shape(self, vector, 1)
        self.n_matvec += 1
        return self._matvec(vector)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """A V (V of shape (dim, m)): m products, batched where the operator can."""
        _check_shape(self, block, 2)
        self.n_matvec += block.shape[1]
        return self._matmat(block)

    def __matmul__(self, other: Any) -> Any:
        """A v (a vector), A V (a (dim, m) block), or the composition A B (an operator)."""
        if isinstance(other, SymmetricOperator):
            return _Composed(self, other)
        if isinstance(other, torch.Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def __add__(self, other: Any) -> "SymmetricOperator":
        """A + B, applied as A v + B v."""
        if not isinstance(other, SymmetricOperator):
            return NotImplemented
        return _Sum(self, other)

    def __sub__(self, other: Any) -> "SymmetricOperator":
        """A - B, applied as A v - B v."""
        if not isinstance(other, SymmetricOperator):
            return NotImplemented
        return _Sum(self, _Scaled(other, -1.0))

    def __mul__(self, scalar: Any) -> "SymmetricOperator":
        """c A for a number c."""
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return _Scaled(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self) -> "SymmetricOperator":
        """-A."""
        return _Scaled(self, -1.0)

    def to_scipy(self) -> Any:
        """A `scipy.sparse.linalg.LinearOperator` in float64 (scipy's solvers: `eigsh`,
        `cg`, ...): numpy vectors in, products in this operator's dtype, numpy out."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def product(x: Any) -> Any:
            tensor = torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
            out = self @ (
                tensor.reshape(-1) if tensor.dim() == 2 and tensor.shape[1] == 1 else tensor
            )
            return out.detach().to("cpu", torch.float64).numpy().reshape(np.shape(x))

        def block(x: Any) -> Any:
            tensor = torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
            return self.matmat(tensor).detach().to("cpu", torch.float64).numpy()

        return ScipyOperator(
            (self.dim, self.dim),
            matvec=product,
            rmatvec=product if self.symmetric else None,
            matmat=block,
            dtype=np.float64,
        )

    def to_dense(self) -> torch.Tensor:
        """The full matrix (small operators, tests): one block product with the identity."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))


def _check_shape(op: SymmetricOperator, tensor: Any, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"an operator multiplies tensors (got {type(tensor).__name__})")
    if tensor.dim() != dims or tensor.shape[0] != op.dim:
        what = f"({op.dim},)" if dims == 1 else f"({op.dim}, m)"
        raise ValueError(
            f"the operator is {op.dim} x {op.dim}: a shape {what} is needed "
            f"(got {tuple(tensor.shape)})"
        )


class _Combined(SymmetricOperator):
    """An operator built from others: it takes their space and counts their products."""

    def __init__(self, *parts: SymmetricOperator) -> None:
        first = parts[0]
        for other in parts[1:]:
            if other.dim != first.dim:
                raise ValueError(f"operators of sizes {first.dim} and {other.dim} do not combine")
        self.parts = parts

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device


class _Sum(_Combined):
    def __init__(self, a: SymmetricOperator, b: SymmetricOperator) -> None:
        super().__init__(a, b)
        self.symmetric = a.symmetric and b.symmetric

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.parts[0].matvec(vector) + self.parts[1].matvec(vector)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.parts[0].matmat(block) + self.parts[1].matmat(block)


class _Scaled(_Combined):
    def __init__(self, a: SymmetricOperator, scalar: float) -> None:
        super().__init__(a)
        self.scalar, self.symmetric = scalar, a.symmetric

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.scalar * self.parts[0].matvec(vector)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.scalar * self.parts[0].matmat(block)


class _Composed(_Combined):
    """A @ B: B first. Not symmetric in general (the symmetric solvers refuse it)."""

    symmetric = False

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.parts[0].matvec(self.parts[1].matvec(vector))

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.parts[0].matmat(self.parts[1].matmat(block))


class LambdaOperator(SymmetricOperator):
    """A symmetric operator from a function v -> A v; counts its products in `n_matvec`.
    The function returns a new tensor each call: a solver may overwrite what it returns."""

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """matvec: v -> A v; dim: the side of A; dtype, device: those of its vectors."""
        if dim < 1:
            raise ValueError(f"dim: must be >= 1 (got {dim})")
        self._function, self._dim = matvec, dim
        self._dtype, self._device = dtype, torch.device(device)
        self.n_matvec = 0

    @property
    def dim(self) -> int:
        """The side n of the n x n matrix."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its vectors."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of its vectors."""
        return self._device

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self._function(vector)


class MatrixOperator(LambdaOperator):
    """A dense symmetric matrix as an operator (tests, small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        """matrix: square, symmetric (not checked)."""
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: must be square (got shape {tuple(matrix.shape)})")
        super().__init__(
            lambda v: matrix @ v.to(matrix.dtype),
            matrix.shape[0],
            dtype=matrix.dtype,
            device=matrix.device,
        )
        self.matrix = matrix

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block.to(self.matrix.dtype)


def require_symmetric(op: Any, solver: str) -> None:
    """One clear error where a symmetric solver gets an operator that says it is not (a
    composition A @ B)."""
    if not getattr(op, "symmetric", True):
        raise ValueError(
            f"{solver}: the operator is not symmetric (a composition A @ B); the solver "
            "needs a symmetric matrix"
        )


def with_products(
    op: Any, vectors: Iterable[torch.Tensor], block: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(v, op @ v) for each v, in order: `block` vectors at a time through `op.matmat`
    where the operator has one (one batched pass), else one at a time. At most one block
    of vectors is held."""
    matmat = getattr(op, "matmat", None) if block > 1 else None
    if matmat is None:
        for v in vectors:
            yield v, op @ v
        return
    pending: list[torch.Tensor] = []
    for v in vectors:
        pending.append(v)
        if len(pending) == block:
            yield from zip(pending, matmat(torch.stack(pending, dim=1)).unbind(1))
            pending = []
    if pending:
        yield from zip(pending, matmat(torch.stack(pending, dim=1)).unbind(1))


def block_size(op: Any) -> int:
    """How many vectors `op` takes in one batched pass (`op.block_size`, else 1)."""
    return int(getattr(op, "block_size", 1) or 1)
