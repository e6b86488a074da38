#!/usr/bin/env python
"""A sweep's (or grid's) runs: the correlation table (Spearman and Kendall with n and
p-values) of noise temperature lr/B vs lambda_max, lambda_max vs gen_gap and sharp_max vs
gen_gap, and a least-squares fit of log lambda_max on log(lr/B).

    python scripts/noise_vs_curvature.py --parent-run <sweep parent run id>
    python scripts/noise_vs_curvature.py --experiment lossgeo --csv correlations.csv
"""

import sys

import click
import numpy as np

from lossgeo.analysis import runs as analysis
from lossgeo.analysis.comparison import select_runs
from lossgeo.errors import UserInputError


@click.command(help=__doc__)
@click.option("--experiment", default=None)
@click.option("--parent-run", default=None)
@click.option("--csv", "csv_path", default=None, help="also write the table to this CSV file")
def main(experiment, parent_run, csv_path):
    try:
        runs = select_runs(experiment, parent_run)
    except UserInputError as exc:
        click.echo(f"noise_vs_curvature: error: {exc}", err=True)
        sys.exit(2)
    runs = runs[runs["status"] == "FINISHED"]
    if "tags.diverged" in runs:
        runs = runs[runs["tags.diverged"] != "true"]
    table = analysis.correlations(runs, analysis.STUDY_PAIRS)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    data = runs[["noise_temperature", "lambda_max"]].dropna() if "lambda_max" in runs else []
    if len(data) >= 2:
        slope, intercept = np.polyfit(
            np.log10(data["noise_temperature"]), np.log10(data["lambda_max"]), 1
        )
        click.echo(
            f"fit: log10 lambda_max = {slope:.3f} * log10(lr/B) + {intercept:.3f} (n = {len(data)})"
        )
    if csv_path:
        table.to_csv(csv_path, index=False)


if __name__ == "__main__":
    main()
