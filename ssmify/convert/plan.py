"""Which layers keep attention, and which become mixers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ssmify.errors import SsmifyError


@dataclass(frozen=True)
class LayerPlan:
    """A model's layer plan: `attention_layers` keep attention; every other layer gets a mixer."""

    num_layers: int
    attention_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        layers = list(self.attention_layers)
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise SsmifyError(
                f"--attention-layers: {bad} out of range; this model has layers 0..{self.num_layers - 1}"
            )
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise SsmifyError(f"--attention-layers: layer {repeated} given more than once")
        object.__setattr__(self, "attention_layers", tuple(sorted(layers)))

    @classmethod
    def keep_fraction(cls, num_layers: int, fraction: float) -> LayerPlan:
        """Keep round(fraction * n) attention layers, spread evenly and ending at the last layer.

        25% of 32 layers keeps 3, 7, ..., 31; 50% of 30 keeps 1, 3, ..., 29.
        """
        if not 0.0 <= fraction <= 1.0:
            raise SsmifyError(f"--keep-attention: {fraction} is outside [0, 1]")
        kept = round(fraction * num_layers)
        stride = num_layers / kept if kept else 0
        return cls(num_layers, tuple(round((i + 1) * stride) - 1 for i in range(kept)))

    @classmethod
    def from_args(
        cls,
        num_layers: int,
        attention_layers: Sequence[int] | None = None,
        keep_attention: float | None = None,
    ) -> LayerPlan:
        """The plan from either explicit indices or a fraction (default: a pure SSM)."""
        if attention_layers is not None and keep_attention is not None:
            raise SsmifyError("give either --attention-layers or --keep-attention, not both")
        if attention_layers is not None:
            return cls(num_layers, tuple(attention_layers))
        return cls.keep_fraction(num_layers, keep_attention if keep_attention is not None else 0.0)

    @property
    def converted(self) -> tuple[int, ...]:
        """The layers whose attention becomes a mixer."""
        kept = set(self.attention_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    def describe(self) -> str:
        return (
            f"{len(self.attention_layers)}/{self.num_layers} layers keep attention "
            f"({', '.join(map(str, self.attention_layers)) or 'none'}); {len(self.converted)} become mixers"
        )
