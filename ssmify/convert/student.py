"""The student: the teacher's own transformers class, with a mixer in place of attention in chosen layers.

A student's config is the teacher's config with `model_type = "ssmify"` and an `ssmify` block:

    {"base_model_type": "llama", "mixer": "mamba2", "mixer_config": {...},
     "attention_layers": [3, 7], "provenance": {...}}

`import ssmify` registers the "ssmify" model type with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(student_dir)` builds the teacher's class from that config,
swaps the mixers in and loads the weights: no teacher weights, no network, no remote code.

Caching: a mixer layer keeps a `MixerState` in a `MixerCacheLayer`, which it puts into the model's
ordinary `DynamicCache` in place of the KV layer at its index the first time it runs. Attention
layers keep their KV cache. Decoding one token costs the same whatever the context length.

Prefill: a student's `generate` prefills long prompts in chunks of `prefill_chunk_size` tokens (see
`chunked_prefill_generate`), so its peak memory is bounded by a chunk, not by the prompt.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ssmify.convert.adapters import SUPPORTED_FAMILIES, get_adapter
from ssmify.errors import SsmifyError
from ssmify.mixers import build_mixer
from ssmify.mixers.state import MixerState

MODEL_TYPE = "ssmify"
# Tokens per prefill chunk in `generate` (a multiple of the scans' chunk sizes); the config block's
# "prefill_chunk_size" overrides it.
PREFILL_CHUNK_SIZE = 2048


class MixerCacheLayer(CacheLayerMixin):
    """A cache slot holding one mixer's recurrent state, and how many tokens it has seen.

    It reports that count as its sequence length, so a pure-SSM student (no KV layer at all) still
    gets correct position ids and masks from transformers.
    """

    supports_early_init = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.state: MixerState | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        raise TypeError("a mixer's cache slot holds a recurrent state, not keys and values")

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("an attention layer tried to write keys and values into a mixer's cache slot")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = MixerState(conv=fn(self.state.conv), ssm=fn(self.state.ssm))

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent state cannot be rolled back; speculative or assisted decoding is not supported"
        )

    def offload(self) -> None:
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass

    def nbytes(self) -> int:
        return self.state.nbytes() if self.state is not None else 0


def mixer_cache_layer(cache: Cache, layer_idx: int) -> MixerCacheLayer:
    """The mixer slot of `cache` at `layer_idx`, put in place of whatever KV layer was there."""
    while len(cache.layers) <= layer_idx:
        make = cache.layer_class_to_replicate or type(cache.layers[-1])
        cache.layers.append(make())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, MixerCacheLayer):
        if layer.get_seq_length() > 0:
            raise SsmifyError(f"cache layer {layer_idx} already holds keys and values; it belongs to a mixer")
        layer = cache.layers[layer_idx] = MixerCacheLayer()
    return layer


class MixerAttention(nn.Module):
    """Sits where a block's attention module was and takes the same call; `.mixer` does the work.

    Blocks unpack `(output, attention_weights)`; a mixer has no attention weights, so the second is None.
    """

    def __init__(self, mixer: nn.Module, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("layer_past"))  # gpt_neox names it layer_past
        return self._mix(hidden_states, cache, kwargs.get("attention_mask")), None

    def _slot(self, cache: Cache) -> MixerCacheLayer:
        """The cache slot that holds this layer's mixer state."""
        return mixer_cache_layer(cache, self.layer_idx)

    def _mix(self, hidden_states: torch.Tensor, cache: Cache | None, attention_mask: Any) -> torch.Tensor:
        """The mixer over `hidden_states`: a whole pass without a cache; with one, a prefill from the
        slot's state, or a single `step` once the slot has seen tokens."""
        length = hidden_states.shape[1]
        if cache is None:
            return self.mixer(hidden_states, mask=padding_mask(attention_mask, length))
        slot = self._slot(cache)
        if slot.state is None:
            slot.state = self.mixer.allocate_state(hidden_states.shape[0], hidden_states.device)
        if slot.seen_tokens > 0 and length == 1:
            out = self.mixer.step(hidden_states, slot.state)
        else:
            out = self.mixer(hidden_states, slot.state, mask=padding_mask(attention_mask, length))
        slot.seen_tokens += length
        return out


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(batch, length) 1/0 for real/padded query positions, read off the mask a block hands to attention.

    A 4-D mask (bool: True attends; float: 0 attends) says whether each query attends to itself; a 2-D
    mask (flash attention) is the padding mask itself. None when nothing is padded.
    """
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        keep = attention_mask[:, -length:].bool()
    elif attention_mask.dim() == 4:
        offset = attention_mask.shape[-1] - length
        diagonal = attention_mask[:, 0, :, offset:].diagonal(dim1=-2, dim2=-1)
        keep = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    else:
        return None
    return None if bool(keep.all()) else keep


class SsmifyConfig(PreTrainedConfig):
    """Registered under model_type "ssmify". Reading a student's config.json returns an instance of
    the teacher family's config class (a subclass of it, see `student_config_class`)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any) -> PreTrainedConfig:
        block = config_dict.get(MODEL_TYPE)
        if not isinstance(block, dict) or "base_model_type" not in block:
            raise SsmifyError("config.json has model_type 'ssmify' but no 'ssmify.base_model_type' field")
        return student_config_class(block["base_model_type"]).from_dict(config_dict, **kwargs)


