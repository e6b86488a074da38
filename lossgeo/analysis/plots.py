"""Matplotlib figures. Functions take plain data (DataFrames, dicts of tensors) and return
a Figure; saving and logging is the caller's job."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _colours(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _log_axis(ax, which: str) -> None:
    """Log scale labelled at 1, 2, 5 x 10^k in plain numbers (matplotlib's default minor
    labels overlap when the data span less than two decades)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _decorate(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7) -> None:
    """Axis labels, title, a light grid and a small legend: how the line plots end."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


# one marker shape per run: runs whose points coincide stay told apart
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def _measured(df: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """(epochs, values) where the metric was measured: the epochs in between (measured
    every few epochs, evaluated every one) would break the line into isolated dots."""
    rows = df[["epoch", metric]].dropna()
    return rows["epoch"], rows[metric]


def _curves(histories: Mapping[str, pd.DataFrame], metrics: list[tuple[str, str]],
            ylabel: str, title: str, log_y: bool = False) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, (colour, (label, df)) in enumerate(zip(_colours(len(histories)), histories.items())):
        for style, (metric, name) in zip(styles, metrics):
            if metric in df and df[metric].notna().any():
                ax.plot(*_measured(df, metric), style, color=colour,
                        marker=MARKERS[i % len(MARKERS)], markersize=5, fillstyle="none",
                        label=f"{label}: {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def loss_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Train (solid) and test (dashed) loss per epoch, one colour per run."""
    return _curves(histories, [("train_loss", "train"), ("test_loss", "test")],
                   "loss (mean over samples)", "Loss curves", log_y=True)


def accuracy_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Train (solid) and test (dashed) accuracy per epoch, one colour per run."""
    fig = _curves(histories, [("train_acc", "train"), ("test_acc", "test")],
                  "accuracy (fraction correct)", "Accuracy curves")
    return fig


def artifact_figures(history: pd.DataFrame, artifacts: Mapping[str, Any]) -> dict[str, Figure]:
    """Figures for the final epoch's measurement artifacts, keyed by artifact path."""
    figures: dict[str, Figure] = {}
    density = artifacts.get("spectrum/density.pt")
    if density is not None:
        eigen = artifacts.get("spectrum/eigen.pt") or {}
        figures["spectrum/esd.png"] = esd(density, eigen.get("values"))
    slice2d = artifacts.get("landscape/loss_slice_2d.pt")
    trajectory = artifacts.get("landscape/trajectory.pt")
    if slice2d is not None:
        figures["plots/landscape_2d.png"] = landscape_2d(slice2d, trajectory)
        figures["plots/landscape_3d.png"] = landscape_3d(slice2d)
    slice1d = artifacts.get("landscape/loss_slice_1d.pt")
    if slice1d is not None:
        figures["plots/landscape_1d.png"] = landscape_1d(slice1d)
    return figures


def _np(t):
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _contour(ax, x, y, loss, title: str):
    """Filled contours with log-spaced levels; loss[i, j] is at (x[i], y[j])."""
    z = _np(loss).T  # contourf wants z[row=y, col=x]
    positive = z[np.isfinite(z) & (z > 0)]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    hi = max(hi, lo * 1.0001)
    levels = np.geomspace(lo, hi, 30)
    filled = ax.contourf(_np(x), _np(y), np.clip(z, lo, hi), levels=levels,
                         norm=LogNorm(lo, hi), cmap="viridis")
    ax.contour(_np(x), _np(y), np.clip(z, lo, hi), levels=levels[::3], colors="white",
               linewidths=0.4, alpha=0.6)
    i, j = np.unravel_index(np.nanargmin(_np(loss)), _np(loss).shape)
    ax.plot(_np(x)[i], _np(y)[j], marker="*", color="red", markersize=12, ls="none",
            label=f"grid minimum ({z[j, i]:.3g})")
    ax.plot(0, 0, marker="o", color="white", markeredgecolor="black", ls="none",
            label="final weights")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("coordinate along direction 1")
    ax.set_ylabel("coordinate along direction 2")
    return filled


