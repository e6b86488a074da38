"""lambda_max tracked over training: each solve starts from the previous top-k Ritz vectors.

Between two measurements a few optimizer steps apart the Hessian moves little, so its top
eigenvector is nearly that of the last solve. Lanczos starts from v_1 + mix * (v_2 + ... +
v_k), the previous Ritz vectors: two products span v_1's first-order correction, and the
stopping test (the Lanczos residual ||H v - theta v|| = beta |s_m|, exact up to rounding
with full reorthogonalisation, and the Kato-Temple gap bound; see lanczos.py) passes after
2-3 products instead of 20-40 from a random vector. The small weight on the other tracked
vectors keeps them in the Krylov space (two vectors' 2-step Krylov space is their span)
without costing products: an equal-weight start needed 4-7 products a solve in
tests/run/test_tracker.py's drifting operator, mix = 0.03 about 2.2.

What a warm start cannot see is a direction outside the tracked space overtaking the top
one: a residual test proves that theta is *an* eigenvalue, not the largest. Two guards:
- k >= 2: a crossing of the top two eigenvalues happens inside the tracked space, so the
  Ritz values swap order and the new top is reported at once;
- every `cold_every`-th solve is repeated from a random vector, to tol / 10; `cold_gap` is
  the relative difference (cold - warm) / |cold|, and when the cold solve finds a larger
  eigenvalue than tol allows, its vectors replace the tracked ones (`restarted`).

How much a warm start saves depends on how far the Hessian moves between measurements
(benchmarks/bench_tracker.py): under full-batch GD it is a few products a solve, while under
noisy small-batch SGD lambda_max jumps by tens of percent between measurements ten steps
apart, and a warm solve costs nearly what a cold one does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .lanczos import Extremes, lanczos_extremes
from .linear import LinearOperator


@dataclass(frozen=True)
class TrackedEigen:
    """One tracked solve. values/vectors: the top-k Ritz pairs reported (the cold ones after
    a restart); n_hvp: products of the warm solve; cold_n_hvp: of the cold check (0 when
    none ran); cold_gap: (cold - warm) / |cold| for lambda_max, None when no check ran."""

    values: torch.Tensor
    vectors: torch.Tensor
    converged: bool
    n_hvp: int
    warm: bool
    cold_gap: float | None = None
    cold_n_hvp: int = 0
    restarted: bool = False

    @property
    def lambda_max(self) -> float:
        return float(self.values[0])


@dataclass(frozen=True)
class WarmState:
    """What a warm start carries from one solve to the next: the last solve's Ritz vectors
    (None before the first) and the number of solves so far (it seeds the cold checks)."""

    vectors: torch.Tensor | None = None
    n_solves: int = 0


class WarmEigen:
    """Top-k eigenpairs of a sequence of operators, each solve warm-started from the last.

    k: Ritz pairs tracked (>= 2 guards crossings of the top two); tol: relative accuracy of
    lambda_max; cold_every: every n-th solve is checked from a random start (0: never);
    mix: weight of the other tracked vectors in the start vector."""

    def __init__(
        self,
        k: int = 2,
        tol: float = 1e-3,
        cold_every: int = 10,
        max_iter: int = 100,
        seed: int = 0,
        mix: float = 0.03,
    ) -> None:
        if k < 1:
            raise ValueError(f"k: must be >= 1 (got {k})")
        if cold_every < 0:
            raise ValueError(f"cold_every: must be >= 0 (got {cold_every})")
        self.k, self.tol, self.cold_every = k, tol, cold_every
        self.max_iter, self.seed, self.mix = max_iter, seed, mix
        self.state = WarmState()

    def _solve(
        self, op: LinearOperator, start: torch.Tensor | None, seed: int, tol: float | None = None
    ):
        k = min(self.k, op.dim)
        if start is not None:
            weights = torch.full(
                (start.shape[0], 1), self.mix, dtype=start.dtype, device=start.device
            )
            weights[0] = 1.0
            start = start * weights
        # only lambda_max has to meet tol; the other tracked pairs just follow it. A warm
        # solve has its own guards (k >= 2 and the cold checks), so no guard pair: it would
        # cost every solve a product
        wanted = Extremes(
            k_top=k,
            tol=tol or self.tol,
            rest_tol=1.0,
            min_steps=k if start is not None else None,
            guard=0 if start is not None else 1,
        )
        top, _ = lanczos_extremes(op, wanted, max_iter=self.max_iter, seed=seed, start=start)
        return top

    def solve(self, op: LinearOperator) -> TrackedEigen:
        n_solves = self.state.n_solves + 1
        vectors = self.state.vectors
        usable = vectors is not None and vectors.shape[-1] == op.dim
        result = self._solve(op, vectors if usable else None, self.seed + n_solves)
        tracked = TrackedEigen(
            values=result.values,
            vectors=result.vectors,
            converged=bool(result.converged[0]),
            n_hvp=result.n_hvp,
            warm=usable,
        )
        if usable and self.cold_every and n_solves % self.cold_every == 0:
            # ten times tighter, so that the gap measures the warm solve's error
            cold = self._solve(op, None, self.seed + 10_000 + n_solves, self.tol / 10)
            cold_max = float(cold.values[0])
            gap = (cold_max - tracked.lambda_max) / max(abs(cold_max), 1e-300)
            restart = gap > self.tol
            tracked = TrackedEigen(
                values=cold.values if restart else tracked.values,
                vectors=cold.vectors if restart else tracked.vectors,
                converged=bool(cold.converged[0]) if restart else tracked.converged,
                n_hvp=tracked.n_hvp,
                warm=True,
                cold_gap=gap,
                cold_n_hvp=cold.n_hvp,
                restarted=restart,
            )
        self.state = replace(self.state, vectors=tracked.vectors, n_solves=n_solves)
        return tracked
