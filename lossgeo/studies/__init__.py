"""Studies: study files, grids and Optuna sweeps, and their statistics."""
