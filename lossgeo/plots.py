"""Matplotlib figures. Functions take plain data (DataFrames, dicts of tensors) and return
a Figure; saving and logging is the caller's job."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _colours(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _curves(histories: Mapping[str, pd.DataFrame], metrics: list[tuple[str, str]],
            ylabel: str, title: str, log_y: bool = False) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for colour, (label, df) in zip(_colours(len(histories)), histories.items()):
        for style, (metric, name) in zip(styles, metrics):
            if metric in df and df[metric].notna().any():
                ax.plot(df["epoch"], df[metric], style, color=colour, marker="o", markersize=3,
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


def artifact_figures(history: pd.DataFrame, artifacts: Mapping[str, object]) -> dict[str, Figure]:
    """Figures for the final epoch's measurement artifacts, keyed by artifact path."""
    figures: dict[str, Figure] = {}
    density = artifacts.get("spectrum/density.pt")
    if density is not None:
        eigen = artifacts.get("spectrum/eigen.pt") or {}
        figures["spectrum/esd.png"] = esd(density, eigen.get("values"))
    return figures


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
