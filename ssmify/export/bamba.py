"""Bamba (`BambaForCausalLM`): the target for llama.cpp, whose converter maps it to granite-hybrid.

Its block is the Llama block (RMSNorm -> attention or Mamba-2 -> residual -> RMSNorm -> SwiGLU MLP ->
residual), chosen per layer by `attn_layer_indices`; its mixer has the student mixer's names, layout
and math. It takes attention biases (all four or none: a missing o_proj bias becomes a zero), MLP
biases, any RoPE type and partial RoPE.

llama.cpp runs only mamba expand 2, so a mixer narrower than 2 * hidden_size is padded there with whole
groups of zero heads, which is exact (`padding.py`); the cost in transformers is the zero heads' compute.
llama.cpp's converter keeps RoPE for this architecture (it drops it for GraniteMoeHybrid), and Bamba has
no expert count to leave behind. vLLM removed Bamba in June 2026: `--to vllm` is GraniteMoeHybrid.

`BambaConfig` hard-codes `partial_rotary_factor = 0.5`, but only as a default: an explicit
`rope_parameters["partial_rotary_factor"]` wins and is written to config.json, so the export always
states its factor (1.0 for Llama). `attn_rotary_emb` carries the same number for the engines that read it.
"""

from __future__ import annotations

import torch
from transformers import BambaConfig, BambaForCausalLM, PreTrainedConfig

from ssmify.export.base import (
    ExportTarget,
    common_fields,
    fill_zeros,
    rename,
    width_problems,
)
from ssmify.export.padding import HeadPadding, pad_mixer, pad_to_width
from ssmify.export.spec import StudentSpec, mixer_config
from ssmify.mixers import Mamba2Config

LAYER_MAP = [
    ("self_attn.mixer.", "mamba."),
    ("mlp.", "feed_forward."),
    ("post_attention_layernorm.", "pre_ff_layernorm."),
]
TOP_MAP = {"model.norm.weight": "model.final_layernorm.weight"}


class Bamba(ExportTarget):
    name = "bamba"
    architecture = "BambaForCausalLM"
    engines = ("llama.cpp",)

    def __init__(self, pad_to_expand: int | None = 2):
        self.pad_to_expand = pad_to_expand  # None: keep the student's width (the padding test's reference)

    def model_class(self) -> type[BambaForCausalLM]:
        return BambaForCausalLM

    def padding(self, mixer: Mamba2Config, hidden_size: int) -> HeadPadding | None:
        """The zero heads that widen the mixer to pad_to_expand * hidden_size; None if none can or need."""
        if self.pad_to_expand is None:
            return None
        padding = pad_to_width(mixer, self.pad_to_expand * hidden_size)
        return padding if padding and padding.extra_heads else None

    def problems(self, config: PreTrainedConfig) -> list[str]:
        if self.padding(mixer_config(config), config.hidden_size):
            return []
        return width_problems(config, self.architecture)

    def make_config(self, spec: StudentSpec) -> BambaConfig:
        num_layers, attention = self.layer_plan(spec)
        fields = common_fields(spec, num_layers)
        fields["rope_parameters"]["partial_rotary_factor"] = spec.rotary_factor
        width, padding = spec.mixer_width, self.padding(spec.mixer, spec.config.hidden_size)
        if padding:
            fields |= {"mamba_n_heads": padding.n_heads, "mamba_n_groups": padding.n_groups}
            width = padding.n_heads * spec.mixer.head_dim
        return BambaConfig(
            **fields,
            attn_layer_indices=attention,
            mamba_expand=width // spec.config.hidden_size,
            mlp_bias=spec.mlp_bias,
            attn_rotary_emb=int(spec.head_dim * spec.rotary_factor),
            # Not a Bamba field: llama.cpp's converter writes a student with no mixer as plain Granite,
            # whose loader requires a logit scale; 1.0 is neutral, and transformers' Bamba ignores it.
            logits_scaling=1.0,
        )

    def make_weights(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        weights = rename(spec.weights, LAYER_MAP, TOP_MAP)
        padding = self.padding(spec.mixer, spec.config.hidden_size)
        if padding:
            for layer in range(spec.num_layers):
                if f"model.layers.{layer}.mamba.in_proj.weight" in weights:
                    pad_mixer(weights, f"model.layers.{layer}.mamba.", padding)
        fill_zeros(weights, shapes, self.zero_keys(spec, shapes))
        return weights
