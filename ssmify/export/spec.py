"""The student, read into one canonical form that every export target starts from.

Canonical weights use the Llama layout: separate q/k/v/o projections in `self_attn`, the mixer under
`self_attn.mixer`, separate gate/up/down projections in `mlp`, `model.norm`, `lm_head`. Phi-3's fused
qkv_proj and gate_up_proj are split into that layout (the same math: their rows, in order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ssmify.mixers import Mamba2Config

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mixer_config(config: PreTrainedConfig) -> Mamba2Config:
    """The student's Mamba-2 settings, defaults filled in."""
    return Mamba2Config(**config.ssmify["mixer_config"])


def rotary_factor(config: PreTrainedConfig) -> float:
    """The fraction of each head that RoPE rotates (Phi-3 style partial rotary; 1.0 for Llama)."""
    return float((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))


@dataclass
class StudentSpec:
    """What a target needs to know about a student: its config, plan, mixer settings and canonical weights."""

    config: PreTrainedConfig
    mixer: Mamba2Config
    attention_layers: list[int]
    weights: dict[str, torch.Tensor]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    @property
    def rotary_factor(self) -> float:
        return rotary_factor(self.config)

    @property
    def mixer_width(self) -> int:
        return self.mixer.n_heads * self.mixer.head_dim

    @property
    def attention_bias(self) -> bool:
        """True when a kept attention layer has any q/k/v/o bias (the targets' flag covers all four)."""
        return any(re.search(r"\.self_attn\.[qkvo]_proj\.bias$", key) for key in self.weights)

    @property
    def mlp_bias(self) -> bool:
        return any(re.search(r"\.mlp\.\w+_proj\.bias$", key) for key in self.weights)


def read_student(student: PreTrainedModel) -> StudentSpec:
    """The canonical form of a loaded mamba2 student (call `check_exportable` first)."""
    return StudentSpec(
        config=student.config,
        mixer=mixer_config(student.config),
        attention_layers=sorted(student.config.ssmify["attention_layers"]),
        weights=canonical_weights(student.state_dict(), student.config),
    )


def canonical_weights(
    state_dict: dict[str, torch.Tensor], config: PreTrainedConfig
) -> dict[str, torch.Tensor]:
    """The state dict in the Llama layout: fused projections split, every other key unchanged."""
    sizes = [
        config.num_attention_heads * head_dim(config),
        config.num_key_value_heads * head_dim(config),
        config.num_key_value_heads * head_dim(config),
    ]
    out = {}
    for key, value in state_dict.items():
        value = value.detach()
        if key.endswith("self_attn.qkv_proj.weight") or key.endswith("self_attn.qkv_proj.bias"):
            for name, part in zip("qkv", value.split(sizes, dim=0)):
                out[key.replace("qkv_proj", f"{name}_proj")] = part.clone()
        elif key.endswith("mlp.gate_up_proj.weight") or key.endswith("mlp.gate_up_proj.bias"):
            gate, up = value.chunk(2, dim=0)  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2)
            out[key.replace("gate_up_proj", "gate_proj")] = gate.clone()
            out[key.replace("gate_up_proj", "up_proj")] = up.clone()
        else:
            out[key] = value
    return out


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (3, "mlp.up_proj.weight"); None for a key outside the layers."""
    match = _LAYER_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None
