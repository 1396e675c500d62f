"""The package version: the ground floor (imports nothing), so any layer may name it."""

__version__ = "0.1.0"
