"""The public curvature functions (re-exported by `lossgeo.curvature`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from ..models import parameter_blocks
from .batches import AnyLossFn, DataSource
from .density import slq_density
from .factories import hessian_block, hessian_operator, make_operator
from .lanczos import (
    Extremes,
    both,
    check_solver_limits,
    lanczos_extremes,
    lanczos_top,
    power_iteration,
)
from .operators import CurvatureOperator, full_precision
from .results import DensityResult, EigenResult, TraceResult
from .scope import Scope
from .trace import hutch_plus_plus, hutchinson, krylov_hutchinson

Which = Literal["LA", "SA"]
EigenMethod = Literal["lanczos", "power"]
Matrix = Literal["hessian", "ggn", "fisher"]
TraceMethod = Literal["hutchinson", "hutch++", "krylov"]


@dataclass(frozen=True)
class EigenSolver:
    """How an eigen solve runs, beyond its tolerance.

    Attributes:
        method: "lanczos" (default) or "power" (power iteration, the largest-magnitude
            eigenvalues only, stopping on the relative change of the estimate as PyHessian).
        max_iter: products at most (Lanczos steps, or power iterations per eigenpair).
        seed: the start vector.
        verify: recompute the residuals ||A v - lambda v|| with one extra product per pair,
            instead of taking the Lanczos estimates.
    """

    method: EigenMethod = "lanczos"
    max_iter: int = 100
    seed: int = 0
    verify: bool = False

    def __post_init__(self) -> None:
        """Bad options fail here, in one line, before any product."""
        if self.method not in ("lanczos", "power"):
            raise ValueError(f"method: must be 'lanczos' or 'power' (got {self.method!r})")
        check_solver_limits(max_iter=self.max_iter)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: must be a whole number (got {self.seed!r})")
        if not isinstance(self.verify, bool):
            raise ValueError(f"verify: must be True or False (got {self.verify!r})")


@dataclass(frozen=True)
class Smoothing:
    """How a spectral density is drawn from its quadrature nodes and weights.

    Attributes:
        sigma: width of the Gaussian smoothing (None: 1% of the spectrum's estimated range).
        grid_size: points of the returned density grid.
    """

    sigma: float | None = None
    grid_size: int = 1000

    def __post_init__(self) -> None:
        """Bad options fail here, in one line, before any product."""
        check_solver_limits(grid_size=self.grid_size)
        real = isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool)
        if self.sigma is not None and not (real and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma: must be a number > 0 or None (got {self.sigma!r})")


def _eigenpairs(op: CurvatureOperator, k: int, which: Which, tol: float, solver: EigenSolver):
    """The k eigenpairs at one end of `op`'s spectrum, by the solver's method."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which: must be 'LA' or 'SA' (got {which!r})")
    if solver.method == "power":
        if which != "LA":
            raise ValueError(
                "which: power iteration finds the largest-magnitude eigenvalues "
                "only; use EigenSolver(method='lanczos') for 'SA'"
            )
        return power_iteration(op, k=k, tol=tol, max_iter=solver.max_iter, seed=solver.seed)
    wanted = Extremes(k_top=k if which == "LA" else 0, k_bottom=k if which == "SA" else 0, tol=tol)
    top, bottom = lanczos_extremes(
        op, wanted, max_iter=solver.max_iter, seed=solver.seed, verify=solver.verify
    )
    result = top if which == "LA" else bottom
    assert result is not None  # the end asked for
    return result


@full_precision
def curvature_eigen(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    *,
    matrix: Matrix = "hessian",
    tol: float = 1e-4,
    solver: EigenSolver = EigenSolver(),
    scope: Scope = Scope(),
) -> EigenResult:
    """The top-k eigenpairs of the Hessian, GGN or empirical Fisher (`matrix`); the
    Hessian's bottom end is `hessian_eigen(..., which="SA")`.

    Args:
        model: any nn.Module.
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch)
            (the GGN and Fisher need the first: they are built on the network outputs).
        data: one (x, y) pair, a list of batches or a DataLoader.
        k: eigenpairs wanted.
        matrix: "hessian", "ggn" or "fisher".
        tol: relative eigenvalue accuracy (Lanczos: error bound min(r, r^2/gap); power
            iteration: relative change, as PyHessian).
        solver: method, step limit, seed, residual check (`EigenSolver`).
        scope: the parameters, the loss's form, the process group, and how products are
            taken (`Scope`). Its memory budget (default "auto": 80% of what the device has
            free) covers the products' graphs and the Lanczos basis: the basis grows with
            the steps taken, and one that would pass the budget is thick-restarted to the
            same stopping test (`EigenResult.restarts`).

    Returns:
        An `EigenResult`: values, vectors, residuals, convergence, products used.
    """
    op = make_operator(matrix, model, loss_fn, data, scope)
    return _eigenpairs(op, k, "LA", tol, solver)


