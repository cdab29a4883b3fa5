"""A mixed layer: attention kept in some KV groups of a layer, a mixer for every other head.

The teacher's query heads group by the KV head they read (GQA). A mixed layer keeps the teacher's
attention module for the chosen KV groups, its q/k/v projections cut down to those groups' rows (so its
KV cache holds those groups only, with RoPE, masks and scaling as the teacher computes them), and a
mixer with fewer heads for the other groups, seeded from those heads' own Q/K/V exactly as a whole
converted layer is. Neither output projection is used: the per-head outputs of both parts are put back
in the teacher's head order and go through the teacher's own `o_proj`, so nothing else in the block
changes. With every group kept it is the teacher's attention; with none, a converted layer.

Parameters: `attention.{q,k,v}_proj` (the kept rows, plus the family's q/k norms), `mixer.*` (its
out_proj is an Identity) and `o_proj` (the teacher's, at the path the teacher's own o_proj has).
Caching: a `MixedCacheLayer` holds the kept groups' keys and values and the mixer's recurrent state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ssmify.convert.adapters import AttentionWeights, FamilyAdapter, get_adapter
from ssmify.convert.seed import mixer_settings
from ssmify.convert.student import MixerAttention, MixerCacheLayer, mixer_cache_layer
from ssmify.errors import SsmifyError
from ssmify.mixers import build_mixer
from ssmify.mixers.state import MixerState

QKV = ("q_proj", "k_proj", "v_proj")


def query_heads(groups: Sequence[int], heads_per_group: int) -> list[int]:
    """The query heads that read KV groups `groups`, in the teacher's order."""
    return [g * heads_per_group + j for g in sorted(groups) for j in range(heads_per_group)]


