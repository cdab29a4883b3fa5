"""Gated DeltaNet (GDN) mixer: the delta rule with a per-head decay, in the layout of transformers'
`OlmoHybridGatedDeltaNet` (separate q/k/v/a/b/g projections, one causal conv over q, k and v).

Per head, with a state S (d_k x d_v):

    q, k, v = SiLU(causal depthwise conv(q_proj u, k_proj u, v_proj u))
    q <- l2norm(q) / sqrt(d_k),  k <- l2norm(k)              (optional RMS/Layer norm before the l2norm)
    beta = sigmoid(b_proj u)  (x2 with allow_neg_eigval),  g = -exp(A_log) * softplus(a_proj u + dt_bias)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t
    out = out_proj(RMSNorm_per_head(o) * silu(g_proj u))

Where Mamba-2 only decays and adds, the delta rule writes the correction beta (v_t - S^T k_t) under
key k_t, so a key can be overwritten. That is what helps in-context lookup.

The mixing matrix (`materialize`). Write u_t for what step t really writes, S_t = exp(g_t) S_{t-1} + k_t u_t^T,
so u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t). Unrolling S (G_t the cumulative sum of g, D[t, s] =
exp(G_t - G_s) for s <= t, else 0):

    u_t = beta_t v_t - beta_t sum_{s<t} D[t, s] (k_t . k_s) u_s,   i.e.  T U = diag(beta) V
    with T = I + strictly_lower(diag(beta) (K K^T * D)), unit lower triangular (the UT transform);
    o_t = sum_{s<=t} D[t, s] (q_t . k_s) u_s,                       i.e.  O = (Q K^T * D) U.

So O = M V with M = (Q K^T * D) T^{-1} diag(beta): for fixed q, k, beta and g the output is linear in v,
and M is the L x L mixing matrix per head. With keys pairwise orthogonal, T = I and M is the decayed
linear attention (Q K^T * D) diag(beta); as beta -> 0, M / beta -> Q K^T * D.

`forward` applies the same algebra in chunks, carrying S across them; `step` is the recurrence itself.

`n_kv_heads` is the kv-width layout: k_proj and v_proj (and their conv channels) for n_kv_heads heads, each
repeated after the conv to the n_heads // n_kv_heads heads that read it, as GQA shares keys and values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmify.errors import SsmifyError
from ssmify.mixers.base import bc_norms, fp32_or_wider
from ssmify.mixers.conv import causal_conv1d, causal_conv1d_step
from ssmify.mixers.kernels import gdn_kernels_for
from ssmify.mixers.ssd import segsum
from ssmify.mixers.state import MixerState

L2_EPS = 1e-6  # as transformers' and fla's l2norm


@dataclass
class GatedDeltaNetConfig:
    """Sizes and initialisation ranges. Keys and values share `head_dim`; the state is head_dim x head_dim."""

    d_model: int
    n_heads: int
    head_dim: int
    d_conv: int = 4
    chunk_size: int = 64
    bias: bool = False  # q/k/v/out projections (b_proj and g_proj always have one: seeding sets them)
    norm_eps: float = 1e-5
    qk_norm: str | None = None  # "rms" or "layer": a teacher's q/k norms, applied before the l2norm
    qk_norm_eps: float = 1e-6
    allow_neg_eigval: bool = (
        False  # beta = 2 sigmoid(b) in (0, 2): the transition I - beta k k^T can flip sign
    )
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    n_kv_heads: int | None = None  # k and v at n_kv_heads heads, repeated after the conv; None: n_heads

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "head_dim", "d_conv", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SsmifyError(f"mixer_config.{name}: must be a positive integer, not {value!r}")
        kv = self.n_kv_heads
        if kv is not None and (
            not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.n_heads % kv
        ):
            raise SsmifyError(
                f"mixer_config.n_kv_heads: must be null or a positive divisor of n_heads {self.n_heads}, "
                f"not {kv!r}"
            )
        if self.qk_norm not in (None, "rms", "layer"):
            raise SsmifyError(f"mixer_config.qk_norm: must be 'rms', 'layer' or null, not {self.qk_norm!r}")
        if not isinstance(self.allow_neg_eigval, bool):
            raise SsmifyError(
                f"mixer_config.allow_neg_eigval: must be true or false, not {self.allow_neg_eigval!r}"
            )
        if not self.norm_eps > 0:
            raise SsmifyError(f"mixer_config.norm_eps: must be positive, not {self.norm_eps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dimension, as transformers' and fla's l2norm."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


class HeadRMSNormGated(nn.Module):
    """RMSNorm over each head's channels, then times silu(gate): OLMo-Hybrid's norm, one gain per channel."""

    def __init__(self, width: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.head_dim = head_dim
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o (..., heads, head_dim) and gate (..., heads * head_dim) -> (..., heads * head_dim)."""
        dtype = gate.dtype
        o = fp32_or_wider(o)
        o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (self.weight * o * F.silu(fp32_or_wider(gate))).to(dtype)


def delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunks. q, k (b, L, h, d_k), v (b, L, h, d_v), g and beta (b, L, h).

    Returns (o (b, L, h, d_v), final state (b, h, d_k, d_v)). Inside a chunk (G the cumulative decay from
    the chunk start, S the entering state), from the module docstring's algebra:
        U = T^{-1} diag(beta) (V - (exp(G) K) S)     the writes, correcting what S already stores
        O = (exp(G) Q) S + (Q K^T * D) U
        S <- exp(G_last) S + (exp(G_last - G) K)^T U
    Padding the tail with k = v = 0 and g = 0 leaves the state unchanged.
    """
    b, L, h, dk = q.shape
    dv = v.shape[-1]
    pad = (-L) % chunk_size
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n, c = (L + pad) // chunk_size, chunk_size
    # b h n c d: heads first, then chunks
    q, k, v = (t.reshape(b, n, c, h, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    g, beta = (t.reshape(b, n, c, h).permute(0, 3, 1, 2) for t in (g, beta))

    G = g.cumsum(-1)  # b h n c
    D = torch.exp(segsum(g))  # b h n c c: exp(G_t - G_s) for s <= t, 0 above
    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    T = torch.eye(c, dtype=q.dtype, device=q.device) + (
        beta[..., None] * (k @ k.transpose(-1, -2)) * D
    ).masked_fill(~strictly_lower, 0.0)
    # Everything that does not depend on the entering state is solved for all chunks at once.
    writes = torch.linalg.solve_triangular(T, beta[..., None] * v, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(
        T, beta[..., None] * k * G.exp()[..., None], upper=False, unitriangular=True
    )
    scores = (q @ k.transpose(-1, -2)) * D
    q_in = q * G.exp()[..., None]
    k_out = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]  # b h n 1 1

    state = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(b, h, dk, dv)
    outputs = []
    # unbind, not indexing: indexing's backward writes a full-size zero tensor per chunk
    per_chunk = (t.unbind(2) for t in (writes, reads, q_in, scores, k_out.transpose(-1, -2), chunk_decay))
    for w, r, qi, s, ko, decay in zip(*per_chunk):
        U = w - r @ state
        outputs.append(qi @ state + s @ U)
        state = decay * state + ko @ U
    o = torch.stack(outputs, 2)  # b h n c dv
    return o.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :L], state


def delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (b, h, d_k), v (b, h, d_v), g and beta (b, h), state (b, h, d_k, d_v).

    Returns (o (b, h, d_v), new state): S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q.
    """
    state = torch.exp(g)[..., None, None] * state
    write = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * write[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q), state