@functools.cache
def student_config_class(base_model_type: str) -> type[PreTrainedConfig]:
    """The teacher family's config class, renamed to model_type "ssmify" (it keeps every field)."""
    get_adapter(base_model_type)  # fails cleanly for unsupported families
    base = CONFIG_MAPPING[base_model_type]
    return type(f"Ssmify{base.__name__}", (base,), {"model_type": MODEL_TYPE, "__module__": __name__})


@functools.cache
def student_model_class(base_model_type: str) -> type[PreTrainedModel]:
    """The teacher family's *ForCausalLM, subclassed to swap mixers in, and registered with AutoModel."""
    config_cls = student_config_class(base_model_type)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[base_model_type]]

    def __init__(self, config: PreTrainedConfig) -> None:
        base.__init__(self, config)
        install_mixers(self, config)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return chunked_prefill_generate(base.generate, self, *args, **kwargs)

    cls = type(
        f"Ssmify{base.__name__}",
        (base,),
        {
            "__init__": __init__,
            "generate": functools.wraps(base.generate)(generate),
            "__module__": __name__,
            "config_class": config_cls,
            "_is_stateful": True,  # tells generate() that the cache cannot be cropped or rolled back
        },
    )
    AutoModelForCausalLM.register(config_cls, cls, exist_ok=True)
    return cls


def chunked_prefill_generate(generate: Any, model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    """`generate`, prefilling the prompt in chunks of the config block's "prefill_chunk_size" tokens.

    transformers' own chunked prefill (`prefill_chunk_size` in the generation config) runs the model
    over the prompt chunk after chunk with the cache: mixers carry their conv and SSM states across
    chunks (a continued forward), attention layers their KV cache, so the result is the whole-prompt
    prefill's, while activations (MLP, scan) only ever cover one chunk. Hooking generate, rather than
    splitting inside forward, keeps forward what the teacher's is, and lets a caller choose:
    `prefill_chunk_size=N` uses N, `prefill_chunk_size=None` prefills in one go. generate already asks
    forward for the last position's logits only (`logits_to_keep=1`), so no chunk materialises its
    (chunk, vocab) logits.
    """
    config = kwargs.get("generation_config") or model.generation_config
    use_cache = kwargs.get("use_cache", config.use_cache)
    if "prefill_chunk_size" not in kwargs and config.prefill_chunk_size is None and use_cache:
        kwargs["prefill_chunk_size"] = model.config.ssmify.get("prefill_chunk_size", PREFILL_CHUNK_SIZE)
    return generate(model, *args, **kwargs)


def install_mixers(model: PreTrainedModel, config: PreTrainedConfig) -> None:
    """Put a freshly initialised mixer in place of attention in every layer that does not keep it, and
    a mixed layer (`mixed_layer.py`) in each layer of `attention_heads` (layer -> kept KV groups)."""
    block = config.ssmify
    adapter = get_adapter(block["base_model_type"])
    keep = set(block["attention_layers"])
    mixed = {int(i): groups for i, groups in block.get("attention_heads", {}).items()}
    for idx, layer in enumerate(adapter.decoder_layers(model)):
        if idx in mixed:
            from ssmify.convert.mixed_layer import make_mixed_attention

            attention = make_mixed_attention(getattr(layer, adapter.attention_attr), block, mixed[idx], idx)
            setattr(layer, adapter.attention_attr, attention)
        elif idx not in keep:
            mixer = build_mixer(block["mixer"], block["mixer_config"])
            setattr(layer, adapter.attention_attr, MixerAttention(mixer, idx))


def make_student_config(teacher_config: PreTrainedConfig, block: dict) -> PreTrainedConfig:
    """The student's config: the teacher's fields plus the `ssmify` block."""
    fields = teacher_config.to_dict()
    fields.pop("model_type", None)
    fields[MODEL_TYPE] = block
    return student_config_class(block["base_model_type"]).from_dict(fields)


def build_student(teacher_config: PreTrainedConfig, block: dict) -> PreTrainedModel:
    """An untrained student (teacher architecture, mixers swapped in), in the teacher config's dtype."""
    config = make_student_config(teacher_config, block)
    return student_model_class(block["base_model_type"])(config)


def is_student(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def mixer_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Converted layer index -> its mixer. Works through wrappers (peft, DDP) via named_modules."""
    return {m.layer_idx: m.mixer for m in model.modules() if isinstance(m, MixerAttention)}


def register() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` understand model_type "ssmify". Idempotent."""
    AutoConfig.register(MODEL_TYPE, SsmifyConfig, exist_ok=True)
    for model_type in SUPPORTED_FAMILIES:
        student_model_class(model_type)
