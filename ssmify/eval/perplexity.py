"""Perplexity over non-overlapping windows: exp of the mean NLL of every token but each window's first."""

from __future__ import annotations

import math

from transformers import PreTrainedModel

from ssmify.eval.checks import require_windows
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.scan import WindowSums, scan_windows


def perplexity_result(sums: WindowSums) -> dict:
    """The report entry: value, tokens scored, window length; the teacher's value and the ratio if known."""
    result = {"value": math.exp(sums.nll / sums.tokens), "tokens": sums.tokens, "seq_len": sums.seq_len}
    if sums.teacher_nll is not None:
        result["teacher_value"] = math.exp(sums.teacher_nll / sums.tokens)
        result["ratio"] = result["value"] / result["teacher_value"]
    return result


def perplexity(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """{"value", "tokens", "seq_len"} for the model, plus "teacher_value" and "ratio" (student / teacher)."""
    options = options or EvalOptions()
    require_windows(data, "perplexity")
    sums = scan_windows(model, data.windows, teacher, options.batch_size, progress=options.progress)
    return perplexity_result(sums)
