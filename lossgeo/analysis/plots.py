"""Matplotlib figures that compare runs: sharpness against noise and gaps, spectra, the
per-step curves of several runs, and Optuna's study plots. One run's own figures (curves,
landscapes, densities) are in `lossgeo.figures` and re-exported here."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from lossgeo.figures import (  # noqa: F401  (re-exported: one-run figures by their old path)
    MARKERS,
    _colours,
    _curves,
    _decorate,
    _draw_density,
    _legend,
    _log_axis,
    _measured,
    accuracy_curves,
    artifact_figures,
    esd,
    interpolation,
    landscape_1d,
    landscape_2d,
    landscape_3d,
    landscape_html,
    loss_curves,
)

# -- comparisons across runs (analysis, grid and sweep parents) -----------------------------


def histories_by_label(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Long (run_id, label, epoch, metric, value) -> {label: wide frame with an epoch column}."""
    out: dict[str, pd.DataFrame] = {}
    if history.empty:
        return out
    for (run_id, label), part in history.groupby(["run_id", "label"], sort=False):
        wide = part.pivot_table(index="epoch", columns="metric", values="value").reset_index()
        name = label if label not in out else f"{label} ({run_id[:6]})"
        out[name] = wide
    return out


def _stability_edge(
    label: str, lrs: Mapping[str, float], momenta: Mapping[str, float] | None
) -> float | None:
    """2(1 + momentum)/lr of the run `label` (rounded, so equal edges compare equal)."""
    lr = lrs.get(label)
    return round(2 * (1 + (momenta or {}).get(label, 0.0)) / lr, 10) if lr else None


def lambda_max_curves(
    histories: Mapping[str, pd.DataFrame],
    lrs: Mapping[str, float],
    momenta: Mapping[str, float] | None = None,
) -> Figure:
    """lambda_max per epoch; the stability edge 2(1 + momentum)/lr dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    edges: dict[float, list[tuple[str, object]]] = {}
    for i, (colour, (label, df)) in enumerate(zip(_colours(len(histories)), histories.items())):
        if "lambda_max" not in df:
            continue
        ax.plot(
            *_measured(df, "lambda_max"),
            "-",
            color=colour,
            marker=MARKERS[i % len(MARKERS)],
            markersize=5,
            fillstyle="none",
            label=label,
        )
        edge = _stability_edge(label, lrs, momenta)
        if edge is not None:
            edges.setdefault(edge, []).append((label, colour))
    for edge, owners in edges.items():  # one dashed line per distinct edge, shared colours
        colour = owners[0][1] if len(owners) == 1 else "grey"
        names = ", ".join(name for name, _ in owners)
        ax.axhline(edge, color=colour, ls="--", lw=1, label=f"2(1+m)/lr = {edge:.3g} ({names})")
    _log_axis(ax, "y")
    _decorate(
        ax,
        "epoch",
        "lambda_max of the Hessian (probe set, log scale)",
        "Sharpness lambda_max and the stability edge of (momentum) GD",
    )
    return fig


def sharpness_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    fig = _curves(
        histories,
        [("sharp_mean", "sharp_mean"), ("sharp_max", "sharp_max")],
        "loss increase L(w + rho d) - L(w)",
        "Random-direction sharpness",
    )
    return fig


def _spearman_legend(ax, x: pd.Series, y: pd.Series) -> None:
    """Spearman's rho, its p-value and n as a legend entry (from three points on)."""
    from scipy import stats

    if len(x) >= 3:
        rho, p = stats.spearmanr(x, y)
        ax.plot([], [], " ", label=f"Spearman rho = {rho:.2f} (p = {p:.2g}, n = {len(x)})")


