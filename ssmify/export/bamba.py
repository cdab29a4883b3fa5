"""Bamba (`BambaForCausalLM`): the default target for Llama-family students.

Its block is the Llama block (RMSNorm -> attention or Mamba-2 -> residual -> RMSNorm -> SwiGLU MLP ->
residual), chosen per layer by `attn_layer_indices`; its mixer has the student mixer's names, layout
and math. It takes attention biases (all four or none: a missing o_proj bias becomes a zero), MLP
biases, any RoPE type and partial RoPE.

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
from ssmify.export.spec import StudentSpec

LAYER_MAP = [
    ("self_attn.mixer.", "mamba."),
    ("mlp.", "feed_forward."),
    ("post_attention_layernorm.", "pre_ff_layernorm."),
]
TOP_MAP = {"model.norm.weight": "model.final_layernorm.weight"}


class Bamba(ExportTarget):
    name = "bamba"
    architecture = "BambaForCausalLM"
    engines = "vLLM and SGLang (Bamba), llama.cpp (convert_hf_to_gguf.py maps it to granitehybrid)"

    def model_class(self) -> type[BambaForCausalLM]:
        return BambaForCausalLM

    def problems(self, config: PreTrainedConfig) -> list[str]:
        return width_problems(config, self.architecture)

    def make_config(self, spec: StudentSpec) -> BambaConfig:
        num_layers, attention = self.layer_plan(spec)
        fields = common_fields(spec, num_layers)
        fields["rope_parameters"]["partial_rotary_factor"] = spec.rotary_factor
        return BambaConfig(
            **fields,
            attn_layer_indices=attention,
            mamba_expand=spec.mixer_width // spec.config.hidden_size,
            mlp_bias=spec.mlp_bias,
            attn_rotary_emb=int(spec.head_dim * spec.rotary_factor),
        )

    def make_weights(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        weights = rename(spec.weights, LAYER_MAP, TOP_MAP)
        fill_zeros(weights, shapes, self.zero_keys(spec, shapes))
        return weights
