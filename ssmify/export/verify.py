"""Check that an export computes what the student computes, before the export is handed out.

Three cheap comparisons with the student's full forward pass, all in fp32:
- logits of a full forward pass on random token windows: max |difference| <= 1e-4;
- logits of the export's cached greedy decoding (prefill, then the one-token recurrent update): max
  |difference| <= 1e-3 of the largest |logit|. The recurrent update rounds differently from the chunked
  scan, in the student as well (its own cached decoding differs from its full forward pass by about
  1e-4 of the largest logit on SmolLM2); a cache that is wrong (positions, conv state) is off by O(1);
- when the student keeps attention, the rotary embedding far into the context, where the windows do not
  reach: max |difference| <= 1e-4.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ssmify.errors import SsmifyError

TOLERANCE = 1e-4  # max |logit difference| of the full forward pass (and of cos, sin), fp32
DECODE_TOLERANCE = 1e-3  # max |logit difference| of cached decoding, relative to the largest |logit|


@torch.no_grad()
def verify_parity(
    student: PreTrainedModel,
    exported: PreTrainedModel,
    windows: int = 2,
    length: int = 40,
    decode_tokens: int = 4,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> dict[str, float]:
    """Max |difference| per comparison, and the decode limit; raises SsmifyError if a limit is exceeded.
    Both models in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, student.config.vocab_size, (windows, length), generator=generator)
    ids = ids.to(student.device)
    diffs = {"forward": _max_abs(student(ids, use_cache=False).logits, exported(ids, use_cache=False).logits)}
    limits = {"forward": tolerance}

    prompt = ids[:1, : length // 2]
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
    limits["decode"] = DECODE_TOLERANCE * max(1.0, reference.abs().max().item())

    if student.config.ssmify["attention_layers"]:
        diffs["rope"] = _rope_diff(student, exported)
        limits["rope"] = tolerance
    failed = [name for name in diffs if not diffs[name] <= limits[name]]  # NaN fails too
    if failed:
        details = ", ".join(f"{name} {diffs[name]:.2e} > {limits[name]:.1e}" for name in failed)
        raise SsmifyError(
            f"the export does not reproduce the student (max |logit difference| {details}); nothing was "
            "written. This is a bug in ssmify's export: please report it"
        )
    return {**diffs, "decode_limit": limits["decode"]}


def _rope_diff(student: PreTrainedModel, exported: PreTrainedModel) -> float:
    """Max |cos, sin difference| of the two rotary embeddings from position 0 to the last position."""
    last = student.config.max_position_embeddings - 1
    positions = torch.tensor([[0, 1, last // 2, last]], device=student.device)
    x = torch.zeros(1, device=student.device)
    expected = student.base_model.rotary_emb(x, positions)
    actual = exported.base_model.rotary_emb(x, positions)
    if any(e.shape != a.shape for e, a in zip(expected, actual)):
        return float("inf")
    return max(_max_abs(e, a) for e, a in zip(expected, actual))


def _max_abs(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return (expected.float() - actual.float()).abs().max().item()
