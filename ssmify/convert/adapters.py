"""Family adapters: where each model family keeps its attention weights, read into one canonical layout.

Seeding a mixer from attention needs every layer's Q/K/V/O projections as plain matrices, whatever the
family stores (separate nn.Linear q/k/v/o, one fused qkv Linear, GPT-2's transposed Conv1D, GPT-NeoX's
head-interleaved fused projection). An adapter reads them into `AttentionWeights`, always in nn.Linear
convention (out_features, in_features), with the key/value heads left unrepeated under GQA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

from ssmify.errors import SsmifyError


@dataclass
class AttentionWeights:
    """One attention layer's projections, in nn.Linear convention (out_features, in_features).

    q_weight (H*d, D), k_weight and v_weight (Hkv*d, D), o_weight (D, H*d); biases are 1-D or None.
    Head h owns rows h*d:(h+1)*d of q_weight; query head h reads key/value head h // (H // Hkv).
    When `qk_norm` is set, each head's query and key vectors (length d) are normalised after projection
    and before RoPE: "rms" is weight * x / rms(x) (Qwen3), "layer" is nn.LayerNorm with weight and bias (Phi).
    `scaling` is the factor the teacher multiplies q.k by before its softmax.
    The tensors are detached views of the module's parameters (copies for GPT-NeoX): clone before changing.
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    qk_norm: Literal["rms", "layer"] | None = None
    q_norm_weight: torch.Tensor | None = None
    q_norm_bias: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    k_norm_bias: torch.Tensor | None = None
    qk_norm_eps: float | None = None

    def __post_init__(self) -> None:
        hidden = self.o_weight.shape[0]
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        expected = {"q_weight": (q_out, hidden), "k_weight": (kv_out, hidden)}
        expected |= {"v_weight": (kv_out, hidden), "o_weight": (hidden, q_out)}
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise SsmifyError(
                    f"attention {name} has shape {actual}, expected {shape} from the config "
                    f"(heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}, hidden={hidden})"
                )

    @property
    def hidden_size(self) -> int:
        return self.q_weight.shape[1]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (..., L, H, d), keys and values (..., L, Hkv, d) of input x (..., L, D), before RoPE."""
        q = F.linear(x, self.q_weight, self.q_bias).unflatten(-1, (self.num_heads, self.head_dim))
        k = F.linear(x, self.k_weight, self.k_bias).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = F.linear(x, self.v_weight, self.v_bias).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm == "layer":
            q = F.layer_norm(q, (self.head_dim,), self.q_norm_weight, self.q_norm_bias, self.qk_norm_eps)
            k = F.layer_norm(k, (self.head_dim,), self.k_norm_weight, self.k_norm_bias, self.qk_norm_eps)
        elif self.qk_norm == "rms":
            q = _rms_norm(q, self.q_norm_weight, self.qk_norm_eps)
            k = _rms_norm(k, self.k_norm_weight, self.qk_norm_eps)
        return q, k, v


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen RMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class FamilyAdapter:
    """The Llama layout: separate q_proj/k_proj/v_proj/o_proj nn.Linear in `block.self_attn`.

    Subclasses override only what their family does differently.
    """

    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma2")
    attention_attr: str = "self_attn"
    layers_attr: str = "layers"
    out_proj_attr: str = "o_proj"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of a *ForCausalLM model (or of its base model)."""
        base = getattr(model, "base_model", model)
        layers = getattr(base, self.layers_attr, None)
        if not isinstance(layers, nn.ModuleList):
            raise SsmifyError(
                f"{type(model).__name__} has no decoder layer list '{self.layers_attr}' where the "
                f"{self.model_types[0]} family keeps it"
            )
        return layers

    def dims(self, config: PreTrainedConfig) -> tuple[int, int, int, int]:
        """(hidden_size, num_heads, num_kv_heads, head_dim) as the family's attention module reads them."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return hidden, heads, kv_heads, head_dim

    def read_attention(self, attn: nn.Module) -> AttentionWeights:
        """The canonical weights of one attention module of this family."""
        q, k, v = self._read_qkv(attn)
        o_weight, o_bias = self._read_out(attn)
        _, heads, kv_heads, head_dim = self.dims(attn.config)
        return AttentionWeights(
            *q,
            *k,
            *v,
            o_weight,
            o_bias,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            scaling=float(attn.scaling),
            **self._read_qk_norm(attn),
        )

    def _read_qkv(self, attn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(p.weight.detach(), _detach(p.bias)) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]

    def _read_out(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = getattr(attn, self.out_proj_attr)
        return out.weight.detach(), _detach(out.bias)

    def _read_qk_norm(self, attn: nn.Module) -> dict:
        return {}


class Qwen3Adapter(FamilyAdapter):
    """Llama layout plus a per-head RMSNorm on queries and keys (q_norm, k_norm)."""

    model_types = ("qwen3",)

    def _read_qk_norm(self, attn: nn.Module) -> dict:
        return {
            "qk_norm": "rms",
            "q_norm_weight": attn.q_norm.weight.detach(),
            "k_norm_weight": attn.k_norm.weight.detach(),
            "qk_norm_eps": float(attn.q_norm.variance_epsilon),
        }


class PhiAdapter(FamilyAdapter):
    """Phi-1/1.5/2: Llama layout, output projection named `dense`, optional per-head LayerNorm on q and k."""

    model_types = ("phi",)
    out_proj_attr = "dense"

    def _read_qk_norm(self, attn: nn.Module) -> dict:
        if not attn.qk_layernorm:
            return {}
        return {
            "qk_norm": "layer",
            "q_norm_weight": attn.q_layernorm.weight.detach(),
            "q_norm_bias": _detach(attn.q_layernorm.bias),
            "k_norm_weight": attn.k_layernorm.weight.detach(),
            "k_norm_bias": _detach(attn.k_layernorm.bias),
            "qk_norm_eps": float(attn.q_layernorm.eps),
        }


class Phi3Adapter(FamilyAdapter):
    """Phi-3: one fused qkv_proj whose output is [all queries | all keys | all values]."""

    model_types = ("phi3",)

    def _read_qkv(self, attn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        _, heads, kv_heads, head_dim = self.dims(attn.config)
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        weights = attn.qkv_proj.weight.detach().split(sizes, dim=0)
        bias = _detach(attn.qkv_proj.bias)
        biases = bias.split(sizes) if bias is not None else (None,) * 3
        return list(zip(weights, biases))


class GPT2Adapter(FamilyAdapter):
    """GPT-2: `attn.c_attn` and `attn.c_proj` are Conv1D, weight (in, out), so transpose; no GQA."""

    model_types = ("gpt2",)
    attention_attr = "attn"
    layers_attr = "h"

    def dims(self, config: PreTrainedConfig) -> tuple[int, int, int, int]:
        hidden, heads = config.hidden_size, config.num_attention_heads
        return hidden, heads, heads, hidden // heads

    def _read_qkv(self, attn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        hidden = attn.c_attn.weight.shape[0]
        weights = attn.c_attn.weight.detach().t().split(hidden, dim=0)
        return list(zip(weights, attn.c_attn.bias.detach().split(hidden)))

    def _read_out(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attn.c_proj.weight.detach().t(), attn.c_proj.bias.detach()


class GPTNeoXAdapter(FamilyAdapter):
    """GPT-NeoX/Pythia: fused `attention.query_key_value`, output laid out per head as [q_h | k_h | v_h]."""

    model_types = ("gpt_neox",)
    attention_attr = "attention"
    out_proj_attr = "dense"

    def dims(self, config: PreTrainedConfig) -> tuple[int, int, int, int]:
        hidden, heads = config.hidden_size, config.num_attention_heads
        return hidden, heads, heads, hidden // heads

    def _read_qkv(self, attn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        # modeling_gpt_neox views the projection output as (..., heads, 3 * head_dim) and chunks the last dim.
        hidden, heads, _, head_dim = self.dims(attn.config)
        weight = attn.query_key_value.weight.detach().view(heads, 3, head_dim, hidden)
        bias = _detach(attn.query_key_value.bias)
        bias = bias.view(heads, 3, head_dim) if bias is not None else None
        return [
            (weight[:, i].reshape(heads * head_dim, hidden), None if bias is None else bias[:, i].reshape(-1))
            for i in range(3)
        ]


_ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(),
    Qwen3Adapter(),
    PhiAdapter(),
    Phi3Adapter(),
    GPT2Adapter(),
    GPTNeoXAdapter(),
)
_BY_MODEL_TYPE: dict[str, FamilyAdapter] = {t: a for a in _ADAPTERS for t in a.model_types}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def get_adapter(model_type: str) -> FamilyAdapter:
    """The adapter for a config.model_type; a one-line SsmifyError naming the supported families otherwise."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise SsmifyError(
            f"config.json model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        ) from None