def landscape_2d(slice2d: Mapping, trajectory: Mapping | None = None) -> Figure:
    """The 2D loss slice; with a trajectory, a second panel shows the optimisation path on
    the slice in its PCA plane (Li et al. 2018, Fig. 9)."""
    panels = 2 if trajectory is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.2), layout="constrained",
                             squeeze=False)
    plane = slice2d.get("plane", "random")
    filled = _contour(axes[0, 0], slice2d["x"], slice2d["y"], slice2d["loss"],
                      f"loss slice, {plane} plane")
    fig.colorbar(filled, ax=axes[0, 0], label="loss (log scale)", format="%.3g")
    if trajectory is not None:
        sl = trajectory["slice"]
        ratio = _np(trajectory["explained_variance_ratio"])
        ax = axes[0, 1]
        filled = _contour(ax, sl["x"], sl["y"], sl["loss"],
                          f"trajectory on the PCA plane ({100 * ratio.sum():.0f}% of variance)")
        coords = _np(trajectory["coordinates"])
        ax.plot(coords[:, 0], coords[:, 1], "-o", color="orange", markersize=4,
                label="SGD path (one point per epoch)")
        ax.annotate("init", coords[0], color="orange", xytext=(4, 4),
                    textcoords="offset points")
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
        fig.colorbar(filled, ax=ax, label="loss (log scale)", format="%.3g")
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="upper right")
    return fig


def landscape_3d(slice2d: Mapping) -> Figure:
    fig = plt.figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    xx, yy = np.meshgrid(_np(slice2d["x"]), _np(slice2d["y"]), indexing="ij")
    ax.plot_surface(xx, yy, _np(slice2d["loss"]), cmap="viridis", linewidth=0,
                    antialiased=True)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_zlabel("loss")
    ax.set_title(f"loss surface, {slice2d.get('plane', 'random')} plane")
    return fig


def landscape_1d(slices: Mapping) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    ax = axes[0]
    for key, label in (("random", "filter-normalised random direction"),
                       ("eigen", "top Hessian eigenvector (unit; t = distance)")):
        if key in slices:
            ax.plot(_np(slices[key]["t"]), _np(slices[key]["loss"]), label=label)
    ax.set_yscale("log")
    _decorate(ax, "step t along the direction (0 = final weights)", "loss (probe set)",
              "1D loss slices through the final weights", legend_size=8)
    ax = axes[1]
    if "interpolation" in slices:
        inter = slices["interpolation"]
        ax.plot(_np(inter["alpha"]), _np(inter["loss"]), color="tab:green")
        ax.axvline(0, color="grey", ls=":", lw=1)
        ax.axvline(1, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("alpha: (1 - alpha) w_init + alpha w_final")
        ax.set_ylabel("loss (probe set)")
        ax.set_title("linear interpolation, initialisation to final")
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()
    return fig


def interpolation(result: Mapping) -> Figure:
    """Loss along the straight line between two weight sets, on each data split given."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for split, curve in result.items():
        ax.plot(_np(curve["alpha"]), _np(curve["loss"]), marker=".", label=f"{split} set")
    for a in (0, 1):
        ax.axvline(a, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    _decorate(ax, "alpha: (1 - alpha) w_a + alpha w_b", "loss (log scale)",
              "Linear interpolation between two runs' final weights", legend_size=8)
    return fig


def landscape_html(slice2d: Mapping) -> str:
    """An interactive 3D surface (plotly, a dependency: the MLflow UI renders the page)."""
    import plotly.graph_objects as go

    surface = go.Surface(x=_np(slice2d["x"]), y=_np(slice2d["y"]), z=_np(slice2d["loss"]).T,
                         colorscale="Viridis")
    fig = go.Figure(surface)
    fig.update_layout(title=f"loss surface, {slice2d.get('plane', 'random')} plane",
                      scene={"xaxis_title": "direction 1", "yaxis_title": "direction 2",
                             "zaxis_title": "loss"})
    return fig.to_html(include_plotlyjs=True, full_html=True)


def esd(density: Mapping, top_values=None, label: str = "") -> Figure:
    """Spectral density on a log scale with the top eigenvalues marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    _draw_density(ax, density, label or "SLQ density")
    if top_values is not None:
        for i, value in enumerate(list(top_values)):
            ax.axvline(float(value), color="crimson", ls="--", lw=1,
                       label="top-k Lanczos eigenvalues" if i == 0 else None)
    ax.set_title("Hessian eigenvalue spectral density (probe set)")
    ax.legend(fontsize=8)
    return fig


def _draw_density(ax, density: Mapping, label: str, colour=None) -> None:
    grid = density["grid"].numpy() if hasattr(density["grid"], "numpy") else density["grid"]
    values = density["density"]
    values = values.numpy() if hasattr(values, "numpy") else values
    floor = max(float(values.max()) * 1e-8, 1e-30)
    ax.semilogy(grid, values.clip(min=floor), color=colour, label=label)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)


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


