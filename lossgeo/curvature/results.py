"""Frozen result records of the curvature estimators (turned into MLflow metrics elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a curvature matrix.

    values: sorted largest first for which="LA", smallest first for which="SA".
    vectors: (k, n), orthonormal rows. residuals: ||A v - lambda v|| per pair. From Lanczos
    they are its own estimates beta_m |s_mi| (no extra product; equal to the true residual up
    to rounding, since the basis is fully reorthogonalised), recomputed with one product each
    when verify=True; power iteration always recomputes them. converged: per pair, whether the
    solver's stopping test passed. n_hvp: matrix-vector products used, residual checks
    included. restarts: thick restarts of a Lanczos run whose basis filled the memory budget
    (0: none; the stopping test, and so the accuracy, is the same either way).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_hvp: int
    which: str = "LA"
    method: str = "lanczos"
    restarts: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its standard error."""

    value: float
    stderr: float
    n_hvp: int
    method: str = "hutchinson"


@dataclass(frozen=True)
class DensityResult:
    """Spectral density from stochastic Lanczos quadrature.

    nodes/weights: (n_vectors, n_steps) Ritz values and squared first components (each row's
    weights sum to 1). density: Gaussian-smoothed on `grid`, integrating to ~1.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    n_hvp: int

    @property
    def mean(self) -> float:
        """Estimated mean eigenvalue, i.e. trace / n."""
        return float((self.nodes * self.weights).sum() / self.weights.shape[0])
