"""Tiny random teachers for every supported family, shared by the whole test suite.

hidden 64, 4 layers, vocab 128; GQA 4/2 where the family supports it, biases where it has them,
gemma2 with head_dim 32 != hidden / heads, phi with partial rotary 0.5, qwen3 with its q/k norms.
Norm weights and all biases are randomised a little, so a test that drops one of them can fail.
"""

from __future__ import annotations

import math

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


def copying_teacher() -> PreTrainedModel:
    """A 4-layer Llama whose hand-set attention in layers 0 and 1 is an induction circuit; layers 2 and 3
    add nothing (attention and MLPs zero). After token x it predicts what followed an earlier x.

    The residual stream holds three blocks of vocab width: [this token | previous token | copied token].
    Layer 0, head 0 attends to the previous position only: constant q/k biases in one rotary pair
    (theta 0.013 rad per position) whose angle peaks at distance 1, and it copies the token block into
    the previous-token block. Layer 1, head 0 matches this token against each position's previous token
    (random unit codes in rotary pairs that barely turn over 512 positions) and copies that position's
    token into the copied block, which is all that lm_head reads. On the character tokenizer's induction
    and passkey probes it scores about 74% (run characters that also occur in the filler are ambiguous).
    """
    vocab, head_dim, rope_theta = _TOKENS["vocab_size"], 128, 1e9
    config = AutoConfig.for_model(
        "llama",
        **_TOKENS,
        hidden_size=3 * vocab,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=head_dim,
        attention_bias=True,
        max_position_embeddings=512,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    this, previous, copied = slice(0, vocab), slice(vocab, 2 * vocab), slice(2 * vocab, 3 * vocab)
    code = torch.randn(vocab, 64, generator=torch.Generator().manual_seed(0))
    code /= code.norm(dim=1, keepdim=True)
    slow = torch.cat([torch.arange(32, 64), torch.arange(96, 128)])  # rotary pairs 32..63
    pair, scale = 11, 2500.0
    theta = rope_theta ** (-2 * pair / head_dim)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, this] = 20 * torch.eye(vocab)
        model.lm_head.weight[:, copied] = torch.eye(vocab)
        shift, induction = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        shift.k_proj.bias[pair] = scale
        shift.q_proj.bias[pair] = scale * math.cos(theta)
        shift.q_proj.bias[pair + head_dim // 2] = -scale * math.sin(theta)
        shift.v_proj.weight[:head_dim, this] = torch.eye(vocab)
        shift.o_proj.weight[previous, :head_dim] = torch.eye(vocab)
        induction.q_proj.weight[slow, this] = 30 * code.T
        induction.k_proj.weight[slow, previous] = 30 * code.T
        induction.v_proj.weight[:head_dim, this] = torch.eye(vocab)
        induction.o_proj.weight[copied, :head_dim] = 10 * torch.eye(vocab)
    return model
