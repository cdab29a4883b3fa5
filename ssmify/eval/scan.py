"""One pass over the evaluation windows that sums what perplexity and agreement need.

Student and teacher see the same batch, one batch at a time, so the (batch, seq_len, vocab) logits
of only one batch are ever held. Per-token sums are in float64 whatever the model's dtype.
Position t predicts token t + 1, so a window of L tokens scores L - 1 tokens: its first token
is never a target, and the logits of its last position are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.eval.checks import require_teacher


@dataclass
class WindowSums:
    """Sums over the scored tokens: NLL of student (and teacher), KL(teacher || student), top-1 matches."""

    tokens: int = 0
    seq_len: int = 0
    nll: float = 0.0
    teacher_nll: float | None = None
    kl: float | None = None
    top1: int | None = None


def vocab_size(model: PreTrainedModel) -> int:
    """The number of logits the model returns (the embedding rows, padding included)."""
    return model.get_output_embeddings().weight.shape[0]


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest context the model's config declares, if it declares one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits (B, L, V) of a plain forward, no cache."""
    return model(input_ids=input_ids.to(model.device), use_cache=False).logits.float()


def nll_sum(window_logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of tokens 1..L-1 given what precedes them in the window."""
    targets = input_ids[:, 1:].to(window_logits.device)
    scored = window_logits[:, :-1]
    return F.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets.reshape(-1), reduction="sum").item()


def kl_and_top1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[float, int]:
    """Summed KL(teacher || student) and count of equal argmaxes over positions 0..L-2 of each window."""
    student = F.log_softmax(student_logits[:, :-1], dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].to(student.device), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum().item()
    top1 = (student.argmax(-1) == teacher.argmax(-1)).sum().item()
    return kl, int(top1)


def check_windows(model: PreTrainedModel, windows: torch.Tensor, name: str) -> None:
    """Windows longer than the model's context, or token ids it has no embedding for, are input errors."""
    limit = max_positions(model)
    if limit is not None and windows.shape[1] > limit:
        raise SsmifyError(
            f"--seq-len {windows.shape[1]} is longer than the {name}'s max_position_embeddings ({limit})"
        )
    size = vocab_size(model)
    if windows.numel() and int(windows.max()) >= size:
        raise SsmifyError(
            f"the data holds token id {int(windows.max())} but the {name} has only {size} logits; "
            "was the tokenizer made for another model?"
        )


def check_same_vocab(model: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Agreement compares distributions token by token, so both models need the same vocabulary."""
    student_size, teacher_size = vocab_size(model), vocab_size(teacher)
    if student_size != teacher_size:
        raise SsmifyError(
            f"the student has {student_size} logits and the teacher {teacher_size} (vocabulary or its "
            "padding differs); agreement needs the same vocabulary"
        )


def scan_windows(
    model: PreTrainedModel,
    windows: torch.Tensor,
    teacher: PreTrainedModel | None = None,
    batch_size: int = 4,
    agreement: bool = False,
    progress: bool = True,
) -> WindowSums:
    """Sum NLL (and, with a teacher, the teacher's NLL; with agreement, KL and top-1) over all windows."""
    check_windows(model, windows, "model")
    if agreement:
        require_teacher(teacher, "agreement")
    if teacher is not None:
        check_windows(teacher, windows, "teacher")
        if agreement:
            check_same_vocab(model, teacher)
    count, seq_len = windows.shape
    sums = WindowSums(tokens=count * (seq_len - 1), seq_len=seq_len)
    if teacher is not None:
        sums.teacher_nll = 0.0
    if agreement:
        sums.kl, sums.top1 = 0.0, 0
    bar = tqdm(total=sums.tokens, unit="tok", unit_scale=True, desc="scoring", disable=not progress)
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]
        student_logits = logits(model, batch)
        sums.nll += nll_sum(student_logits, batch)
        if teacher is not None:
            teacher_logits = logits(teacher, batch)
            sums.teacher_nll += nll_sum(teacher_logits, batch)
            if agreement:
                kl, top1 = kl_and_top1(student_logits, teacher_logits)
                sums.kl += kl
                sums.top1 += top1
        bar.update(batch.shape[0] * (seq_len - 1))
        bar.set_postfix(nll=f"{sums.nll / (bar.n or 1):.3f}")
    bar.close()
    return sums
