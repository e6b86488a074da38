"""The public curvature functions (re-exported by `lossgeo.curvature`)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..models import parameter_blocks
from .batches import AnyLossFn, DataSource
from .density import slq_density
from .factories import hessian_block, hessian_operator, make_operator
from .lanczos import Extremes, both, lanczos_extremes, lanczos_top, power_iteration
from .operators import full_precision
from .results import DensityResult, EigenResult, TraceResult
from .trace import hutch_plus_plus, hutchinson, krylov_hutchinson

Which = Literal["LA", "SA"]
EigenMethod = Literal["lanczos", "power"]
Matrix = Literal["hessian", "ggn", "fisher"]
TraceMethod = Literal["hutchinson", "hutch++", "krylov"]


def _operator_options(
    chunk_size: int | str | None, hvp_method: str, max_memory: int | str | None
) -> dict[str, Any]:
    """The operator keywords that every public function takes by its own names."""
    return {"chunk_size": chunk_size, "method": hvp_method, "max_memory": max_memory}


@full_precision
def curvature_eigen(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    which: Which = "LA",
    method: EigenMethod = "lanczos",
    tol: float = 1e-4,
    max_iter: int = 100,
    *,
    matrix: Matrix = "hessian",
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    hvp_method: str = "graph",
    params: Sequence[str] | str | None = None,
    verify: bool = False,
    max_memory: int | str | None = "auto",
    **batching: Any,
) -> EigenResult:
    """Top-k ("LA") or bottom-k ("SA") eigenpairs of the Hessian, GGN or empirical Fisher.

    params: a parameter filter (names, module paths, globs); batching: `loss_form` and
    `batch_size` for loss_fn(model, batch) and other batches (see `batches.py`).

    tol is the relative eigenvalue accuracy (Lanczos: error bound min(r, r^2/gap); power
    iteration: relative change, as PyHessian). verify=True recomputes the residuals
    ||A v - lambda v|| with one extra product per pair instead of the Lanczos estimates.

    max_memory: the budget for the products' graphs and the Lanczos basis (bytes, "4GB", or
    "auto": 80% of what the device has free; None: unsized). The basis grows with the
    steps taken, and a basis that would pass the budget is thick-restarted to the same
    stopping test (`EigenResult.restarts`)."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which: must be 'LA' or 'SA' (got {which!r})")
    op = make_operator(
        matrix,
        model,
        loss_fn,
        data,
        params=params,
        chunk_size=chunk_size,
        method=hvp_method,
        max_memory=max_memory,
        **batching,
    )
    if method == "power":
        if which != "LA":
            raise ValueError(
                "which: power iteration finds the largest-magnitude eigenvalues "
                "only; use method='lanczos' for 'SA'"
            )
        return power_iteration(op, k=k, tol=tol, max_iter=max_iter, seed=seed)
    if method != "lanczos":
        raise ValueError(f"method: must be 'lanczos' or 'power' (got {method!r})")
    wanted = Extremes(k_top=k if which == "LA" else 0, k_bottom=k if which == "SA" else 0, tol=tol)
    top, bottom = lanczos_extremes(op, wanted, max_iter=max_iter, seed=seed, verify=verify)
    result = top if which == "LA" else bottom
    assert result is not None  # the end asked for
    return result


def hessian_eigen(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    which: Which = "LA",
    method: EigenMethod = "lanczos",
    tol: float = 1e-4,
    max_iter: int = 100,
    **options: Any,
) -> EigenResult:
    """Top-k ("LA") or bottom-k ("SA") Hessian eigenpairs; see `curvature_eigen`."""
    return curvature_eigen(
        model, loss_fn, data, k, which, method, tol, max_iter, matrix="hessian", **options
    )


@full_precision
def hessian_extremes(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    hvp_method: str = "graph",
    max_memory: int | str | None = "auto",
    **options: Any,
) -> tuple[EigenResult, EigenResult]:
    """Top-k and lambda_min from one Lanczos run (what a training epoch logs)."""
    sizing = _operator_options(chunk_size, hvp_method, max_memory)
    op = hessian_operator(model, loss_fn, data, **sizing, **options)
    wanted = Extremes(k_top=k, k_bottom=1, tol=tol)
    return both(lanczos_extremes(op, wanted, max_iter=max_iter, seed=seed))


