"""lossgeo: loss-landscape geometry of neural networks, tracked in MLflow."""

__version__ = "0.1.0"
