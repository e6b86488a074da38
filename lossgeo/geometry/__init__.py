"""Pure measurement beyond the curvature matrices: sharpness, loss landscapes and their
directions, the gradient noise scale, curvature spikes. No MLflow, Optuna, click or
matplotlib here."""
