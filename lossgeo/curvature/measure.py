"""The per-epoch curvature of a model on a probe set: one Hessian operator shared by every
estimator, so the probe set's gradient graph is built once per measurement.

This is the only per-epoch curvature path: lossgeo's training loop and `Tracker.epoch()` in a
user's loop both call `measure_curvature` with one `CurvatureSettings`. It returns numbers in
a `CurvatureMeasures` record; the metric names and artifact paths they are logged under are
given in `lossgeo.run.names`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..models import parameter_blocks
from .api import effective_dimension
from .batches import AnyLossFn, DataSource, eval_mode
from .density import slq_density
from .distributed import unwrap
from .factories import AnyHessianOperator, hessian_block, hessian_operator, make_operator
from .lanczos import (
    Extremes,
    LanczosRun,
    basis_rows,
    both,
    check_solver_limits,
    lanczos_extremes,
    lanczos_top,
)
from .linear import MatrixOperator
from .operators import full_precision
from .persample import fisher_gram
from .results import DensityResult, EigenResult, TraceResult
from .scope import Scope
from .sharded import is_sharded
from .trace import hutchinson

log = logging.getLogger("lossgeo")


@dataclass(frozen=True)
class CurvatureSettings:
    """What a per-epoch curvature measurement computes, and how accurately.

    Attributes:
        k: eigenpairs at the top of the spectrum (lambda_1..k).
        tol: relative accuracy of lambda_max.
        max_iter: Lanczos steps at most per solve.
        trace_samples: Hutchinson probe vectors for the trace (fewer than 2: no trace),
            deflated by the eigen solve's Krylov basis: 14 give the standard error that 20
            gave deflated by the top-5 Ritz pairs (benchmarks/bench_trace_deflation.py).
        density_steps: Lanczos steps of the spectral density (final measurement only).
        alpha: the effective dimension's scale, sum of lambda / (lambda + alpha).
        secondary_tol: relative accuracy of lambda_2..k, of the GGN, Fisher and per-layer
            lambda_max (the Fisher is exact on Linear chains), and of lambda_min against
            lambda_max.
        layerwise: lambda_max of each layer's diagonal Hessian block (when there are two or
            more layers).
        ggn: lambda_max of the GGN and of the empirical Fisher (with loss_fn(output, target)
            only: they need the network outputs).
        seed: start vectors and probe vectors.

    How the products are taken (chunks, precision, the memory budget) is the `Scope`'s.
    """

    k: int = 5
    tol: float = 1e-4
    max_iter: int = 100
    trace_samples: int = 14
    density_steps: int = 100
    alpha: float = 1.0
    secondary_tol: float = 1e-3
    layerwise: bool = True
    ggn: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Every size, count, tolerance and option checked at construction (one line),
        not at the first measurement an epoch of training later."""
        check_solver_limits(
            k=self.k, max_iter=self.max_iter, density_steps=self.density_steps,
            tol=self.tol, secondary_tol=self.secondary_tol,
        )  # fmt: skip
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha: must be a number > 0 (got {self.alpha!r})")
        if isinstance(self.trace_samples, bool) or not isinstance(self.trace_samples, int):
            raise ValueError(f"trace_samples: must be a whole number (got {self.trace_samples!r})")


