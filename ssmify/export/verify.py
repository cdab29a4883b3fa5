"""Check that an export computes what the student computes, before the export is handed out.

Two passes over the same comparisons, each limit relative to the largest |logit| of the student (at
least 1; cos and sin have scale 1):
- float64, exact: both models in float64 with transformers' float32 downcasts lifted
  (`Float64Throughout`), so each computes its own math in float64 throughout. An exact export agrees
  to float64 rounding (about 1e-14 of the logits); anything above 1e-9 is a bug, however small. In
  plain float64 transformers still rounds its norms and scan to float32, which alone leaves about 1e-7.
- float32, as served: the export loaded from the saved weights in float32 (half-precision weights are
  upcast exactly) against the student in float32, within 1e-3. float32 rounding grows with the residual
  stream: an untrained pure-SSM SmolLM2 (residual |max| 1.5e4) differs by 2e-5 to 6e-5 of its largest
  logit, above an absolute 1e-4.

The comparisons: logits of a full forward pass on random token windows; logits of the export's cached
greedy decoding (prefill, then the one-token recurrent update) against the student's full forward pass
on the same tokens; and, when the student keeps attention, cos and sin of the rotary embedding far into
the context, where the windows do not reach.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.export.float64 import Float64Throughout, as_float64
from ssmify.export.spec import mixer_config

TOLERANCE = {"float64": 1e-9, "float32": 1e-3}  # max |difference| / max(1, largest |logit| of the student)


@torch.no_grad()
def verify_parity(
    student: PreTrainedModel,
    exported: PreTrainedModel,
    windows: int = 2,
    length: int | None = None,
    decode_tokens: int = 4,
    seed: int = 0,
) -> dict:
    """{"logit_scale": s, "float64": {comparison: max |difference|, "limits": {comparison: limit}},
    "float32": the same}; raises SsmifyError if a difference exceeds its limit. Both models float32 and in
    eval mode; they are converted to float64 in place for the exact pass, and back after it. `length`:
    tokens per window; by default one and a half chunks of the mixer's scan, at least 40, so that the
    scan carries its state from one chunk to the next."""
    if length is None:
        length = max(40, mixer_config(student.config).chunk_size * 3 // 2)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, student.config.vocab_size, (windows, length), generator=generator)
    ids = ids.to(student.device)
    float32, _ = _compare(student, exported, ids, decode_tokens)
    with as_float64(student), as_float64(exported), Float64Throughout():
        float64, scale = _compare(student, exported, ids, decode_tokens)
    report = {"logit_scale": scale}
    failed = []
    for dtype, diffs in (("float64", float64), ("float32", float32)):
        limits = {name: TOLERANCE[dtype] * (1.0 if name == "rope" else max(1.0, scale)) for name in diffs}
        failed += [  # NaN fails too
            f"{dtype} {n} {diffs[n]:.2e} > {limits[n]:.1e}" for n in diffs if not diffs[n] <= limits[n]
        ]
        report[dtype] = {**diffs, "limits": limits}
    if failed:
        raise SsmifyError(
            f"the export does not reproduce the student (max |logit difference| {', '.join(failed)}); nothing "
            "was written. This is a bug in ssmify's export: please report it"
        )
    return report


def _compare(
    student: PreTrainedModel, exported: PreTrainedModel, ids: torch.Tensor, decode_tokens: int
) -> tuple[dict[str, float], float]:
    """Max |difference| of each comparison, and the student's largest |logit|, in the models' dtype."""
    logits = student(ids, use_cache=False).logits
    diffs = {"forward": _max_abs(logits, exported(ids, use_cache=False).logits)}
    prompt = ids[:1, : ids.shape[1] // 2]
    decoded = exported.generate(
        prompt,
        max_new_tokens=decode_tokens,
        min_new_tokens=decode_tokens,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=student.config.pad_token_id or 0,
    )
    reference = student(decoded.sequences, use_cache=False).logits[0, prompt.shape[1] - 1 : -1]
    diffs["decode"] = _max_abs(reference, torch.cat(decoded.logits))
    if student.config.ssmify["attention_layers"]:
        diffs["rope"] = _rope_diff(student, exported)
    return diffs, logits.abs().max().item()


def _rope_diff(student: PreTrainedModel, exported: PreTrainedModel) -> float:
    """Max |cos, sin difference| of the two rotary embeddings from position 0 to the last position."""
    last = student.config.max_position_embeddings - 1
    positions = torch.tensor([[0, 1, last // 2, last]], device=student.device)
    x = torch.zeros(1, device=student.device, dtype=student.dtype)
    expected = student.base_model.rotary_emb(x, positions)
    actual = exported.base_model.rotary_emb(x, positions)
    if any(e.shape != a.shape for e, a in zip(expected, actual)):
        return float("inf")
    return max(_max_abs(e, a) for e, a in zip(expected, actual))


def _max_abs(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return (expected.double() - actual.double()).abs().max().item()
