"""Layer-by-layer alignment of a student with its teacher, on the teacher's own inputs to each layer.

For every converted layer (one whose attention is now a mixer):

- matrix_rel_error = ||M - A||_F / ||A||_F, where A is the teacher's softmax attention matrix there
  (B, H, L, L) and M the mixer's materialized mixing matrix on the same attention input;
- hidden_rel_error = ||y_s - y_t||_2 / ||y_t||_2, where y_t is the teacher block's output and y_s the
  student block's output on the very inputs the teacher block received.

Both are summed over the first `alignment_windows` windows, cut to `alignment_seq_len` tokens (the
matrices cost O(L^2) memory), before the ratio is taken. These are what distillation stages 1 and 2
minimize, so they show which layers still differ.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ssmify.convert.probes import capture_blocks, run_block, teacher_attention
from ssmify.convert.student import is_student, mixer_layers
from ssmify.errors import SsmifyError
from ssmify.eval.checks import require_teacher, require_windows
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions


def _squared(x: torch.Tensor) -> float:
    return x.double().pow(2).sum().item()


@torch.no_grad()
def alignment(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """{"layers": [{"layer", "matrix_rel_error", "hidden_rel_error"}], "windows", "seq_len"}."""
    options = options or EvalOptions()
    require_teacher(teacher, "alignment")
    require_windows(data, "alignment")
    if not is_student(model):
        raise SsmifyError(
            f"task alignment compares an ssmify student's mixers with attention, but the model is a "
            f"plain {model.config.model_type}; evaluate a converted student"
        )
    mixers = mixer_layers(model)
    layers = sorted(mixers)
    windows = data.windows[: options.alignment_windows, : options.alignment_seq_len]
    sums = {i: [0.0, 0.0, 0.0, 0.0] for i in layers}  # matrix diff, matrix ref, hidden diff, hidden ref
    for window in tqdm(windows, desc="alignment", unit="window", disable=not options.progress or not layers):
        input_ids = window[None].to(teacher.device)
        attention = teacher_attention(teacher, input_ids, layers)
        blocks = capture_blocks(teacher, input_ids, layers)
        for i in layers:
            probs = attention[i].probs.float()
            heads = getattr(mixers[i], "teacher_heads", None)  # a mixed layer's mixer computes only these
            if heads is not None:
                probs = probs[:, list(heads)]
            mixing = mixers[i].materialize(attention[i].inputs.to(model.device)).float().to(probs.device)
            if mixing.shape != probs.shape:
                raise SsmifyError(
                    f"layer {i}: the student's mixing matrix is {tuple(mixing.shape)} but the teacher's "
                    f"attention is {tuple(probs.shape)}; is this student converted from this teacher?"
                )
            target = blocks[i].output.float()
            output = run_block(model, i, blocks[i]).float().to(target.device)
            sums[i][0] += _squared(mixing - probs)
            sums[i][1] += _squared(probs)
            sums[i][2] += _squared(output - target)
            sums[i][3] += _squared(target)
    return {
        "layers": [
            {
                "layer": i,
                "matrix_rel_error": math.sqrt(sums[i][0] / sums[i][1]),
                "hidden_rel_error": math.sqrt(sums[i][2] / sums[i][3]),
            }
            for i in layers
        ],
        "windows": len(windows),
        "seq_len": windows.shape[1],
    }
