"""Write files and folders atomically: build them under a temporary name beside the target, then rename.

A reader never sees a half-written file or folder, and a run killed mid-write leaves the previous
version intact (plus a stale temporary that the next write removes or replaces).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ssmify.errors import SsmifyError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path` (named for this process), then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `target` in one rename.

    Refuses to replace a non-empty `target` unless `overwrite`. On error the temporary folder is removed
    and `target` is left as it was.
    """
    target = Path(target)
    if is_nonempty_dir(target) and not overwrite:
        raise SsmifyError(f"{target}: folder exists and is not empty; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise SsmifyError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = target.parent / f".{target.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