@full_precision
def hessian_trace(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    method: TraceMethod = "hutchinson",
    n_samples: int = 30,
    *,
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    hvp_method: str = "graph",
    max_memory: int | str | None = "auto",
    **options: Any,
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
        chunk_size: samples per forward pass ("auto": by activation memory).
        hvp_method: "graph" (double backward) or "fwdrev" (forward-over-reverse).
        max_memory: the budget for graphs and solver vectors ("4GB", bytes, "auto": 80% of
            the free memory; None: unsized); see `curvature_eigen`.
        **options: passed to `HessianOperator` (params=, loss_form=, ...).

    Returns:
        A `TraceResult` with the estimate, its standard error and the products used.
    """
    estimators = {"hutchinson": hutchinson, "hutch++": hutch_plus_plus, "krylov": krylov_hutchinson}
    if method not in estimators:
        raise ValueError(f"method: must be 'hutchinson', 'hutch++' or 'krylov' (got {method!r})")
    sizing = _operator_options(chunk_size, hvp_method, max_memory)
    op = hessian_operator(model, loss_fn, data, **sizing, **options)
    return estimators[method](op, n_samples, seed=seed)


@full_precision
def spectral_density(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    n_steps: int = 100,
    n_vectors: int = 1,
    *,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    hvp_method: str = "graph",
    max_memory: int | str | None = "auto",
    **options: Any,
) -> DensityResult:
    """The Hessian's spectral density by stochastic Lanczos quadrature.

    Args:
        model: any nn.Module.
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch).
        data: one (x, y) pair, a list of batches or a DataLoader.
        n_steps: Lanczos steps per start vector (PyHessian uses 100).
        n_vectors: random start vectors averaged.
        sigma: width of the Gaussian smoothing (default from the spectrum's range).
        grid_size: points of the returned density grid.
        seed: the start vectors.
        chunk_size: samples per forward pass ("auto": by activation memory).
        hvp_method: "graph" (double backward) or "fwdrev" (forward-over-reverse).
        max_memory: the budget for graphs and solver vectors ("4GB", bytes, "auto": 80% of
            the free memory; None: unsized); see `curvature_eigen`.
        **options: passed to `HessianOperator` (params=, loss_form=, ...).

    Returns:
        A `DensityResult`: the smoothed density on its grid, the quadrature nodes and weights.
    """
    sizing = _operator_options(chunk_size, hvp_method, max_memory)
    op = hessian_operator(model, loss_fn, data, **sizing, **options)
    return slq_density(
        op, n_steps=n_steps, n_vectors=n_vectors, sigma=sigma, grid_size=grid_size, seed=seed
    )


@full_precision
def layerwise_lambda_max(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | str | None = "auto",
    params: Sequence[str] | str | None = None,
    max_memory: int | str | None = "auto",
    **options: Any,
) -> dict[str, EigenResult]:
    """Top eigenpair of each layer's diagonal Hessian block (the layer's own parameters
    varied, all others fixed), keyed by layer name (`models.layer_names`: fc1, conv2, ...,
    or the module path). With a parameter filter, the blocks are those of the selected
    parameters. All layers
    share one gradient graph (a sharded (FSDP) model: one difference product of the whole
    Hessian per block product)."""
    op = hessian_operator(
        model, loss_fn, data, chunk_size=chunk_size, params=params, max_memory=max_memory, **options
    )
    blocks = parameter_blocks(op.model, op.space.names)
    return {
        layer: lanczos_top(hessian_block(op, names), tol=tol, max_iter=max_iter, seed=seed)
        for layer, names in blocks.items()
    }


def effective_dimension(eigenvalues: torch.Tensor | Sequence[float], alpha: float) -> float:
    """N_eff(alpha) = sum_i lambda_i / (lambda_i + alpha) over the (top-k) eigenvalues;
    non-positive eigenvalues contribute 0 (MacKay 1992; Maddox et al. 2020)."""
    if alpha <= 0:
        raise ValueError(f"alpha: must be > 0 (got {alpha})")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0)
    return float((lam / (lam + alpha)).sum())
