"""Optional CUDA kernels, imported lazily so that CPU machines never import them: mamba_ssm's for the
SSD mixers, fla's (flash-linear-attention) for Gated DeltaNet.

The PyTorch code in `ssd.py` and `gated_deltanet.py` is the reference; these kernels are a faster way to
compute the same thing on a GPU, and the GPU tests check that they agree.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)


@functools.cache
def _load() -> SimpleNamespace | None:
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        log.info("mamba_ssm kernels unavailable (%s); using the PyTorch scan", err)
        return None
    return SimpleNamespace(chunk_scan=mamba_chunk_scan_combined, state_update=selective_state_update)


def kernels_for(t: torch.Tensor) -> SimpleNamespace | None:
    """The mamba_ssm kernels when `t` lives on a CUDA device and they import; otherwise None."""
    return _load() if t.is_cuda else None


@functools.cache
def _load_fla() -> SimpleNamespace | None:
    if not torch.cuda.is_available():
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError as err:
        log.info("fla kernels unavailable (%s); using the PyTorch delta rule", err)
        return None
    return SimpleNamespace(chunk=chunk_gated_delta_rule, recurrent=fused_recurrent_gated_delta_rule)


def gdn_kernels_for(t: torch.Tensor) -> SimpleNamespace | None:
    """fla's gated delta rule kernels when `t` lives on a CUDA device and they import; otherwise None."""
    return _load_fla() if t.is_cuda else None
