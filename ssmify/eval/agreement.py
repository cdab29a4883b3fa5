"""How closely the student's next-token distribution follows the teacher's, token by token."""

from __future__ import annotations

from transformers import PreTrainedModel

from ssmify.eval.checks import require_teacher, require_windows
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.scan import WindowSums, scan_windows


def agreement_result(sums: WindowSums) -> dict:
    """The report entry: mean per-token KL(teacher || student) in nats, and the top-1 agreement rate."""
    return {"kl": sums.kl / sums.tokens, "top1": sums.top1 / sums.tokens, "tokens": sums.tokens}


def agreement(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """{"kl", "top1"} over the same windows and scored positions as perplexity."""
    options = options or EvalOptions()
    require_teacher(teacher, "agreement")
    require_windows(data, "agreement")
    sums = scan_windows(
        model, data.windows, teacher, options.batch_size, agreement=True, progress=options.progress
    )
    return agreement_result(sums)
