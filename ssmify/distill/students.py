"""Load a student folder for training and write a trained student back as a plain Hugging Face folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ssmify.convert.student import register
from ssmify.distill.lora import ADAPTER_DIR, save_adapter
from ssmify.distill.objectives import adapted_model, trained_student
from ssmify.errors import SsmifyError


def check_vocabulary(teacher_name: str, teacher: PreTrainedModel, tokenizer: Any, student_dir: Path) -> None:
    """The student's output vocabulary must be the teacher's, or the logits cannot be compared."""
    student_vocab = json.loads((student_dir / "config.json").read_text()).get("vocab_size")
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise SsmifyError(
            f"student {student_dir}: vocab_size {student_vocab} does not match the teacher's {teacher_vocab} "
            f"({teacher_name}); convert the student from this teacher"
        )
    if len(tokenizer) > teacher_vocab:
        raise SsmifyError(
            f"teacher {teacher_name}: its tokenizer has {len(tokenizer)} tokens, more than vocab_size"
        )


def load_student(path: Path) -> PreTrainedModel:
    """A student folder as an fp32 model."""
    register()  # teaches the Auto classes the "ssmify" model type
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise SsmifyError(f"student {path}: could not load it: {str(err).splitlines()[0]}") from None


def save_student(objective: nn.Module, student: nn.Module, folder: Path, tokenizer: Any) -> None:
    """Write the trained student (LoRA merged) and the tokenizer into `folder`, through a temporary folder.

    A LoRA stage's adapters (and trained mixer extras) also go to `folder/adapter`, saved before the merge.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".student-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        adapted = adapted_model(objective)
        if adapted is not None:
            save_adapter(adapted, tmp / ADAPTER_DIR)
        final = trained_student(objective, student)
        final.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not stay full of a half-written student
        raise
    for item in tmp.iterdir():
        if (folder / item.name).is_dir():
            shutil.rmtree(folder / item.name)
        os.replace(item, folder / item.name)
    tmp.rmdir()