def _cell_error_bars(ax, runs: pd.DataFrame, x: str, y: str) -> None:
    """Where cells have replicates (seeds): each cell's mean with its 95% t-interval over
    seeds, drawn over the runs' points."""
    from lossgeo.analysis.statistics import cell_summary

    if "tags.cell" not in runs or not {x, y} <= set(runs):
        return
    summary = cell_summary(runs, metrics=[x, y])
    summary = summary[summary["n_seeds"] >= 2]
    if summary.empty:
        return

    def errors(metric):
        mean = summary[f"{metric}_mean"]
        return [mean - summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"] - mean]

    ax.errorbar(
        summary[f"{x}_mean"],
        summary[f"{y}_mean"],
        xerr=errors(x),
        yerr=errors(y),
        fmt="s",
        color="black",
        markersize=4,
        capsize=3,
        lw=1,
        label="cell mean, 95% t-interval over seeds",
    )


def gen_gap_vs_lambda(runs: pd.DataFrame) -> Figure:
    """Final gen_gap against final lambda_max, one point per run, Spearman in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    columns = ["lambda_max", "gen_gap", "label"]
    # runs measured without curvature have no lambda_max column: an empty plot, not a crash
    data = runs[columns].dropna() if set(columns) <= set(runs) else pd.DataFrame(columns=columns)
    for colour, (_, row) in zip(_colours(len(data)), data.iterrows()):
        ax.scatter(row["lambda_max"], row["gen_gap"], color=colour, s=40, label=row["label"])
    _spearman_legend(ax, data["lambda_max"], data["gen_gap"])
    _cell_error_bars(ax, runs, "lambda_max", "gen_gap")
    _log_axis(ax, "x")
    _decorate(
        ax,
        "final lambda_max (log scale)",
        "final gen_gap = test_loss - train_loss",
        "Generalisation gap vs sharpness",
    )
    return fig


def noise_vs_lambda(runs: pd.DataFrame) -> Figure:
    """lambda_max against the noise temperature lr/B on log axes, all runs/trials."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    if {"noise_temperature", "lambda_max"} <= set(runs):
        data = runs[["noise_temperature", "lambda_max"]].apply(pd.to_numeric, errors="coerce")
        data = data[(data > 0).all(axis=1)]
        models = runs.loc[data.index, "model"] if "model" in runs else pd.Series("run", data.index)
        for colour, model in zip(_colours(models.nunique()), models.unique()):
            part = data[models == model]
            ax.scatter(
                part["noise_temperature"], part["lambda_max"], color=colour, s=30, label=str(model)
            )
        _spearman_legend(ax, data["noise_temperature"], data["lambda_max"])
        _cell_error_bars(ax, runs, "noise_temperature", "lambda_max")
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlabel("noise temperature lr / B (log scale)")
    ax.set_ylabel("final lambda_max (log scale)")
    ax.set_title("SGD noise temperature vs sharpness")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, 7)
    return fig


def connectivity_barriers(summary: pd.DataFrame) -> Figure:
    """Mean barrier per kind of pair (`analysis.connectivity.connectivity_summary`), one bar
    per path (straight line, Bezier curve, each after alignment where measured), with 95%
    intervals."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    paths = [
        p
        for p in ("linear", "bezier", "linear_aligned", "bezier_aligned")
        if f"connect/{p}_barrier_mean" in summary
    ]
    width = 0.8 / max(len(paths), 1)
    x = np.arange(len(summary))
    for i, path in enumerate(paths):
        column = f"connect/{path}_barrier"
        mean = summary[f"{column}_mean"].to_numpy(dtype=float)
        low = summary[f"{column}_ci_low"].to_numpy(dtype=float)
        high = summary[f"{column}_ci_high"].to_numpy(dtype=float)
        errors = np.nan_to_num(np.vstack([mean - low, high - mean]))
        ax.bar(
            x + (i - (len(paths) - 1) / 2) * width,
            mean,
            width,
            yerr=errors,
            capsize=3,
            label=path.replace("_", " "),
        )
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(x, [f"{k}\n({n} pairs)" for k, n in zip(summary["kind"], summary["n_pairs"])])
    ax.set_ylabel("barrier: max train loss on the path - mean of its ends")
    ax.set_title("Loss barriers between runs, by kind of pair (95% t intervals)")
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, 8)
    return fig


def spectra(densities: Mapping[str, Mapping]) -> Figure:
    """Final spectral densities of several runs overlaid (log density)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for colour, (label, density) in zip(_colours(len(densities)), densities.items()):
        _draw_density(ax, density, label, colour)
    ax.set_title("Hessian spectral densities at the final epoch (SLQ, probe set)")
    if densities:
        ax.legend(fontsize=7)
    return fig


