"""Output: runs read back into pandas, statistics, plots, the comparison and the LaTeX report.

`from lossgeo.analysis import load_runs, load_history` is the notebook entry point."""

from .runs import load_history, load_runs, run_label
from .statistics import STUDY_PAIRS, correlations

__all__ = ["STUDY_PAIRS", "correlations", "load_history", "load_runs", "run_label"]
