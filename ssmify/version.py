"""The installed ssmify version, read from the package metadata without importing anything heavy."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The version string of the installed distribution, or "unknown" when run from an uninstalled tree."""
    try:
        return metadata.version("ssmify")
    except metadata.PackageNotFoundError:
        return "unknown"
