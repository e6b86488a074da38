r"""The Krylov state of a Lanczos run: an orthonormal basis that grows with the steps taken,
and the projected matrix :math:`H_m = Q_m^\top A Q_m`.

The basis is allocated in blocks as the run goes (never ``max_iter`` rows up front: on a
124M-parameter model 100 float32 rows are 50 GB), and never past ``capacity`` rows, the
memory a budget leaves beside the operator's graphs. A run that reaches its capacity is
thick-restarted (Wu & Simon 2000): the wanted Ritz vectors :math:`Y = Q_m S_p` replace the
basis, and with the next Lanczos vector :math:`q_{m+1}` the relation

.. math:: A Q = Q H + \beta\, q_{m+1} e_m^\top

holds again, where :math:`H` is the diagonal of the kept Ritz values bordered by the
couplings :math:`\beta s_{m,i}` (an arrowhead) followed by the usual tridiagonal. The
residual of a Ritz pair of :math:`H` is still :math:`\beta |s_{m,i}|`, so the stopping test
and the accuracy it states are those of an unrestarted run; a restart only costs products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh, eigh_tridiagonal

# rows of the first block; each later block doubles the rows held so far (so at most half
# the allocation is ever unused), and no block passes the capacity
_FIRST_BLOCK = 4
_LARGEST_BLOCK = 64


class KrylovBasis:
    """Orthonormal rows, stored in blocks allocated as rows are appended.

    capacity: the most rows ever held at once (None: no limit); `nbytes` is what the
    blocks hold, allocated, and `peak_rows` the most rows allocated at any time."""

    def __init__(
        self, dim: int, dtype: torch.dtype, device: torch.device, capacity: int | None = None
    ) -> None:
        """An empty basis of vectors of length `dim`."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity: must be >= 1 (got {capacity})")
        self.dim, self.dtype, self.device, self.capacity = dim, dtype, device, capacity
        self._blocks: list[torch.Tensor] = []
        self._rows = 0
        self.peak_rows = 0

    def __len__(self) -> int:
        """Rows held."""
        return self._rows

    @property
    def allocated_rows(self) -> int:
        """Rows the blocks can hold (used or not)."""
        return sum(len(b) for b in self._blocks)

    @property
    def nbytes(self) -> int:
        """Bytes the blocks hold."""
        return sum(b.numel() * b.element_size() for b in self._blocks)

    @property
    def full(self) -> bool:
        """Whether another row would pass the capacity."""
        return self.capacity is not None and self._rows >= self.capacity

    def append(self, row: torch.Tensor) -> None:
        """Adds one row (a unit vector orthogonal to the rows held)."""
        if self.full:
            raise MemoryError(f"Krylov basis: full at its capacity of {self.capacity} rows")
        if self._rows == self.allocated_rows:
            self._grow()
        offset = self._rows
        for block in self._blocks:
            if offset < len(block):
                block[offset] = row
                break
            offset -= len(block)
        self._rows += 1

    def _grow(self) -> None:
        rows = min(max(_FIRST_BLOCK, self.allocated_rows), _LARGEST_BLOCK)
        if self.capacity is not None:
            rows = min(rows, self.capacity - self.allocated_rows)
        self._blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device))
        self.peak_rows = max(self.peak_rows, self.allocated_rows)

    def _used(self):
        """(block rows in use) for each block holding any."""
        left = self._rows
        for block in self._blocks:
            if left <= 0:
                return
            yield block[: min(left, len(block))]
            left -= len(block)

    def coefficients(self, vector: torch.Tensor) -> torch.Tensor:
        """Q w: the vector's components along the rows."""
        return torch.cat([block @ vector for block in self._used()])

    def orthogonalise(self, vector: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """w - Q^T Q w (one classical Gram-Schmidt pass against every row), into a new
        vector, or into w itself with in_place=True (a fresh 124M-entry vector costs 0.2 s
        of page faults)."""
        coeffs = self.coefficients(vector)
        out, start = (vector if in_place else vector.clone()), 0
        for block in self._used():  # fused: out -= block^T c, no temporary of size dim
            out.addmv_(block.T, coeffs[start : start + len(block)], alpha=-1)
            start += len(block)
        return out

    def combine(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Q^T C for C of shape (rows, k): k vectors, returned as (k, dim) rows."""
        coeffs = coeffs.to(dtype=self.dtype, device=self.device)
        out: torch.Tensor | None = None
        start = 0
        for block in self._used():
            part = coeffs[start : start + len(block)].T
            # the first block's product is the output (a zero-filled (k, dim) first cost
            # half a second a restart on a 124M-parameter model)
            out = part @ block if out is None else out.addmm_(part, block)
            start += len(block)
        if out is None:
            return torch.zeros(coeffs.shape[1], self.dim, dtype=self.dtype, device=self.device)
        return out

    def replace(self, rows: torch.Tensor) -> None:
        """The basis becomes `rows` (k, dim), reusing the first blocks' memory."""
        self._rows = 0
        keep, held = [], 0
        for block in self._blocks:  # enough leading blocks for the new rows; free the rest
            if held >= len(rows):
                break
            keep.append(block)
            held += len(block)
        self._blocks = keep
        for row in rows:
            self.append(row)

    def to_tensor(self) -> torch.Tensor:
        """The rows as one (rows, dim) tensor (a copy)."""
        return torch.cat(list(self._used())) if self._rows else torch.empty(0, self.dim)


# dot products of float32 vectors, accumulated in float64: a float64 copy of two 124M-entry
# vectors cost 2.1 s and 2 GB, and one float32 BLAS call loses 1e-4 relative; float64
# copies of blocks of this many entries (8 MB, reused by the allocator) cost 0.29 s there
# and lose 4e-13, and on the MNIST MLP (536k) they beat both (float32 blocks of 65,536 paid
# a thread-pool wake-up a block on a busy machine: 11 ms a call)
_DOT_BLOCK = 1 << 20


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> of two flat vectors, accumulated in float64 without float64 copies of the
    whole vectors."""
    if a.dtype == torch.float64:
        return float(torch.dot(a, b))
    if a.device.type != "cpu":  # one reduction on the device, not a sync per block
        return float(torch.sum(a * b, dtype=torch.float64))
    return math.fsum(
        float(torch.dot(x.double(), y.double()))
        for x, y in zip(a.split(_DOT_BLOCK), b.split(_DOT_BLOCK))
    )


def norm(a: torch.Tensor) -> float:
    """||a|| of a flat vector, accumulated in float64 without a float64 copy."""
    return math.sqrt(max(dot(a, a), 0.0))


@dataclass
class KrylovState:
    """A Lanczos run after its last step.

    basis: the orthonormal rows Q; head/coupling: the Ritz values kept at the last thick
    restart and their couplings to the first vector after it (empty before any restart);
    alphas/betas: the tridiagonal part since then; beta: the norm of the next residual
    (zero when the Krylov space is invariant); products: operator products taken in all;
    restarts: thick restarts so far."""

    basis: KrylovBasis
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    beta: float = 0.0
    head: np.ndarray = field(default_factory=lambda: np.zeros(0))
    coupling: np.ndarray = field(default_factory=lambda: np.zeros(0))
    products: int = 0
    restarts: int = 0

    @property
    def size(self) -> int:
        """The order of the projected matrix (the rows of the basis)."""
        return len(self.head) + len(self.alphas)

    def projected(self) -> np.ndarray:
        """H = Q^T A Q, dense: the kept Ritz values bordered by their couplings, then the
        tridiagonal of the steps since."""
        p, m = len(self.head), len(self.alphas)
        h = np.zeros((p + m, p + m))
        h[np.arange(p), np.arange(p)] = self.head
        if m:
            h[p:, p:] = np.diag(self.alphas) + np.diag(self.betas[: m - 1], 1)
            h[p:, p:] += np.diag(self.betas[: m - 1], -1)
            h[:p, p] = h[p, :p] = self.coupling
        return h

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors of H (columns): scipy's tridiagonal
        solver before any restart, its dense one after."""
        if len(self.head):
            return eigh(self.projected())
        if len(self.alphas) == 1:
            return np.array(self.alphas), np.ones((1, 1))
        return eigh_tridiagonal(np.array(self.alphas), np.array(self.betas[: len(self.alphas) - 1]))

    def invariant(self) -> bool:
        """The next Lanczos vector vanished: the Krylov space is invariant."""
        scale = max([1.0, *map(abs, self.alphas), *np.abs(self.head).tolist()])
        return self.beta <= 1e-10 * scale

    def restart(self, keep: np.ndarray, theta: np.ndarray, s: np.ndarray) -> None:
        """Thick restart: the basis becomes the Ritz vectors of the columns `keep` of s."""
        rows = self.basis.combine(torch.as_tensor(s[:, keep]))
        # the kept vectors exist beside the full basis until it is replaced
        self.basis.peak_rows = max(self.basis.peak_rows, self.basis.allocated_rows + len(keep))
        coupling = self.beta * s[-1, keep]
        self.basis.replace(rows)
        self.head, self.coupling = theta[keep].copy(), coupling
        self.alphas, self.betas = [], []
        self.restarts += 1