@full_precision
def hessian_eigen(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    which: Which = "LA",
    *,
    tol: float = 1e-4,
    solver: EigenSolver = EigenSolver(),
    scope: Scope = Scope(),
) -> EigenResult:
    """Top-k ("LA") or bottom-k ("SA") Hessian eigenpairs; the arguments are
    `curvature_eigen`'s. Power iteration (`EigenSolver(method="power")`) finds the top only."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which: must be 'LA' or 'SA' (got {which!r})")
    op = hessian_operator(model, loss_fn, data, scope)
    return _eigenpairs(op, k, which, tol, solver)


@full_precision
def hessian_extremes(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    *,
    tol: float = 1e-4,
    solver: EigenSolver = EigenSolver(),
    scope: Scope = Scope(),
) -> tuple[EigenResult, EigenResult]:
    """Top-k and lambda_min from one Lanczos run (what a training epoch logs); the
    arguments are `curvature_eigen`'s."""
    if solver.method != "lanczos":
        raise ValueError(f"solver: both ends come from one Lanczos run (got {solver.method!r})")
    op = hessian_operator(model, loss_fn, data, scope)
    wanted = Extremes(k_top=k, k_bottom=1, tol=tol)
    return both(
        lanczos_extremes(
            op, wanted, max_iter=solver.max_iter, seed=solver.seed, verify=solver.verify
        )
    )


@full_precision
def hessian_trace(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    method: TraceMethod = "hutchinson",
    n_samples: int = 30,
    *,
    seed: int = 0,
    scope: Scope = Scope(),
) -> TraceResult:
    """The trace of the Hessian of the mean loss, estimated stochastically.

    Args:
        model: any nn.Module.
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch).
        data: one (x, y) pair, a list of batches or a DataLoader.
        method: "hutchinson" (Rademacher probes), "hutch++" (Meyer et al. 2021), or
            "krylov" (Chen & Hallman 2023: a third of the products on Lanczos steps whose
            basis takes its part of the trace exactly; the most accurate of the three per
            product on the MNIST models measured, `benchmarks/bench_trace_deflation.py`).
        n_samples: Hessian-vector products to spend.
        seed: the probe vectors.
        scope: the parameters, the loss's form, the process group, and how products are
            taken: chunks, method, precision, the memory budget (`Scope`).

    Returns:
        A `TraceResult` with the estimate, its standard error and the products used.
    """
    estimators = {"hutchinson": hutchinson, "hutch++": hutch_plus_plus, "krylov": krylov_hutchinson}
    if method not in estimators:
        raise ValueError(f"method: must be 'hutchinson', 'hutch++' or 'krylov' (got {method!r})")
    op = hessian_operator(model, loss_fn, data, scope)
    return estimators[method](op, n_samples, seed=seed)


@full_precision
def spectral_density(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    n_steps: int = 100,
    n_vectors: int = 1,
    *,
    smoothing: Smoothing = Smoothing(),
    seed: int = 0,
    scope: Scope = Scope(),
) -> DensityResult:
    """The Hessian's spectral density by stochastic Lanczos quadrature.

    Args:
        model: any nn.Module.
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch).
        data: one (x, y) pair, a list of batches or a DataLoader.
        n_steps: Lanczos steps per start vector (PyHessian uses 100).
        n_vectors: random start vectors averaged.
        smoothing: the Gaussian width and the grid of the returned density (`Smoothing`).
        seed: the start vectors.
        scope: the parameters, the loss's form, the process group, and how products are
            taken (`Scope`).

    Returns:
        A `DensityResult`: the smoothed density on its grid, the quadrature nodes and weights.
    """
    op = hessian_operator(model, loss_fn, data, scope)
    return slq_density(
        op,
        n_steps=n_steps,
        n_vectors=n_vectors,
        sigma=smoothing.sigma,
        grid_size=smoothing.grid_size,
        seed=seed,
    )


@full_precision
def layerwise_lambda_max(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    *,
    tol: float = 1e-4,
    solver: EigenSolver = EigenSolver(),
    scope: Scope = Scope(),
) -> dict[str, EigenResult]:
    """Top eigenpair of each layer's diagonal Hessian block (the layer's own parameters
    varied, all others fixed), keyed by layer name (`models.layer_names`: fc1, conv2, ...,
    or the module path). With a parameter filter (`Scope(params=...)`), the blocks are
    those of the selected parameters. All layers share one gradient graph (a sharded (FSDP)
    model: one difference product of the whole Hessian per block product)."""
    if solver.method != "lanczos":
        raise ValueError(f"solver: layer blocks are solved by Lanczos (got {solver.method!r})")
    op = hessian_operator(model, loss_fn, data, scope)
    blocks = parameter_blocks(op.model, op.space.names)
    return {
        layer: lanczos_top(
            hessian_block(op, names), tol=tol, max_iter=solver.max_iter, seed=solver.seed
        )
        for layer, names in blocks.items()
    }


def effective_dimension(eigenvalues: torch.Tensor | Sequence[float], alpha: float) -> float:
    """N_eff(alpha) = sum_i lambda_i / (lambda_i + alpha) over the (top-k) eigenvalues;
    non-positive eigenvalues contribute 0 (MacKay 1992; Maddox et al. 2020)."""
    if alpha <= 0:
        raise ValueError(f"alpha: must be > 0 (got {alpha})")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0)
    return float((lam / (lam + alpha)).sum())
