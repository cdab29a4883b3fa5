"""Exact expansion of kv-width mixers to the full layout that every export target has.

A kv-width mixer (`n_kv_heads`, see `mixers/mamba2.py`) projects x for n_kv_heads heads and B for
n_kv_heads groups, and repeats them after the conv to the n_heads heads and n_groups C groups. The targets
(Bamba, GraniteMoeHybrid, Falcon-H1) project x for every head and B for as many groups as C. The expanded
mixer repeats the in_proj rows of x and B instead, and their conv channels with their conv weights and
biases: the conv is depthwise (each channel its own filter), so repeating a channel before it equals
repeating its output after it, and the SiLU, the B norm and the scan that follow see the same numbers.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ssmify.export.spec import StudentSpec
from ssmify.mixers import Mamba2Config

_MIXER_KEY = re.compile(r"(model\.layers\.\d+\.self_attn\.mixer\.)in_proj\.weight$")


def expand_kv_width(spec: StudentSpec) -> StudentSpec:
    """The student with every kv-width mixer written in the full layout (the same function)."""
    m = spec.mixer
    if m.n_kv_heads is None:
        return spec
    weights = dict(spec.weights)
    for key in list(weights):
        match = _MIXER_KEY.match(key)
        if match:
            expand_mixer_weights(weights, match.group(1), m)
    return dataclasses.replace(spec, mixer=full_width(m), weights=weights)


def full_width(config: Mamba2Config) -> Mamba2Config:
    """The full-layout config of a (kv-width or full) mixer config."""
    return dataclasses.replace(config, n_kv_heads=None)


def expand_mixer_weights(weights: dict[str, torch.Tensor], prefix: str, config) -> None:
    """Expand the kv-width mixer weights under `prefix` in place: in_proj's x and B rows, and the x and B
    conv channels, each repeated to the heads / groups that read them (`config` is a Mamba2Config or a
    DiscreteMamba2Config, whose in_proj_segments say where the rows lie)."""
    kv = config.n_kv_heads
    if kv is None:
        return
    # segment -> (block size, repeats); the blocks are heads of x and groups of B
    repeats = {"x": (config.head_dim, config.n_heads // kv), "B": (config.d_state, config.n_groups // kv)}
    segments = config.in_proj_segments()
    for name, names in (("in_proj", list(segments)), ("conv1d", ["x", "B", "C"])):
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in weights:
                weights[key] = _repeat_segments(weights[key], [(n, segments[n]) for n in names], repeats)


def _repeat_segments(
    tensor: torch.Tensor, segments: list[tuple[str, int]], repeats: dict[str, tuple[int, int]]
) -> torch.Tensor:
    """Split dim 0 into the named segments; repeat each block of the segments in `repeats` in place."""
    parts = []
    for (name, _), part in zip(segments, tensor.split([size for _, size in segments])):
        if name in repeats:
            block, times = repeats[name]
            part = part.unflatten(0, (-1, block)).repeat_interleave(times, dim=0).flatten(0, 1)
        parts.append(part)
    return torch.cat(parts)
