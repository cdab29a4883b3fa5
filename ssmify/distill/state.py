"""The accelerate process state, created the way every part of a distill run must see it."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def distributed_state() -> PartialState:
    """accelerate's process state; honours ACCELERATE_USE_CPU=true (several CPU processes over gloo).

    PartialState() alone ignores that variable, and the first call fixes the state for the process.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