def _stability_edge(label: str, lrs: Mapping[str, float],
                    momenta: Mapping[str, float] | None) -> float | None:
    """2(1 + momentum)/lr of the run `label` (rounded, so equal edges compare equal)."""
    lr = lrs.get(label)
    return round(2 * (1 + (momenta or {}).get(label, 0.0)) / lr, 10) if lr else None


def lambda_max_curves(histories: Mapping[str, pd.DataFrame], lrs: Mapping[str, float],
                      momenta: Mapping[str, float] | None = None) -> Figure:
    """lambda_max per epoch; the stability edge 2(1 + momentum)/lr dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    edges: dict[float, list[tuple[str, object]]] = {}
    for i, (colour, (label, df)) in enumerate(zip(_colours(len(histories)), histories.items())):
        if "lambda_max" not in df:
            continue
        ax.plot(*_measured(df, "lambda_max"), "-", color=colour,
                marker=MARKERS[i % len(MARKERS)], markersize=5, fillstyle="none", label=label)
        edge = _stability_edge(label, lrs, momenta)
        if edge is not None:
            edges.setdefault(edge, []).append((label, colour))
    for edge, owners in edges.items():  # one dashed line per distinct edge, shared colours
        colour = owners[0][1] if len(owners) == 1 else "grey"
        names = ", ".join(name for name, _ in owners)
        ax.axhline(edge, color=colour, ls="--", lw=1, label=f"2(1+m)/lr = {edge:.3g} ({names})")
    _log_axis(ax, "y")
    _decorate(ax, "epoch", "lambda_max of the Hessian (probe set, log scale)",
              "Sharpness lambda_max and the stability edge of (momentum) GD")
    return fig


def sharpness_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    fig = _curves(histories, [("sharp_mean", "sharp_mean"), ("sharp_max", "sharp_max")],
                  "loss increase L(w + rho d) - L(w)", "Random-direction sharpness")
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
    from lossgeo.studies.statistics import cell_summary

    if "tags.cell" not in runs or not {x, y} <= set(runs):
        return
    summary = cell_summary(runs, metrics=[x, y])
    summary = summary[summary["n_seeds"] >= 2]
    if summary.empty:
        return

    def errors(metric):
        mean = summary[f"{metric}_mean"]
        return [mean - summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"] - mean]

    ax.errorbar(summary[f"{x}_mean"], summary[f"{y}_mean"], xerr=errors(x), yerr=errors(y),
                fmt="s", color="black", markersize=4, capsize=3, lw=1,
                label="cell mean, 95% t-interval over seeds")


def gen_gap_vs_lambda(runs: pd.DataFrame) -> Figure:
    """Final gen_gap against final lambda_max, one point per run, Spearman in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    columns = ["lambda_max", "gen_gap", "label"]
    # runs measured without curvature have no lambda_max column: an empty plot, not a crash
    data = (runs[columns].dropna() if set(columns) <= set(runs)
            else pd.DataFrame(columns=columns))
    for colour, (_, row) in zip(_colours(len(data)), data.iterrows()):
        ax.scatter(row["lambda_max"], row["gen_gap"], color=colour, s=40, label=row["label"])
    _spearman_legend(ax, data["lambda_max"], data["gen_gap"])
    _cell_error_bars(ax, runs, "lambda_max", "gen_gap")
    _log_axis(ax, "x")
    _decorate(ax, "final lambda_max (log scale)", "final gen_gap = test_loss - train_loss",
              "Generalisation gap vs sharpness")
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
            ax.scatter(part["noise_temperature"], part["lambda_max"], color=colour, s=30,
                       label=str(model))
        _spearman_legend(ax, data["noise_temperature"], data["lambda_max"])
        _cell_error_bars(ax, runs, "noise_temperature", "lambda_max")
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlabel("noise temperature lr / B (log scale)")
    ax.set_ylabel("final lambda_max (log scale)")
    ax.set_title("SGD noise temperature vs sharpness")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
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


