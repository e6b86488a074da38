"""What every solver takes: a symmetric linear operator, described by `dim`, `dtype`,
`device` and `op @ v`. Curvature operators (operators.py) are such objects; these wrappers
make one from a plain matrix or a function, so any solver runs on any symmetric matrix."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __matmul__(self, vector: torch.Tensor) -> torch.Tensor: ...


class LambdaOperator:
    """A symmetric operator from a function v -> A v; counts its products in `n_matvec`."""

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be >= 1 (got {dim})")
        self._matvec, self.dim = matvec, dim
        self.dtype, self.device = dtype, torch.device(device)
        self.n_matvec = 0

    def __matmul__(self, vector: torch.Tensor) -> torch.Tensor:
        self.n_matvec += 1
        return self._matvec(vector)


class MatrixOperator(LambdaOperator):
    """A dense symmetric matrix as an operator (tests, small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: must be square (got shape {tuple(matrix.shape)})")
        super().__init__(
            lambda v: matrix @ v.to(matrix.dtype),
            matrix.shape[0],
            dtype=matrix.dtype,
            device=matrix.device,
        )
        self.matrix = matrix
