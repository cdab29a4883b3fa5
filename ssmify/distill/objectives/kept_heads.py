"""The kept attention heads' outputs, for the logits stage's `loss.head_weight` term.

In a hybrid, a kept attention head is the teacher's, but it reads its queries and keys from the
student's residual stream, which is off the teacher's (30-40% relative error in the 9-head SmolLM2
student, docs/benchmarks.md section 13). Over 2,000 tokens its attention on a far key then thins out.
The next-token KL sees that only at the few positions that copy; this term sees it at every position.
It compares each kept query head's output (its slice of the input to o_proj, before the output
projection), the student running end to end, with the same head's output in the teacher:

    head_error = mean over kept query heads h and tokens t of ||o_s[h, t] - o_t[h, t]|| / ||o_t[h, t]||

Relative error, so that heads with large outputs do not drown the rest. It is LoLCATs' attention
transfer (match each attention's output) turned round: there a new linear attention learns from the
teacher's inputs, here the teacher's own heads learn to cope with the student's inputs, and the mixers
before them learn to hand them what they need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ssmify.convert.mixed_layer import MixedAttention
from ssmify.convert.probes import attention_modules, model_adapter
from ssmify.convert.student import MixerAttention


@dataclass(frozen=True)
class KeptHeads:
    """One layer's kept attention heads: the channels of its o_proj input that they write."""

    layer: int
    channels: torch.Tensor
    head_dim: int


def _plain(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper, or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def kept_heads(student: nn.Module) -> list[KeptHeads]:
    """Every layer of `student` that keeps attention heads: a mixed layer's kept groups, or all heads of a
    layer left as the teacher's attention. Empty for a student whose every layer is a mixer."""
    plain = _plain(student)
    adapter = model_adapter(plain)
    head_dim = adapter.dims(plain.config)[3]
    found = []
    for layer, attention in enumerate(attention_modules(plain)):
        if isinstance(attention, MixedAttention):
            if attention.attention is not None:
                found.append(KeptHeads(layer, attention.kept_channels(), attention.head_dim))
        elif not isinstance(attention, MixerAttention):
            width = getattr(attention, adapter.out_proj_attr).in_features
            found.append(KeptHeads(layer, torch.arange(width), head_dim))
    return found


def out_projections(model: nn.Module, layers: list[int]) -> dict[int, nn.Module]:
    """The output projection of each layer in `layers`: the teacher's, or a student's (a mixed layer
    holds the teacher's o_proj as `o_proj` whatever the family calls it)."""
    plain = _plain(model)
    modules = attention_modules(plain)
    name = model_adapter(plain).out_proj_attr
    return {
        i: modules[i].o_proj if isinstance(modules[i], MixedAttention) else getattr(modules[i], name)
        for i in layers
    }


@contextlib.contextmanager
def recorded_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, the input each of `modules` last received, by layer."""
    records: dict[int, torch.Tensor] = {}

    def keep(layer: int, module: nn.Module, args: tuple) -> None:
        records[layer] = args[0]

    handles = [module.register_forward_pre_hook(partial(keep, layer)) for layer, module in modules.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def select(inputs: dict[int, torch.Tensor], heads: list[KeptHeads]) -> dict[int, torch.Tensor]:
    """The kept heads' outputs (B, L, heads, head_dim) out of the recorded o_proj inputs."""
    return {
        h.layer: inputs[h.layer]
        .index_select(-1, h.channels.to(inputs[h.layer].device))
        .unflatten(-1, (-1, h.head_dim))
        for h in heads
    }


def head_error(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over kept query heads and tokens of ||o_s - o_t|| / ||o_t|| (see the module docstring)."""
    errors = [
        (
            torch.linalg.vector_norm(student[layer].float() - teacher[layer].float(), dim=-1)
            / torch.linalg.vector_norm(teacher[layer].float(), dim=-1).clamp_min(1e-6)
        ).flatten()
        for layer in teacher
    ]
    return torch.cat(errors).mean()
