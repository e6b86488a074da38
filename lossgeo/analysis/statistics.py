"""How sure a study is: rank correlations with bootstrap confidence intervals, a partial
Spearman correlation that holds train loss fixed, whether lambda_max follows lr/B alone, and
a verdict per hypothesis from its CI.

Pure numpy/scipy/pandas on a table of runs (one row per run); no MLflow. The bootstrap
resamples runs (rows) with replacement; it is written out rather than taken from
``scipy.stats.bootstrap`` because small studies resample constant columns now and then, whose
rank correlation is undefined: those resamples are dropped here, where scipy's percentile
interval would turn NaN. Spearman is computed for all resamples at once (ranks by
``scipy.stats.rankdata`` along rows), Kendall one resample at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Hypothesis:
    """One hypothesised rank relation: `x` and `y` rise together (sign +1) or not (-1)."""

    name: str  # H1 .. H4
    x: str
    y: str
    sign: int  # +1: x and y rise together; -1: one falls as the other rises
    claim: str


# The hypotheses a noise-temperature study tests (the original design's findings).
HYPOTHESES = [
    Hypothesis("H1", "noise_temperature", "lambda_max", -1, "low noise -> sharper"),
    Hypothesis("H1", "noise_temperature", "hessian_trace", -1, "low noise -> sharper"),
    Hypothesis("H1", "noise_temperature", "sharp_max", -1, "low noise -> sharper"),
    Hypothesis("H1", "noise_temperature", "eps_sharpness", -1, "low noise -> sharper"),
    Hypothesis("H1", "noise_temperature", "adaptive_sharpness", -1, "low noise -> sharper"),
    Hypothesis("H2", "lambda_max", "gen_gap", 1, "sharper -> larger gap at equal fit"),
    Hypothesis("H2", "lambda_max", "gen_gap_acc", 1, "sharper -> larger gap at equal fit"),
    Hypothesis("H2", "sharp_max", "gen_gap", 1, "sharper -> larger gap at equal fit"),
]
CONTROL = "train_loss"  # the partial correlation holds the fit fixed
# Below this many runs a partial rank correlation over three variables is not read: its
# bootstrap resamples of 4-9 runs hit +-1 so often that the interval looks sure when it is not.
MIN_PARTIAL_N = 10


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of (B, n) arrays; NaN where a row is constant."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=1) / denom


def _partial_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Partial Spearman of x and y given z, row by row: the Pearson partial correlation
    formula applied to the rank correlations."""
    r_xy, r_xz, r_yz = _spearman_rows(x, y), _spearman_rows(x, z), _spearman_rows(y, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) < 10:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def rank_correlation(
    x,
    y,
    control=None,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Spearman and Kendall with percentile-bootstrap CIs (runs resampled), and, given a
    control variable, the partial Spearman with its CI. Keys: n, spearman, spearman_ci_low,
    spearman_ci_high, kendall, kendall_ci_low, kendall_ci_high[, partial_spearman,
    partial_ci_low, partial_ci_high]."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    out: dict[str, float] = {"n": n}
    if n < 3:
        return out
    index = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    rho = float(_spearman_rows(x[None], y[None])[0])
    low, high = _interval(_spearman_rows(x[index], y[index]), confidence)
    out.update(spearman=rho, spearman_ci_low=low, spearman_ci_high=high)
    taus = np.array([stats.kendalltau(x[i], y[i]).statistic for i in index])
    low, high = _interval(taus, confidence)
    out.update(
        kendall=float(stats.kendalltau(x, y).statistic), kendall_ci_low=low, kendall_ci_high=high
    )
    if control is not None:
        z = np.asarray(control, dtype=float)
        partial = float(_partial_rows(x[None], y[None], z[None])[0])
        low, high = _interval(_partial_rows(x[index], y[index], z[index]), confidence)
        out.update(partial_spearman=partial, partial_ci_low=low, partial_ci_high=high)
    return out


# Fisher's z of a correlation from n runs has variance ~1/(n - 3 - q), q the number of
# variables held fixed (Fisher 1924; Fieller, Hartley & Pearson 1957 for ranks): the
# inverse-variance weights of a fixed-effect combination (Hedges & Olkin 1985, ch. 6).
_RHO_LIMIT = 0.9999  # atanh(+-1) is infinite; a stratum at +-1 counts as very strong


def _fisher_combined(rhos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """tanh of the weighted mean of atanh(rho) over the last axis; NaN where a stratum is."""
    z = np.arctanh(np.clip(rhos, -_RHO_LIMIT, _RHO_LIMIT))
    return np.tanh((z * weights).sum(axis=-1) / weights.sum())


def stratified_correlation(
    x,
    y,
    strata,
    control=None,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, object]:
    """Spearman of x and y (partial, given `control`, when given) within each stratum,
    combined by Fisher's z with weights n_k - 3 - q; its CI by a bootstrap that resamples
    runs within each stratum, so that no resample mixes the strata's levels. Keys: n,
    combined, ci_low, ci_high, strata (one dict per stratum: stratum, n, rho, ci_low,
    ci_high). Strata with too few runs for a weight (n_k <= 3 + q) are left out."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    z = None if control is None else np.asarray(control, dtype=float)
    labels = np.asarray(strata, dtype=object)
    q = 0 if z is None else 1
    rng = np.random.default_rng(seed)
    per_stratum, samples, weights = [], [], []
    for label in pd.unique(labels):
        rows = np.flatnonzero(labels == label)
        n_k = len(rows)
        if n_k <= 3 + q:
            continue
        index = rows[rng.integers(0, n_k, size=(n_resamples, n_k))]

        def rho_of(i: np.ndarray) -> np.ndarray:
            if z is None:
                return _spearman_rows(x[i], y[i])
            return _partial_rows(x[i], y[i], z[i])

        value = float(rho_of(rows[None])[0])
        boot = rho_of(index)
        low, high = _interval(boot, confidence)
        per_stratum.append(
            {"stratum": label, "n": n_k, "rho": value, "ci_low": low, "ci_high": high}
        )
        samples.append(boot)
        weights.append(n_k - 3 - q)
    out: dict[str, object] = {"n": sum(int(s["n"]) for s in per_stratum), "strata": per_stratum}
    if not per_stratum:
        return out
    w = np.asarray(weights, dtype=float)
    point = _fisher_combined(np.array([s["rho"] for s in per_stratum], dtype=float), w)
    low, high = _interval(_fisher_combined(np.stack(samples, axis=1), w), confidence)
    out.update(combined=float(point), ci_low=low, ci_high=high)
    return out


def verdict(low: float, high: float, sign: int) -> str:
    """held: the CI lies wholly on the hypothesised side of 0; contradicted: wholly on the
    other side; inconclusive: it contains 0 (or could not be computed)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if sign * low > 0 and sign * high > 0:
        return "held"
    if sign * low < 0 and sign * high < 0:
        return "contradicted"
    return "inconclusive"


def hypothesis_table(
    runs: pd.DataFrame,
    hypotheses: list[Hypothesis] = HYPOTHESES,
    *,
    seed: int = 0,
    equal_fit: bool = True,
    strata: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per hypothesis and pair of metrics, over the runs where x, y (and train loss)
    are finite: the correlations with CIs and the verdict. H2 is about equal fit, so its
    verdict comes from the partial Spearman given train loss (Spearman where the train loss
    is exactly equal); H1's from Spearman. Runs not trained to a common fit
    (`equal_fit=False`) give H2 a verdict only through the partial correlation, and only
    from MIN_PARTIAL_N runs on; `verdict_from` says which, or why there is none.

    With `strata` (settings such as `model`), H2 is judged within each stratum and the
    strata combined (`stratified_correlation`): the verdict row (role "verdict") holds the
    combined value in `stratified`; one row per stratum (role "stratum") shows that
    stratum's correlation and its own verdict; the pooled correlation is kept as a row with
    role "pooled diagnostic" and verdict "diagnostic" (it can mix levels that differ for
    other reasons, e.g. two architectures). Every other row has role "verdict"."""
    rows = []
    for h in hypotheses:
        columns = [h.x, h.y] + ([CONTROL] if CONTROL in runs else [])
        row: dict[str, object] = {
            "hypothesis": h.name,
            "claim": h.claim,
            "x": h.x,
            "y": h.y,
            "expected_sign": h.sign,
            "n": 0,
        }
        if not {h.x, h.y} <= set(runs):
            rows.append(
                {**row, "verdict": "inconclusive", "verdict_from": "no data", "role": "verdict"}
            )
            continue
        data = runs[columns].apply(pd.to_numeric, errors="coerce")
        data = data[np.isfinite(data).all(axis=1)]
        # a constant train loss (exactly equal fit) leaves nothing to hold fixed
        control = data[CONTROL] if CONTROL in data and data[CONTROL].nunique() > 1 else None
        row.update(rank_correlation(data[h.x], data[h.y], control, seed=seed))
        source = "partial_spearman" if h.name == "H2" and "partial_ci_low" in row else "spearman"
        prefix = "partial" if source == "partial_spearman" else "spearman"
        row["verdict"] = verdict(
            float(row.get(f"{prefix}_ci_low", np.nan)),  # type: ignore[arg-type]
            float(row.get(f"{prefix}_ci_high", np.nan)),  # type: ignore[arg-type]
            h.sign,
        )
        row["verdict_from"] = source
        if h.name == "H2" and not equal_fit:
            reason = (
                "no verdict: the runs were not trained to a common fit and their "
                "train loss was not logged"
                if control is None
                else f"no verdict: the runs were not trained to a common fit, and {len(data)} "
                f"runs are too few for a partial correlation (needs {MIN_PARTIAL_N})"
                if len(data) < MIN_PARTIAL_N
                else None
            )
            if reason is not None:
                row.update(verdict="inconclusive", verdict_from=reason)
        row["equal_fit"] = equal_fit
        row["role"] = "verdict"
        levels = [c for c in strata if c in runs]
        if h.name == "H2" and levels:
            rows.extend(_stratified_rows(runs, data.index, h, row, levels, control, seed))
            continue
        rows.append(row)
    return pd.DataFrame(rows)


def _stratified_rows(
    runs: pd.DataFrame,
    index: pd.Index,
    h: Hypothesis,
    pooled: dict[str, object],
    levels: list[str],
    control: pd.Series | None,
    seed: int,
) -> list[dict[str, object]]:
    """The stratified verdict row, one row per stratum and the pooled diagnostic row."""
    labels = runs.loc[index, levels].astype(str).agg(", ".join, axis=1)
    names = ", ".join(levels)
    data = runs.loc[index, [h.x, h.y]].apply(pd.to_numeric, errors="coerce")
    result = stratified_correlation(data[h.x], data[h.y], labels, control, seed=seed)
    method = "partial Spearman given train loss" if control is not None else "Spearman"
    base = {k: pooled[k] for k in ("hypothesis", "claim", "x", "y", "expected_sign", "equal_fit")}
    verdict_row: dict[str, object] = {
        **base,
        "role": "verdict",
        "n": result["n"],
        "strata": names,
        "stratified": result.get("combined", np.nan),
        "stratified_ci_low": result.get("ci_low", np.nan),
        "stratified_ci_high": result.get("ci_high", np.nan),
        "verdict": verdict(
            float(result.get("ci_low", np.nan)),  # type: ignore[arg-type]
            float(result.get("ci_high", np.nan)),  # type: ignore[arg-type]
            h.sign,
        ),
        "verdict_from": f"{method} within each {names}, Fisher-z combined",
    }
    if str(pooled.get("verdict_from", "")).startswith("no verdict"):
        verdict_row.update(verdict="inconclusive", verdict_from=pooled["verdict_from"])
    out = [verdict_row]
    prefix = "partial" if control is not None else "spearman"
    per_stratum: list[dict] = result["strata"]  # type: ignore[assignment]
    for stratum in per_stratum:
        out.append(
            {
                **base,
                "role": "stratum",
                "strata": f"{names} = {stratum['stratum']}",
                "n": stratum["n"],
                "partial_spearman" if prefix == "partial" else "spearman": stratum["rho"],
                f"{prefix}_ci_low": stratum["ci_low"],
                f"{prefix}_ci_high": stratum["ci_high"],
                "verdict": verdict(stratum["ci_low"], stratum["ci_high"], h.sign),
                "verdict_from": f"{method} within {names} = {stratum['stratum']}",
            }
        )
    out.append(
        {
            **pooled,
            "role": "pooled diagnostic",
            "verdict": "diagnostic",
            "verdict_from": f"pooled over {names}: not a verdict (it mixes the strata)",
        }
    )
    return out


def stability_edge(runs: pd.DataFrame, *, confidence: float = CONFIDENCE) -> dict[str, object]:
    """H4, SGD keeps lambda_max <= 2(1+m)/lr: the share of runs with edge_ratio <= 1 and its
    Clopper-Pearson interval. held: every run below the edge; contradicted: the interval of
    the share below the edge lies under 1/2 (most runs above it); else inconclusive."""
    ratios = pd.to_numeric(runs.get("edge_ratio", pd.Series(dtype=float)), errors="coerce")
    ratios = ratios[np.isfinite(ratios)]
    n, below = len(ratios), int((ratios <= 1).sum())
    if n == 0:
        return {"hypothesis": "H4", "n": 0, "verdict": "inconclusive"}
    ci = stats.binomtest(below, n).proportion_ci(confidence, method="exact")
    held = below == n
    contradicted = ci.high < 0.5
    return {
        "hypothesis": "H4",
        "claim": "SGD keeps lambda_max <= 2(1+m)/lr",
        "n": n,
        "share_below_edge": below / n,
        "share_ci_low": ci.low,
        "share_ci_high": ci.high,
        "max_edge_ratio": float(ratios.max()),
        "verdict": "held" if held else ("contradicted" if contradicted else "inconclusive"),
    }


H3_TOLERANCE = 0.25  # |beta_lr + beta_B| below this: doubling lr and B changes lambda_max < 19%


def temperature_alone(
    runs: pd.DataFrame, *, confidence: float = CONFIDENCE, metric: str = "lambda_max"
) -> dict[str, object]:
    """H3, lambda_max depends on lr/B alone (Jastrzebski et al. 2017; Kaur et al. 2022 say
    not alone). Fits log lambda = a + b_lr log lr + b_B log B by least squares: lr/B alone
    means b_lr + b_B = 0. held: the t-interval of b_lr + b_B lies inside +-H3_TOLERANCE;
    contradicted: it excludes 0; else inconclusive. Also the spread of log lambda within
    diagonals of constant lr/B (pooled standard deviation) against the spread of the diagonal
    means across them."""
    columns = [metric, "lr", "batch_size"]
    row: dict[str, object] = {
        "hypothesis": "H3",
        "claim": "lambda_max is a function of lr/B alone",
        "x": "lr, batch_size",
        "y": metric,
        "n": 0,
        "verdict": "inconclusive",
    }
    if not set(columns) <= set(runs):
        return row
    data = runs[columns].apply(pd.to_numeric, errors="coerce")
    data = data[(data > 0).all(axis=1) & np.isfinite(data).all(axis=1)]
    n = len(data)
    row["n"] = n
    log_lr, log_b = np.log(data["lr"].to_numpy()), np.log(data["batch_size"].to_numpy())
    y = np.log(data[metric].to_numpy())
    design = np.column_stack([np.ones(n), log_lr, log_b])
    if n <= 3 or np.linalg.matrix_rank(design) < 3:
        return row  # lr and B must both vary, and leave residual degrees of freedom
    coef, _, _, _ = np.linalg.lstsq(design, y, rcond=None)
    dof = n - 3
    sigma2 = float(((y - design @ coef) ** 2).sum() / dof)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    contrast = np.array([0.0, 1.0, 1.0])
    value = float(contrast @ coef)
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * np.sqrt(contrast @ cov @ contrast))
    low, high = value - half, value + half
    temperature = np.round(np.log(data["lr"] / data["batch_size"]).to_numpy(), 6)
    groups = pd.Series(y).groupby(temperature)
    within = groups.apply(lambda g: ((g - g.mean()) ** 2).sum()).sum()
    within_dof = n - groups.ngroups
    row.update(
        beta_lr=float(coef[1]),
        beta_b=float(coef[2]),
        beta_sum=value,
        beta_sum_ci_low=low,
        beta_sum_ci_high=high,
        n_diagonals=groups.ngroups,
        within_diagonal_sd=float(np.sqrt(within / within_dof)) if within_dof else np.nan,
        across_diagonal_sd=float(groups.mean().std(ddof=1)) if groups.ngroups > 1 else np.nan,
    )
    if low > 0 or high < 0:
        row["verdict"] = "contradicted"
    elif -H3_TOLERANCE < low and high < H3_TOLERANCE:
        row["verdict"] = "held"
    return row


def trained_to_equal_fit(runs: pd.DataFrame) -> bool:
    """Whether every run trained to one target fit (the same target_train_loss or
    target_train_acc, reached): only then do its gaps compare at equal fit."""
    targets = [c for c in ("target_train_loss", "target_train_acc") if c in runs]
    if runs.empty or not targets:
        return False
    values = runs[targets].apply(pd.to_numeric, errors="coerce").fillna(0)
    one_target = (values.nunique() == 1).all() and bool((values.iloc[0] > 0).any())
    reached = "tags.reached_target" not in runs or bool(
        (runs["tags.reached_target"] == "true").all()
    )
    return one_target and reached


def default_strata(runs: pd.DataFrame) -> tuple[str, ...]:
    """The architecture (`model`) when a study has more than one, else none."""
    return ("model",) if "model" in runs and runs["model"].nunique() > 1 else ()


def study_verdicts(
    runs: pd.DataFrame, *, seed: int = 0, strata: Sequence[str] | None = None
) -> pd.DataFrame:
    """H1-H4 over a study's finished runs: diverged runs and runs that missed their target
    train loss are left out (they would compare regimes at unequal fit). H2 is stratified
    by `strata` (default: `default_strata`)."""
    keep = runs
    for tag, bad in (("tags.diverged", "true"), ("tags.reached_target", "false")):
        if tag in keep:
            keep = keep[keep[tag] != bad]
    if "noise_temperature" not in keep and {"lr", "batch_size"} <= set(keep):
        keep = keep.assign(
            noise_temperature=pd.to_numeric(keep["lr"]) / pd.to_numeric(keep["batch_size"])
        )
    strata = default_strata(keep) if strata is None else tuple(strata)
    table = hypothesis_table(keep, seed=seed, equal_fit=trained_to_equal_fit(keep), strata=strata)
    extra = pd.DataFrame([temperature_alone(keep), stability_edge(keep)])
    verdicts = pd.concat([table, extra], ignore_index=True)
    verdicts["role"] = verdicts["role"].fillna("verdict")
    return verdicts


# the metrics of a study's tables: runs.csv (one row per run) and summary.csv (per cell)
SUMMARY_METRICS = [
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "val_loss",
    "gen_gap",
    "gen_gap_acc",
    "lambda_max",
    "lambda_min",
    "hessian_trace",
    "sharp_mean",
    "sharp_max",
    "eps_sharpness",
    "adaptive_sharpness",
    "edge_ratio",
    "grad_noise_scale",
    "steps_to_target",
    "epochs_to_target",
]


def cell_summary(
    runs: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS, confidence: float = 0.95
) -> pd.DataFrame:
    """One row per cell (tag ``cell``, else the run's label) over its seeds: for each metric
    ``<metric>_mean`` and a two-sided Student-t interval ``<metric>_ci_low``/``_ci_high``
    (mean +- t_{(1+c)/2, n-1} s / sqrt(n), s the sample standard deviation; NaN for one
    seed), and ``n_seeds``. Runs tagged reached_target=false are left out (they were not
    fitted to the study's target) and counted in ``n_missed_target``."""
    frame = runs.copy()
    frame["cell"] = frame["tags.cell"] if "tags.cell" in frame else frame["label"]
    frame["cell"] = frame["cell"].fillna(frame["label"])
    missed = (
        (frame["tags.reached_target"] == "false")
        if "tags.reached_target" in frame
        else pd.Series(False, index=frame.index)
    )
    rows = []
    for cell, group in frame.groupby("cell", sort=True):
        fitted = group[~missed.loc[group.index]]
        row: dict[str, object] = {
            "cell": cell,
            "n_seeds": len(fitted),
            "n_missed_target": int(missed.loc[group.index].sum()),
        }
        for metric in metrics:
            if metric not in fitted:
                continue
            values = pd.to_numeric(fitted[metric], errors="coerce").dropna()
            n = len(values)
            mean = float(values.mean()) if n else float("nan")
            half = (
                float(stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
                if n >= 2
                else float("nan")
            )
            row.update(
                {
                    f"{metric}_mean": mean,
                    f"{metric}_ci_low": mean - half,
                    f"{metric}_ci_high": mean + half,
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


# Plain (unbootstrapped) rank correlations with p-values: the diagnostic table of the
# `noise_vs_curvature` script; the verdicts above use the intervals instead.
def correlations(frame: pd.DataFrame, pairs: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """Spearman and Kendall rank correlations with n and two-sided p-values, for each pair
    of columns, over the rows where both are finite."""
    rows = []
    for x, y in pairs:
        if x not in frame or y not in frame:
            rows.append({"x": x, "y": y, "n": 0})
            continue
        both = frame[[x, y]].apply(pd.to_numeric, errors="coerce")
        both = both[np.isfinite(both).all(axis=1)]
        n = len(both)
        row = {"x": x, "y": y, "n": n}
        if n >= 3:
            rho, p_rho = stats.spearmanr(both[x], both[y])
            tau, p_tau = stats.kendalltau(both[x], both[y])
            row.update({"spearman": rho, "spearman_p": p_rho, "kendall": tau, "kendall_p": p_tau})
        rows.append(row)
    return pd.DataFrame(
        rows, columns=["x", "y", "n", "spearman", "spearman_p", "kendall", "kendall_p"]
    )


STUDY_PAIRS = [
    ("noise_temperature", "lambda_max"),
    ("lambda_max", "gen_gap"),
    ("sharp_max", "gen_gap"),
]
