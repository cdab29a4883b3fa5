"""Tiny random teachers for every supported family, shared by the whole test suite.

hidden 64, 4 layers, vocab 128; GQA 4/2 where the family supports it, biases where it has them,
gemma2 with head_dim 32 != hidden / heads, phi with partial rotary 0.5, qwen3 with its q/k norms.
Norm weights and all biases are randomised a little, so a test that drops one of them can fail.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

_TOKENS = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA_LIKE = {
    **_TOKENS,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

TINY_CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": None},
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},
    "phi": {**_LLAMA_LIKE, "partial_rotary_factor": 0.5},
    "phi3": _LLAMA_LIKE,
    "gemma2": {**_LLAMA_LIKE, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 8},
    "gpt2": {**_TOKENS, "n_embd": 64, "n_inner": 128, "n_layer": 4, "n_head": 4, "n_positions": 256},
    "gpt_neox": {
        **_TOKENS,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    },
}


def tiny_config(model_type: str, **overrides) -> PreTrainedConfig:
    """A tiny config of the given family; keyword overrides use the family's own field names."""
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised *ForCausalLM (GPT2LMHeadModel for gpt2) in eval mode, fp32."""
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.add_(0.1 * torch.randn_like(param))
    return model.eval()
