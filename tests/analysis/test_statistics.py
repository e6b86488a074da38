"""Uncertainty in every verdict: bootstrap CIs that cover, partial Spearman by hand,
verdicts from intervals."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lossgeo.analysis.statistics import rank_correlation, stability_edge, study_verdicts, verdict


@pytest.mark.slow
def test_bootstrap_interval_covers_the_true_rank_correlation_about_95_percent():
    # bivariate normal with Pearson r: Spearman's population rho is (6/pi) asin(r/2)
    r, n, repeats = 0.5, 30, 120
    true_rho = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(repeats):
        x = rng.normal(size=n)
        y = r * x + math.sqrt(1 - r**2) * rng.normal(size=n)
        out = rank_correlation(x, y, n_resamples=600, seed=k)
        covered += out["spearman_ci_low"] <= true_rho <= out["spearman_ci_high"]
    assert 0.85 <= covered / repeats <= 0.99


def test_point_estimates_and_partial_spearman_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=25)
    x = z + 0.5 * rng.normal(size=25)
    y = z + 0.5 * rng.normal(size=25)
    out = rank_correlation(x, y, z, n_resamples=200)
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    # partial rank correlation = Pearson of the rank residuals after regressing out z's ranks
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    design = np.column_stack([np.ones(25), rz])
    res_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    res_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    assert out["partial_spearman"] == pytest.approx(stats.pearsonr(res_x, res_y).statistic)
    # x and y move together only through z: the partial correlation is far smaller
    assert out["spearman"] > 0.5 and abs(out["partial_spearman"]) < out["spearman"] - 0.2
    assert out["partial_ci_low"] <= out["partial_spearman"] <= out["partial_ci_high"]


def test_verdict_from_the_interval():
    assert verdict(0.1, 0.9, +1) == "held"
    assert verdict(-0.9, -0.1, +1) == "contradicted"
    assert verdict(-0.9, -0.1, -1) == "held"
    assert verdict(-0.2, 0.6, +1) == "inconclusive"
    assert verdict(float("nan"), float("nan"), +1) == "inconclusive"


def test_stability_edge_share_and_verdict():
    below = stability_edge(pd.DataFrame({"edge_ratio": [0.2, 0.5, 0.9]}))
    assert below["verdict"] == "held" and below["share_below_edge"] == 1
    assert below["share_ci_low"] == pytest.approx(
        stats.binomtest(3, 3).proportion_ci(0.95, method="exact").low
    )
    above = stability_edge(pd.DataFrame({"edge_ratio": [1.2] * 9 + [0.5]}))
    assert above["verdict"] == "contradicted" and above["max_edge_ratio"] == 1.2


def test_study_verdicts_leave_out_runs_at_unequal_fit():
    rng = np.random.default_rng(3)
    temps = np.geomspace(1e-4, 1e-2, 12)
    runs = pd.DataFrame(
        {
            "lr": temps * 32,
            "batch_size": 32,
            "train_loss": 0.05 + 0.001 * rng.normal(size=12),
            "lambda_max": 1 / temps * (1 + 0.05 * rng.normal(size=12)),
            "gen_gap": rng.normal(size=12),
            "edge_ratio": 0.5,
            "tags.reached_target": ["true"] * 10 + ["false"] * 2,
        }
    )
    table = study_verdicts(runs).set_index(["hypothesis", "y"], drop=False)
    h1 = table.loc[("H1", "lambda_max")]
    assert h1["n"] == 10 and h1["verdict"] == "held" and h1["spearman"] < -0.9
    assert table.loc[("H1", "hessian_trace"), "verdict"] == "inconclusive"  # no data
    assert table[table["hypothesis"] == "H4"]["verdict"].item() == "held"


def designed_grid(exponent_lr, exponent_b, noise=0.02, seed=0):
    """lambda_max = lr^a B^b on a 4 x 4 lr x B grid, two replicates, multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for lr in (0.025, 0.05, 0.1, 0.2):
        for b in (16, 32, 64, 128):
            for _ in range(2):
                rows.append(
                    {
                        "lr": lr,
                        "batch_size": b,
                        "lambda_max": lr**exponent_lr
                        * b**exponent_b
                        * math.exp(noise * rng.normal()),
                    }
                )
    return pd.DataFrame(rows)


def test_lambda_max_of_lr_over_b_alone_is_held_and_of_lr_alone_contradicted():
    from lossgeo.analysis.statistics import temperature_alone

    alone = temperature_alone(designed_grid(-1.0, 1.0))  # lambda ~ (lr/B)^-1
    assert alone["verdict"] == "held" and alone["n"] == 32 and alone["n_diagonals"] == 7
    assert alone["beta_lr"] == pytest.approx(-1.0, abs=0.05)
    assert alone["beta_sum_ci_low"] < 0 < alone["beta_sum_ci_high"]
    assert alone["within_diagonal_sd"] < alone["across_diagonal_sd"] / 10
    not_alone = temperature_alone(designed_grid(-1.0, 0.0))  # lambda ~ 1/lr only
    assert not_alone["verdict"] == "contradicted" and not_alone["beta_sum_ci_low"] > -1.1
    noisy = temperature_alone(designed_grid(-1.0, 1.0, noise=2.0).iloc[::4])  # n = 8
    assert noisy["verdict"] == "inconclusive"


def test_comparison_plots_get_cell_error_bars_only_with_replicates():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.container import ErrorbarContainer

    from lossgeo.analysis import plots

    runs = designed_grid(-1.0, 1.0, noise=0.2)
    runs["label"] = [f"mlp / lr={a}, B={b}" for a, b in zip(runs.lr, runs.batch_size)]
    runs["tags.cell"] = runs["label"]
    runs["noise_temperature"] = runs.lr / runs.batch_size
    runs["model"] = "mlp"
    runs["gen_gap"] = np.linspace(0, 0.05, 32)
    for draw in (plots.noise_vs_lambda, plots.gen_gap_vs_lambda):
        bars = [c for c in draw(runs).axes[0].containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 1 and len(bars[0].lines[0].get_xdata()) == 16  # one per cell
        single = runs.drop_duplicates("tags.cell")
        assert not [c for c in draw(single).axes[0].containers if isinstance(c, ErrorbarContainer)]


def simpson_runs(n_per_model=12, seed=0):
    """Within each architecture the sharper run has the larger gap; across them the CNN is
    sharper and has the smaller gaps, so that the pooled correlation is negative."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, shift_x, shift_y in (("mlp", 0.0, 1.0), ("cnn", 10.0, 0.0)):
        x = rng.uniform(0, 1, n_per_model)
        for xi in x:
            rows.append(
                {
                    "model": model,
                    "lr": 0.1,
                    "batch_size": 32,
                    "lambda_max": shift_x + xi,
                    "gen_gap": shift_y + 0.1 * xi + 0.01 * rng.normal(),
                    "train_loss": 0.05 + 0.001 * rng.normal(),
                }
            )
    return pd.DataFrame(rows)


def test_h2_is_judged_within_architectures_and_the_pooled_figure_is_only_a_diagnostic():
    from lossgeo.analysis.statistics import default_strata, stratified_correlation

    runs = simpson_runs()
    assert default_strata(runs) == ("model",)
    table = study_verdicts(runs)
    h2 = table[(table["hypothesis"] == "H2") & (table["y"] == "gen_gap")]
    by_role = {role: rows for role, rows in h2.groupby("role")}
    verdict_row = by_role["verdict"].iloc[0]
    pooled = by_role["pooled diagnostic"].iloc[0]
    assert pooled["partial_spearman"] < -0.5 and pooled["verdict"] == "diagnostic"
    assert verdict_row["verdict"] == "held" and verdict_row["n"] == 24
    assert set(by_role["stratum"]["strata"]) == {"model = mlp", "model = cnn"}
    assert (by_role["stratum"]["verdict"] == "held").all()
    # the combined value is the Fisher-z mean with weights n_k - 3 - 1 (one control)
    rhos = by_role["stratum"]["partial_spearman"].to_numpy()
    expected = np.tanh(np.arctanh(np.clip(rhos, -0.9999, 0.9999)).mean())  # equal n_k
    assert verdict_row["stratified"] == pytest.approx(expected)
    # one architecture: nothing to stratify, the pooled row is the verdict
    mlp_only = study_verdicts(runs[runs["model"] == "mlp"])
    assert set(mlp_only["role"]) == {"verdict"}
    # strata too small for a weight are left out of the combination
    tiny = stratified_correlation([1, 2, 3], [1, 2, 3], ["a", "a", "a"])
    assert tiny["strata"] == [] and "combined" not in tiny


def test_a_study_file_declares_its_strata(tmp_path):
    from lossgeo.errors import UserInputError
    from lossgeo.studies.studyfile import load_study_file

    text = "kind: grid\nmodels: [mlp]\nregimes: {a: {lr: 0.1}}\nstrata: [NAME]\n"
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("NAME", "hidden"))
    assert load_study_file(good).strata == ("hidden",)
    for bad in ("seed", "colour"):
        path = tmp_path / f"{bad}.yaml"
        path.write_text(text.replace("NAME", bad))
        with pytest.raises(UserInputError, match="strata"):
            load_study_file(path)


def test_runs_that_would_share_a_label_are_told_apart_by_seed_or_id():
    """The seeds of one grid cell were all labelled "mlp / B-16", so `lossgeo edge` printed
    three identical rows and plots merged their legends."""
    import pandas as pd

    from lossgeo.analysis.runs import unique_labels

    runs = pd.DataFrame(
        {
            "run_id": ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33", "dddddddd44"],
            "model": ["mlp"] * 4,
            "tags.regime": ["B-16", "B-16", "B-32", "B-64"],
            "tags.seed": ["1", "2", "1", None],
        }
    )
    assert unique_labels(runs).tolist() == [
        "mlp / B-16 (seed 1)",
        "mlp / B-16 (seed 2)",
        "mlp / B-32",
        "mlp / B-64",
    ]
    runs.loc[3, "tags.regime"] = "B-32"  # a twin without a seed tag: its run id tells it
    assert unique_labels(runs).tolist()[2:] == ["mlp / B-32 (seed 1)", "mlp / B-32 (dddddddd)"]
