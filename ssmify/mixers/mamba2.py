"""Mamba-2 mixer, with the parameter names and shapes of transformers' `Mamba2Mixer` (and mamba_ssm's).

u --in_proj--> [z | x B C | dt]
xBC --causal depthwise conv--> SiLU --> x, B, C            (optional per-group RMSNorm on B and C)
dt = softplus(dt + dt_bias),  A = -exp(A_log)
y = SSD(x * dt, log_a = dt * A, B, C) + D x
out = out_proj(RMSNorm_per_group(y * silu(z)))

Two lean variants (config fields, both off by default):
- `n_kv_heads`, the kv-width layout (MambaInLlama's d_xb): x is projected at n_kv_heads heads and B at
  n_kv_heads groups, and both are repeated to every head / C group after the conv, as GQA's repeat_kv shares
  keys and values. The conv is depthwise, so this equals the full layout with repeated rows and conv
  channels (which is how export writes it).
- `gate = "none"`: no z rows; out = out_proj(RMSNorm_per_group(y)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmify.errors import SsmifyError
from ssmify.mixers.base import SSDMixer, bc_norms, check_kv_heads, fp32_or_wider, xb_sizes

GATES = ("z", "none")


@dataclass
class Mamba2Config:
    """Sizes and initialisation ranges. `n_heads * head_dim` is the inner width."""

    d_model: int
    n_heads: int
    head_dim: int
    d_state: int = 64
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 64
    bias: bool = False  # in_proj and out_proj, as transformers' `use_bias`
    conv_bias: bool = True
    norm_eps: float = 1e-5
    bc_norm: str | None = None  # "rms" or "layer": a norm on each group of B and C (a teacher's k/q norms)
    bc_norm_eps: float = 1e-6
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] | None = None
    A_init_range: tuple[float, float] = (1.0, 16.0)
    n_kv_heads: int | None = None  # x, B at n_kv_heads heads / groups, repeated; None: full width
    gate: str = "z"  # "z": out = norm(y * silu(z)); "none": no z rows, out = norm(y)

    def __post_init__(self) -> None:
        check_kv_heads(self)
        if self.gate not in GATES:
            raise SsmifyError(f"mixer_config.gate: must be one of {', '.join(GATES)}, not {self.gate!r}")

    def in_proj_segments(self) -> dict[str, int]:
        """in_proj's output rows, in order: the gate z, the conv input x B C, the time-step dt."""
        x_heads, b_groups = xb_sizes(self)
        return {
            "z": self.n_heads * self.head_dim if self.gate == "z" else 0,
            "x": x_heads * self.head_dim,
            "B": b_groups * self.d_state,
            "C": self.n_groups * self.d_state,
            "dt": self.n_heads,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels, as transformers' MambaRMSNormGated;
    RMSNorm(y) when there is no gate (z None)."""

    def __init__(self, width: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        dtype = y.dtype
        y = fp32_or_wider(y)
        if z is not None:
            y = y * F.silu(fp32_or_wider(z))
        y = y.unflatten(-1, (-1, self.group_size))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.flatten(-2).to(dtype)


class Mamba2(SSDMixer):
    conv_activation = staticmethod(F.silu)

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = c = config
        self.inner = c.n_heads * c.head_dim
        segments = c.in_proj_segments()
        self.z_width = segments["z"]
        self.conv_dim = segments["x"] + segments["B"] + segments["C"]
        self.in_proj = nn.Linear(c.d_model, sum(segments.values()), bias=c.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            c.d_conv,
            groups=self.conv_dim,
            padding=c.d_conv - 1,
            bias=c.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.empty(c.n_heads))
        if c.bc_norm:
            self.B_norm, self.C_norm = bc_norms(c.bc_norm, c.d_state, c.bc_norm_eps)
        self.norm = GatedRMSNorm(self.inner, self.inner // c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(self.inner, c.d_model, bias=c.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The usual Mamba-2 init: dt log-uniform in [dt_min, dt_max], A uniform in A_init_range, D = 1."""
        c = self.config
        log_range = math.log(c.dt_max) - math.log(c.dt_min)
        dt = torch.exp(torch.rand(c.n_heads) * log_range + math.log(c.dt_min)).clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(c.n_heads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def project(self, u):
        z, xBC, raw = self.in_proj(u).split([self.z_width, self.conv_dim, self.config.n_heads], dim=-1)
        return (z if self.z_width else None), xBC, raw

    def discretize(self, raw):
        dt = F.softplus(fp32_or_wider(raw) + self.dt_bias)
        if self.config.dt_limit is not None:
            dt = dt.clamp(*self.config.dt_limit)
        return dt, dt * -torch.exp(self.A_log)

    def output(self, y, z):
        return self.out_proj(self.norm(y.flatten(-2), z))

    def kernel_scan(self, kernels, x, raw, B, C, initial_state):
        return kernels.chunk_scan(
            x,
            raw,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.config.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.config.dt_limit or (0.0, float("inf")),
            initial_states=initial_state,
            return_final_states=True,
        )

    def kernel_step(self, kernels, state, x, raw, B, C):
        c = self.config
        return kernels.state_update(
            state,
            x,
            raw[..., None].expand(-1, -1, c.head_dim),
            -torch.exp(self.A_log.float())[:, None, None].expand(-1, c.head_dim, c.d_state),
            B,
            C,
            D=self.D[:, None].expand(-1, c.head_dim),
            dt_bias=self.dt_bias[:, None].expand(-1, c.head_dim),
            dt_softplus=True,
        )
