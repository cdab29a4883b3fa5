"""Write files and folders atomically: build them under a temporary name beside the target, then rename.

A reader never sees a half-written file or folder, and a run killed mid-write leaves the previous
version intact (plus a stale temporary that the next write removes or replaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ssmify.errors import SsmifyError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path` (named for this process), then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written temporary behind
        raise


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def written_by_ssmify(folder: Path) -> bool:
    """Whether `folder` holds something ssmify writes, and so may be replaced by --overwrite.

    The rule: a student or stage (config.json with an "ssmify" block), a stage summary (summary.json),
    an export (export_report.json), or an eval report (report.json beside report.md).
    """
    if (folder / "export_report.json").is_file() or (folder / "summary.json").is_file():
        return True
    if (folder / "report.json").is_file() and (folder / "report.md").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("ssmify"), dict)


def check_output_dir(target: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, or non-empty without `overwrite`, or not ssmify's own.

    `--overwrite` replaces only a folder that ssmify wrote (see `written_by_ssmify`), never other files.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SsmifyError(f"{flag} {target}: exists and is not a folder; choose a folder path")
    if not is_nonempty_dir(target):
        return
    if not overwrite:
        raise SsmifyError(f"{flag} {target}: folder exists and is not empty; pass --overwrite to replace it")
    if not written_by_ssmify(target):
        raise SsmifyError(
            f"{flag} {target}: --overwrite replaces only a folder that ssmify wrote (a student, stage, "
            "export or eval report), and this one holds none; empty it yourself or choose another folder"
        )


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
