"""Barriers between a study's runs by kind of pair, from its `lossgeo connect` runs.

Pure pandas on `analysis.load_runs` rows; no MLflow. Within a kind (two runs of one regime,
or one of each of two regimes), the mean barrier over the pairs gets a two-sided Student-t
interval (`statistics.cell_summary`). Pairs that share a run are not independent (three seeds
give three pairs from three runs), so read the intervals as descriptive, not as tests.
"""

from __future__ import annotations

import pandas as pd

from lossgeo.analysis.statistics import cell_summary

PATHS = ("linear", "bezier", "linear_aligned", "bezier_aligned")
BARRIERS = tuple(f"connect/{path}_barrier" for path in PATHS)
PAIR_COLUMNS = ("kind", "run_a", "run_b", "connect_run", *BARRIERS)


def pairs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per connect run: its kind of pair, the two runs, its barriers."""
    frame = pd.DataFrame(
        {
            "kind": runs["tags.connect.kind"],
            "run_a": runs["run_a"],
            "run_b": runs["run_b"],
            "connect_run": runs["run_id"],
        }
    )
    for metric in BARRIERS:
        frame[metric] = runs[metric] if metric in runs else float("nan")
    return frame.sort_values(["kind", "run_a", "run_b"]).reset_index(drop=True)


def connectivity_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per kind of pair: `n_pairs`, and for each barrier its mean and 95% t
    interval (`<metric>_mean`, `_ci_low`, `_ci_high`); paths never measured are left out."""
    measured = [m for m in BARRIERS if pairs[m].notna().any()]
    frame = pairs.assign(label=pairs["kind"])
    table = cell_summary(frame, measured)
    return table.rename(columns={"cell": "kind", "n_seeds": "n_pairs"}).drop(
        columns="n_missed_target"
    )
