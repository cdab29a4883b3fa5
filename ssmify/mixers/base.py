"""What every SSD mixer shares: conv, the B/C split, the recurrent state, and the three paths.

A mixer subclass says how it projects its input (`project`), how it turns its raw time-step into a
per-head input scale and log-decay (`discretize`), how it gates and projects the SSM output
(`output`), and how it calls the mamba_ssm kernels. The scan itself is `ssd.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from ssmify.errors import SsmifyError
from ssmify.mixers.conv import causal_conv1d, causal_conv1d_step
from ssmify.mixers.kernels import kernels_for
from ssmify.mixers.ssd import ssd_chunked, ssd_matrix, ssd_update_
from ssmify.mixers.state import MixerState


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are scanned in fp32; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def bc_norms(kind: str, d_state: int, eps: float) -> tuple[nn.Module, nn.Module]:
    """The B and C norms: "rms" (as Qwen3's q/k norms) or "layer" (LayerNorm with bias, as Phi's)."""
    if kind == "rms":
        return nn.RMSNorm(d_state, eps=eps), nn.RMSNorm(d_state, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(d_state, eps=eps), nn.LayerNorm(d_state, eps=eps)
    raise ValueError(f"bc_norm must be 'rms', 'layer' or None, not {kind!r}")


def xb_sizes(config) -> tuple[int, int]:
    """(heads of x, groups of B) as projected: n_kv_heads of each in the kv-width layout, else n_heads
    and n_groups."""
    kv = config.n_kv_heads
    return (kv or config.n_heads, kv or config.n_groups)


def check_kv_heads(config) -> None:
    """n_heads a multiple of n_groups, and n_groups of n_kv_heads (each C group reads one B group)."""
    if config.n_heads % config.n_groups:
        raise ValueError(f"n_heads ({config.n_heads}) must be a multiple of n_groups ({config.n_groups})")
    kv = config.n_kv_heads
    if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or config.n_groups % kv):
        raise SsmifyError(
            f"mixer_config.n_kv_heads: must be null or a positive divisor of n_groups {config.n_groups}, "
            f"not {kv!r}"
        )


class SSDMixer(nn.Module):
    """Base class. Subclasses set `config` (with n_heads, head_dim, n_groups, n_kv_heads, d_state, d_conv,
    chunk_size, bc_norm, and `in_proj_segments()`), `inner`, `conv_dim`, `in_proj`, `conv1d`, `D`,
    `conv_activation`, and B_norm/C_norm when config.bc_norm."""

    config: object
    inner: int
    conv_dim: int
    conv1d: nn.Conv1d
    D: nn.Parameter
    conv_activation: Callable[[torch.Tensor], torch.Tensor]

    # --- subclass hooks -------------------------------------------------------------------------
    def project(self, u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """in_proj, split into the gate z (None without one), the conv input xBC, and the raw time-step
        (..., heads)."""
        raise NotImplementedError

    def discretize(self, raw: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Raw time-step -> (input scale or None, log-decay), both (..., heads), fp32."""
        raise NotImplementedError

    def output(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """SSM output (..., heads, head_dim) and gate (None for an ungated mixer) -> (..., d_model)."""
        raise NotImplementedError

    def kernel_scan(self, kernels: SimpleNamespace, x, raw, B, C, initial_state):
        """(y including D x, final_state) from mamba_ssm's chunked scan."""
        raise NotImplementedError

    def kernel_step(self, kernels: SimpleNamespace, state, x, raw, B, C):
        """y including D x from mamba_ssm's state update; updates `state` in place."""
        raise NotImplementedError

    # --- shared pieces --------------------------------------------------------------------------
    def in_proj_rows(self) -> dict[str, slice]:
        """Where each segment of `config.in_proj_segments()` lies in in_proj's output rows."""
        rows, start = {}, 0
        for name, size in self.config.in_proj_segments().items():
            rows[name] = slice(start, start + size)
            start += size
        return rows

    def split_xbc(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., conv_dim) -> x (..., heads, head_dim), B and C (..., groups, d_state).

        In the kv-width layout x and B come in fewer heads / groups and are repeated here, each to the
        heads / C groups that read it, as GQA's repeat_kv shares a key/value head among query heads.
        """
        c = self.config
        x_heads, b_groups = xb_sizes(c)
        x, B, C = xBC.split([x_heads * c.head_dim, b_groups * c.d_state, c.n_groups * c.d_state], dim=-1)
        x = x.unflatten(-1, (x_heads, c.head_dim))
        B = B.unflatten(-1, (b_groups, c.d_state))
        C = C.unflatten(-1, (c.n_groups, c.d_state))
        if c.bc_norm:
            B, C = self.B_norm(B), self.C_norm(C)
        if x_heads != c.n_heads:
            x = x.repeat_interleave(c.n_heads // x_heads, dim=-2)
        if b_groups != c.n_groups:
            B = B.repeat_interleave(c.n_groups // b_groups, dim=-2)
        return x, B, C

    def conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_activation(causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, conv_state))

    def scan(
        self,
        x: torch.Tensor,
        raw: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        initial: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The PyTorch SSD scan plus the D skip, in fp32 or wider. Returns (y, final_state)."""
        scale, log_a = self.discretize(raw)
        x = fp32_or_wider(x)
        xs = x if scale is None else x * scale[..., None]
        y, final = ssd_chunked(xs, log_a, fp32_or_wider(B), fp32_or_wider(C), self.config.chunk_size, initial)
        return y + x * self.D[:, None], final

    # --- the three paths ------------------------------------------------------------------------
    def forward(
        self, u: torch.Tensor, state: MixerState | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u (batch, length, d_model) -> (batch, length, d_model).

        With `state`, the sequence continues from it, and the state is updated in place (prefill).
        `mask` (batch, length), 1 for real tokens and 0 for padding, keeps padded positions out of the
        conv and the state, so a left-padded sequence ends in the same state as the unpadded one.
        """
        z, xBC, raw = self.project(u)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC = self.conv(xBC, state.conv if state is not None else None)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        x, B, C = self.split_xbc(xBC)
        initial = state.ssm if state is not None else None
        kernels = kernels_for(u)
        if kernels is not None:
            y, final = self.kernel_scan(kernels, x, raw, B, C, initial)
        else:
            y, final = self.scan(x, raw, B, C, initial)
        if state is not None:
            state.ssm.copy_(final.detach())
        return self.output(y.to(u.dtype), z)

    def step(self, u: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: u (batch, 1, d_model) or (batch, d_model). Updates `state` in place."""
        token = u if u.dim() == 2 else u[:, 0]
        z, xBC, raw = self.project(token)
        xBC = self.conv_activation(causal_conv1d_step(xBC, self.conv1d.weight, self.conv1d.bias, state.conv))
        x, B, C = self.split_xbc(xBC)
        kernels = kernels_for(u)
        if kernels is not None:
            y = self.kernel_step(kernels, state.ssm, x, raw, B, C)
        else:
            scale, log_a = self.discretize(raw)
            x = fp32_or_wider(x)
            xs = x if scale is None else x * scale[..., None]
            y = ssd_update_(state.ssm, xs, log_a, B, C) + x * self.D[:, None]
        out = self.output(y.to(u.dtype), z)
        return out if u.dim() == 2 else out[:, None]

    def materialize(self, u: torch.Tensor) -> torch.Tensor:
        """The per-head causal mixing matrix M (batch, heads, L, L), in fp32 or wider.

        The SSM core is y = M x + D x, with x the post-conv input from `split_xbc`.
        """
        _, xBC, raw = self.project(u)
        _, B, C = self.split_xbc(self.conv(xBC))
        scale, log_a = self.discretize(raw)
        M = ssd_matrix(log_a, fp32_or_wider(B), fp32_or_wider(C))
        return M if scale is None else M * scale.transpose(1, 2)[:, :, None, :]

    def allocate_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MixerState:
        """A zero state: the start of a sequence."""
        c = self.config
        weight = self.conv1d.weight
        return MixerState.zeros(
            batch_size,
            self.conv_dim,
            c.d_conv,
            c.n_heads,
            c.head_dim,
            c.d_state,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )
