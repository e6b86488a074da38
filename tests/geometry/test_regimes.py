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


def test_share_at_the_edge_and_bad_settings():
    detector = EdgeRegimeDetector(window=2)
    for ratio in (1.0, 1.0, 1.0, 0.5):
        detector.update(ratio, 1.0)
    assert detector.counts["at_edge_stalled"] == 2 and detector.share_at_edge == 0.5
    with pytest.raises(ValueError, match="window"):
        EdgeRegimeDetector(window=0)
