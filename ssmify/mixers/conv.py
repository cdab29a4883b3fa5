"""Causal depthwise conv1d over channels-last input, with a carried state (the last d_conv inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> torch.Tensor:
    """x (b, L, d), weight (d, 1, w) as in nn.Conv1d(groups=d). Returns (b, L, d).

    With `conv_state` (b, d, w), the inputs before x are read from it, and it is updated in place to
    hold the last w inputs; without it they are zeros.
    """
    w = weight.shape[-1]
    xt = x.transpose(1, 2)
    prefix = (
        conv_state[..., 1:].to(xt.dtype) if conv_state is not None else xt.new_zeros(*xt.shape[:2], w - 1)
    )
    full = torch.cat([prefix, xt], dim=-1)
    if conv_state is not None:
        conv_state.copy_(full[..., -w:].detach())
    y = F.conv1d(full, weight, bias, groups=weight.shape[0])
    return y.transpose(1, 2)


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One token: x (b, d). Shifts x into `conv_state` (b, d, w) in place and returns (b, d)."""
    window = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    y = (window * weight[:, 0, :]).sum(-1)
    return y + bias if bias is not None else y
