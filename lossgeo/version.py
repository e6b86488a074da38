"""The package version: its own module at the bottom layer, so code in any layer can log it
without importing the package root (which reaches up to the Tracker)."""

__version__ = "0.1.0"
