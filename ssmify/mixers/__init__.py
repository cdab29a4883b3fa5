"""Sequence mixers that replace attention: one file each, the SSD scan math shared in `ssd.py`.

Every mixer takes `(u, state=None, mask=None)`, and has `step`, `materialize` and `allocate_state`.
"""

from torch import nn

from ssmify.mixers.base import SSDMixer
from ssmify.mixers.discrete_mamba2 import DiscreteMamba2, DiscreteMamba2Config
from ssmify.mixers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from ssmify.mixers.mamba2 import Mamba2, Mamba2Config
from ssmify.mixers.state import MixerState

MIXERS: dict[str, tuple[type[nn.Module], type]] = {
    "mamba2": (Mamba2, Mamba2Config),
    "discrete_mamba2": (DiscreteMamba2, DiscreteMamba2Config),
    "gated_deltanet": (GatedDeltaNet, GatedDeltaNetConfig),
}


def build_mixer(name: str, settings: dict) -> nn.Module:
    """A mixer from its registry name and its config as a dict (as stored in a student's config.json)."""
    mixer_cls, config_cls = MIXERS[name]
    return mixer_cls(config_cls(**settings))


__all__ = [
    "MIXERS",
    "DiscreteMamba2",
    "DiscreteMamba2Config",
    "GatedDeltaNet",
    "GatedDeltaNetConfig",
    "Mamba2",
    "Mamba2Config",
    "MixerState",
    "SSDMixer",
    "build_mixer",
]
