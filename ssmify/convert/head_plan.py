"""Which KV groups keep attention, model-wide: a head-level plan.

A layer's query heads group by the KV head they read; keeping attention for a group keeps its query
heads and its keys/values (one KV head of cache). A layer with every group kept is an attention layer,
one with none a converted (mixer) layer, anything between a mixed layer (`mixed_layer.py`). A plan
whose layers are all whole is a layer plan and is saved as one (`attention_layers` only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmify.errors import SsmifyError


@dataclass(frozen=True)
class HeadPlan:
    """`kept`: the (layer, kv_group) pairs that keep attention, sorted."""

    num_layers: int
    num_kv_heads: int
    kept: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        for layer, group in self.kept:
            if not 0 <= layer < self.num_layers:
                raise SsmifyError(
                    f"--attention-heads: layer {layer} out of range; this model has layers 0..{self.num_layers - 1}"
                )
            if not 0 <= group < self.num_kv_heads:
                raise SsmifyError(
                    f"--attention-heads: KV group {group} of layer {layer} out of range; each layer has KV "
                    f"groups 0..{self.num_kv_heads - 1}"
                )
        seen: set[tuple[int, int]] = set()
        for head in self.kept:
            if head in seen:
                raise SsmifyError(f"--attention-heads: {head[0]}:{head[1]} given more than once")
            seen.add(head)
        object.__setattr__(self, "kept", tuple(sorted(self.kept)))

    @classmethod
    def parse(cls, num_layers: int, num_kv_heads: int, text: str) -> HeadPlan:
        """From "3:0,7:2" (layer:kv_group, comma-separated); "5:all" keeps every KV group of layer 5."""
        kept = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            layer, sep, group = item.partition(":")
            malformed = f"--attention-heads: {item!r} is not LAYER:KV_GROUP or LAYER:all (e.g. 3:0,7:2,9:all)"
            if not sep:
                raise SsmifyError(malformed)
            try:
                groups = range(num_kv_heads) if group.strip() == "all" else [int(group)]
                kept += [(int(layer), g) for g in groups]
            except ValueError:
                raise SsmifyError(malformed) from None
        return cls(num_layers, num_kv_heads, tuple(kept))

    @property
    def total(self) -> int:
        return self.num_layers * self.num_kv_heads

    def groups(self, layer: int) -> tuple[int, ...]:
        return tuple(g for i, g in self.kept if i == layer)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Layers that keep every KV group: plain attention layers."""
        return tuple(i for i in range(self.num_layers) if len(self.groups(i)) == self.num_kv_heads)

    @property
    def mixed(self) -> dict[int, tuple[int, ...]]:
        """Layers that keep some but not all KV groups -> the groups they keep."""
        return {i: g for i in range(self.num_layers) if 0 < len(g := self.groups(i)) < self.num_kv_heads}

    @property
    def converted(self) -> tuple[int, ...]:
        """The layers that get a mixer (for all or some of their heads)."""
        kept = set(self.attention_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    def block_fields(self) -> dict:
        """What the student's `ssmify` config block says of this plan (no `attention_heads` if whole layers)."""
        fields: dict = {"attention_layers": list(self.attention_layers)}
        if self.mixed:
            fields["attention_heads"] = {str(i): list(g) for i, g in self.mixed.items()}
        return fields

    def describe(self) -> str:
        heads = ", ".join(f"{i}:{g}" for i, g in self.kept) or "none"
        return (
            f"{len(self.kept)}/{self.total} KV heads keep attention ({heads}); "
            f"{len(self.attention_layers)} whole attention layers, {len(self.mixed)} mixed layers"
        )


def head_count(keep_heads: float, total: int) -> int:
    """How many KV heads --keep-heads keeps: a count (>= 1, a whole number) or a fraction in (0, 1)."""
    what = f"give a count 1..{total} or a fraction in (0, 1) of this model's {total} KV heads"
    if 0 < keep_heads < 1:
        count = round(keep_heads * total)
        if count < 1:
            raise SsmifyError(f"--keep-heads: {keep_heads:g} of {total} KV heads keeps none; {what}")
        return count
    if keep_heads != int(keep_heads) or not 1 <= keep_heads <= total:
        raise SsmifyError(f"--keep-heads: {keep_heads:g} is out of range; {what}")
    return int(keep_heads)


def kv_bytes_per_head(head_dim: int, context: int, dtype: torch.dtype) -> int:
    """Bytes one KV head's cache (keys and values) takes at `context` tokens, per sequence."""
    return 2 * head_dim * context * torch.empty((), dtype=dtype).element_size()


def budget_count(kv_budget_mib: float, context: int, head_dim: int, dtype: torch.dtype, total: int) -> int:
    """How many KV heads fit in `kv_budget_mib` MiB of KV cache at `context` tokens (one sequence)."""
    if context < 1:
        raise SsmifyError(f"--context: {context} tokens; give a positive context length")
    per_head = kv_bytes_per_head(head_dim, context, dtype) / 2**20
    count = int(kv_budget_mib // per_head)
    if not 1 <= count <= total:
        raise SsmifyError(
            f"--kv-budget-mib: {kv_budget_mib:g} MiB at {context} tokens holds {count} KV heads ({per_head:.3g} "
            f"MiB each in {str(dtype).removeprefix('torch.')}); give {per_head:.3g} to {per_head * total:.3g} "
            f"MiB (1..{total} KV heads)"
        )
    return count


# Families whose attention module has separate q/k/v Linear projections and reads its head counts only
# at construction (so it can be cut to a subset of KV groups), and whose layers are all full attention.
HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def plan_heads(
    config,
    attention_heads: str | None,
    keep_heads: float | None,
    kv_budget_mib: float | None,
    context: int,
    dtype: torch.dtype,
) -> HeadPlan | int | None:
    """What the head options ask for, checked from the teacher's config alone: a plan (--attention-heads),
    a count of KV heads to choose by score (--keep-heads, --kv-budget-mib), or None (no head option)."""
    from ssmify.convert.adapters import get_adapter

    given = [
        n
        for n, v in (
            ("--attention-heads", attention_heads),
            ("--keep-heads", keep_heads),
            ("--kv-budget-mib", kv_budget_mib),
        )
        if v is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        raise SsmifyError(f"give one of {', '.join(given)}, not several")
    family = config.model_type
    if family not in HEAD_FAMILIES:
        raise SsmifyError(
            f"{given[0]}: head-level plans support {', '.join(HEAD_FAMILIES)} teachers, not {family}; "
            "use --attention-layers or --keep-attention"
        )
    if getattr(config, "sliding_window", None) and family == "mistral":
        raise SsmifyError(
            f"{given[0]}: this mistral teacher has sliding-window attention; head-level plans need full attention"
        )
    _, _, kv_heads, head_dim = get_adapter(family).dims(config)
    layers = config.num_hidden_layers
    if attention_heads is not None:
        return HeadPlan.parse(layers, kv_heads, attention_heads)
    if keep_heads is not None:
        return head_count(keep_heads, layers * kv_heads)
    return budget_count(kv_budget_mib, context, head_dim, dtype, layers * kv_heads)


def ranked(scores: torch.Tensor) -> list[tuple[int, int]]:
    """Every (layer, kv_group) of `scores` (num_layers, num_kv_heads), highest score first; ties go to the earlier."""
    groups = scores.shape[1]
    order = scores.flatten().argsort(descending=True, stable=True).tolist()
    return [(i // groups, i % groups) for i in order]