def delta_matrix(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """M (b, h, L, L) with o = M v from a zero state: M = (Q K^T * D) T^{-1} diag(beta)."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # b h L d
    g, beta = g.transpose(1, 2), beta.transpose(1, 2)  # b h L
    L = q.shape[2]
    D = torch.exp(segsum(g))
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    T = torch.eye(L, dtype=q.dtype, device=q.device) + (
        beta[..., None] * (k @ k.transpose(-1, -2)) * D
    ).masked_fill(~strictly_lower, 0.0)
    inverse_times_beta = torch.linalg.solve_triangular(
        T, torch.diag_embed(beta), upper=False, unitriangular=True
    )
    return ((q @ k.transpose(-1, -2)) * D) @ inverse_times_beta


class GatedDeltaNet(nn.Module):
    """The GDN mixer: `forward` (chunked), `step` (one token) and `materialize` (the mixing matrix)."""

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__()
        self.config = c = config
        self.inner = c.n_heads * c.head_dim
        self.kv_heads = c.n_kv_heads or c.n_heads
        self.kv_inner = self.kv_heads * c.head_dim
        self.conv_dim = self.inner + 2 * self.kv_inner
        self.q_proj = nn.Linear(c.d_model, self.inner, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, self.kv_inner, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, self.kv_inner, bias=c.bias)
        self.a_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.b_proj = nn.Linear(c.d_model, c.n_heads, bias=True)
        self.g_proj = nn.Linear(c.d_model, self.inner, bias=True)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, padding=c.d_conv - 1, bias=False
        )
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        if c.qk_norm:
            self.k_norm, self.q_norm = bc_norms(c.qk_norm, c.head_dim, c.qk_norm_eps)
        self.o_norm = HeadRMSNormGated(self.inner, c.head_dim, c.norm_eps)
        self.out_proj = nn.Linear(self.inner, c.d_model, bias=c.bias)
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """The usual init (as OLMo-Hybrid's): dt log-uniform in [dt_min, dt_max], A uniform in A_init_range."""
        c = self.config
        log_range = math.log(c.dt_max) - math.log(c.dt_min)
        dt = torch.exp(torch.rand(c.n_heads) * log_range + math.log(c.dt_min)).clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(c.n_heads).uniform_(*c.A_init_range)))

    # --- pieces ---------------------------------------------------------------------------------
    def qkv(self, u: torch.Tensor) -> torch.Tensor:
        """The conv input: q, k and v projections side by side, (..., conv_dim)."""
        return torch.cat([self.q_proj(u), self.k_proj(u), self.v_proj(u)], dim=-1)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-conv (..., conv_dim) -> q (scaled by 1/sqrt(d)), k (both l2-normalised) and v, (..., heads, d);
        in the kv-width layout k and v are repeated to every head here."""
        c = self.config
        q, k, v = fp32_or_wider(qkv).split([self.inner, self.kv_inner, self.kv_inner], -1)
        q = q.unflatten(-1, (c.n_heads, c.head_dim))
        k, v = (t.unflatten(-1, (self.kv_heads, c.head_dim)) for t in (k, v))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_heads != c.n_heads:
            k, v = (t.repeat_interleave(c.n_heads // self.kv_heads, dim=-2) for t in (k, v))
        return l2norm(q) / math.sqrt(c.head_dim), l2norm(k), v

    def gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-decay g, write strength beta), both (..., heads), fp32 or wider."""
        a, b = fp32_or_wider(self.a_proj(u)), fp32_or_wider(self.b_proj(u))
        g = -torch.exp(self.A_log) * F.softplus(a + self.dt_bias)
        beta = torch.sigmoid(b) * (2.0 if self.config.allow_neg_eigval else 1.0)
        return g, beta

    def conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        return F.silu(causal_conv1d(qkv, self.conv1d.weight, None, conv_state))

    def output(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Core output (..., heads, d) -> (..., d_model): per-head gated RMSNorm, then out_proj."""
        return self.out_proj(self.o_norm(o, self.g_proj(u)))

    # --- the three paths ------------------------------------------------------------------------
    def forward(
        self, u: torch.Tensor, state: MixerState | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u (batch, length, d_model) -> (batch, length, d_model).

        With `state`, the sequence continues from it and the state is updated in place (prefill).
        `mask` (batch, length), 1 for real tokens and 0 for padding: padded positions write nothing and do
        not decay the state, so a left-padded sequence ends in the same state as the unpadded one.
        """
        qkv = self.qkv(u)
        g, beta = self.gates(u)
        if mask is not None:
            qkv = qkv * mask[..., None].to(qkv.dtype)
        qkv = self.conv(qkv, state.conv if state is not None else None)
        if mask is not None:
            qkv = qkv * mask[..., None].to(qkv.dtype)
            g = g * mask[..., None].to(g.dtype)
        q, k, v = self.split_qkv(qkv)
        initial = state.ssm if state is not None else None
        kernels = gdn_kernels_for(u)
        if kernels is not None:
            # fla takes q, k, v and beta in the model's dtype (some versions refuse fp32), g and the state in fp32
            args = {
                name: t.to(u.dtype).contiguous() for name, t in zip(("q", "k", "v", "beta"), (q, k, v, beta))
            }
            o, final = kernels.chunk(
                **args, g=g.float(), scale=1.0, initial_state=initial, output_final_state=True
            )
        else:
            o, final = delta_chunked(q, k, v, g, beta, self.config.chunk_size, initial)
        if state is not None:
            state.ssm.copy_(final.detach())
        return self.output(o.to(u.dtype), u)

    def step(self, u: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: u (batch, 1, d_model) or (batch, d_model). Updates `state` in place."""
        token = u if u.dim() == 2 else u[:, 0]
        qkv = F.silu(causal_conv1d_step(self.qkv(token), self.conv1d.weight, None, state.conv))
        q, k, v = self.split_qkv(qkv)
        g, beta = self.gates(token)
        kernels = gdn_kernels_for(u)
        if kernels is not None:
            args = {
                name: t[:, None].to(u.dtype).contiguous()
                for name, t in zip(("q", "k", "v", "beta"), (q, k, v, beta))
            }
            o, new = kernels.recurrent(
                **args, g=g[:, None].float(), scale=1.0, initial_state=state.ssm, output_final_state=True
            )
            o = o[:, 0]
        else:
            o, new = delta_step(state.ssm, q, k, v, g, beta)
        state.ssm.copy_(new)
        out = self.output(o.to(u.dtype), token)
        return out if u.dim() == 2 else out[:, None]

    def materialize(self, u: torch.Tensor) -> torch.Tensor:
        """The per-head causal mixing matrix M (batch, heads, L, L), fp32 or wider: the core output is
        o = M v, with v the post-conv values from `split_qkv` (see the module docstring)."""
        q, k, _ = self.split_qkv(self.conv(self.qkv(u)))
        g, beta = self.gates(u)
        return delta_matrix(q, k, g, beta)

    def allocate_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MixerState:
        """A zero state: the start of a sequence. Its `ssm` is the delta-rule state S (b, h, d_k, d_v)."""
        c = self.config
        weight = self.conv1d.weight
        return MixerState.zeros(
            batch_size,
            self.conv_dim,
            c.d_conv,
            c.n_heads,
            c.head_dim,
            c.head_dim,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )
