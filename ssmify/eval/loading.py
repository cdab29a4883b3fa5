"""Load the model under evaluation and its teacher onto one device, with one tokenizer for both."""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.convert.teacher import load_teacher
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> torch.device:
    """The named device, or CUDA when there is one, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise SsmifyError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SsmifyError(f"--device {device}: CUDA is not available on this machine")
    return chosen


def load_models(
    source: str,
    teacher_source: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel | None, PreTrainedTokenizerBase | None]:
    """(model, teacher or None, tokenizer): the model's own tokenizer, else the teacher's."""
    target = pick_device(device)
    model, tokenizer = load_teacher(source, dtype=dtype, trust_remote_code=trust_remote_code)
    teacher = None
    if teacher_source is not None:
        teacher, teacher_tokenizer = load_teacher(
            teacher_source, dtype=dtype, trust_remote_code=trust_remote_code
        )
        if tokenizer is None:
            log.info("%s has no tokenizer; using the teacher's", source)
            tokenizer = teacher_tokenizer
        teacher.to(target)
    return model.to(target), teacher, tokenizer
