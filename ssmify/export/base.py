"""What every export target shares: the config fields they all take, key renaming, and the fit check.

A target turns a `StudentSpec` into a config of a native transformers architecture and a state dict
that this architecture loads with `strict=True`: no missing weight, no weight left over, every shape
equal. Anything the target has and the student lacks is a branch or layer that must output exactly
zero, and is filled with zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.export.engine_rules import ENGINE_NAMES, engine_problems
from ssmify.export.spec import StudentSpec, head_dim, mixer_config, rotary_factor, split_layer_key


class ExportTarget:
    """One native architecture. Subclasses set the class attributes and the three methods below."""

    name: str  # the --to value, and the target's model_type
    architecture: str  # its *ForCausalLM class
    engines: tuple[str, ...] = ()  # the engines that run this architecture exactly (the tests marked engines)
    adds_identity_layer = True  # transformers 5.x cannot generate with a cache if no layer is attention

    def model_class(self) -> type[PreTrainedModel]:
        raise NotImplementedError

    def problems(self, config: PreTrainedConfig) -> list[str]:
        """Why this target cannot hold the student exactly, read from the student's config; [] if it can."""
        return []

    def engine_problems(self, config: PreTrainedConfig, engine: str) -> list[str]:
        """Why `engine` would not run this student's export exactly ([] if it would), from the config."""
        return engine_problems(self.name, self.engines, config, engine)

    def engines_running(self, config: PreTrainedConfig) -> list[str]:
        """The engines that run this student's export exactly."""
        return [engine for engine in ENGINE_NAMES if not self.engine_problems(config, engine)]

    def make_config(self, spec: StudentSpec) -> PreTrainedConfig:
        raise NotImplementedError

    def make_weights(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The student's weights under this architecture's names; `shapes` are the target's, for zero fills."""
        raise NotImplementedError

    def build(self, spec: StudentSpec) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
        """(config, state dict) of the export; raises SsmifyError if the weights do not fit exactly.

        The config names the *ForCausalLM class in `architectures`: serving engines (vLLM, SGLang,
        llama.cpp's converter) pick the model class and the runner from it, and without it vLLM resolves
        the bare base model and serves it as an embedding model."""
        config = self.make_config(spec)
        config.architectures = [self.architecture]
        shapes = target_shapes(self.model_class(), config)
        weights = self.make_weights(spec, shapes)
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
            weights.pop("lm_head.weight", None)
        check_fit(self.architecture, weights, shapes)
        return config, weights

    def layer_plan(self, spec: StudentSpec) -> tuple[int, list[int]]:
        """(number of layers, attention layers) of the export, with the identity layer when one is needed."""
        if spec.attention_layers or not self.adds_identity_layer:
            return spec.num_layers, list(spec.attention_layers)
        return spec.num_layers + 1, [spec.num_layers]

    def zero_keys(self, spec: StudentSpec, shapes: dict[str, torch.Size]) -> list[str]:
        """The target keys that must be zero: the identity layer, if any, and attention biases the student
        lacks (the targets' attention_bias covers q, k, v and o alike; Qwen2 has no o_proj bias)."""
        num_layers, attention = self.layer_plan(spec)
        identity = keys_under(shapes, [f"model.layers.{i}." for i in range(spec.num_layers, num_layers)])
        attention_keys = keys_under(shapes, [f"model.layers.{i}.self_attn." for i in attention])
        return identity + [key for key in attention_keys if key.endswith(".bias")]


def width_problems(config: PreTrainedConfig, architecture: str) -> list[str]:
    """Bamba and GraniteMoeHybrid size the mixer as an integer `mamba_expand` times hidden_size."""
    mixer = mixer_config(config)
    width = mixer.n_heads * mixer.head_dim
    if width % config.hidden_size:
        return [
            f"its mixer width n_heads*head_dim = {width} is not a multiple of hidden_size {config.hidden_size} "
            f"({architecture} sizes the mixer as an integer mamba_expand * hidden_size)"
        ]
    return []


def partial_rotary_problems(config: PreTrainedConfig, architecture: str) -> list[str]:
    """GraniteMoeHybrid and Falcon-H1 rotate the whole head; that matters only if attention is kept."""
    factor = rotary_factor(config)
    if factor != 1.0 and config.ssmify["attention_layers"]:
        rotated = int(head_dim(config) * factor)
        return [
            f"its attention rotates {rotated} of {head_dim(config)} head dims (partial_rotary_factor {factor}), "
            f"and {architecture} rotates them all"
        ]
    return []


def common_fields(spec: StudentSpec, num_layers: int) -> dict:
    """The config fields that Bamba, GraniteMoeHybrid and Falcon-H1 name alike, from the student's config."""
    c, m = spec.config, spec.mixer
    return {
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": spec.head_dim,  # not a declared field of these configs; their attention reads it
        "hidden_act": c.hidden_act,  # the MLP's activation and the mixer's conv activation alike
        "rms_norm_eps": c.rms_norm_eps,  # every norm, the mixer's gated norm included
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": dict(c.rope_parameters),  # a copy: BambaConfig writes into the dict it is given
        "attention_bias": spec.attention_bias,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "mamba_n_heads": m.n_heads,
        "mamba_d_head": m.head_dim,
        "mamba_n_groups": m.n_groups,
        "mamba_d_state": m.d_state,
        "mamba_d_conv": m.d_conv,
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": m.bias,
        "mamba_chunk_size": m.chunk_size,
        "time_step_limit": (0.0, float("inf")),
    }


def rename(
    weights: dict[str, torch.Tensor], layer_map: list[tuple[str, str]], top_map: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Canonical keys -> target keys: inside each layer by prefix (first match wins), outside it by name."""
    out = {}
    for key, value in weights.items():
        split = split_layer_key(key)
        if split is None:
            out[top_map.get(key, key)] = value
            continue
        layer, name = split
        for old, new in layer_map:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[f"model.layers.{layer}.{name}"] = value
    return out


def fill_zeros(weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size], keys: Iterable[str]) -> None:
    """Add a zero tensor for each of `keys` that `weights` lacks: a part that must contribute exactly 0."""
    dtype = next(iter(weights.values())).dtype
    for key in keys:
        if key not in weights:
            weights[key] = torch.zeros(shapes[key], dtype=dtype)


def keys_under(shapes: dict[str, torch.Size], prefixes: Iterable[str]) -> list[str]:
    prefixes = tuple(prefixes)
    return [key for key in shapes if prefixes and key.startswith(prefixes)]


def target_shapes(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> dict[str, torch.Size]:
    """Every state-dict key of the target and its shape, from a weightless (meta) instance."""
    with torch.device("meta"):
        model = model_class(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def check_fit(architecture: str, weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """The export's weights are exactly the target's: same keys, same shapes."""
    missing = sorted(shapes.keys() - weights.keys())
    unexpected = sorted(weights.keys() - shapes.keys())
    wrong = sorted(k for k in shapes.keys() & weights.keys() if tuple(weights[k].shape) != tuple(shapes[k]))
    if missing or unexpected or wrong:
        parts = [
            f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
            for label, names in (
                ("weights it has no place for:", unexpected),
                ("weights it needs that the student lacks:", missing),
                ("weights of another shape:", wrong),
            )
            if names
        ]
        raise SsmifyError(f"{architecture} cannot hold this student's weights exactly: {'; '.join(parts)}")
