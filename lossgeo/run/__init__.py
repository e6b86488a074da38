"""Running and measuring training: the loop, the Tracker, the per-epoch measurements, the
MLflow layer (`tracking.py`, the only module that talks to MLflow)."""