def step_curvature_curves(histories: Mapping[str, pd.DataFrame], lrs: Mapping[str, float],
                          momenta: Mapping[str, float] | None = None) -> Figure:
    """Per-step tracking (measure_every_steps): lambda_max (solid) and batch sharpness
    (dashed) against the optimizer step, with the stability edge 2(1 + m)/lr (dotted)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    edges: dict[float, str] = {}
    for colour, (label, df) in zip(_colours(len(histories)), histories.items()):
        steps = df["epoch"]  # the long table's step column: optimizer steps for step/ metrics
        if "step/lambda_max" in df:
            ax.plot(steps, df["step/lambda_max"], "-", color=colour, lw=1.2,
                    label=f"{label}: lambda_max")
        if "step/batch_sharpness" in df:
            ax.plot(steps, df["step/batch_sharpness"], "--", color=colour, lw=1.2,
                    label=f"{label}: batch sharpness")
        edge = _stability_edge(label, lrs, momenta)
        if edge is not None:
            edges.setdefault(edge, label)
    for edge in edges:
        ax.axhline(edge, color="black", ls=":", lw=1, label=f"2(1+m)/lr = {edge:.3g}")
    _decorate(ax, "optimizer step", "curvature (probe set)",
              "lambda_max and batch sharpness over training, against the stability edge")
    return fig


def split_step_history(history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-epoch rows, per-step rows): step/ metrics are logged at the optimizer step."""
    if history.empty:
        return history, history
    per_step = history["metric"].str.startswith("step/")
    return history[~per_step], history[per_step]


def comparison_figures(runs: pd.DataFrame, history: pd.DataFrame,
                       densities: Mapping[str, Mapping] | None = None) -> dict[str, Figure]:
    """The comparison plots, keyed by file name (step_curvature.png when runs tracked
    curvature per step)."""
    epoch_history, step_history = split_step_history(history)
    hist = histories_by_label(epoch_history)
    lrs = dict(zip(runs["label"], runs["lr"])) if "lr" in runs else {}
    momenta = dict(zip(runs["label"], runs["momentum"])) if "momentum" in runs else {}
    figures = {"loss_curves.png": loss_curves(hist), "accuracy_curves.png": accuracy_curves(hist),
               "lambda_max.png": lambda_max_curves(hist, lrs, momenta),
               "sharpness.png": sharpness_curves(hist),
               "gen_gap_vs_lambda.png": gen_gap_vs_lambda(runs),
               "noise_vs_lambda.png": noise_vs_lambda(runs)}
    if densities is not None:
        figures["spectra.png"] = spectra(densities)
    if not step_history.empty:
        figures["step_curvature.png"] = step_curvature_curves(
            histories_by_label(step_history), lrs, momenta)
    return figures


def optuna_figures(study) -> dict[str, Figure]:
    """Optuna's own matplotlib plots (history, importances, lr x batch-size contour)."""
    import warnings

    from optuna.visualization import matplotlib as ovm

    figures: dict[str, Figure] = {}
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not completed or len(study.directions) > 1:
        return figures
    plots_to_make: dict[str, Callable[[], Any]] = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study)}
    if len(completed) >= 2 and len(completed[0].params) >= 2:
        plots_to_make["param_importances.png"] = lambda: ovm.plot_param_importances(study)
    names = set(completed[0].params)
    if {"lr", "batch_size"} <= names and len(completed) >= 3:
        plots_to_make["contour_lr_batch_size.png"] = lambda: ovm.plot_contour(
            study, params=["lr", "batch_size"])
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
