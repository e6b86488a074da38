"""lossgeo: loss-landscape geometry of neural networks, tracked in MLflow."""

from lossgeo.version import __version__

__all__ = ["CurvatureSettings", "SGDStep", "Scope", "StepSettings", "Tracker", "__version__"]


def __getattr__(name: str):
    # `lossgeo.Tracker` without importing torch for every `import lossgeo` (the CLI's --help)
    if name in ("Tracker", "StepSettings"):
        from lossgeo.run import tracker

        return getattr(tracker, name)
    if name == "CurvatureSettings":
        from lossgeo.curvature.measure import CurvatureSettings

        return CurvatureSettings
    if name == "Scope":
        from lossgeo.curvature.scope import Scope

        return Scope
    if name == "SGDStep":
        from lossgeo.curvature.stability import SGDStep

        return SGDStep
    raise AttributeError(f"module 'lossgeo' has no attribute {name!r}")
