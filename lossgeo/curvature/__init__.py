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

from .api import (
                  curvature_eigen,
                  effective_dimension,
                  hessian_eigen,
                  hessian_extremes,
                  hessian_trace,
                  layerwise_lambda_max,
                  spectral_density,
)
from .batches import as_batches, eval_mode
from .linear import LambdaOperator, LinearOperator, MatrixOperator
from .operators import (
                  CurvatureOperator,
                  EmpiricalFisherOperator,
                  GGNOperator,
                  HessianBlockOperator,
                  HessianOperator,
)
from .results import DensityResult, EigenResult, TraceResult

__all__ = [
    "hessian_eigen", "hessian_extremes", "curvature_eigen", "hessian_trace",
    "spectral_density", "layerwise_lambda_max", "effective_dimension", "EigenResult",
    "TraceResult", "DensityResult", "HessianOperator", "HessianBlockOperator", "GGNOperator",
    "EmpiricalFisherOperator", "CurvatureOperator", "LinearOperator", "LambdaOperator",
    "MatrixOperator", "as_batches", "eval_mode",
]
