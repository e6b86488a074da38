"""Exact curvature of the mean training loss: Hessian (and GGN / empirical Fisher) spectra,
traces and densities, on any nn.Module. Pure: no MLflow, no I/O.

Public API (what notebooks call)::

    hessian_eigen(model, loss_fn, data, k=1, which="LA", method="lanczos", tol=1e-4, max_iter=100)
    hessian_trace(model, loss_fn, data, method="hutchinson" | "hutch++", n_samples=30)
    spectral_density(model, loss_fn, data, n_steps=100, n_vectors=1)
    layerwise_lambda_max(model, loss_fn, data)
    effective_dimension(eigenvalues, alpha)

`data` is one (x, y) tuple or an iterable of them; losses are mean-reduced over all samples
with batches weighted by size. "LA" = largest algebraic (sorted largest first), "SA" =
smallest algebraic (most negative first). Power iteration finds the largest *magnitude*.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models import parameter_blocks
from .density import slq_density
from .lanczos import lanczos_extremes, power_iteration
from .operators import (CurvatureOperator, DataSource, EmpiricalFisherOperator, GGNOperator,
                        HessianBlockOperator, HessianOperator, LossFn, as_batches, eval_mode,
                        make_operator)
from .results import DensityResult, EigenResult, TraceResult
from .trace import hutch_plus_plus, hutchinson

__all__ = [
    "hessian_eigen", "hessian_extremes", "curvature_eigen", "hessian_trace",
    "spectral_density", "layerwise_lambda_max", "effective_dimension", "EigenResult",
    "TraceResult", "DensityResult", "HessianOperator", "HessianBlockOperator", "GGNOperator",
    "EmpiricalFisherOperator", "CurvatureOperator", "as_batches", "eval_mode",
]


def curvature_eigen(model: nn.Module, loss_fn: LossFn, data: DataSource, k: int = 1,
                    which: str = "LA", method: str = "lanczos", tol: float = 1e-4,
                    max_iter: int = 100, *, matrix: str = "hessian", seed: int = 0,
                    chunk_size: int | str | None = "auto", hvp_method: str = "graph",
                    params: Sequence[str] | None = None, verify: bool = False) -> EigenResult:
    """Top-k ("LA") or bottom-k ("SA") eigenpairs of the Hessian, GGN or empirical Fisher.

    tol is the relative eigenvalue accuracy (Lanczos: error bound min(r, r^2/gap); power
    iteration: relative change, as PyHessian). verify=True recomputes the residuals
    ||A v - lambda v|| with one extra product per pair instead of the Lanczos estimates."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which: must be 'LA' or 'SA' (got {which!r})")
    op = make_operator(matrix, model, loss_fn, data, params=params, chunk_size=chunk_size,
                       method=hvp_method)
    if method == "power":
        if which != "LA":
            raise ValueError("which: power iteration finds the largest-magnitude eigenvalues "
                             "only; use method='lanczos' for 'SA'")
        return power_iteration(op, k=k, tol=tol, max_iter=max_iter, seed=seed)
    if method != "lanczos":
        raise ValueError(f"method: must be 'lanczos' or 'power' (got {method!r})")
    top, bottom = lanczos_extremes(op, k_top=k if which == "LA" else 0,
                                   k_bottom=k if which == "SA" else 0, tol=tol,
                                   max_iter=max_iter, seed=seed, verify=verify)
    return top if which == "LA" else bottom


def hessian_eigen(model: nn.Module, loss_fn: LossFn, data: DataSource, k: int = 1,
                  which: str = "LA", method: str = "lanczos", tol: float = 1e-4,
                  max_iter: int = 100, **options) -> EigenResult:
    """Top-k ("LA") or bottom-k ("SA") Hessian eigenpairs; see `curvature_eigen`."""
    return curvature_eigen(model, loss_fn, data, k, which, method, tol, max_iter,
                           matrix="hessian", **options)


def hessian_extremes(model: nn.Module, loss_fn: LossFn, data: DataSource, k: int = 1, *,
                     tol: float = 1e-4, max_iter: int = 100, seed: int = 0,
                     chunk_size: int | str | None = "auto", hvp_method: str = "graph",
                     ) -> tuple[EigenResult, EigenResult]:
    """Top-k and lambda_min from one Lanczos run (what a training epoch logs)."""
    op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size, method=hvp_method)
    top, bottom = lanczos_extremes(op, k_top=k, k_bottom=1, tol=tol, max_iter=max_iter,
                                   seed=seed)
    return top, bottom


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: DataSource,
                  method: str = "hutchinson", n_samples: int = 30, *, seed: int = 0,
                  chunk_size: int | str | None = "auto", hvp_method: str = "graph") -> TraceResult:
    estimators = {"hutchinson": hutchinson, "hutch++": hutch_plus_plus}
    if method not in estimators:
        raise ValueError(f"method: must be 'hutchinson' or 'hutch++' (got {method!r})")
    op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size, method=hvp_method)
    return estimators[method](op, n_samples, seed=seed)


def spectral_density(model: nn.Module, loss_fn: LossFn, data: DataSource, n_steps: int = 100,
                     n_vectors: int = 1, *, sigma: float | None = None, grid_size: int = 1000,
                     seed: int = 0, chunk_size: int | str | None = "auto",
                     hvp_method: str = "graph") -> DensityResult:
    op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size, method=hvp_method)
    return slq_density(op, n_steps=n_steps, n_vectors=n_vectors, sigma=sigma,
                       grid_size=grid_size, seed=seed)


def layerwise_lambda_max(model: nn.Module, loss_fn: LossFn, data: DataSource, *,
                         tol: float = 1e-4, max_iter: int = 100, seed: int = 0,
                         chunk_size: int | str | None = "auto") -> dict[str, EigenResult]:
    """Top eigenpair of each layer's diagonal Hessian block (the layer's own parameters
    varied, all others fixed), keyed by module name. All layers share one gradient graph."""
    op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size)
    results = {}
    for layer, names in parameter_blocks(model).items():
        block = HessianBlockOperator(op, names)
        results[layer], _ = lanczos_extremes(block, k_top=1, tol=tol, max_iter=max_iter,
                                             seed=seed)
    return results


def effective_dimension(eigenvalues: torch.Tensor | Sequence[float], alpha: float) -> float:
    """N_eff(alpha) = sum_i lambda_i / (lambda_i + alpha) over the (top-k) eigenvalues;
    non-positive eigenvalues contribute 0 (MacKay 1992; Maddox et al. 2020)."""
    if alpha <= 0:
        raise ValueError(f"alpha: must be > 0 (got {alpha})")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0)
    return float((lam / (lam + alpha)).sum())
