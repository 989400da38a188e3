"""edgekit: take a trained model to a fleet of edge devices and keep it honest there."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("edgekit")
except metadata.PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
