#!/usr/bin/env python
"""Comparison plots (loss/accuracy curves, lambda_max, sharpness, gen_gap vs lambda_max,
noise temperature vs lambda_max, spectra) of logged runs, written to plots/ and logged to
MLflow. Thin wrapper over lossgeo.analysis.comparison.compare.

    python scripts/compare_landscape_results.py --experiment mnist_grid
    python scripts/compare_landscape_results.py --parent-run <grid or sweep parent run id>
"""

from lossgeo.cli import compare_command

if __name__ == "__main__":
    compare_command.help = __doc__
    compare_command(prog_name="compare_landscape_results.py")
