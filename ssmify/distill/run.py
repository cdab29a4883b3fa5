"""Run a recipe: load the teacher once, find or convert the student, then train the stages in order.

Output layout (output_dir):

    recipe.yaml            the validated recipe this run used
    0-convert/             the converted student, when the recipe gives convert options
    1-matrix/              stage 1: the student after it (a loadable HF folder), summary.json,
      checkpoints/step-N/  the accelerate state of its newest checkpoints, while it is unfinished
    2-hidden/ ...

A stage folder with summary.json is finished; `--resume` skips it and continues the first
unfinished stage from its newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from pydantic import ValidationError
from torch import nn

from ssmify.atomic import write_text_atomic
from ssmify.convert.teacher import load_teacher
from ssmify.distill.checkpoints import drop_checkpoints
from ssmify.distill.data import check_data_files, load_data
from ssmify.distill.loop import SUMMARY_FILE, StageContext, plan_stage, train_stage
from ssmify.distill.lora import check_lora_stages
from ssmify.distill.recipe import Recipe, stage_data, stage_dir_name, stage_seq_len
from ssmify.distill.sharding import shard_teacher
from ssmify.distill.state import distributed_state
from ssmify.distill.students import check_vocabulary
from ssmify.distill.tracking import check_installed
from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)

CONVERT_DIR = "0-convert"
RECIPE_FILE = "recipe.yaml"


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False) -> list[dict]:
    """Train every unfinished stage of `recipe`; returns each stage's summary (finished ones from disk).

    Every input is checked before any model loads: the data files, each stage's batch sizes, the
    output folder, and on `resume` that the recipe is the one the run started with (unless `force`).
    """
    out = Path(recipe.output_dir)
    state = distributed_state()
    if out.exists() and not out.is_dir():
        raise SsmifyError(f"output_dir {out}: exists and is not a folder; choose a folder path")
    check_data_files(recipe.data)
    check_installed(recipe)
    for index in range(len(recipe.stages)):
        plan_stage(recipe, index, state.num_processes)
    stage_dirs = [out / stage_dir_name(i, s) for i, s in enumerate(recipe.stages)]
    if not resume and any(d.exists() for d in [out / CONVERT_DIR, *stage_dirs]):
        raise SsmifyError(
            f"output_dir {out}: it already holds a run; "
            "pass --resume to continue it, or choose another output_dir"
        )
    if resume:
        check_same_recipe(recipe, out / RECIPE_FILE, force)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / RECIPE_FILE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    state.wait_for_everyone()
    finished = [(d / SUMMARY_FILE).is_file() for d in stage_dirs]
    first_open = finished.index(False) if False in finished else len(finished)
    summaries = [json.loads((d / SUMMARY_FILE).read_text()) for d in stage_dirs[:first_open]]
    if state.is_main_process and not recipe.keep_finished_checkpoints:
        for folder in stage_dirs[:first_open]:
            drop_checkpoints(folder)  # left by a kill between a stage's summary and its cleanup
    if first_open == len(recipe.stages):
        logger.info("all %d stages of %s are finished", first_open, out)
        return summaries

    converting = recipe.student.path is None and not (out / CONVERT_DIR / "config.json").is_file()
    dtype = "float32" if converting else teacher_dtype(recipe)  # seed the mixers from full-precision weights
    teacher, tokenizer = load_teacher(recipe.teacher, dtype, recipe.trust_remote_code)
    if tokenizer is None:
        raise SsmifyError(
            f"teacher {recipe.teacher}: it has no tokenizer files; the data is tokenized with it"
        )
    start = find_or_convert_student(recipe, teacher, tokenizer, out, state)
    check_vocabulary(recipe.teacher, teacher, tokenizer, start)
    check_lora_stages(recipe, start)
    teacher.requires_grad_(False)
    teacher.eval().to(dtype=getattr(torch, teacher_dtype(recipe)))
    if recipe.teacher_sharding == "fsdp":
        shard_teacher(teacher, state)  # from CPU, a layer at a time: fits where the whole teacher does not
    else:
        teacher.to(state.device)
    if first_open > 0:
        start = stage_dirs[first_open - 1]
        logger.info("stages 1-%d are finished; starting from %s", first_open, start)

    for index in range(first_open, len(recipe.stages)):
        stage = recipe.stages[index]
        data = load_data(stage_data(recipe, stage), tokenizer, stage_seq_len(recipe, stage), recipe.seed)
        ctx = StageContext(recipe, index, teacher, tokenizer, start, out, data)
        summaries.append(train_stage(ctx, resume))
        start = stage_dirs[index]
    return summaries


def teacher_dtype(recipe: Recipe) -> str:
    """The recipe's teacher_dtype; "auto" is bf16 on a GPU that has it, fp32 otherwise."""
    if recipe.teacher_dtype != "auto":
        return recipe.teacher_dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def check_same_recipe(recipe: Recipe, path: Path, force: bool) -> None:
    """Refuse to resume with a recipe that differs from the run's saved one, naming the changed fields.

    Stages appended after the saved ones are no change: they extend the run (the saved stages must be a
    prefix of the new list)."""
    if not path.is_file():
        return
    before = saved_recipe(path)
    now = recipe.model_dump(mode="json")
    saved_stages = before.get("stages")
    if isinstance(saved_stages, list) and len(now["stages"]) > len(saved_stages):
        now["stages"] = now["stages"][: len(saved_stages)]
    changed = changed_fields(before, now)
    if not changed:
        return
    fields = ", ".join(changed)
    if not force:
        raise SsmifyError(
            f"--resume: the recipe differs from the run's {path} in {fields}; "
            "pass --force to resume with it anyway, or choose another output_dir"
        )
    logger.warning("--force: resuming with a recipe that differs from %s in %s", path, fields)


def saved_recipe(path: Path) -> Any:
    """The recipe a run saved, as this version dumps it (an older run's `trackers:` is tracking.report_to now)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return Recipe.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw


def changed_fields(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted paths (e.g. stages.1.lr) where two recipe dumps differ."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = list(now) + [k for k in before if k not in now]
        return [f for k in keys for f in changed_fields(before.get(k), now.get(k), f"{prefix}{k}.")]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [f for i, (b, n) in enumerate(zip(before, now)) for f in changed_fields(b, n, f"{prefix}{i}.")]
    return [] if before == now else [prefix.rstrip(".") or "the whole recipe"]


def find_or_convert_student(
    recipe: Recipe, teacher: nn.Module, tokenizer: Any, out: Path, state: PartialState
) -> Path:
    """The student folder: student.path, or output_dir/0-convert made once by `ssmify.convert.convert`."""
    if recipe.student.path is not None:
        path = Path(recipe.student.path)
        if not (path / "config.json").is_file():
            raise SsmifyError(
                f"student.path {path}: no config.json there; expected a converted student folder"
            )
        return path
    target = out / CONVERT_DIR
    if state.is_main_process and not (target / "config.json").is_file():
        from ssmify.convert.convert import convert

        logger.info("converting %s into %s", recipe.teacher, target)
        convert(teacher, out=target, tokenizer=tokenizer, overwrite=True, **recipe.student.convert_kwargs())
    state.wait_for_everyone()
    return target
