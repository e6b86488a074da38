"""lossgeo: loss-landscape geometry of neural networks, tracked in MLflow."""

__version__ = "0.1.0"

__all__ = ["Tracker", "__version__"]


def __getattr__(name: str):
    # `lossgeo.Tracker` without importing torch for every `import lossgeo` (the CLI's --help)
    if name == "Tracker":
        from lossgeo.run.tracker import Tracker

        return Tracker
    raise AttributeError(f"module 'lossgeo' has no attribute {name!r}")
