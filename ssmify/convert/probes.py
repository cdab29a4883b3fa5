"""Look inside a forward pass: teacher attention matrices and inputs, and decoder-block inputs/outputs.

Used by seeding (calibration), by distillation stages 1-2 (targets) and by eval (alignment).
Family-agnostic: attention is captured through transformers' AttentionInterface, calling each
family's own eager attention, so scaling, softcapping, sliding windows and GQA are the family's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ssmify.convert.adapters import FamilyAdapter, get_adapter

PROBE = "ssmify_probe"


@dataclass
class AttentionProbe:
    """One layer's attention: its input (B, L, D), after the block's norm, and its probabilities (B, H, L, L)."""

    inputs: torch.Tensor
    probs: torch.Tensor


@dataclass
class BlockIO:
    """What one decoder block received and returned in a forward pass."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


_recording: dict[int, int] = {}  # id(attention module) -> layer index, while a probe is active
_records: dict[int, torch.Tensor] = {}
_fallback: dict[str, Any] = {}


def _probe_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Computes attention as the family's eager code does; keeps the probabilities of probed layers."""
    layer = _recording.get(id(module))
    if layer is None and _fallback.get("impl") not in (None, "eager"):
        return _fallback["fn"](module, query, key, value, attention_mask, **kwargs)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, probs = eager(module, query, key, value, attention_mask, **kwargs)
    if layer is not None:
        _records[layer] = probs
    return out, probs


AttentionInterface.register(PROBE, _probe_attention)
# Without a mask function of its own, a custom attention implementation gets no mask at all (not even causal).
AttentionMaskInterface.register(PROBE, eager_mask)


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    adapter = model_adapter(model)
    return [getattr(block, adapter.attention_attr) for block in adapter.decoder_layers(model)]


def model_adapter(model: PreTrainedModel) -> FamilyAdapter:
    """The family adapter of a teacher, or of a student (its teacher's family)."""
    block = getattr(model.config, "ssmify", None)
    return get_adapter(block["base_model_type"] if isinstance(block, dict) else model.config.model_type)


@contextlib.contextmanager
def _attention_probe(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    modules = attention_modules(model)
    original = model.config._attn_implementation
    _recording.clear()
    _records.clear()
    _recording.update({id(modules[i]): i for i in layers})
    _fallback.update(impl=original, fn=ALL_ATTENTION_FUNCTIONS.get(original))
    model.set_attn_implementation(PROBE)
    try:
        yield _records
    finally:
        model.set_attn_implementation(original)
        _recording.clear()
        _fallback.clear()


def teacher_attention(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: Iterable[int], **forward_kwargs: Any
) -> dict[int, AttentionProbe]:
    """Attention inputs and probabilities (KV heads expanded) of `layers`, from one forward pass."""
    layers = sorted(set(layers))
    modules = attention_modules(model)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(idx: int):
        def hook(module, args, kwargs):
            inputs[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [modules[i].register_forward_pre_hook(keep_input(i), with_kwargs=True) for i in layers]
    try:
        with _attention_probe(model, layers) as probs:
            model(input_ids=input_ids, use_cache=False, **forward_kwargs)
            found = dict(probs)
    finally:
        for handle in handles:
            handle.remove()
    return {i: AttentionProbe(inputs=inputs[i], probs=found[i]) for i in layers}


def capture_blocks(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: Iterable[int], **forward_kwargs: Any
) -> dict[int, BlockIO]:
    """Each chosen decoder block's positional args, kwargs and output, from one forward pass."""
    layers = sorted(set(layers))
    blocks = model_adapter(model).decoder_layers(model)
    seen: dict[int, BlockIO] = {}

    def before(idx: int):
        def hook(module, args, kwargs):
            seen[idx] = BlockIO(args=args, kwargs=kwargs, output=None)

        return hook

    def after(idx: int):
        def hook(module, args, kwargs, output):
            seen[idx].output = output[0] if isinstance(output, tuple) else output

        return hook

    handles = []
    for i in layers:
        handles.append(blocks[i].register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(blocks[i].register_forward_hook(after(i), with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def run_block(model: PreTrainedModel, layer_idx: int, io: BlockIO) -> torch.Tensor:
    """Rerun one decoder block of `model` on inputs captured (possibly from another model)."""
    block = model_adapter(model).decoder_layers(model)[layer_idx]
    out = block(*io.args, **io.kwargs)
    return out[0] if isinstance(out, tuple) else out
