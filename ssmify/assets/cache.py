"""Where the assets are cached: one root folder, chosen by argument, environment or default; and the lock
that lets one process build an asset while the others that need it wait."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$SSMIFY_CACHE`, else `~/.cache/ssmify`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SSMIFY_CACHE") or "~/.cache/ssmify").expanduser()


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on building `target` (a lock file beside it) while the body runs.

    Two processes that need the same asset on a fresh machine (two bench runs, two test workers) would
    otherwise build it in the same staging folder, and the second one's start would delete the first
    one's files. With the lock the second waits; it must then look again before building (see callers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
