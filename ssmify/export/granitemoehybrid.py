"""GraniteMoeHybrid (`GraniteMoeHybridForCausalLM`), dense: the target for vLLM, which has no Bamba.

With no experts its block is the Llama block with multipliers, all set to their neutral values
(embedding, residual and logits multipliers 1, `attention_multiplier = head_dim ** -0.5`, the Llama
scale) and `position_embedding_type = "rope"` (its default is no position embedding at all). The
MLP is `shared_mlp`, whose `input_linear` holds gate and up stacked. It has no MLP bias and rotates
the whole head, so students with either are refused.
"""

from __future__ import annotations

import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, PreTrainedConfig

from ssmify.export.base import (
    ExportTarget,
    common_fields,
    fill_zeros,
    partial_rotary_problems,
    rename,
    width_problems,
)
from ssmify.export.spec import StudentSpec

LAYER_MAP = [("self_attn.mixer.", "mamba.")]


class GraniteMoeHybrid(ExportTarget):
    name = "granitemoehybrid"
    architecture = "GraniteMoeHybridForCausalLM"
    engines = ("vllm",)

    def model_class(self) -> type[GraniteMoeHybridForCausalLM]:
        return GraniteMoeHybridForCausalLM

    def problems(self, config: PreTrainedConfig) -> list[str]:
        problems = width_problems(config, self.architecture)
        problems += partial_rotary_problems(config, self.architecture)
        if getattr(config, "mlp_bias", False):
            problems.append(f"its MLP has biases (mlp_bias), and {self.architecture}'s MLP has none")
        return problems

    def make_config(self, spec: StudentSpec) -> GraniteMoeHybridConfig:
        num_layers, attention = self.layer_plan(spec)
        fields = common_fields(spec, num_layers)
        return GraniteMoeHybridConfig(
            **fields,
            layer_types=[
                "full_attention" if i in attention else "linear_attention" for i in range(num_layers)
            ],
            mamba_expand=spec.mixer_width // spec.config.hidden_size,
            position_embedding_type="rope",
            attention_multiplier=spec.head_dim**-0.5,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            num_local_experts=0,
            shared_intermediate_size=spec.config.intermediate_size,
        )

    def make_weights(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        weights = rename(spec.weights, LAYER_MAP, {})
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            gate, up = weights.pop(p + "mlp.gate_proj.weight"), weights.pop(p + "mlp.up_proj.weight")
            weights[p + "shared_mlp.input_linear.weight"] = torch.cat([gate, up])  # act(first half) * second
            weights[p + "shared_mlp.output_linear.weight"] = weights.pop(p + "mlp.down_proj.weight")
        fill_zeros(weights, shapes, self.zero_keys(spec, shapes))
        return weights
