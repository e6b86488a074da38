"""Running and measuring training: the loop, the Tracker, the per-epoch measurements, the
MLflow layer (`tracking/`, the only package that talks to MLflow)."""
