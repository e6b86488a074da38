"""Where a run stands against its optimizer's stability edge, measurement by measurement.

The ratio is that of the sharpness which governs the optimizer to its threshold (batch
sharpness for mini-batch SGD, lambda_max for full-batch GD, the preconditioned lambda_max for
Adam; see `curvature.stability`). Regimes:

- ``at_edge``: the ratio has stayed within 1 +- `band` for the last `window` measurements
  (Cohen et al. 2021 and Andreyev & Beneventano 2024 describe a sharpness that rises to the
  threshold and hovers there);
- ``at_edge_stalled``: at the edge, and the probe loss has not decreased over that window;
- ``above``: over 1 + band, not (yet) for a whole window;
- ``converged_below``: under 1 - `band`, and converging rather than sharpening: either the
  probe loss is down to `converged` (5%) of its first measured value, or over the last two
  windows the mean probe loss fell (by 2% or more) while the mean ratio rose by less than
  `band` (the sharpening has stopped below the edge while the loss still falls). It converges
  before it reaches the edge, the failure mode Andreyev & Beneventano name for a learning
  rate too small for the problem;
- ``below``: anything else under the threshold.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

REGIMES = {"below": 0, "at_edge": 1, "at_edge_stalled": 2, "above": 3, "converged_below": 4}
WINDOW = 5
BAND = 0.1
CONVERGED = 0.05
# the mean probe loss of the last window below the one before by this share: still falling
LOSS_FALL = 0.02


class EdgeRegimeDetector:
    """Online: `update(ratio, probe_loss)` after each measurement returns its regime (None
    for a ratio that is not finite: that measurement is not counted)."""

    def __init__(
        self, window: int = WINDOW, band: float = BAND, converged: float = CONVERGED
    ) -> None:
        if window < 1 or not 0 < band < 1 or not 0 < converged < 1:
            raise ValueError("window: must be >= 1, band and converged in (0, 1)")
        self.window, self.band, self.converged = window, band, converged
        self._first_loss = math.nan
        # (ratio, probe loss) of the last two windows of measurements
        self._two_windows: deque[tuple[float, float]] = deque(maxlen=2 * window)
        self.counts = {name: 0 for name in REGIMES}

    def update(self, ratio: float, probe_loss: float) -> str | None:
        if not math.isfinite(ratio):
            return None
        self._two_windows.append((ratio, probe_loss))
        recent = list(self._two_windows)[-self.window :]
        if math.isnan(self._first_loss):
            self._first_loss = probe_loss
        full = len(recent) == self.window
        if full and all(abs(r - 1) <= self.band for r, _ in recent):
            first, last = recent[0][1], recent[-1][1]
            regime = "at_edge" if last < first else "at_edge_stalled"
        elif ratio > 1 + self.band:
            regime = "above"
        elif ratio < 1 - self.band and (
            (self._first_loss > 0 and probe_loss <= self.converged * self._first_loss)
            or self._sharpening_stopped()
        ):
            regime = "converged_below"
        else:
            regime = "below"
        self.counts[regime] += 1
        return regime

    def _sharpening_stopped(self) -> bool:
        """Over the last two windows: the mean probe loss fell by LOSS_FALL or more, the
        mean ratio rose by less than `band`."""
        if len(self._two_windows) < 2 * self.window:
            return False
        pairs = list(self._two_windows)
        (r0, l0), (r1, l1) = (
            tuple(sum(v) / self.window for v in zip(*pairs[i : i + self.window]))
            for i in (0, self.window)
        )
        return l1 <= (1 - LOSS_FALL) * l0 and r1 < (1 + self.band) * r0

    @property
    def share_at_edge(self) -> float:
        """The share of counted measurements at the edge (stalled or not)."""
        total = sum(self.counts.values())
        at_edge = self.counts["at_edge"] + self.counts["at_edge_stalled"]
        return at_edge / total if total else math.nan


def edge_regimes(
    ratios: Sequence[float],
    probe_losses: Sequence[float],
    *,
    window: int = WINDOW,
    band: float = BAND,
    converged: float = CONVERGED,
) -> list[str | None]:
    """The regime of each measurement of a logged series (as the online detector saw it)."""
    detector = EdgeRegimeDetector(window, band, converged)
    return [detector.update(r, loss) for r, loss in zip(ratios, probe_losses)]
