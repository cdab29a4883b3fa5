"""Discrete Mamba-2, the MOHAWK / Llamba variant (phi-mamba's `DiscreteMamba2` layout and names).

    u --in_proj--> [x B C | z | a]
    xBC --causal depthwise conv (no activation)--> x, B, C     (B, C per head group; optional RMSNorm)
    log_a = -softplus(a)          (A is fixed at -1; the input is not scaled by dt)
    y = SSD(x, log_a, B, C) + D x
    out = out_proj(y * silu(z + z_bias))                       (no norm)

`n_groups` is phi-mamba's `n_qk_heads` (heads of B and C); `n_heads` is its `n_v_heads`.
`n_kv_heads` is the kv-width layout, as in `mamba2.py`: x and B projected at n_kv_heads heads / groups and
repeated after the conv.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmify.mixers.base import SSDMixer, bc_norms, check_kv_heads, fp32_or_wider, xb_sizes


@dataclass
class DiscreteMamba2Config:
    d_model: int
    n_heads: int
    head_dim: int
    d_state: int = 64
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 64
    bias: bool = False  # in_proj and out_proj; without it, the gate has its own z_bias
    conv_bias: bool = True
    bc_norm: str | None = None  # "rms" or "layer": a norm on each group of B and C (a teacher's k/q norms)
    bc_norm_eps: float = 1e-6
    n_kv_heads: int | None = None  # x, B at n_kv_heads heads / groups, repeated; None: full width

    def __post_init__(self) -> None:
        check_kv_heads(self)

    def in_proj_segments(self) -> dict[str, int]:
        """in_proj's output rows, in order: the conv input x B C, the gate z, the decay a."""
        x_heads, b_groups = xb_sizes(self)
        return {
            "x": x_heads * self.head_dim,
            "B": b_groups * self.d_state,
            "C": self.n_groups * self.d_state,
            "z": self.n_heads * self.head_dim,
            "dt": self.n_heads,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class DiscreteMamba2(SSDMixer):
    conv_activation = staticmethod(nn.Identity())

    def __init__(self, config: DiscreteMamba2Config):
        super().__init__()
        self.config = c = config
        self.inner = c.n_heads * c.head_dim
        segments = c.in_proj_segments()
        self.conv_dim = segments["x"] + segments["B"] + segments["C"]
        self.in_proj = nn.Linear(c.d_model, sum(segments.values()), bias=c.bias)
        if not c.bias:
            self.z_bias = nn.Parameter(torch.zeros(self.inner))
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            c.d_conv,
            groups=self.conv_dim,
            padding=c.d_conv - 1,
            bias=c.conv_bias,
        )
        if c.bc_norm:
            self.B_norm, self.C_norm = bc_norms(c.bc_norm, c.d_state, c.bc_norm_eps)
        self.D = nn.Parameter(torch.ones(c.n_heads))
        self.out_proj = nn.Linear(self.inner, c.d_model, bias=c.bias)

    def project(self, u):
        xBC, z, a = self.in_proj(u).split([self.conv_dim, self.inner, self.config.n_heads], dim=-1)
        return z, xBC, a

    def discretize(self, raw):
        return None, -F.softplus(fp32_or_wider(raw))

    def output(self, y, z):
        z = z if self.config.bias else z + self.z_bias
        return self.out_proj(y.flatten(-2) * F.silu(z))

    def kernel_scan(self, kernels, x, raw, B, C, initial_state):
        # mamba_ssm scales x by dt = softplus(a); divide first so that the input is x itself.
        dt = F.softplus(raw.float())
        y, final = kernels.chunk_scan(
            x / dt[..., None].to(x.dtype),
            raw,
            -torch.ones(self.config.n_heads, device=x.device),
            B,
            C,
            self.config.chunk_size,
            dt_softplus=True,
            initial_states=initial_state,
            return_final_states=True,
        )
        return y + x * self.D[:, None], final

    def kernel_step(self, kernels, state, x, raw, B, C):
        c = self.config
        dt = F.softplus(raw.float())
        y = kernels.state_update(
            state,
            x / dt[..., None].to(x.dtype),
            raw[..., None].expand(-1, -1, c.head_dim),
            -torch.ones(c.n_heads, c.head_dim, c.d_state, device=x.device),
            B,
            C,
            dt_softplus=True,
        )
        return y + x * self.D[:, None]
