"""The names measurements are logged under: MLflow metric keys and artifact paths of the
per-epoch curvature (`lossgeo.curvature.measure` returns numbers only). The names are the
original design's (`lambda_max`, `hessian_trace`, `spectrum/eigen.pt`, ...)."""

from __future__ import annotations

import math
from typing import Any

from lossgeo.curvature.measure import CurvatureMeasures, CurvatureSettings, edge_ratio


def curvature_metrics(
    measures: CurvatureMeasures, *, lr: float | None = None, momentum: float = 0.0
) -> dict[str, float]:
    """The per-epoch curvature metrics, named as logged.

    Args:
        measures: what `measure_curvature` returned.
        lr: the step size the optimizer runs at; None (unknown, or an optimizer without a
            known edge) logs no `edge_ratio`.
        momentum: heavy-ball momentum of that optimizer.

    Returns:
        lambda_max, lambda_2..k, lambda_min, lambda_max_residual_log10 and _converged,
        hessian_trace and _se, effective_dim, lambda_max_ggn and _fisher, lambda_max/<layer>,
        edge_ratio, curvature_n_hvp and curvature_seconds; only lambda_max (NaN), probe_loss
        and curvature_seconds when the probe loss was not finite.
    """
    m = measures
    if m.top is None or m.bottom is None:
        return {"lambda_max": math.nan, "probe_loss": m.probe_loss, "curvature_seconds": m.seconds}
    lambda_max = m.lambda_max
    metrics: dict[str, float] = {
        "lambda_max": lambda_max,
        "lambda_min": float(m.bottom.values[0]),
        # log10 of ||Hv - lambda v|| / |lambda|: the raw residual spans 1e-9..1e-26, which a
        # linear chart draws as a row of zeros
        "lambda_max_residual_log10": math.log10(
            max(float(m.top.residuals[0]) / max(abs(lambda_max), 1e-300), 1e-300)
        ),
        "lambda_max_converged": float(m.top.all_converged),
    }
    if m.trace is not None:
        metrics["hessian_trace"], metrics["hessian_trace_se"] = m.trace.value, m.trace.stderr
    if m.effective_dim is not None:
        metrics["effective_dim"] = m.effective_dim
    if lr is not None:
        metrics["edge_ratio"] = edge_ratio(lambda_max, lr, momentum)
    for i, value in enumerate(m.top.values.tolist()[1:], start=2):
        metrics[f"lambda_{i}"] = value
    if m.ggn_lambda_max is not None:
        metrics["lambda_max_ggn"] = m.ggn_lambda_max
    if m.fisher_lambda_max is not None:
        metrics["lambda_max_fisher"] = m.fisher_lambda_max
    for layer, value in m.layers.items():
        metrics[f"lambda_max/{layer}"] = value
    metrics["curvature_n_hvp"] = float(m.n_hvp)
    metrics["curvature_seconds"] = m.seconds
    return metrics


def curvature_artifacts(measures: CurvatureMeasures, settings: CurvatureSettings) -> dict[str, Any]:
    """The spectrum artifacts of a final measurement: `spectrum/eigen.pt` (top-k pairs,
    residuals, lambda_min) and `spectrum/density.pt` (the SLQ density); empty otherwise."""
    m = measures
    if m.density is None or m.top is None or m.bottom is None:
        return {}
    top, density = m.top, m.density
    return {
        "spectrum/eigen.pt": {
            "values": top.values,
            "vectors": top.vectors.cpu(),
            "residuals": top.residuals,
            "converged": top.converged,
            "lambda_min": m.bottom.values,
            "n_hvp": top.n_hvp,
            "tol": settings.tol,
            "parameter_names": list(m.parameter_names),
        },
        "spectrum/density.pt": {
            "grid": density.grid,
            "density": density.density,
            "nodes": density.nodes,
            "weights": density.weights,
            "sigma": density.sigma,
            "n_steps": settings.density_steps,
        },
    }
