"""Did a run reach its optimizer's stability edge and stay there? Read from logged series.

For each run the sharpness that governs its optimizer is read against the threshold it logged
(`stability_threshold`): batch sharpness under mini-batch SGD when the per-step set ran
(`step/batch_edge_ratio`), else the per-step or per-epoch `edge_ratio` (lambda_max for GD,
the preconditioned lambda_max for Adam). Raw lambda_max is read against 2/lr next to it, the
comparison Cohen et al. (2022) make for Adam. The second half of the measurements is where
the published claims are stated ("rises to the threshold and hovers there"), so the verdict
is taken there; the regimes are those of the online detector (`geometry.regimes`) replayed
on the series.

Pure pandas on the long history table of `analysis.load_history`; no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from lossgeo.geometry.regimes import BAND, EdgeRegimeDetector

# a run hovers at the edge when this share of its second half is within 1 +- BAND
HOVER_SHARE = 0.8


@dataclass(frozen=True)
class EdgeSeries:
    """The governing sharpness of one run over its measurements, with its threshold."""

    governing: str  # the metric read against the threshold
    steps: np.ndarray
    ratio: np.ndarray  # governing / threshold
    loss: np.ndarray  # probe loss (per step) or train loss (per epoch) at the same points
    raw_lambda_max: np.ndarray  # lambda_max at the same points (NaN where not logged)


# what an edge_ratio is of: the preconditioned lambda_max where the optimizer has one
_EDGE_SHARPNESS = {
    prefix: (f"{prefix}preconditioned_lambda_max", f"{prefix}lambda_max")
    for prefix in ("step/", "")
}


def _wide(history: pd.DataFrame) -> pd.DataFrame:
    return history.pivot_table(index="epoch", columns="metric", values="value").sort_index()


def edge_series(history: pd.DataFrame) -> EdgeSeries | None:
    """The governing series of one run's long history; None when it logged no edge ratio
    (an optimizer without a known threshold, or curvature off)."""
    wide = _wide(history)
    for ratio, candidates, loss, raw in (
        ("step/batch_edge_ratio", ("step/batch_sharpness",), "step/probe_loss", "step/lambda_max"),
        ("step/edge_ratio", _EDGE_SHARPNESS["step/"], "step/probe_loss", "step/lambda_max"),
        ("edge_ratio", _EDGE_SHARPNESS[""], "train_loss", "lambda_max"),
    ):
        rows = wide[wide[ratio].notna()] if ratio in wide else wide.iloc[:0]
        if rows.empty:
            continue
        return EdgeSeries(
            governing=next((name for name in candidates if name in rows), candidates[-1]),
            steps=rows.index.to_numpy(dtype=float),
            ratio=rows[ratio].to_numpy(dtype=float),
            loss=_column(rows, loss),
            raw_lambda_max=_column(rows, raw),
        )
    return None


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    if name not in rows:
        return np.full(len(rows), math.nan)
    # the epoch set's train loss is logged at every evaluated epoch: the nearest one before
    return rows[name].ffill().to_numpy(dtype=float)


def edge_summary(series: EdgeSeries, lr: float | None) -> dict[str, float | str]:
    """Second-half statistics of the governing ratio, the regime at the end and a verdict:
    "at the edge" (at least HOVER_SHARE of the second half within 1 +- BAND), "converged
    first" (converged_below the detector's most frequent regime over the second half: one
    measurement at the end is too noisy to decide on), "above", or "below"."""
    half = series.ratio[len(series.ratio) // 2 :]
    detector = EdgeRegimeDetector()  # replayed as it saw the run
    replayed = [detector.update(r, loss) for r, loss in zip(series.ratio, series.loss)]
    regimes = [r for r in replayed if r is not None]
    later = [r for r in replayed[len(replayed) // 2 :] if r is not None]
    within = float(np.mean(np.abs(half - 1) <= BAND)) if len(half) else math.nan
    final = regimes[-1] if regimes else "none"
    if within >= HOVER_SHARE:
        verdict = "at the edge"
    elif later and max(set(later), key=later.count) == "converged_below":
        verdict = "converged first"
    elif len(half) and np.median(half) > 1 + BAND:
        verdict = "above"
    else:
        verdict = "below"
    raw_half = series.raw_lambda_max[len(series.raw_lambda_max) // 2 :]
    raw_ratio = raw_half * lr / 2 if lr else np.full(len(raw_half), math.nan)
    return {
        "governing": series.governing,
        "measurements": float(len(series.ratio)),
        "last_step": float(series.steps[-1]),
        "ratio_second_half_mean": float(np.mean(half)),
        "ratio_second_half_min": float(np.min(half)),
        "ratio_second_half_max": float(np.max(half)),
        "share_second_half_within_band": within,
        "lambda_max_over_2_lr_second_half_mean": float(np.nanmean(raw_ratio))
        if np.isfinite(raw_ratio).any()
        else math.nan,
        "final_loss": float(series.loss[-1]),
        "final_regime": final,
        "converged_share_second_half": later.count("converged_below") / len(later)
        if later
        else math.nan,
        "at_edge_share": detector.share_at_edge,
        "verdict": verdict,
    }


def edge_table(history: pd.DataFrame, lrs: Mapping[str, float]) -> pd.DataFrame:
    """One row per run of the long history (label, run_id and `edge_summary`'s columns);
    runs with no edge ratio are left out. A run that logged `diverged_epoch` is read as
    "diverged", whatever its few measurements say: it never had a second half to hover in."""
    rows = []
    for (run_id, label), part in history.groupby(["run_id", "label"], sort=False):
        series = edge_series(part)
        if series is None:
            continue
        summary = edge_summary(series, lrs.get(run_id))
        if (part["metric"] == "diverged_epoch").any():
            summary.update(verdict="diverged", final_regime="diverged")
        rows.append({"label": label, "run_id": run_id, **summary})
    return pd.DataFrame(rows)
