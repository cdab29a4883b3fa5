"""The two preconditions that several evaluators share, each failing with a one-line SsmifyError."""

from __future__ import annotations

from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.eval.data import EvalData


def require_teacher(teacher: PreTrainedModel | None, task: str) -> None:
    """Tasks that compare against the teacher need one."""
    if teacher is None:
        raise SsmifyError(f"task {task} compares the student with its teacher: pass --teacher PATH")


def require_windows(data: EvalData | None, task: str) -> None:
    """The text-scoring tasks need --data."""
    if data is None or data.windows is None:
        raise SsmifyError(f"task {task} scores text: pass --data FILE (.txt or .jsonl)")
