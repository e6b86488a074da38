"""Barriers by kind of pair (analysis/connectivity.py): the mean and Student-t interval of
each path's barrier over the pairs of a kind, by hand."""

import math

import pandas as pd
import pytest
from scipy import stats

from lossgeo.analysis.connectivity import connectivity_summary, pairs_table


def connect_runs_frame() -> pd.DataFrame:
    """What `load_runs` gives for four connect runs (the aligned paths not measured)."""
    return pd.DataFrame(
        {
            "run_id": ["c1", "c2", "c3", "c4"],
            "run_a": ["a", "a", "b", "a"],
            "run_b": ["b", "c", "c", "d"],
            "tags.connect.kind": ["within high", "within high", "within high", "across"],
            "connect/linear_barrier": [1.0, 2.0, 4.0, 0.5],
            "connect/bezier_barrier": [0.1, 0.2, 0.3, 0.05],
        }
    )


def test_the_summary_is_each_kinds_mean_with_its_t_interval():
    pairs = pairs_table(connect_runs_frame())
    assert list(pairs["kind"]) == ["across", "within high", "within high", "within high"]
    assert pairs["connect/linear_aligned_barrier"].isna().all()  # not measured: NaN
    summary = connectivity_summary(pairs).set_index("kind")
    within = summary.loc["within high"]
    assert within["n_pairs"] == 3
    values = [1.0, 2.0, 4.0]
    mean, sd = sum(values) / 3, pd.Series(values).std(ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert within["connect/linear_barrier_mean"] == pytest.approx(mean)
    assert within["connect/linear_barrier_ci_low"] == pytest.approx(mean - half)
    assert within["connect/linear_barrier_ci_high"] == pytest.approx(mean + half)
    # one pair: a mean, no interval
    across = summary.loc["across"]
    assert across["connect/bezier_barrier_mean"] == pytest.approx(0.05)
    assert math.isnan(across["connect/bezier_barrier_ci_low"])
    # paths never measured get no columns
    assert not any("aligned" in column for column in summary.columns)
