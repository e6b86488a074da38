"""Exact curvature of the mean training loss: Hessian (and GGN / empirical Fisher) spectra,
traces and densities, on any nn.Module. Pure: no MLflow, no I/O.

Model-level API (what notebooks call)::

    hessian_eigen(model, loss_fn, data, k=1, which="LA", tol=1e-4, solver=EigenSolver())
    curvature_eigen(model, loss_fn, data, k=1, matrix="ggn")  # or "hessian", "fisher"
    hessian_trace(model, loss_fn, data, method="hutchinson" | "hutch++" | "krylov", n_samples=30)
    spectral_density(model, loss_fn, data, n_steps=100, n_vectors=1, smoothing=Smoothing())
    layerwise_lambda_max(model, loss_fn, data)
    # every one of them takes scope=Scope(params=..., max_memory="4GB", chunk_size=...)
    measure_curvature(model, loss_fn, data, CurvatureSettings())  # the per-epoch set
    batch_sharpness(model, loss_fn, probe, BatchSampling(batch_size=32))
    effective_dimension(eigenvalues, alpha)

Solvers on any symmetric operator (`HessianOperator(model, loss_fn, data)`, `GGNOperator`,
or `LambdaOperator` around your own product)::

    lanczos(op, k, which="LA", tol=1e-4, max_iter=100, seed=0) -> EigenResult
    power_iteration(op, k=1, tol=1e-3) -> EigenResult
    hutchinson(op, n_samples) / hutchpp(op, n_samples) / krylov_hutchinson(op, n_samples)
    slq_density(op, n_steps=100, n_vectors=1) -> DensityResult

`data` is one (x, y) tuple or an iterable of them; losses are mean-reduced over all samples
with batches weighted by size. `Scope(loss_form=...)` ("output_target" for
loss_fn(output, target), "model_batch" for loss_fn(model, batch)) says which form loss_fn
has; by default it is guessed. "LA" = largest algebraic (sorted largest first), "SA" =
smallest algebraic (most negative first). Power iteration finds the largest *magnitude*.
"""

from .api import (
    EigenSolver,
    Smoothing,
    curvature_eigen,
    effective_dimension,
    hessian_eigen,
    hessian_extremes,
    hessian_trace,
    layerwise_lambda_max,
    spectral_density,
)
from .batches import as_batches, eval_mode
from .density import slq_density
from .lanczos import lanczos, power_iteration
from .linear import LambdaOperator, LinearOperator, MatrixOperator, SymmetricOperator
from .measure import CurvatureMeasures, CurvatureSettings, measure_curvature
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianBlockOperator,
    HessianOperator,
)
from .results import DensityResult, EigenResult, TraceResult
from .scope import Scope
from .stability import SGDStep
from .stochastic import BatchSampling, batch_sharpness
from .trace import hutch_plus_plus, hutchinson, hutchpp, krylov_hutchinson

__all__ = [
    "hessian_eigen",
    "hessian_extremes",
    "curvature_eigen",
    "hessian_trace",
    "spectral_density",
    "layerwise_lambda_max",
    "effective_dimension",
    "measure_curvature",
    "CurvatureSettings",
    "CurvatureMeasures",
    "Scope",
    "EigenSolver",
    "Smoothing",
    "batch_sharpness",
    "BatchSampling",
    "SGDStep",
    "lanczos",
    "power_iteration",
    "hutchinson",
    "hutchpp",
    "hutch_plus_plus",
    "krylov_hutchinson",
    "slq_density",
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "HessianOperator",
    "HessianBlockOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "CurvatureOperator",
    "LinearOperator",
    "LambdaOperator",
    "MatrixOperator",
    "SymmetricOperator",
    "as_batches",
    "eval_mode",
]
