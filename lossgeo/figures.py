"""Matplotlib figures of one run: loss and accuracy curves, landscapes, the spectral density.

Functions take plain data (DataFrames, dicts of tensors) and return a Figure; saving and
logging is the caller's job. A layer below `run/`, so a training run draws its own figures;
the figures that compare runs (and need the statistics) are in `lossgeo.analysis.plots`."""

from __future__ import annotations

from typing import Any, Mapping

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
    _legend(ax, legend_size)


def _legend(ax, size: int) -> None:
    """A legend of what was drawn; an axes with nothing drawn says so in its middle (runs
    that did not log the metric), not with matplotlib's empty-legend warning."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)
    else:
        ax.text(
            0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes
        )


# one marker shape per run: runs whose points coincide stay told apart
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def _measured(df: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """(epochs, values) where the metric was measured: the epochs in between (measured
    every few epochs, evaluated every one) would break the line into isolated dots."""
    rows = df[["epoch", metric]].dropna()
    return rows["epoch"], rows[metric]


def _curves(
    histories: Mapping[str, pd.DataFrame],
    metrics: list[tuple[str, str]],
    ylabel: str,
    title: str,
    log_y: bool = False,
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, (colour, (label, df)) in enumerate(zip(_colours(len(histories)), histories.items())):
        for style, (metric, name) in zip(styles, metrics):
            if metric in df and df[metric].notna().any():
                ax.plot(
                    *_measured(df, metric),
                    style,
                    color=colour,
                    marker=MARKERS[i % len(MARKERS)],
                    markersize=5,
                    fillstyle="none",
                    label=f"{label}: {name}",
                )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _legend(ax, 8)
    return fig


def loss_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Train (solid) and test (dashed) loss per epoch, one colour per run."""
    return _curves(
        histories,
        [("train_loss", "train"), ("test_loss", "test")],
        "loss (mean over samples)",
        "Loss curves",
        log_y=True,
    )


def accuracy_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Train (solid) and test (dashed) accuracy per epoch, one colour per run."""
    fig = _curves(
        histories,
        [("train_acc", "train"), ("test_acc", "test")],
        "accuracy (fraction correct)",
        "Accuracy curves",
    )
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
    filled = ax.contourf(
        _np(x), _np(y), np.clip(z, lo, hi), levels=levels, norm=LogNorm(lo, hi), cmap="viridis"
    )
    ax.contour(
        _np(x),
        _np(y),
        np.clip(z, lo, hi),
        levels=levels[::3],
        colors="white",
        linewidths=0.4,
        alpha=0.6,
    )
    i, j = np.unravel_index(np.nanargmin(_np(loss)), _np(loss).shape)
    ax.plot(
        _np(x)[i],
        _np(y)[j],
        marker="*",
        color="red",
        markersize=12,
        ls="none",
        label=f"grid minimum ({z[j, i]:.3g})",
    )
    ax.plot(
        0, 0, marker="o", color="white", markeredgecolor="black", ls="none", label="final weights"
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("coordinate along direction 1")
    ax.set_ylabel("coordinate along direction 2")
    return filled


def landscape_2d(slice2d: Mapping, trajectory: Mapping | None = None) -> Figure:
    """The 2D loss slice; with a trajectory, a second panel shows the optimisation path on
    the slice in its PCA plane (Li et al. 2018, Fig. 9)."""
    panels = 2 if trajectory is not None else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(6.5 * panels, 5.2), layout="constrained", squeeze=False
    )
    plane = slice2d.get("plane", "random")
    filled = _contour(
        axes[0, 0], slice2d["x"], slice2d["y"], slice2d["loss"], f"loss slice, {plane} plane"
    )
    fig.colorbar(filled, ax=axes[0, 0], label="loss (log scale)", format="%.3g")
    if trajectory is not None:
        sl = trajectory["slice"]
        ratio = _np(trajectory["explained_variance_ratio"])
        ax = axes[0, 1]
        filled = _contour(
            ax,
            sl["x"],
            sl["y"],
            sl["loss"],
            f"trajectory on the PCA plane ({100 * ratio.sum():.0f}% of variance)",
        )
        coords = _np(trajectory["coordinates"])
        ax.plot(
            coords[:, 0],
            coords[:, 1],
            "-o",
            color="orange",
            markersize=4,
            label="SGD path (one point per epoch)",
        )
        ax.annotate("init", coords[0], color="orange", xytext=(4, 4), textcoords="offset points")
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
    ax.plot_surface(xx, yy, _np(slice2d["loss"]), cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_zlabel("loss")
    ax.set_title(f"loss surface, {slice2d.get('plane', 'random')} plane")
    return fig


def landscape_1d(slices: Mapping) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    ax = axes[0]
    for key, label in (
        ("random", "filter-normalised random direction"),
        ("eigen", "top Hessian eigenvector (unit; t = distance)"),
    ):
        if key in slices:
            ax.plot(_np(slices[key]["t"]), _np(slices[key]["loss"]), label=label)
    ax.set_yscale("log")
    _decorate(
        ax,
        "step t along the direction (0 = final weights)",
        "loss (probe set)",
        "1D loss slices through the final weights",
        legend_size=8,
    )
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
    _decorate(
        ax,
        "alpha: (1 - alpha) w_a + alpha w_b",
        "loss (log scale)",
        "Linear interpolation between two runs' final weights",
        legend_size=8,
    )
    return fig


def connect_paths(paths: pd.DataFrame) -> Figure:
    """Train (solid) and test (dashed) loss along each path of `lossgeo connect`, from run
    a (t = 0) to run b (t = 1): `paths` has columns path, t, train_loss, test_loss."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for i, (name, rows) in enumerate(paths.groupby("path", sort=False)):
        color = f"C{i}"
        ax.plot(rows["t"], rows["train_loss"], marker=".", color=color, label=f"{name}, train")
        ax.plot(rows["t"], rows["test_loss"], ls="--", color=color, label=f"{name}, test")
    ax.set_yscale("log")
    _decorate(
        ax,
        "t: run a at 0, run b at 1",
        "loss (log scale)",
        "Loss along the straight line and the trained Bezier curve",
        legend_size=8,
    )
    return fig


def landscape_html(slice2d: Mapping) -> str:
    """An interactive 3D surface (plotly, a dependency: the MLflow UI renders the page)."""
    import plotly.graph_objects as go

    surface = go.Surface(
        x=_np(slice2d["x"]), y=_np(slice2d["y"]), z=_np(slice2d["loss"]).T, colorscale="Viridis"
    )
    fig = go.Figure(surface)
    fig.update_layout(
        title=f"loss surface, {slice2d.get('plane', 'random')} plane",
        scene={"xaxis_title": "direction 1", "yaxis_title": "direction 2", "zaxis_title": "loss"},
    )
    return fig.to_html(include_plotlyjs=True, full_html=True)


def esd(density: Mapping, top_values=None, label: str = "") -> Figure:
    """Spectral density on a log scale with the top eigenvalues marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    _draw_density(ax, density, label or "SLQ density")
    if top_values is not None:
        for i, value in enumerate(list(top_values)):
            ax.axvline(
                float(value),
                color="crimson",
                ls="--",
                lw=1,
                label="top-k Lanczos eigenvalues" if i == 0 else None,
            )
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
