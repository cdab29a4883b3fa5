"""Checkpoints of a stage: `checkpoints/step-N/`, written under a temporary name and renamed when whole.

A run killed while saving leaves only a `.tmp-step-N` folder, which the next save clears and resume
ignores; old checkpoints are renamed to `.trash-step-N` before they are deleted, so a kill while
pruning leaves no half-deleted `step-N`. Only the newest K are kept, and none once the stage is
finished (unless the recipe says `keep_finished_checkpoints`): they serve only to resume an unfinished
stage, and a real student's are model plus optimizer state, gigabytes each.

progress.json, written last, records the size of every file of the checkpoint. `--resume` takes the
newest `step-N` whose files still match (see `ssmify.distill.integrity`); a newer one that does not,
truncated or garbled by hand or by a failing disk, is named in a WARNING and set aside as
`step-N.invalid`, kept for inspection and out of the way of later saves and pruning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ssmify.atomic import write_text_atomic
from ssmify.disk_full import stop_when_disk_full
from ssmify.distill.integrity import file_sizes, folder_problem
from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"
CHECKPOINTS_DIR = "checkpoints"  # in a stage folder
FILES_KEY = "files"  # in progress.json: {file: bytes} of the checkpoint as saved
SET_ASIDE_SUFFIX = ".invalid"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=1))


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder under `root`, oldest first; each was renamed in whole."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint under `root` that has its progress record, oldest first."""
    return [(step, folder) for step, folder in step_folders(root) if (folder / PROGRESS_FILE).is_file()]


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (progress record unreadable, a file missing, cut or garbled), or None."""
    try:
        record = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{PROGRESS_FILE} is missing"
    except (OSError, ValueError):
        return f"{PROGRESS_FILE} is not valid JSON"
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return f"{PROGRESS_FILE} holds no step"
    sizes = record.get(FILES_KEY)
    return folder_problem(folder, sizes if isinstance(sizes, dict) else None)


def resume_checkpoint(accelerator: Accelerator, root: Path) -> Path | None:
    """The newest checkpoint under `root` that passes `checkpoint_problem`, or None when none does.

    Every process checks the same files and so picks the same one; the main process then logs each
    newer one it skipped, and why, and sets it aside.
    """
    skipped: list[tuple[Path, str]] = []
    chosen = None
    for _, folder in reversed(step_folders(root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            chosen = folder
            break
        skipped.append((folder, problem))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        instead = (
            f"resuming from {chosen.name}" if chosen else "no valid checkpoint left; the stage starts over"
        )
        for folder, problem in skipped:
            aside = folder.with_name(folder.name + SET_ASIDE_SUFFIX)
            logger.warning(
                "checkpoint %s skipped: %s; %s (it is kept as %s)", folder, problem, instead, aside.name
            )
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
    accelerator.wait_for_everyone()
    return chosen


def retire(folder: Path) -> None:
    """Delete `folder` after renaming it out of the `step-N` namespace, so no half-deleted checkpoint remains."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def drop_checkpoints(stage_dir: Path) -> None:
    """Delete a finished stage's `checkpoints/` (renamed first, so a kill leaves no half-deleted step-N)."""
    folder = stage_dir / CHECKPOINTS_DIR
    if folder.is_dir():
        retire(folder)
    shutil.rmtree(stage_dir / f".trash-{CHECKPOINTS_DIR}", ignore_errors=True)  # a kill's leftover


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, progress: dict, keep: int) -> Path:
    """Save the accelerate state (model, optimizer, RNG) and `progress` as `root/step-<step>`.

    Every process calls this: each writes its own part (RNG state; shards under FSDP/ZeRO). A full
    disk stops the run with one line; the temporary folder is removed and older checkpoints stay. When
    one process fails to write, all of them stop (`any_process_failed`) instead of the others waiting at
    the next barrier; a failure inside a collective of save_state itself (FSDP, ZeRO) can still hang.
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    previous = newest_checkpoint(root)
    intact = (
        f"checkpoint {previous.name} is intact; free some space and continue with --resume"
        if previous is not None
        else "no checkpoint of this stage was written yet; free some space and continue with --resume"
    )
    try:
        with stop_when_disk_full(root, f"checkpoint {final.name}", intact):
            if accelerator.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            failure = None
            try:
                accelerator.save_state(str(tmp))
            except Exception as err:  # held until every process knows, or the others would wait forever
                failure = err
            if any_process_failed(accelerator, failure is not None):
                raise failure or SsmifyError(
                    f"checkpoint {final.name}: another process failed writing its part (its own error "
                    f"says why); {intact}"
                )
            if accelerator.is_main_process:
                record = {**progress, FILES_KEY: file_sizes(tmp)}
                (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            retire(final)
        os.replace(tmp, final)
        for _, old in step_folders(root)[:-keep]:
            retire(old)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".trash-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def any_process_failed(accelerator: Accelerator, failed: bool) -> bool:
    """Whether any process says it failed; every process must call it (one all-reduce, the sync point)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([float(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def load_checkpoint(accelerator: Accelerator, folder: Path) -> dict:
    """Restore the accelerate state saved in `folder` and return its progress record (without the file sizes)."""
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # torch, safetensors and pickle each raise their own kind
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SsmifyError(
            f"checkpoint {folder}: could not load it ({cause}); move it aside to resume from the one before it"
        ) from None
    record = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    record.pop(FILES_KEY, None)
    return record
