"""The SSD scan (Mamba-2's state-space dual), in pure PyTorch: the reference every mixer uses.

One head of an SSD layer keeps a state h (head_dim x d_state) and, at each step t,

    h_t = a_t * h_{t-1} + x_t B_t^T          (a_t = exp(log_a_t), a scalar decay per head)
    y_t = h_t C_t

Unrolled, that is a causal matrix mixer:

    y_t = sum_{s <= t} (C_t . B_s) * exp(log_a_{s+1} + ... + log_a_t) * x_s

The mixers fold their discretisation into the inputs before calling these functions: Mamba-2 passes
x * dt and log_a = dt * A; the discrete variant passes x and log_a = -softplus(a). The skip term D x
and the gating live in the mixers, not here.

Shapes: x (batch, length, heads, head_dim); log_a (batch, length, heads); B and C
(batch, length, groups, d_state), where each group of B/C is shared by heads // groups heads;
states (batch, heads, head_dim, d_state).

Three ways to compute the same thing:
- `ssd_chunked`: quadratic attention-like form inside chunks, the recurrence across chunks as one
  matrix product (O(L * chunk + (L / chunk)^2) per head and state entry).
- `ssd_step`: one token, the recurrence itself; `ssd_sequential` loops it (the naive reference);
  `ssd_update_` is the same step updating the state in place, for decoding.
- `ssd_matrix`: the L x L mixing matrix, for stage-1 distillation and tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """out[..., t, s] = log_a[s+1] + ... + log_a[t] for s <= t, and -inf above the diagonal.

    Summing masked copies (instead of subtracting two cumulative sums) keeps the exponent exact
    even when the cumulative sum is large, which matters for the decays close to one that seeding uses.
    """
    T = log_a.size(-1)
    x = log_a[..., None].expand(*log_a.shape, T)  # x[..., k, s] = log_a[k]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)  # keep k > s
    out = x.cumsum(dim=-2)  # out[..., t, s] = sum_{s < k <= t} log_a[k]
    lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def _split_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., heads, ...) -> (..., groups, heads // groups, ...) on the head dimension (dim 2)."""
    return t.unflatten(2, (groups, t.shape[2] // groups))


def ssd_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan. Returns (y, final_state); y has x's shape, final_state (b, h, p, n).

    Any length works: the tail is padded with log_a = 0 and x = 0, which leaves the state unchanged.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per B/C group
    pad = (-L) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c, l = (L + pad) // chunk_size, chunk_size

    # b c l g r p / b c l g r / b c l g n
    x = _split_heads(x, g).reshape(b, c, l, g, r, p)
    log_a = _split_heads(log_a, g).reshape(b, c, l, g, r)
    B = B.reshape(b, c, l, g, n)
    C = C.reshape(b, c, l, g, n)
    a_cum = log_a.cumsum(dim=2)  # decay from the chunk start, inclusive

    # 1. Inside each chunk: attention-like quadratic form with a decay mask.
    decay = torch.exp(segsum(log_a.permute(0, 1, 3, 4, 2)))  # b c g r l s
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # C_t . B_s, shared by the r heads of a group
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, x)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # b c l g r
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, x * to_end[..., None])

    # 3. The recurrence across chunks, h_k = exp(chunk log-decay_k) h_{k-1} + chunk_states_k, is itself
    # a (c+1)-step SSD with the initial state as step 0: unrolled, one matrix product gives the state
    # entering every chunk and the final state (no Python loop over chunks, forward or backward).
    state0 = (
        initial_state.reshape(b, 1, g, r, p, n).to(x.dtype)
        if initial_state is not None
        else x.new_zeros(b, 1, g, r, p, n)
    )
    states = torch.cat([state0, chunk_states], dim=1)  # b (c+1) g r p n
    chunk_log_decay = F.pad(a_cum[:, :, -1], (0, 0, 0, 0, 1, 0))  # b (c+1) g r; step 0 has none
    across = torch.exp(segsum(chunk_log_decay.permute(0, 2, 3, 1)))  # b g r (c+1) (c+1)
    after = torch.einsum("bgrkj,bjgrpn->bkgrpn", across, states)  # the state after each step
    entering, state = after[:, :-1], after[:, -1]  # b c g r p n; b g r p n

    # 4. The entering state's contribution to each position, decayed from the chunk start.
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, entering) * torch.exp(a_cum)[..., None]

    y = (y_diag + y_off).reshape(b, c * l, h, p)[:, :L]
    return y, state.reshape(b, h, p, n)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence. x (b, h, p), log_a (b, h), B and C (b, g, n), state (b, h, p, n).

    Returns (y (b, h, p), new_state).
    """
    h, g = x.shape[1], B.shape[1]
    B = B.repeat_interleave(h // g, dim=1)
    C = C.repeat_interleave(h // g, dim=1)
    state = torch.exp(log_a)[..., None, None] * state + x[..., :, None] * B[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def ssd_update_(
    state: torch.Tensor, x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """`ssd_step` for decoding: updates `state` in place and returns y (b, h, p).

    The same recurrence, written to touch the state as little as possible: one in-place scale, one
    in-place rank-1 add, one read for y; B and C are broadcast over the heads of their group, not copied.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    grouped = state.view(b, g, h // g, p, n)  # a view: writing to it writes the state
    grouped.mul_(torch.exp(log_a).view(b, g, h // g, 1, 1))
    grouped.addcmul_(x.view(b, g, h // g, p, 1), B.view(b, g, 1, 1, n).to(state.dtype))
    y = grouped @ C.view(b, g, 1, n, 1).to(state.dtype)  # b g r p 1
    return y.view(b, h, p)


def ssd_sequential(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive per-timestep recurrence: the reference that `ssd_chunked` is tested against."""
    b, L, h, p = x.shape
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(L):
        y, state = ssd_step(state, x[:, t], log_a[:, t], B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_matrix(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The causal mixing matrix M (b, h, L, L) with y_t = sum_s M[t, s] x_s. Memory is O(L^2)."""
    h, g = log_a.shape[2], B.shape[2]
    scores = torch.einsum("btgn,bsgn->bgts", C, B).repeat_interleave(h // g, dim=1)
    return scores * torch.exp(segsum(log_a.transpose(1, 2)))