def step_curvature_curves(
    histories: Mapping[str, pd.DataFrame],
    lrs: Mapping[str, float],
    momenta: Mapping[str, float] | None = None,
) -> Figure:
    """Per-step tracking (measure_every_steps): lambda_max (solid) and batch sharpness
    (dashed) against the optimizer step, with the stability edge 2(1 + m)/lr (dotted)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    edges: dict[float, str] = {}
    for colour, (label, df) in zip(_colours(len(histories)), histories.items()):
        steps = df["epoch"]  # the long table's step column: optimizer steps for step/ metrics
        if "step/lambda_max" in df:
            ax.plot(
                steps,
                df["step/lambda_max"],
                "-",
                color=colour,
                lw=1.2,
                label=f"{label}: lambda_max",
            )
        if "step/batch_sharpness" in df:
            ax.plot(
                steps,
                df["step/batch_sharpness"],
                "--",
                color=colour,
                lw=1.2,
                label=f"{label}: batch sharpness",
            )
        edge = _stability_edge(label, lrs, momenta)
        if edge is not None:
            edges.setdefault(edge, label)
    for edge in edges:
        ax.axhline(edge, color="black", ls=":", lw=1, label=f"2(1+m)/lr = {edge:.3g}")
    _decorate(
        ax,
        "optimizer step",
        "curvature (probe set)",
        "lambda_max and batch sharpness over training, against the stability edge",
    )
    return fig


def edge_curves(history: pd.DataFrame, lrs: Mapping[str, float]) -> Figure:
    """Each run's governing sharpness over its threshold (solid) and raw lambda_max over 2/lr
    (dashed) against the step, on one log axis: the edge is 1 for every optimizer, and the
    shaded band is the +-10% within which a run counts as at the edge."""
    from lossgeo.analysis.edge import edge_series
    from lossgeo.geometry.regimes import BAND

    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    groups = list(history.groupby(["run_id", "label"], sort=False))
    for colour, ((run_id, label), part) in zip(_colours(len(groups)), groups):
        series = edge_series(part)
        if series is None:
            continue
        name = series.governing.removeprefix("step/")
        ax.plot(series.steps, series.ratio, "-", color=colour, lw=1.2, label=f"{label}: {name}")
        lr = lrs.get(run_id)
        if lr and name != "lambda_max":  # else the solid line is lambda_max already
            ax.plot(
                series.steps,
                series.raw_lambda_max * lr / 2,
                "--",
                color=colour,
                lw=1,
                label=f"{label}: lambda_max / (2/lr)",
            )
    ax.axhspan(1 - BAND, 1 + BAND, color="grey", alpha=0.2, lw=0)
    ax.axhline(1, color="black", ls=":", lw=1, label="the optimizer's threshold")
    _log_axis(ax, "y")
    _decorate(
        ax,
        "optimizer step",
        "sharpness / threshold (log scale)",
        "The sharpness that governs each run against its stability threshold",
    )
    return fig


def split_step_history(history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-epoch rows, per-step rows): step/ metrics are logged at the optimizer step."""
    if history.empty:
        return history, history
    per_step = history["metric"].str.startswith("step/")
    return history[~per_step], history[per_step]


