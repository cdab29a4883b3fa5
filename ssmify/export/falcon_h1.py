"""Falcon-H1 (`FalconH1ForCausalLM`): the fallback when the mixer width is not a multiple of hidden_size.

Every Falcon-H1 layer runs attention and a Mamba-2 mixer side by side on the same normed input and adds
their outputs. A student layer uses one of the two, so the other branch gets all-zero weights: its
output projection is zero, so it adds exactly 0. Its mixer width is free (`mamba_d_ssm`). The cost is
that every layer keeps a KV cache and computes a dead branch, so the export keeps the student's outputs
but not its speed or memory; prefer Bamba whenever it fits. All muP multipliers are set to 1, the mixer
norm to the gated RMSNorm the student uses (`mamba_rms_norm`, gate before norm), and the out_proj bias
(`projectors_bias`) to the student's.
"""

from __future__ import annotations

import torch
from transformers import FalconH1Config, FalconH1ForCausalLM, PreTrainedConfig

from ssmify.export.base import (
    ExportTarget,
    common_fields,
    fill_zeros,
    keys_under,
    partial_rotary_problems,
    rename,
)
from ssmify.export.spec import StudentSpec

LAYER_MAP = [
    ("self_attn.mixer.", "mamba."),
    ("mlp.", "feed_forward."),
    ("post_attention_layernorm.", "pre_ff_layernorm."),
]
TOP_MAP = {"model.norm.weight": "model.final_layernorm.weight"}


class FalconH1(ExportTarget):
    name = "falcon_h1"
    architecture = "FalconH1ForCausalLM"
    engines = ("vllm",)
    adds_identity_layer = False  # every layer has attention

    def model_class(self) -> type[FalconH1ForCausalLM]:
        return FalconH1ForCausalLM

    def problems(self, config: PreTrainedConfig) -> list[str]:
        return partial_rotary_problems(config, self.architecture)

    def make_config(self, spec: StudentSpec) -> FalconH1Config:
        fields = common_fields(spec, spec.num_layers)
        fields["rope_parameters"].pop("partial_rotary_factor", None)
        return FalconH1Config(
            **fields,
            mamba_d_ssm=spec.mixer_width,
            mamba_rms_norm=True,
            mamba_norm_before_gate=False,
            projectors_bias=spec.mixer.bias,
            mlp_bias=spec.mlp_bias,
            embedding_multiplier=1.0,
            lm_head_multiplier=1.0,
            mlp_multipliers=[1.0, 1.0],
            key_multiplier=1.0,
            attention_in_multiplier=1.0,
            attention_out_multiplier=1.0,
            ssm_multipliers=[1.0] * 5,
            ssm_in_multiplier=1.0,
            ssm_out_multiplier=1.0,
        )

    def make_weights(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        weights = rename(spec.weights, LAYER_MAP, TOP_MAP)
        kept = set(spec.attention_layers)
        dead = [f"model.layers.{i}.{'mamba' if i in kept else 'self_attn'}." for i in range(spec.num_layers)]
        fill_zeros(weights, shapes, keys_under(shapes, dead) + self.zero_keys(spec, shapes))
        return weights
