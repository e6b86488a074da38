"""Output: runs read back into pandas, plots, the comparison and the LaTeX report.

`from lossgeo.analysis import load_runs, load_history` is the notebook entry point."""

from .runs import correlations, load_history, load_runs, run_label

__all__ = ["correlations", "load_history", "load_runs", "run_label"]
