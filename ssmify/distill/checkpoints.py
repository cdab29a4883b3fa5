"""Checkpoints of a stage: `checkpoints/step-N/`, written under a temporary name and renamed when whole.

A folder named `step-N` is therefore always complete: a run killed while saving leaves only a
`.tmp-step-N` folder, which the next save or resume ignores and clears. Only the newest K are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ssmify.atomic import write_text_atomic

STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=1))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / PROGRESS_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, progress: dict, keep: int) -> Path:
    """Save the accelerate state (model, optimizer, RNG) and `progress` as `root/step-<step>`.

    Every process calls this: each writes its own part (RNG state; shards under FSDP/ZeRO).
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> dict:
    """Restore the accelerate state saved in `folder` and return its progress record."""
    accelerator.load_state(str(folder))
    return json.loads((folder / PROGRESS_FILE).read_text())
