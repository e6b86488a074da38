"""Regimes at the stability edge on series whose answer is known."""

import math

import pytest

from lossgeo.geometry.regimes import EdgeRegimeDetector, edge_regimes


def test_a_run_that_rises_to_the_edge_and_hovers_is_at_the_edge_after_five_measurements():
    ratios = [0.3, 0.6, 0.95, 1.05, 0.97, 1.02, 0.99, 1.08]
    losses = [2.0, 1.5, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7]
    assert edge_regimes(ratios, losses) == ["below"] * 6 + ["at_edge"] * 2


def test_at_the_edge_without_progress_is_stalled():
    ratios = [1.0, 1.05, 0.95, 1.0, 1.02]
    assert edge_regimes(ratios, [1.0, 1.1, 0.9, 1.05, 1.0])[-1] == "at_edge_stalled"
    assert edge_regimes(ratios, [1.0, 1.1, 0.9, 1.05, 0.99])[-1] == "at_edge"


def test_a_run_that_converges_first_stays_below_and_one_excursion_is_above():
    ratios = [0.2, 0.35, 0.45, 0.5, 0.52, 0.55, 1.3, 0.5]
    detector = EdgeRegimeDetector()
    regimes = [detector.update(r, 1.0) for r in ratios]
    assert regimes == ["below"] * 6 + ["above", "below"]
    assert detector.share_at_edge == 0
    assert detector.update(math.nan, 1.0) is None  # not counted
    assert sum(detector.counts.values()) == 8


def test_a_loss_down_to_five_percent_while_below_the_edge_is_converged_first():
    # the tanh-MLP study's shape: batch sharpness creeps up while the loss falls to 0.02
    ratios = [0.30, 0.35, 0.40, 0.42, 0.45, 0.47]
    losses = [0.50, 0.20, 0.05, 0.026, 0.024, 0.02]
    assert edge_regimes(ratios, losses) == ["below"] * 4 + ["converged_below"] * 2
    # the same loss at the edge is the edge, and a loss first measured at 0 is never "converged"
    at_edge = edge_regimes([1.0] * 6, losses)
    assert at_edge[-1] == "at_edge" and "converged_below" not in at_edge
    assert "converged_below" not in edge_regimes([0.92] * 6, losses)  # within the band
    assert edge_regimes([0.3, 0.3], [0.0, 0.0]) == ["below", "below"]


def test_sharpening_that_stops_below_the_edge_while_the_loss_falls_is_converged_first():
    # today's tanh-MLP batch-16 cell: batch sharpness flat at about 0.42 of 2/lr over the
    # last ten measurements while the probe loss falls from 0.066 to 0.043
    flat = [0.45, 0.40, 0.43, 0.38, 0.44, 0.41, 0.43, 0.40, 0.42, 0.41]
    losses = [0.066 - 0.0025 * i for i in range(10)]
    assert edge_regimes(flat, losses) == ["below"] * 9 + ["converged_below"]
    # still sharpening (the ratio up by 25% between the windows): below
    rising = [0.30, 0.31, 0.32, 0.33, 0.34, 0.38, 0.39, 0.40, 0.41, 0.42]
    assert edge_regimes(rising, losses)[-1] == "below"
    # flat but the loss flat too: a plateau, not convergence
    assert edge_regimes(flat, [0.05] * 10)[-1] == "below"


def test_share_at_the_edge_and_bad_settings():
    detector = EdgeRegimeDetector(window=2)
    for ratio in (1.0, 1.0, 1.0, 0.5):
        detector.update(ratio, 1.0)
    assert detector.counts["at_edge_stalled"] == 2 and detector.share_at_edge == 0.5
    with pytest.raises(ValueError, match="window"):
        EdgeRegimeDetector(window=0)
    with pytest.raises(ValueError, match="converged"):
        EdgeRegimeDetector(converged=1.5)