@dataclass(frozen=True)
class CurvatureMeasures:
    """What one curvature measurement found (numbers and result records, no names).

    `top` is None when the probe loss or its gradient was not finite: then nothing else was
    measured, and `probe_loss` says what the loss was.
    """

    probe_loss: float
    top: EigenResult | None = None
    bottom: EigenResult | None = None
    trace: TraceResult | None = None
    effective_dim: float | None = None
    ggn_lambda_max: float | None = None
    fisher_lambda_max: float | None = None
    layers: dict[str, float] = field(default_factory=dict)
    density: DensityResult | None = None
    parameter_names: tuple[str, ...] = ()
    n_hvp: int = 0
    seconds: float = 0.0
    # products ran under the math attention backend (fused attention has no double backward)
    math_attention: bool = False

    @property
    def finite(self) -> bool:
        """Whether the probe loss was finite (and so anything was measured)."""
        return self.top is not None

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (NaN when the probe loss was not finite)."""
        return float(self.top.values[0]) if self.top is not None else math.nan


def edge_ratio(lambda_max: float, lr: float, momentum: float = 0.0) -> float:
    """lambda_max / (2 (1 + momentum) / lr): GD with heavy-ball momentum is stable on a
    quadratic while this is below 1 (Cohen et al. 2021 use 2/lr without momentum)."""
    return lambda_max * lr / (2.0 * (1.0 + momentum))


def probe_is_finite(op: AnyHessianOperator) -> bool:
    """Whether the probe loss and its gradient are finite (no curvature is read otherwise).
    The gradient first: it builds the retained graph every product then reads, and records
    the loss on the way (asked first, the loss would cost a forward pass of its own)."""
    gradient_finite = bool(torch.isfinite(op.gradient()).all())
    return gradient_finite and math.isfinite(op.loss())


@full_precision
def measure_curvature(
    model: nn.Module,
    loss_fn: AnyLossFn,
    data: DataSource,
    settings: CurvatureSettings = CurvatureSettings(),
    *,
    scope: Scope = Scope(),
    final: bool = False,
) -> CurvatureMeasures:
    """The per-epoch curvature of the mean loss of `model` on `data`.

    Args:
        model: any nn.Module; left as it was (weights, flags, buffers, `.grad`).
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch).
        data: one (x, y) pair, a list of batches or a DataLoader.
        settings: what to compute and to which accuracy.
        scope: the parameters, the loss's form, how batches are counted, the process
            group, and how products are taken (chunks, method, precision, the memory
            budget; `Scope`): with a group, `data`
            is this rank's shard of the probe set and every product is summed over the
            group; every rank returns the same record. A sharded (FSDP2) model is measured
            over its mesh's group by difference products (`sharded.py`).
        final: also the spectral density (continuing the eigen solve's Krylov space).

    Returns:
        A `CurvatureMeasures`: lambda_max..lambda_k and lambda_min with residuals, the trace
        (deflated by the top-k pairs), the effective dimension, GGN and Fisher lambda_max,
        lambda_max per layer and, when final, the density; all None/empty if the probe loss
        is not finite.
    """
    start = time.perf_counter()
    s, scope = settings, scope.resolved()
    model = unwrap(model)
    op = hessian_operator(model, loss_fn, data, scope)
    if not probe_is_finite(op):
        return CurvatureMeasures(
            probe_loss=op.loss(),
            seconds=time.perf_counter() - start,
            math_attention=op.math_attention,
        )
    k = max(1, min(s.k, op.dim - 1))
    run = _krylov_run(op, s, final)
    # lambda_max to tol; lambda_2..k and lambda_min (against lambda_max) to secondary_tol
    top, bottom = both(
        lanczos_extremes(
            op,
            Extremes(
                k_top=k,
                k_bottom=1,
                tol=s.tol,
                rest_tol=s.secondary_tol,
                bottom_tol=s.secondary_tol,
                bottom_scale="spectrum",
            ),
            max_iter=s.max_iter,
            seed=s.seed,
            run=run,
        )
    )
    n_hvp = top.n_hvp
    trace = None
    if s.trace_samples >= 2 and op.dim > k:
        # the eigen solve's whole Krylov basis (else its top-k Ritz pairs) carries much of
        # Hutchinson's variance: take its part exactly (`trace.py`)
        krylov = run.state if run is not None else None
        deflation = krylov if krylov is not None else (top.values, top.vectors)
        trace = hutchinson(op, s.trace_samples, seed=s.seed, deflation=deflation)
        n_hvp += trace.n_hvp
    ggn = fisher = None
    if s.ggn and op.objective.form == "output_target":
        # the GGN and Fisher are not sized in advance (their graphs are the Hessian's, which
        # was): a budget would only repeat the small graphs the Hessian's sizing built
        outputs = replace(scope, loss_form="output_target", math_attention=False, max_memory=None)
        ggn_result = lanczos_top(
            make_operator("ggn", model, loss_fn, data, outputs),
            tol=s.secondary_tol,
            max_iter=s.max_iter,
            seed=s.seed,
        )
        ggn = float(ggn_result.values[0])
        fisher, fisher_products = _fisher_lambda_max(model, loss_fn, data, s, outputs)
        n_hvp += ggn_result.n_hvp + fisher_products
    layers: dict[str, float] = {}
    blocks = parameter_blocks(model, op.space.names) if s.layerwise else {}
    if len(blocks) > 1:
        for layer, names in blocks.items():
            result = lanczos_top(
                hessian_block(op, names),
                tol=s.secondary_tol,
                max_iter=s.max_iter,
                seed=s.seed,
            )
            layers[layer] = float(result.values[0])
            n_hvp += result.n_hvp
    density = None
    if final:
        density = _density(op, s, run)
        n_hvp += density.n_hvp if density is not None else 0
    return CurvatureMeasures(
        probe_loss=op.loss(),
        top=top,
        bottom=bottom,
        trace=trace,
        effective_dim=effective_dimension(top.values, s.alpha),
        ggn_lambda_max=ggn,
        fisher_lambda_max=fisher,
        layers=layers,
        density=density,
        parameter_names=tuple(op.space.names),
        n_hvp=n_hvp,
        seconds=time.perf_counter() - start,
        math_attention=op.math_attention,
    )


def _krylov_run(op: AnyHessianOperator, s: CurvatureSettings, final: bool) -> LanczosRun | None:
    """The eigen solve's Lanczos run, kept for the trace's deflation and, at the last epoch,
    for the spectral density to continue; None when its whole basis would not fit the
    memory budget: the solve then restarts as the budget needs, the trace deflates by the
    top-k pairs, and the density takes its own run (or is left out, `_density`)."""
    steps = max(s.max_iter, s.density_steps) if final else s.max_iter
    capacity = basis_rows(op, min(steps, op.dim))
    if capacity is None or capacity >= min(steps, op.dim):
        return LanczosRun(op, seed=s.seed, max_steps=steps)
    return None


def _density(
    op: AnyHessianOperator, s: CurvatureSettings, run: LanczosRun | None
) -> DensityResult | None:
    """The final epoch's spectral density, continuing the eigen solve's run where there is
    one; None, with one warning, when its quadrature's basis does not fit the memory budget
    (the rest of the final set is kept: a density cannot restart)."""
    try:
        return slq_density(op, n_steps=s.density_steps, seed=s.seed, run=run)
    except MemoryError as error:
        log.warning("lossgeo: the spectral density is left out: %s", error)
        return None


def _fisher_lambda_max(
    model: nn.Module,
    loss_fn: Any,
    data: DataSource,
    s: CurvatureSettings,
    scope: Scope,
) -> tuple[float, int]:
    """(lambda_max of the empirical Fisher, products in parameter space). For a chain of
    Linear layers (the MLP) it is the top eigenvalue of the n x n Gram matrix of per-sample
    gradients, exact to rounding and cheaper than Lanczos in parameter space (MLP, probe
    1024: 0.1 s against 0.22 s for 1e-3); any other model, a parameter filter or a sharded
    probe set gets Lanczos on the operator."""
    gram = None
    # the Gram path reads every parameter and every sample of the probe set in one process
    if (
        scope.params is None
        and scope.size_fn is None
        and scope.process_group is None
        and not is_sharded(model)
    ):
        with eval_mode(model):
            gram = fisher_gram(model, loss_fn, data)
    if gram is not None:
        top = lanczos_top(MatrixOperator(gram), tol=1e-12, max_iter=gram.shape[0], seed=s.seed)
        return float(top.values[0]), 0
    fisher = make_operator("fisher", model, loss_fn, data, scope)
    result = lanczos_top(fisher, tol=s.secondary_tol, max_iter=s.max_iter, seed=s.seed)
    return float(result.values[0]), result.n_hvp
