"""Which measure predicts generalisation: the field's scores of a measure against a gap over
the runs of a study.

- Kendall's tau over all runs (tau-b, scipy), with a percentile-bootstrap CI (runs resampled).
- The granulated Kendall Psi (Jiang et al. 2019, "Fantastic Generalization Measures", Sec.
  4): for each factor (hyperparameter axis), the mean of tau over the groups of runs that
  share every other factor and the seed, so that only that axis varies within a group; Psi
  is the mean of those per-axis taus. Its CI resamples each axis's groups.
- The sign error (Dziugaite et al. 2020, "In Search of Robust Measures of Generalization"):
  over pairs of runs that differ in exactly one factor (and share the seed), the share of
  pairs the measure orders against the gap, 1/2 (1 - sign(dm) sign(dg)) (a tie counts a
  half). The mean over pairs with a bootstrap CI (pairs resampled), the mean per axis and
  the worst axis.
- The same three after conditioning on the train loss, for studies not trained to equal
  fit: measure and gap are replaced by the residuals of their ranks after a least-squares
  fit on the rank of the train loss.

A positive tau or Psi means that the larger the measure, the larger the gap (Jiang et al.'s
orientation: every lossgeo measure is oriented so that larger means sharper or noisier).
Pure numpy/scipy/pandas on a table of runs; no MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from lossgeo.analysis.statistics import CONFIDENCE, _interval

# Every candidate a run logs at its end point (larger: sharper, or noisier for B_simple).
MEASURES = (
    "lambda_max",
    "hessian_trace",
    "effective_dim",
    "lambda_max_ggn",
    "lambda_max_fisher",
    "sharp_mean",
    "sharp_max",
    "eps_sharpness",
    "adaptive_sharpness",
    "pac_bayes_flatness",
    "pac_bayes_mag_flatness",
    "grad_noise_scale",
)
GAPS = ("gen_gap", "gen_gap_acc")
# The settings a study may vary; the ones that vary in a table are its factors.
FACTOR_CANDIDATES = (
    "model",
    "lr",
    "batch_size",
    "momentum",
    "weight_decay",
    "hidden",
    "activation",
    "loss",
    "train_subset",
)
CONTROL = "train_loss"
N_RESAMPLES = 1000


def study_factors(runs: pd.DataFrame) -> list[str]:
    """The settings among FACTOR_CANDIDATES that take more than one value in `runs`."""
    return [c for c in FACTOR_CANDIDATES if c in runs and runs[c].astype(str).nunique() > 1]


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b; NaN with fewer than two runs or a constant column."""
    if len(x) < 2:
        return float("nan")
    return float(stats.kendalltau(x, y).statistic)


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of (B, n) arrays at once (NaN for a constant row):
    sum sx sy / sqrt(sum sx^2 sum sy^2) over pairs, sx = sign(x_i - x_j), which counts
    ties as tau-b does."""
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sx * sy).sum(axis=(1, 2)) / np.sqrt(
            (sx**2).sum(axis=(1, 2)) * (sy**2).sum(axis=(1, 2))
        )


def _labels(runs: pd.DataFrame, factors: Sequence[str]) -> dict[str, np.ndarray]:
    columns = list(factors) + (["seed"] if "seed" in runs else [])
    return {c: runs[c].astype(str).to_numpy() for c in columns}


def axis_groups(runs: pd.DataFrame, factors: Sequence[str], axis: str) -> list[np.ndarray]:
    """Row positions of each group of runs in which only `axis` varies (every other factor
    and the seed fixed), for groups with at least two values of `axis`."""
    return _axis_groups(_labels(runs, factors), axis)


def _axis_groups(labels: dict[str, np.ndarray], axis: str) -> list[np.ndarray]:
    fixed = [labels[c] for c in labels if c != axis]
    n = len(labels[axis])
    keys = np.array(["|".join(parts) for parts in zip(*fixed)]) if fixed else np.zeros(n, str)
    groups = []
    for key in pd.unique(keys):
        rows = np.flatnonzero(keys == key)
        if len(set(labels[axis][rows])) > 1:
            groups.append(rows)
    return groups


def one_factor_pairs(runs: pd.DataFrame, factors: Sequence[str]) -> list[tuple[int, int, str]]:
    """(i, j, axis) for every pair of runs that differ in exactly one factor, same seed."""
    return _pairs(_labels(runs, factors), factors)


def _pairs(labels: dict[str, np.ndarray], factors: Sequence[str]) -> list[tuple[int, int, str]]:
    pairs = []
    for axis in factors:
        for rows in _axis_groups(labels, axis):
            values = labels[axis][rows]
            for a, b in combinations(range(len(rows)), 2):
                if values[a] != values[b]:
                    pairs.append((int(rows[a]), int(rows[b]), axis))
    return pairs


def sign_errors(m: np.ndarray, g: np.ndarray, pairs: list[tuple[int, int, str]]) -> np.ndarray:
    """1/2 (1 - sign(m_i - m_j) sign(g_i - g_j)) for each pair."""
    i = np.array([p[0] for p in pairs], dtype=int)
    j = np.array([p[1] for p in pairs], dtype=int)
    return 0.5 * (1 - np.sign(m[i] - m[j]) * np.sign(g[i] - g[j]))


def _rank_residuals(values: np.ndarray, control: np.ndarray) -> np.ndarray:
    r, c = stats.rankdata(values), stats.rankdata(control)
    design = np.column_stack([np.ones(len(c)), c])
    return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]


def score_measure(
    runs: pd.DataFrame,
    measure: str,
    gap: str,
    factors: Sequence[str],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, object]:
    """tau, Psi and sign error of one measure against one gap (see the module docstring),
    over the runs where both (and the train loss, when logged) are finite."""
    columns = [measure, gap] + ([CONTROL] if CONTROL in runs else [])
    values = runs[columns].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(values).all(axis=1)
    runs, values = runs[keep].reset_index(drop=True), values[keep].reset_index(drop=True)
    row: dict[str, object] = {"measure": measure, "gap": gap, "n": len(runs)}
    if len(runs) < 3:
        return row
    m, g = values[measure].to_numpy(), values[gap].to_numpy()
    rng = np.random.default_rng(seed)
    labels = _labels(runs, factors)
    design = _Design(
        groups={axis: _axis_groups(labels, axis) for axis in factors},
        pairs=_pairs(labels, factors),
    )
    row.update(_scores(design, m, g, rng, confidence, n_resamples, ""))
    if CONTROL in values and values[CONTROL].nunique() > 1:
        z = values[CONTROL].to_numpy()
        row.update(
            _scores(
                design,
                _rank_residuals(m, z),
                _rank_residuals(g, z),
                rng,
                confidence,
                n_resamples,
                "_given_train_loss",
            )
        )
    return row


@dataclass(frozen=True)
class _Design:
    """Where only one axis varies: its groups of runs, and the one-factor pairs."""

    groups: dict[str, list[np.ndarray]]
    pairs: list[tuple[int, int, str]]


def _scores(
    design: _Design,
    m: np.ndarray,
    g: np.ndarray,
    rng: np.random.Generator,
    confidence: float,
    n_resamples: int,
    suffix: str,
) -> dict[str, object]:
    out: dict[str, object] = {}
    n = len(m)
    tau = kendall(m, g)
    index = rng.integers(0, n, size=(n_resamples, n))
    boot = kendall_rows(m[index], g[index])
    low, high = _interval(boot, confidence)
    out.update({f"tau{suffix}": tau, f"tau_ci_low{suffix}": low, f"tau_ci_high{suffix}": high})
    # granulated: per axis, tau in every group where only that axis varies
    axis_taus: dict[str, np.ndarray] = {}
    for axis, groups in design.groups.items():
        taus = np.array([kendall(m[rows], g[rows]) for rows in groups])
        taus = taus[np.isfinite(taus)]
        if len(taus):
            axis_taus[axis] = taus
            out[f"tau_{axis}{suffix}"] = float(taus.mean())
    if axis_taus:
        out[f"psi{suffix}"] = float(np.mean([t.mean() for t in axis_taus.values()]))
        resampled = np.mean(
            [
                t[rng.integers(0, len(t), size=(n_resamples, len(t)))].mean(axis=1)
                for t in axis_taus.values()
            ],
            axis=0,
        )
        low, high = _interval(resampled, confidence)
        out.update({f"psi_ci_low{suffix}": low, f"psi_ci_high{suffix}": high})
    pairs = design.pairs
    if pairs:
        errors = sign_errors(m, g, pairs)
        axes = np.array([p[2] for p in pairs])
        out[f"sign_error{suffix}"] = float(errors.mean())
        boot = errors[rng.integers(0, len(errors), size=(n_resamples, len(errors)))].mean(axis=1)
        low, high = _interval(boot, confidence)
        out.update({f"sign_error_ci_low{suffix}": low, f"sign_error_ci_high{suffix}": high})
        per_axis = {axis: float(errors[axes == axis].mean()) for axis in pd.unique(axes)}
        for axis, value in per_axis.items():
            out[f"sign_error_{axis}{suffix}"] = value
        worst = max(per_axis, key=lambda a: per_axis[a])
        out.update({f"sign_error_worst{suffix}": per_axis[worst], f"worst_axis{suffix}": worst})
        out[f"n_pairs{suffix}"] = len(pairs)
    return out


def score_measures(
    runs: pd.DataFrame,
    measures: Sequence[str] = MEASURES,
    gaps: Sequence[str] = GAPS,
    factors: Sequence[str] | None = None,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> pd.DataFrame:
    """One row per (measure, gap) present in `runs`, ranked by Psi within each gap (then by
    tau): the table of `lossgeo measures`. Unfinished and diverged runs, and runs that missed
    their target, are left out. factors: default `study_factors(runs)`."""
    keep = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    for tag, bad in (("tags.diverged", "true"), ("tags.reached_target", "false")):
        if tag in keep:
            keep = keep[keep[tag] != bad]
    factors = study_factors(keep) if factors is None else list(factors)
    rows = [
        score_measure(keep, measure, gap, factors, seed=seed, n_resamples=n_resamples)
        for gap in gaps
        if gap in keep
        for measure in measures
        if measure in keep
    ]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for column in ("psi", "tau"):
        if column not in table:
            table[column] = np.nan
    table["factors"] = ",".join(factors)
    order = table.sort_values(["gap", "psi", "tau"], ascending=[True, False, False])
    return order.reset_index(drop=True)
