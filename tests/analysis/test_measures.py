"""Scoring measures against the gap: Kendall's tau, the granulated Psi and the sign error by
hand, a measure planted on one axis, and `lossgeo measures` on real MLflow runs."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.analysis.measures import (
    kendall_rows,
    one_factor_pairs,
    score_measure,
    score_measures,
    study_factors,
)
from lossgeo.cli import cli

SIX = pd.DataFrame(
    {
        "lr": [0.1, 0.2, 0.4, 0.1, 0.2, 0.4],
        "batch_size": [32, 32, 32, 64, 64, 64],
        "seed": 0,
        "m": [1.0, 2, 3, 4, 5, 6],
        "g": [1.0, 3, 2, 4, 6, 5],
    }
)


def test_tau_psi_and_sign_error_by_hand_on_six_runs():
    row = score_measure(SIX, "m", "g", ["lr", "batch_size"], n_resamples=200)
    # 15 pairs, m always rising; g falls in (2,3) and (5,6): 13 concordant, 2 discordant
    assert row["tau"] == pytest.approx(11 / 15)
    # lr varies alone in {1,2,3} and {4,5,6}: tau 1/3 each; B alone in three pairs: tau 1
    assert row["tau_lr"] == pytest.approx(1 / 3)
    assert row["tau_batch_size"] == pytest.approx(1.0)
    assert row["psi"] == pytest.approx((1 / 3 + 1) / 2)
    # nine one-factor pairs (six along lr, three along B); (2,3) and (5,6) are wrong
    assert row["n_pairs"] == 9
    assert row["sign_error"] == pytest.approx(2 / 9)
    assert row["sign_error_lr"] == pytest.approx(2 / 6)
    assert row["sign_error_batch_size"] == 0
    assert row["worst_axis"] == "lr" and row["sign_error_worst"] == pytest.approx(1 / 3)
    assert row["tau_ci_low"] <= row["tau"] <= row["tau_ci_high"]
    assert row["sign_error_ci_low"] <= row["sign_error"] <= row["sign_error_ci_high"]


def test_a_tie_in_the_measure_is_half_a_sign_error():
    tied = SIX.assign(m=[1.0, 1.0, 3, 4, 5, 6])  # (1,2) tied in m, g differs
    row = score_measure(tied, "m", "g", ["lr", "batch_size"], n_resamples=50)
    assert row["sign_error"] == pytest.approx((2 + 0.5) / 9)


def test_pairs_differ_in_exactly_one_factor_and_share_the_seed():
    runs = pd.concat([SIX, SIX.assign(seed=1)], ignore_index=True)
    pairs = one_factor_pairs(runs, ["lr", "batch_size"])
    assert len(pairs) == 18
    for i, j, axis in pairs:
        a, b = runs.iloc[i], runs.iloc[j]
        assert a["seed"] == b["seed"] and a[axis] != b[axis]
        other = "batch_size" if axis == "lr" else "lr"
        assert a[other] == b[other]


def planted_grid() -> pd.DataFrame:
    """Three axes of three values, two seeds; the gap rises along every axis; the measure
    rises along `a` and falls along `b` and `c`: it predicts the gap on axis a only."""
    rows = []
    for a, b, c, seed in itertools.product(range(3), range(3), range(3), range(2)):
        gap = a + b + c + 0.1 * seed
        rows.append(
            {
                "a": a,
                "b": b,
                "c": c,
                "seed": seed,
                "gen_gap": gap,
                "lambda_max": 10 * a - b - c,
                "status": "FINISHED",
            }
        )
    return pd.DataFrame(rows)


def test_a_measure_planted_on_one_axis_shows_there_and_only_there():
    import lossgeo.analysis.measures as measures

    grid = planted_grid()
    table = score_measures(
        grid, measures=["lambda_max"], gaps=["gen_gap"], factors=["a", "b", "c"], n_resamples=200
    )
    row = table.iloc[0]
    assert (row["tau_a"], row["tau_b"], row["tau_c"]) == (1.0, -1.0, -1.0)
    assert row["psi"] == pytest.approx(-1 / 3)
    assert row["sign_error_a"] == 0 and row["sign_error_b"] == 1 and row["sign_error_c"] == 1
    assert row["worst_axis"] in ("b", "c") and row["sign_error_worst"] == 1
    # 2 seeds x 9 groups x 3 pairs per axis
    assert row["n_pairs"] == 3 * 2 * 9 * 3
    assert measures.study_factors(grid.assign(model="mlp")) == []  # a..c are not settings


def test_conditioning_on_train_loss_removes_a_measure_that_only_tracks_the_fit():
    rng = np.random.default_rng(0)
    grid = planted_grid()
    n = len(grid)
    fit = rng.permutation(n).astype(float)
    # the measure and the gap both follow the fit, and nothing else in common
    grid = grid.assign(
        train_loss=fit,
        gen_gap=fit + 8 * rng.normal(size=n),
        m=fit + 8 * rng.normal(size=n),
    )
    row = score_measure(grid, "m", "gen_gap", ["a", "b", "c"], n_resamples=100)
    assert row["tau"] > 0.5
    assert abs(row["tau_given_train_loss"]) < 0.25 < row["tau"] - 0.25
    assert row["tau_ci_low_given_train_loss"] < 0 < row["tau_ci_high_given_train_loss"]


def test_vectorised_kendall_matches_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (30, 8)).astype(float)
    y = rng.integers(0, 3, (30, 8)).astype(float)
    expected = [stats.kendalltau(x[i], y[i]).statistic for i in range(30)]
    assert np.allclose(kendall_rows(x, y), expected, equal_nan=True)


def test_study_factors_are_the_settings_that_vary():
    runs = pd.DataFrame({"lr": [0.1, 0.2], "batch_size": [32, 32], "hidden": ["64", "128"]})
    assert study_factors(runs) == ["lr", "hidden"]


def log_study(grid: pd.DataFrame) -> str:
    """The planted grid as real MLflow runs under one parent (lr, batch_size, hidden)."""
    client = MlflowClient()
    experiment = client.create_experiment("measures")
    parent = client.create_run(experiment, run_name="grid", tags={"lossgeo_role": "parent"})
    values = {"a": [0.025, 0.05, 0.1], "b": [32, 64, 128], "c": ["256", "512", "1024"]}
    for _, row in grid.iterrows():
        child = client.create_run(
            experiment, tags={"mlflow.parentRunId": parent.info.run_id, "seed": str(row["seed"])}
        )
        run_id = child.info.run_id
        for name, param in (("a", "lr"), ("b", "batch_size"), ("c", "hidden")):
            client.log_param(run_id, param, values[name][int(row[name])])
        client.log_param(run_id, "seed", int(row["seed"]))
        for metric in ("gen_gap", "lambda_max"):
            client.log_metric(run_id, metric, float(row[metric]))
        client.log_metric(run_id, "train_loss", 0.05)
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id


def test_measures_command_logs_the_ranked_table_and_chart_on_the_parent(tracking):
    parent = log_study(planted_grid())
    result = CliRunner().invoke(cli, ["measures", "--parent-run", parent, "--out", "m"])
    assert result.exit_code == 0, result.output
    assert "lambda_max" in result.output and "Psi -0.33" in result.output
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(parent)}
    assert "measures.csv" in logged
    assert [a.path for a in client.list_artifacts(parent, "plots")] == ["plots/measures.png"]
    table = pd.read_csv(tracking / "m" / "measures.csv")
    row = table.iloc[0]
    assert row["factors"] == "lr,batch_size,hidden" and row["n"] == 54
    assert math.isclose(row["tau_lr"], 1.0) and math.isclose(row["tau_hidden"], -1.0)


def test_measures_command_refuses_bad_input_before_writing(tracking):
    runner = CliRunner()
    missing = runner.invoke(cli, ["measures", "--parent-run", "0" * 32, "--out", "m"])
    assert missing.exit_code == 2 and "error" in missing.output
    one_cell = log_study(planted_grid().iloc[:1])
    flat = runner.invoke(cli, ["measures", "--parent-run", one_cell, "--out", "m"])
    assert flat.exit_code == 2 and "factor" in flat.output, flat.output
    assert not (tracking / "m").exists()
    assert not MlflowClient().list_artifacts(one_cell)


def test_the_report_section_ranks_the_measures_and_is_absent_without_factors():
    from lossgeo.analysis.report import measures_section

    grid = planted_grid().assign(hessian_trace=lambda f: f["gen_gap"] ** 2)
    table = score_measures(
        grid, measures=["lambda_max", "hessian_trace"], gaps=["gen_gap"], factors=["a", "b", "c"]
    )
    tex = measures_section(table)
    assert "granulated Kendall" in tex and "54 runs" in tex
    # hessian_trace rises with the gap on every axis: ranked first, Psi 1
    first, second = (line for line in tex.splitlines() if line.startswith(("hessian", "lambda")))
    assert first.startswith("hessian\\_trace & 1.00") and second.startswith("lambda\\_max & -0.33")
    assert measures_section(None) == "" and measures_section(table.iloc[0:0]) == ""
