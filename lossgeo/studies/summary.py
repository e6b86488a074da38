"""A study's summary on its parent run: runs.csv, the per-cell intervals (summary.csv),
the verdicts (correlations.csv and metrics) and the comparison figures."""

from __future__ import annotations

import optuna
import pandas as pd

from lossgeo.analysis import plots
from lossgeo.analysis import runs as analysis
from lossgeo.analysis.statistics import SUMMARY_METRICS, cell_summary, study_verdicts
from lossgeo.run.tracking import TrackedRun, get_run


def summarise(parent_run_id: str, study: optuna.Study | None = None) -> pd.DataFrame:
    """On the parent run: runs.csv (one row per run), summary.csv (one row per cell: means
    and 95% t-intervals over seeds, see `analysis.cell_summary`), correlations.csv and the
    comparison plots."""

    runs = analysis.load_runs(parent_run=parent_run_id)
    run = TrackedRun(run_id=parent_run_id)
    if runs.empty:
        return runs
    if "noise_temperature" not in runs and {"lr", "batch_size"} <= set(runs):
        runs["noise_temperature"] = runs["lr"] / runs["batch_size"]
    keep = [
        c
        for c in [
            "run_id",
            "label",
            "status",
            "tags.cell",
            "tags.regime",
            "tags.seed",
            "tags.trial_number",
            "tags.diverged",
            "tags.reached_target",
            "model",
            "lr",
            "batch_size",
            "momentum",
            "noise_temperature",
            *SUMMARY_METRICS,
        ]
        if c in runs
    ]
    table = runs[keep]
    run.log_text("runs.csv", table.to_csv(index=False))
    finished = runs[runs["status"] == "FINISHED"]
    if "tags.diverged" in finished:
        finished = finished[finished["tags.diverged"] != "true"]
    if len(finished):
        run.log_text("summary.csv", cell_summary(finished).to_csv(index=False))
    declared = get_run(parent_run_id).data.tags.get("strata", "")
    verdicts = study_verdicts(finished, strata=tuple(declared.split(",")) if declared else None)
    run.log_text("correlations.csv", verdicts.to_csv(index=False))
    score = {"held": 1.0, "inconclusive": 0.0, "contradicted": -1.0}
    for _, row in verdicts[verdicts["role"] == "verdict"].iterrows():
        pair = {"H3": "lambda_max_on_lr_and_B", "H4": "edge_ratio"}.get(
            row["hypothesis"], f"{row['x']}_vs_{row['y']}"
        )
        metrics = {f"verdict/{row['hypothesis']}_{pair}": score[row["verdict"]]}
        for column in (
            "spearman",
            "spearman_ci_low",
            "spearman_ci_high",
            "kendall",
            "partial_spearman",
            "stratified",
        ):
            if pd.notna(row.get(column)):
                metrics[f"{column}/{pair}"] = float(row[column])
        run.log_metrics(metrics)
    history = analysis.load_history(finished) if len(finished) else pd.DataFrame()
    run.log_figures(plots.comparison_figures(finished, history), prefix="plots/")
    if study is not None:
        run.log_figures(plots.optuna_figures(study), prefix="optuna/")
    return table