def _rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def _kept_rows(groups: Sequence[int], heads_per_group: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The rows of q_proj, k_proj and v_proj that KV groups `groups` own."""
    kv = _rows(sorted(groups), head_dim)
    return {"q_proj": _rows(query_heads(groups, heads_per_group), head_dim), "k_proj": kv, "v_proj": kv}


def subset_weights(weights: AttentionWeights, groups: Sequence[int]) -> AttentionWeights:
    """The attention of KV groups `groups` alone: their query heads, their keys/values, their W_O columns."""
    ratio = weights.num_heads // weights.num_kv_heads
    q_rows = _rows(query_heads(groups, ratio), weights.head_dim)
    kv_rows = _rows(sorted(groups), weights.head_dim)

    def cut(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[rows.to(t.device)]

    return AttentionWeights(
        cut(weights.q_weight, q_rows),
        cut(weights.q_bias, q_rows),
        cut(weights.k_weight, kv_rows),
        cut(weights.k_bias, kv_rows),
        cut(weights.v_weight, kv_rows),
        cut(weights.v_bias, kv_rows),
        weights.o_weight[:, q_rows.to(weights.o_weight.device)],
        weights.o_bias,
        num_heads=len(groups) * ratio,
        num_kv_heads=len(groups),
        head_dim=weights.head_dim,
        scaling=weights.scaling,
        qk_norm=weights.qk_norm,
        q_norm_weight=weights.q_norm_weight,
        q_norm_bias=weights.q_norm_bias,
        k_norm_weight=weights.k_norm_weight,
        k_norm_bias=weights.k_norm_bias,
        qk_norm_eps=weights.qk_norm_eps,
    )


def head_mixer_config(
    mixer: str, layer_config: dict, weights: AttentionWeights, groups: Sequence[int]
) -> dict:
    """The whole-layer mixer config `layer_config`, with every setting that counts heads cut to `groups`.

    The settings that differ between a seeded mixer of the whole layer and one of `groups` are the
    head-count ones (n_heads, n_groups, ...); everything else (d_conv, chunk size, options) is kept.
    """
    chunk, eps = layer_config.get("chunk_size", 64), layer_config.get("norm_eps", 1e-5)
    whole = mixer_settings(mixer, weights, chunk, norm_eps=eps)
    part = mixer_settings(mixer, subset_weights(weights, groups), chunk, norm_eps=eps)
    return {**layer_config, **{k: v for k, v in part.items() if whole.get(k) != v}}


class MixedCacheLayer(DynamicLayer):
    """One mixed layer's cache: the kept KV groups' keys and values (a DynamicLayer) and the mixer's state.

    Its sequence length is the KV part's, which the kept attention writes before the mixer runs.
    """

    supports_early_init = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: MixerState | None = None
        self.seen_tokens = 0

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = MixerState(conv=fn(self.state.conv), ssm=fn(self.state.ssm))

    def reset(self) -> None:
        super().reset()
        self.state = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent state cannot be rolled back; speculative or assisted decoding is not supported"
        )

    def offload(self) -> None:
        super().offload()
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def nbytes(self) -> int:
        kv = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return kv + (self.state.nbytes() if self.state is not None else 0)


def mixed_cache_layer(cache: Cache, layer_idx: int) -> MixedCacheLayer:
    """The slot of `cache` at `layer_idx` as a MixedCacheLayer, put in place of the empty KV layer there."""
    while len(cache.layers) <= layer_idx:
        make = cache.layer_class_to_replicate or type(cache.layers[-1])
        cache.layers.append(make())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, MixedCacheLayer):
        if getattr(layer, "is_sliding", False):
            raise SsmifyError(
                f"layer {layer_idx} is a sliding-window layer; head-level plans keep only full-attention layers"
            )
        if layer.get_seq_length() > 0:
            raise SsmifyError(f"cache layer {layer_idx} already holds keys and values of the whole layer")
        layer = cache.layers[layer_idx] = MixedCacheLayer()
    return layer


class MixedAttention(MixerAttention):
    """Sits where a block's attention was: kept KV groups by attention, the other heads by `mixer`.

    `attention` is the teacher's attention module cut to the kept groups (None if none is kept), with
    an Identity output projection; `mixer` computes the other heads (None if all are kept), with an
    Identity out_proj. Outputs (B, L, heads * head_dim) of both go back in the teacher's head order,
    then through `o_proj`. The mixer carries `teacher_heads`, the teacher query heads it computes, so
    that matrix alignment compares it with those heads' attention.
    """

    def __init__(
        self,
        attention: nn.Module | None,
        mixer: nn.Module | None,
        o_proj: nn.Module,
        kept_groups: Sequence[int],
        num_kv_heads: int,
        heads_per_group: int,
        head_dim: int,
        layer_idx: int,
    ):
        super().__init__(mixer, layer_idx)
        self.attention = attention
        self.o_proj = o_proj
        self.kept_groups = tuple(sorted(kept_groups))
        self.head_dim = head_dim
        self.heads_per_group = heads_per_group
        mixed_groups = [g for g in range(num_kv_heads) if g not in self.kept_groups]
        kept_heads = query_heads(self.kept_groups, heads_per_group)
        mixer_heads = query_heads(mixed_groups, heads_per_group)
        # where teacher head h sits among the concatenated kept and mixer heads (plain ints, not buffers:
        # from_pretrained leaves non-persistent buffers uninitialised)
        concatenated = kept_heads + mixer_heads
        self.head_order = tuple(sorted(range(len(concatenated)), key=concatenated.__getitem__))
        if mixer is not None:
            mixer.teacher_heads = tuple(mixer_heads)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache")
        parts = []
        if self.attention is not None:
            if cache is not None and self.mixer is not None:
                mixed_cache_layer(cache, self.layer_idx)  # before the attention writes its keys there
            parts.append(self.attention(hidden_states, *args, **kwargs)[0])
        if self.mixer is not None:
            parts.append(self._mix(hidden_states, cache, kwargs.get("attention_mask")))
        dtype = parts[0].dtype
        heads = torch.cat([p.to(dtype).unflatten(-1, (-1, self.head_dim)) for p in parts], dim=-2)
        order = torch.tensor(self.head_order, device=heads.device)
        return self.o_proj(heads.index_select(-2, order).flatten(-2)), None

    def kept_channels(self) -> torch.Tensor:
        """The channels of `o_proj`'s input (teacher head order) that the kept attention heads write."""
        return _rows(query_heads(self.kept_groups, self.heads_per_group), self.head_dim)

    def _slot(self, cache: Cache) -> MixedCacheLayer | MixerCacheLayer:
        """A mixed cache slot (kept K/V and mixer state) when this layer keeps attention, else a mixer's."""
        if self.attention is not None:
            return mixed_cache_layer(cache, self.layer_idx)
        return mixer_cache_layer(cache, self.layer_idx)


def check_head_family(adapter: FamilyAdapter, attention: nn.Module, family: str) -> None:
    """A one-line SsmifyError unless the family's attention has separate q/k/v Linear projections."""
    if not all(isinstance(getattr(attention, name, None), nn.Linear) for name in QKV):
        raise SsmifyError(
            f"head-level plans need an attention with separate q_proj/k_proj/v_proj; {family} fuses them "
            "(use --attention-layers or --keep-attention)"
        )


def _cut_linear(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    cut = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    cut.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        cut.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            cut.bias.copy_(linear.bias[rows])
    return cut


def make_mixed_attention(
    attention: nn.Module, block: dict, kept_groups: Sequence[int], layer_idx: int
) -> MixedAttention:
    """A MixedAttention from a block's attention module (taken over: its projections are cut in place).

    block: the student's `ssmify` config block; the mixer gets its whole-layer mixer config with fewer heads.
    """
    family, mixer, layer_config = block["base_model_type"], block["mixer"], block["mixer_config"]
    adapter = get_adapter(family)
    check_head_family(adapter, attention, family)
    weights = adapter.read_attention(attention)
    groups, ratio, d = weights.num_kv_heads, weights.num_heads // weights.num_kv_heads, weights.head_dim
    kept = sorted(kept_groups)
    mixed = [g for g in range(groups) if g not in kept]
    o_proj = getattr(attention, adapter.out_proj_attr)
    mix = None
    if mixed:
        mix = build_mixer(mixer, head_mixer_config(mixer, layer_config, weights, mixed))
        mix.to(device=o_proj.weight.device, dtype=o_proj.weight.dtype)
        mix.out_proj = nn.Identity()
    kept_attention = None
    if kept:
        rows = _kept_rows(kept, ratio, d)
        for name in QKV:
            setattr(attention, name, _cut_linear(getattr(attention, name), rows[name]))
        setattr(attention, adapter.out_proj_attr, nn.Identity())
        kept_attention = attention
    return MixedAttention(kept_attention, mix, o_proj, kept, groups, ratio, d, layer_idx)


@torch.no_grad()
def copy_kept_attention(mixed: MixedAttention, teacher_attention: nn.Module) -> None:
    """Fill the kept part of `mixed` from the teacher's attention module of the same layer: the kept
    groups' rows of q/k/v, and every other parameter (the family's q/k norms) as it is."""
    if mixed.attention is None:
        return
    rows = _kept_rows(mixed.kept_groups, mixed.heads_per_group, mixed.head_dim)
    for name, param in mixed.attention.named_parameters():
        source = teacher_attention.get_parameter(name)
        owner = name.split(".")[0]
        param.copy_(source[rows[owner].to(source.device)] if owner in rows else source)


@contextlib.contextmanager
def seedable(mixer: nn.Module, hidden_size: int) -> Iterator[None]:
    """While seeding, give a head mixer a throwaway Linear out_proj (seeding writes W_O columns there;
    a mixed layer uses the teacher's o_proj instead); put the Identity back afterwards."""
    if not isinstance(mixer.out_proj, nn.Identity):
        yield
        return
    weight = next(mixer.parameters())
    mixer.out_proj = nn.Linear(mixer.inner, hidden_size, bias=True, device=weight.device, dtype=weight.dtype)
    try:
        yield
    finally:
        mixer.out_proj = nn.Identity()


def mixer_weights(attention: nn.Module, weights: AttentionWeights) -> AttentionWeights:
    """The teacher weights the mixer in a student's attention slot is seeded from: the whole layer's
    for a converted layer, the mixer groups' for a mixed layer."""
    if isinstance(attention, MixedAttention):
        mixed = [g for g in range(weights.num_kv_heads) if g not in attention.kept_groups]
        return subset_weights(weights, mixed)
    return weights


def teacher_heads(mixer: nn.Module) -> list[int] | None:
    """The teacher query heads a mixer computes, or None when it computes all of them."""
    heads = getattr(mixer, "teacher_heads", None)
    return None if heads is None else list(heads)
