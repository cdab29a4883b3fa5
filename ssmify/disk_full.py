"""A disk that fills while ssmify writes becomes one line naming the folder, not a traceback.

The writers report a full disk in three ways: Python's own files raise OSError with errno ENOSPC (or
EDQUOT, over quota), safetensors raises its own error whose text says "No space left on device",
and torch.save raises a RuntimeError about stream positions that names no cause. The last is
recognised by the free space left on the folder's file system when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from ssmify.errors import SsmifyError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
NEARLY_FULL_BYTES = 64 * 2**20  # a write that fails with less free than this is taken for a full disk


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the file system of `folder` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether `err`, raised while writing under `folder`, means that the disk (or quota) is full."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError):
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def stop_when_disk_full(folder: Path, what: str, after: str) -> Iterator[None]:
    """Turn a full disk while writing `what` under `folder` into an SsmifyError; other errors pass through.

    `after` is the rest of the message: what is still intact and how to continue.
    """
    try:
        yield
    except Exception as err:  # safetensors' error is neither OSError nor RuntimeError
        if not is_disk_full(err, folder):
            raise
        raise SsmifyError(
            f"{folder}: the disk is full (no space left on device) while writing {what}; {after}"
        ) from None
