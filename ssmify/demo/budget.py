"""Split the demo's wall-clock budget: what setup took, what evaluation will take, and the rest to training.

Costs are counted from throughputs measured on this machine just before training: the teacher's and
the seeded student's forward tokens per second. Distillation is then sized by
`ssmify.distill.budget.fit_to_time`, which counts its stages in teacher forward tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Share of the budget the plan fills; the rest absorbs estimation error (stage costs are +-30%).
PLAN_SHARE = 0.91
# Per stage: loading the student, building the objective, saving the stage's student (2 cores, 135M).
STAGE_OVERHEAD_S = 16.0
# The run loads the teacher once; the evaluation loads three models and writes the report.
RUN_OVERHEAD_S = 10.0
EVAL_OVERHEAD_S = 45.0
# A 4k-token prefill costs the teacher about this many times a short window's per-token cost (its
# attention is quadratic); the student's mixers are linear in length.
TEACHER_LONG_CONTEXT_COST = 1.5
# speed() runs each model's prefill twice (once timed alone, once before decoding) plus a warm-up.
SPEED_PREFILLS = 2


@dataclass(frozen=True)
class Throughput:
    """Forward tokens per second on this machine, at the training sequence length."""

    teacher: float
    student: float


@torch.no_grad()
def forward_tokens_per_s(model: PreTrainedModel, input_ids: torch.Tensor, repeats: int = 2) -> float:
    """Tokens per second of a forward pass over `input_ids` (B, L): the best of `repeats` passes after a
    short warm-up, so that a moment of other work on the machine does not skew the plan."""
    model(input_ids=input_ids[:1, : min(32, input_ids.shape[1])], use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return input_ids.numel() / max(best, 1e-6)


def fastest_threads(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[int, dict[int, float]]:
    """The torch thread count (1, half or all of the default) with the fastest forward pass here, set for
    the rest of the process; and the tokens/s each gave.

    On a machine where other work takes a core, all-core thread pools spin and wait on each other and
    can run slower than one thread; on an idle machine, all cores win.
    """
    default = torch.get_num_threads()
    measured: dict[int, float] = {}
    for threads in sorted({1, max(1, default // 2), default}, reverse=True):
        torch.set_num_threads(threads)
        measured[threads] = forward_tokens_per_s(model, input_ids, repeats=1)
    best = max(measured, key=measured.get)
    torch.set_num_threads(best)
    measured[best] = max(measured[best], forward_tokens_per_s(model, input_ids, repeats=1))
    return best, measured


def evaluation_seconds(
    throughput: Throughput,
    eval_tokens: int,
    speed_context: int,
    decode_tokens: int,
    retrieval_tokens: int = 0,
) -> float:
    """Expected seconds of the demo's evaluation.

    Quality: the seeded and the distilled student are each scored beside the teacher on the slice.
    Speed: teacher and distilled student prefill `speed_context` tokens twice, then decode.
    Retrieval: the teacher and both students read `retrieval_tokens` each (induction and passkey
    prompts, at long contexts).
    """
    per_pair = 1 / throughput.teacher + 1 / throughput.student
    quality = 2 * eval_tokens * per_pair
    prefill = (
        SPEED_PREFILLS
        * speed_context
        * (TEACHER_LONG_CONTEXT_COST / throughput.teacher + 1 / throughput.student)
    )
    decode = 2 * decode_tokens * per_pair * 8  # one token at a time runs far below batch throughput
    retrieval = retrieval_tokens * (TEACHER_LONG_CONTEXT_COST / throughput.teacher + 2 / throughput.student)
    return quality + prefill + decode + retrieval + EVAL_OVERHEAD_S


def training_seconds(budget_s: float, elapsed_s: float, evaluation_s: float, stages: int) -> float:
    """What is left of the budget for the distillation stages (may be zero or less)."""
    return budget_s * PLAN_SHARE - elapsed_s - evaluation_s - RUN_OVERHEAD_S - stages * STAGE_OVERHEAD_S
