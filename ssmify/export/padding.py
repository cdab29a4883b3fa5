"""Exact zero-padding of Mamba-2 mixers: extra groups of heads, or a larger d_state, so that an engine's
fixed shapes fit.

llama.cpp's granite-hybrid runs only mamba expand 2 (d_inner = 2 * hidden_size), and ssmify's mixers have
d_inner = n_heads * head_dim, often hidden_size. Padding adds whole groups of heads whose x, B, C, z and dt
rows of in_proj, conv channels, conv bias, D and out_proj columns are zero: each new head reads x = 0, so
its output is 0 whatever its state; its z = 0 gates it to 0; and its group of the gated RMSNorm holds only
those zeros (0 * rsqrt(0 + eps) = 0), so the real groups' norms are untouched. out_proj then adds nothing.
The padded mixer computes exactly what the unpadded one does, which tests/test_export_padding.py checks.

`pad_state` grows d_state (llama.cpp's CUDA scan runs only d_state 96, 128 or 256) with zero rows of B and
C in every group: B = 0 writes nothing into the new state rows, and C = 0 reads nothing out of them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ssmify.export.spec import StudentSpec
from ssmify.mixers import Mamba2Config

_MIXER_KEY = re.compile(r"(model\.layers\.\d+\.self_attn\.mixer\.)in_proj\.weight$")


@dataclass(frozen=True)
class HeadPadding:
    """A mixer's shape before and after padding with whole groups of zero heads."""

    mixer: Mamba2Config
    n_heads: int  # after padding
    n_groups: int  # after padding

    @property
    def extra_heads(self) -> int:
        return self.n_heads - self.mixer.n_heads

    @property
    def extra_groups(self) -> int:
        return self.n_groups - self.mixer.n_groups


def pad_to_width(mixer: Mamba2Config, width: int) -> HeadPadding | None:
    """The padding that makes the mixer `width` wide (n_heads * head_dim), or None if whole groups cannot."""
    group_width = mixer.n_heads // mixer.n_groups * mixer.head_dim
    current = mixer.n_heads * mixer.head_dim
    if width < current or (width - current) % group_width:
        return None
    extra_groups = (width - current) // group_width
    return HeadPadding(mixer, width // mixer.head_dim, mixer.n_groups + extra_groups)


def pad_mixer(weights: dict[str, torch.Tensor], prefix: str, padding: HeadPadding) -> None:
    """Pad the mixer weights under `prefix` (e.g. `model.layers.0.mamba.`) in place."""
    m, p = padding.mixer, padding
    if not p.extra_heads:
        return
    inner, extra_inner = m.n_heads * m.head_dim, p.extra_heads * m.head_dim
    bc, extra_bc = m.n_groups * m.d_state, p.extra_groups * m.d_state
    # in_proj rows and conv channels, segment by segment: [z | x | B | C | dt] and [x | B | C].
    rows = [
        (inner, extra_inner),
        (inner, extra_inner),
        (bc, extra_bc),
        (bc, extra_bc),
        (m.n_heads, p.extra_heads),
    ]
    for name in ("in_proj.weight", "in_proj.bias"):
        if prefix + name in weights:
            weights[prefix + name] = _pad_segments(weights[prefix + name], rows)
    for name in ("conv1d.weight", "conv1d.bias"):
        if prefix + name in weights:
            weights[prefix + name] = _pad_segments(weights[prefix + name], rows[1:4])
    for name in ("dt_bias", "A_log", "D"):
        weights[prefix + name] = _pad_segments(weights[prefix + name], [(m.n_heads, p.extra_heads)])
    weights[prefix + "norm.weight"] = _pad_segments(
        weights[prefix + "norm.weight"], [(inner, extra_inner)], 1.0
    )
    out = weights[prefix + "out_proj.weight"]
    weights[prefix + "out_proj.weight"] = torch.cat([out, out.new_zeros(out.shape[0], extra_inner)], dim=1)


def _pad_segments(tensor: torch.Tensor, segments: list[tuple[int, int]], fill: float = 0.0) -> torch.Tensor:
    """Split dim 0 into segments of the given sizes and append `extra` rows of `fill` after each."""
    parts = []
    for part, (_, extra) in zip(tensor.split([size for size, _ in segments]), segments):
        parts += [part, part.new_full((extra, *part.shape[1:]), fill)]
    return torch.cat(parts)


def pad_state(spec: StudentSpec, d_state: int) -> StudentSpec:
    """The student with every mixer's d_state zero-padded to `d_state` (at least the current one)."""
    m = spec.mixer
    extra = d_state - m.d_state
    if extra <= 0:
        return spec
    inner, groups = m.n_heads * m.head_dim, m.n_groups
    weights = dict(spec.weights)
    for key in list(weights):
        match = _MIXER_KEY.match(key)
        if not match:
            continue
        prefix = match.group(1)
        for name, offset in (
            ("in_proj.weight", inner),
            ("in_proj.bias", inner),
            ("conv1d.weight", 0),
            ("conv1d.bias", 0),
        ):
            if prefix + name in weights:
                weights[prefix + name] = _pad_state_rows(
                    weights[prefix + name], offset + inner, groups, m.d_state, extra
                )
    return dataclasses.replace(spec, mixer=dataclasses.replace(m, d_state=d_state), weights=weights)


def _pad_state_rows(tensor: torch.Tensor, start: int, groups: int, d_state: int, extra: int) -> torch.Tensor:
    """Rows `start ...` hold B then C, each `groups` blocks of `d_state` rows; append `extra` zero rows to each block."""
    head, rest = tensor[:start], tensor[start:]
    bc, tail = rest[: 2 * groups * d_state], rest[2 * groups * d_state :]
    blocks = []
    for block in bc.split(d_state):
        blocks += [block, block.new_zeros((extra, *block.shape[1:]))]
    return torch.cat([head, *blocks, tail])
