"""Where the assets are cached: one root folder, chosen by argument, environment or default."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$SSMIFY_CACHE`, else `~/.cache/ssmify`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SSMIFY_CACHE") or "~/.cache/ssmify").expanduser()
