"""Cheap checks that a saved folder's files are whole: sizes recorded at save time, safetensors headers.

Why not checksums: what actually breaks a checkpoint is a run killed or a disk filled mid-write, or a
hand edit, and those leave files missing, truncated or with garbled headers, which a size check and a
header parse catch while reading a few bytes per file. A content hash would read every byte of every
checkpoint (model and optimizer state: gigabytes for a real student) once when saving and again when
resuming. The price: a flipped bit inside tensor data with the size unchanged goes unnoticed here; a
pickle (optimizer, RNG state) garbled that way fails when it is loaded, with a one-line error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (subfolders too, as FSDP shards are), as {relative path: bytes}."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def size_problem(folder: Path, expected: dict[str, int]) -> str | None:
    """Why the files under `folder` do not have the sizes recorded at save time, or None if they do."""
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {size} when it was saved"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header unreadable, data cut or extended), or None.

    The format: an 8-byte little-endian header length, a JSON header giving each tensor's byte range,
    then the data; a whole file ends exactly where the last range ends.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path.name} is {size} bytes, too short for a safetensors header"
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            return f"{path.name} declares a {header_bytes}-byte header in a {size}-byte file"
        try:
            header = json.loads(handle.read(header_bytes))
        except ValueError:
            return f"{path.name} has a header that is not valid JSON"
    if not isinstance(header, dict):
        return f"{path.name} has a header that is not a JSON object"
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path.name} has no valid data_offsets for {key}"
        ends.append(offsets[1])
    expected = 8 + header_bytes + max(ends, default=0)
    if expected != size:
        return f"{path.name} is {size} bytes, its header says {expected}"
    return None


def folder_problem(folder: Path, expected: dict[str, int] | None) -> str | None:
    """The first problem found with the files under `folder`, or None: recorded sizes, then safetensors headers."""
    if expected is not None:
        problem = size_problem(folder, expected)
        if problem is not None:
            return problem
    for path in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            return problem
    return None
