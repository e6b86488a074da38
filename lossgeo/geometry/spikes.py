"""Curvature-spike detector (the original design's LLM extension): flag epochs where
lambda_max jumps by more than `factor` per epoch over the previous measurement, or where
edge_ratio crosses 1 from below (the step size just left the stable region of GD on that
curvature). Per epoch, because measurements may be far apart (e.g. only the initialisation
and the final point): a rise by x6 over 38 epochs is steady sharpening, not a spike."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Spike:
    epoch: int
    reason: str


def detect_spikes(history: pd.DataFrame, factor: float = 2.0) -> list[Spike]:
    """history: one row per epoch with `epoch`, `lambda_max` and optionally `edge_ratio`."""
    if factor <= 1:
        raise ValueError(f"factor: must be > 1 (got {factor})")
    if history.empty or "lambda_max" not in history:
        return []
    rows = history.dropna(subset=["lambda_max"]).sort_values("epoch")
    spikes: list[Spike] = []
    previous = None
    for _, row in rows.iterrows():
        reasons: list[str] = []
        if previous is not None:
            gap = max(1, int(row["epoch"]) - int(previous["epoch"]))
            if (
                previous["lambda_max"] > 0
                and row["lambda_max"] > factor**gap * previous["lambda_max"]
            ):
                reasons.append(
                    f"lambda_max x{row['lambda_max'] / previous['lambda_max']:.2f}"
                    + (f" over {gap} epochs" if gap > 1 else "")
                )
            if (
                "edge_ratio" in row
                and pd.notna(row["edge_ratio"])
                and pd.notna(previous.get("edge_ratio"))
                and previous["edge_ratio"] < 1 <= row["edge_ratio"]
            ):
                reasons.append(f"edge_ratio crossed 1 ({row['edge_ratio']:.2f})")
        if reasons:
            spikes.append(Spike(int(row["epoch"]), "; ".join(reasons)))
        previous = row
    return spikes


class OnlineSpikeDetector:
    """The same rule on a series as it is measured (per-step tracking): `update` returns the
    reason when this measurement is a spike (lambda_max above `factor` times the previous
    one, or edge_ratio crossing 1 from below), else None. Per measurement, not per step:
    measurements a fixed number of steps apart are the unit a fine-tuning user watches."""

    def __init__(self, factor: float = 2.0) -> None:
        if factor <= 1:
            raise ValueError(f"factor: must be > 1 (got {factor})")
        self.factor = factor
        self._previous: tuple[float, float | None] | None = None

    def update(self, step: int, lambda_max: float, edge_ratio: float | None = None) -> str | None:
        reasons = []
        if self._previous is not None:
            last_lambda, last_edge = self._previous
            if last_lambda > 0 and lambda_max > self.factor * last_lambda:
                reasons.append(f"lambda_max x{lambda_max / last_lambda:.2f}")
            if edge_ratio is not None and last_edge is not None and last_edge < 1 <= edge_ratio:
                reasons.append(f"edge_ratio crossed 1 ({edge_ratio:.2f})")
        self._previous = (lambda_max, edge_ratio)
        return "; ".join(reasons) or None