def comparison_figures(
    runs: pd.DataFrame, history: pd.DataFrame, densities: Mapping[str, Mapping] | None = None
) -> dict[str, Figure]:
    """The comparison plots, keyed by file name (step_curvature.png when runs tracked
    curvature per step)."""
    epoch_history, step_history = split_step_history(history)
    hist = histories_by_label(epoch_history)
    lrs = dict(zip(runs["label"], runs["lr"])) if "lr" in runs else {}
    momenta = dict(zip(runs["label"], runs["momentum"])) if "momentum" in runs else {}
    figures = {
        "loss_curves.png": loss_curves(hist),
        "accuracy_curves.png": accuracy_curves(hist),
        "lambda_max.png": lambda_max_curves(hist, lrs, momenta),
        "sharpness.png": sharpness_curves(hist),
        "gen_gap_vs_lambda.png": gen_gap_vs_lambda(runs),
        "noise_vs_lambda.png": noise_vs_lambda(runs),
    }
    if densities is not None:
        figures["spectra.png"] = spectra(densities)
    if not step_history.empty:
        figures["step_curvature.png"] = step_curvature_curves(
            histories_by_label(step_history), lrs, momenta
        )
    return figures


def measures_ranking(table: pd.DataFrame, gap: str = "gen_gap") -> Figure:
    """The measures ranked by granulated Kendall Psi against `gap`, beside their sign error,
    both with 95% bootstrap intervals (the table of `analysis.measures.score_measures`)."""
    import numpy as np

    rows = table[table["gap"] == gap].sort_values("psi", ascending=True, na_position="first")
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10, 0.35 * max(len(rows), 4) + 1.4), sharey=True
    )
    position = np.arange(len(rows))
    for ax, value, low, high, label, reference in (
        (left, "psi", "psi_ci_low", "psi_ci_high", "granulated Kendall $\\Psi$", 0.0),
        (right, "sign_error", "sign_error_ci_low", "sign_error_ci_high", "sign error", 0.5),
    ):
        centre = rows.get(value, pd.Series(np.nan, index=rows.index)).to_numpy(float)
        below = centre - rows.get(low, pd.Series(np.nan, index=rows.index)).to_numpy(float)
        above = rows.get(high, pd.Series(np.nan, index=rows.index)).to_numpy(float) - centre
        ax.barh(position, centre, xerr=np.vstack([below, above]), color="#4c72b0", capsize=3)
        ax.axvline(reference, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    left.set_yticks(position, rows["measure"].tolist())
    right.set_title("0: always ordered like the gap; 0.5: chance", fontsize=8)
    factors = str(rows["factors"].iloc[0]) if len(rows) and "factors" in rows else ""
    n = int(rows["n"].max()) if len(rows) else 0
    fig.suptitle(f"Which measure predicts {gap}? (factors: {factors}; {n} runs)")
    fig.tight_layout()
    return fig


def optuna_figures(study) -> dict[str, Figure]:
    """Optuna's own matplotlib plots (history, importances, lr x batch-size contour)."""
    import warnings

    from optuna.visualization import matplotlib as ovm

    figures: dict[str, Figure] = {}
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not completed or len(study.directions) > 1:
        return figures
    plots_to_make: dict[str, Callable[[], Any]] = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study)
    }
    if len(completed) >= 2 and len(completed[0].params) >= 2:
        plots_to_make["param_importances.png"] = lambda: ovm.plot_param_importances(study)
    names = set(completed[0].params)
    if {"lr", "batch_size"} <= names and len(completed) >= 3:
        plots_to_make["contour_lr_batch_size.png"] = lambda: ovm.plot_contour(
            study, params=["lr", "batch_size"]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        for name, make in plots_to_make.items():
            try:
                ax = make()
            except (ValueError, RuntimeError):  # e.g. importances with zero variance
                continue
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            fig = ax.get_figure()
            if isinstance(fig, Figure):
                fig.set_size_inches(7, 4.5)
                figures[name] = fig
    return figures
