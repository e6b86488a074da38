"""Per-step metrics get their own figure and stay out of the per-epoch ones."""

import matplotlib.pyplot as plt
import pandas as pd

from lossgeo.analysis.plots import comparison_figures, split_step_history


def long_history():
    rows = []
    for epoch in range(3):
        rows += [
            ("r1", "run a", epoch, "lambda_max", 10.0 + epoch),
            ("r1", "run a", epoch, "train_loss", 1.0 / (epoch + 1)),
        ]
    for step in (25, 50, 75):  # step/ metrics are logged at the optimizer step
        rows += [
            ("r1", "run a", step, "step/lambda_max", 40.0 + step / 25),
            ("r1", "run a", step, "step/batch_sharpness", 30.0),
        ]
    return pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])


def test_step_metrics_get_their_own_figure_with_the_edge():
    history = long_history()
    per_epoch, per_step = split_step_history(history)
    assert set(per_step["metric"]) == {"step/lambda_max", "step/batch_sharpness"}
    assert per_epoch["epoch"].max() == 2  # no optimizer step leaks into the epoch axis
    runs = pd.DataFrame({"run_id": ["r1"], "label": ["run a"], "lr": [0.04], "momentum": [0.0]})
    figures = comparison_figures(runs, history)
    ax = figures["step_curvature.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["run a: lambda_max"].get_xdata()) == [25, 50, 75]
    assert lines["2(1+m)/lr = 50"].get_ydata()[0] == 50
    epoch_lines = figures["lambda_max.png"].axes[0].get_lines()
    assert max(max(line.get_xdata(), default=0) for line in epoch_lines) <= 2
    for figure in figures.values():
        plt.close(figure)


def test_sparse_measurements_draw_joined_lines_and_runs_are_told_apart():
    """measure_every 4 over 2 epochs: lambda_max at epochs 0 and 2 only, losses every epoch.
    The plots showed isolated dots at 0 and 2 (the NaN at epoch 1 broke the line) and two
    runs' points on top of each other looked like one."""
    rows = []
    for run in ("r1", "r2"):
        for epoch in range(3):
            rows.append((run, f"run {run}", epoch, "train_loss", 1.0 / (epoch + 1)))
            rows.append((run, f"run {run}", epoch, "sharp_max", 0.1))
        for epoch in (0, 2):
            rows.append((run, f"run {run}", epoch, "lambda_max", 5.0))
    history = pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])
    runs = pd.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "label": ["run r1", "run r2"],
            "lr": [0.1, 0.1],
            "momentum": [0.0, 0.0],
        }
    )
    figures = comparison_figures(runs, history)
    lines = {line.get_label(): line for line in figures["lambda_max.png"].axes[0].get_lines()}
    assert list(lines["run r1"].get_xdata()) == [0, 2]  # one joined line, no NaN gap
    assert lines["run r1"].get_linestyle() == "-"
    assert lines["run r1"].get_marker() != lines["run r2"].get_marker()
    for figure in figures.values():
        plt.close(figure)


def test_runs_without_curvature_draw_no_empty_legends(recwarn):
    """compare on runs that logged losses only: matplotlib warned 'No artists with labels'
    for every curvature plot, which came out empty without a word."""
    rows = [("r1", "run a", e, "train_loss", 1.0 / (e + 1)) for e in range(3)]
    rows += [("r1", "run a", e, "test_loss", 1.2 / (e + 1)) for e in range(3)]
    history = pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])
    runs = pd.DataFrame({"run_id": ["r1"], "label": ["run a"], "lr": [0.1], "momentum": [0.0]})
    figures = comparison_figures(runs, history)
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]
    texts = [t.get_text() for t in figures["lambda_max.png"].axes[0].texts]
    assert texts == ["not logged by these runs"]
    assert figures["loss_curves.png"].axes[0].get_legend() is not None
    for figure in figures.values():
        plt.close(figure)
