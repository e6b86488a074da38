"""Per-step metrics get their own figure and stay out of the per-epoch ones."""

import matplotlib.pyplot as plt
import pandas as pd

from lossgeo.analysis.plots import comparison_figures, split_step_history


def long_history():
    rows = []
    for epoch in range(3):
        rows += [("r1", "run a", epoch, "lambda_max", 10.0 + epoch),
                 ("r1", "run a", epoch, "train_loss", 1.0 / (epoch + 1))]
    for step in (25, 50, 75):  # step/ metrics are logged at the optimizer step
        rows += [("r1", "run a", step, "step/lambda_max", 40.0 + step / 25),
                 ("r1", "run a", step, "step/batch_sharpness", 30.0)]
    return pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])


def test_step_metrics_get_their_own_figure_with_the_edge():
    history = long_history()
    per_epoch, per_step = split_step_history(history)
    assert set(per_step["metric"]) == {"step/lambda_max", "step/batch_sharpness"}
    assert per_epoch["epoch"].max() == 2  # no optimizer step leaks into the epoch axis
    runs = pd.DataFrame({"run_id": ["r1"], "label": ["run a"], "lr": [0.04],
                         "momentum": [0.0]})
    figures = comparison_figures(runs, history)
    ax = figures["step_curvature.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["run a: lambda_max"].get_xdata()) == [25, 50, 75]
    assert lines["2(1+m)/lr = 50"].get_ydata()[0] == 50
    epoch_lines = figures["lambda_max.png"].axes[0].get_lines()
    assert max(max(line.get_xdata(), default=0) for line in epoch_lines) <= 2
    for figure in figures.values():
        plt.close(figure)
