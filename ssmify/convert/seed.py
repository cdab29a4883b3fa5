"""Seeding a mixer from the teacher's attention, and calibrating its output scale.

Per head: C <- W_Q, B <- W_K, x <- W_V (key/value heads repeated under GQA), out_proj <- W_O,
with d_state = head_dim and one B/C group per head. With decay 1 and the conv and gate out of the
way, the mixer is then causal linear attention with the teacher's projections:
y_t = sum_{s<=t} (q_t . k_s) v_s. The teacher's q/k norms (Qwen3, Phi) become the B/C norms.
In the kv-width layout (`width="kv"`) x and B keep the teacher's key/value heads, unrepeated: the mixer
repeats them itself, so it computes exactly what the full-width seeded mixer does, with fewer weights.

What attention lacks starts as a no-op or at the usual values: conv1d is the identity (last tap 1),
the gate passes through (z weights 0, z bias with silu(bias) = 1), dt does not depend on the input
(dt weights 0) and its bias, A and D get the usual Mamba-2 initialisation.

The gate has three forms (`GATES`): "z" as above; "none", no gate at all (out = out_proj(norm(y)));
"mean", a gate without bias, for engines whose Mamba-2 has no in_proj bias (llama.cpp): every z row is
alpha * r, r the unit mean direction of the layer's calibration inputs (`seed_mean_gate`). Then
silu(z) = silu(alpha r.u) is one positive number per token wherever r.u > 0, which the per-head RMSNorm
divides out again (up to its eps): the mixer computes what the "z" form does on those tokens.

Linear attention has no softmax denominator, so its output scale is far from the teacher's.
`calibrate_mixer` fits, on calibration text, each head's decay (from a grid) and its output scale to the
teacher head it came from: the scale goes into the gated-norm gain for mamba2 and into the constant
gate silu(z bias) for discrete_mamba2 (which has no norm). out_proj stays W_O in both.

gated_deltanet is seeded the same way: q_proj <- W_Q, k_proj <- W_K, v_proj <- W_V (repeated under
GQA unless kv-width), out_proj <- W_O, the teacher's q/k norms as its q/k norms, the conv the identity, the gate
pass-through (g_proj weights 0, silu(bias) = 1), decay and beta input-independent (a_proj and b_proj
weights 0). The identity that then holds, with the conv bypassed and decay 1: the delta rule's core
output is o = (Q K^T * causal) U with U = T^{-1} diag(beta) V (see `mixers/gated_deltanet.py`), with
Q, K the teacher's l2-normalised queries (over sqrt(d)) and keys and V its values; as beta -> 0,
o / beta is the teacher's causal linear attention sum_{s<=t} (q_t . k_s) v_s on those normalised q, k.
So a small beta makes every write, the first exactly, a linear-attention write; calibration first picks
each head's decay at BETA_SEED, then the beta on BETA_GRID that points its output the teacher head's way,
then the output scale (the gated-norm gain, as for mamba2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ssmify.convert.adapters import AttentionWeights
from ssmify.mixers import DiscreteMamba2, GatedDeltaNet, Mamba2, SSDMixer

SILU_ONE = 1.2784645427610738  # silu(SILU_ONE) == 1: a pass-through gate
WIDTHS = ("full", "kv")
GATES = ("z", "mean", "none")
# A mean gate's typical pre-activation alpha * r.u: silu(4) = 3.93, so the norm divides out a gate
# far from 0, and its eps weighs 1 / 3.93^2 of what it weighs with the pass-through gate.
MEAN_GATE_LEVEL = 4.0


def has_bias(weights: AttentionWeights) -> bool:
    """Whether the teacher's attention has any q/k/v/o bias (which in_proj / out_proj must then hold)."""
    return any(b is not None for b in (weights.q_bias, weights.k_bias, weights.v_bias, weights.o_bias))


def mixer_settings(
    mixer: str,
    weights: AttentionWeights,
    chunk_size: int = 64,
    norm_eps: float = 1e-5,
    width: str = "full",
    gate: str = "z",
) -> dict:
    """The mixer config that can hold one teacher attention layer exactly.

    width "kv" keeps x and B (gated_deltanet: k and v) at the teacher's key/value width; gate (mamba2
    only) "z" needs in_proj/out_proj biases, "mean" and "none" have them only if the teacher's attention
    has biases. Only settings that differ from the old defaults are added, so a default student's config
    is what it always was."""
    if mixer == "gated_deltanet":
        settings = {
            "d_model": weights.hidden_size,
            "n_heads": weights.num_heads,
            "head_dim": weights.head_dim,
            "chunk_size": chunk_size,
            "bias": True,
            "norm_eps": norm_eps,
            "qk_norm": weights.qk_norm,
            "qk_norm_eps": weights.qk_norm_eps if weights.qk_norm else 1e-6,
        }
        if width == "kv":
            settings["n_kv_heads"] = weights.num_kv_heads
        return settings
    settings = {
        "d_model": weights.hidden_size,
        "n_heads": weights.num_heads,
        "head_dim": weights.head_dim,
        "d_state": weights.head_dim,
        "n_groups": weights.num_heads,
        "chunk_size": chunk_size,
        "bias": True,
        "bc_norm": weights.qk_norm,
        "bc_norm_eps": weights.qk_norm_eps if weights.qk_norm else 1e-6,
    }
    if width == "kv":
        settings["n_kv_heads"] = weights.num_kv_heads
    if mixer == "mamba2":
        settings["norm_eps"] = norm_eps
        if gate != "z":
            settings["bias"] = has_bias(weights)
        if gate == "none":
            settings["gate"] = "none"
    return settings


def _per_head(
    weights: AttentionWeights, repeat_kv: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """q, k, v as (H*d, D) rows per query head, with key/value heads repeated under GQA; with
    `repeat_kv` False, k and v keep the teacher's (Hkv*d, D) rows."""
    H, d, D = weights.num_heads, weights.head_dim, weights.hidden_size
    kv_of_head = torch.arange(H) // (H // weights.num_kv_heads)

    def expand(w: torch.Tensor, b: torch.Tensor | None):
        if not repeat_kv:
            return w, b
        w = w.view(-1, d, D)[kv_of_head].reshape(H * d, D)
        return w, None if b is None else b.view(-1, d)[kv_of_head].reshape(H * d)

    return {
        "q": (weights.q_weight, weights.q_bias),
        "k": expand(weights.k_weight, weights.k_bias),
        "v": expand(weights.v_weight, weights.v_bias),
    }


@torch.no_grad()
def seed_mixer(mixer: SSDMixer | GatedDeltaNet, weights: AttentionWeights) -> None:
    """Write the teacher's attention projections into `mixer` (built with `mixer_settings`), in place."""
    if isinstance(mixer, GatedDeltaNet):
        seed_gated_deltanet(mixer, weights)
        return
    if not isinstance(mixer, (Mamba2, DiscreteMamba2)):
        raise TypeError(f"no seeding rule for {type(mixer).__name__}")
    heads = _per_head(weights, repeat_kv=mixer.config.n_kv_heads is None)
    sources = {"x": heads["v"], "B": heads["k"], "C": heads["q"]}
    rows = mixer.in_proj_rows()

    weight, bias = mixer.in_proj.weight, mixer.in_proj.bias
    if bias is None and has_bias(weights):
        raise ValueError("the teacher's attention has biases, and this mixer's in_proj has none")
    weight.zero_()
    if bias is not None:
        bias.zero_()
    for name, (w, b) in sources.items():
        weight[rows[name]] = w
        if b is not None:
            bias[rows[name]] = b
    if bias is not None:
        bias[rows["z"]] = SILU_ONE  # a mean gate (no bias) is seeded on calibration inputs: seed_mean_gate

    if isinstance(mixer, DiscreteMamba2):
        # decay exp(-softplus(a)) with softplus(a) log-uniform in [1e-3, 1e-1], as Mamba-2's dt range
        dt = torch.exp(torch.rand(mixer.config.n_heads) * math.log(100) + math.log(1e-3))
        bias[rows["dt"]] = dt + torch.log(-torch.expm1(-dt))

    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()

    if weights.qk_norm:
        _copy_qk_norms(weights, q_norm=mixer.C_norm, k_norm=mixer.B_norm)
    _copy_out_proj(mixer.out_proj, weights)


# Write strengths a seeded gated_deltanet head may take; BETA_SEED, the smallest, is nearly linear attention.
BETA_GRID = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
BETA_SEED = float(BETA_GRID[0])


@torch.no_grad()
def seed_gated_deltanet(mixer: GatedDeltaNet, weights: AttentionWeights) -> None:
    """q/k/v/out projections from attention, the rest a no-op or input-independent (module docstring)."""
    heads = _per_head(weights, repeat_kv=mixer.config.n_kv_heads is None)
    for proj, name in ((mixer.q_proj, "q"), (mixer.k_proj, "k"), (mixer.v_proj, "v")):
        w, b = heads[name]
        proj.weight.copy_(w)
        proj.bias.copy_(b if b is not None else torch.zeros_like(proj.bias))
    for proj in (mixer.a_proj, mixer.b_proj, mixer.g_proj):
        proj.weight.zero_()
    mixer.g_proj.bias.fill_(SILU_ONE)
    set_beta(mixer, torch.full((mixer.config.n_heads,), BETA_SEED))
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    if weights.qk_norm:
        _copy_qk_norms(weights, q_norm=mixer.q_norm, k_norm=mixer.k_norm)
    _copy_out_proj(mixer.out_proj, weights)


@torch.no_grad()
def set_beta(mixer: GatedDeltaNet, beta: torch.Tensor) -> None:
    """Give each head a constant write strength beta (b_proj's weights are 0 in a seeded mixer)."""
    p = beta.double() / (2.0 if mixer.config.allow_neg_eigval else 1.0)
    mixer.b_proj.bias.copy_(torch.log(p) - torch.log1p(-p))


def _copy_qk_norms(weights: AttentionWeights, q_norm: torch.nn.Module, k_norm: torch.nn.Module) -> None:
    for norm, w, b in (
        (k_norm, weights.k_norm_weight, weights.k_norm_bias),
        (q_norm, weights.q_norm_weight, weights.q_norm_bias),
    ):
        norm.weight.copy_(w)
        if b is not None:
            norm.bias.copy_(b)


def _copy_out_proj(out_proj: torch.nn.Linear, weights: AttentionWeights) -> None:
    out_proj.weight.copy_(weights.o_weight)
    if weights.o_bias is not None:
        out_proj.bias.copy_(weights.o_bias)
    elif out_proj.bias is not None:
        out_proj.bias.zero_()


@torch.no_grad()
def seed_mean_gate(mixer: Mamba2, inputs: torch.Tensor) -> dict[str, float]:
    """Seed a gate without bias from the layer's calibration `inputs` (..., d_model): every z row becomes
    alpha * r, r the unit mean input direction, alpha = MEAN_GATE_LEVEL / median(r.u) (the mean of r.u,
    which is |mean u| > 0, if the median is not positive). A z bias, if in_proj has one, is set to 0.

    Returns alpha, the median of r.u, and the fraction of calibration tokens with r.u <= 0, on which the
    gate is not positive and the seeded mixer is not the pass-through-gated one."""
    u = inputs.reshape(-1, inputs.shape[-1]).double()
    r = u.mean(0)
    r = r / r.norm()
    projection = u @ r
    median = projection.median()
    alpha = MEAN_GATE_LEVEL / (median if median > 0 else projection.mean())
    rows = mixer.in_proj_rows()["z"]
    mixer.in_proj.weight[rows] = (alpha * r).to(mixer.in_proj.weight.dtype)
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[rows] = 0.0
    return {
        "alpha": float(alpha),
        "median_projection": float(median),
        "nonpositive_fraction": float((projection <= 0).double().mean()),
    }


def head_rms(outputs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head RMS of (..., heads * head_dim) outputs, over everything but the head."""
    return _by_head(outputs, num_heads).pow(2).mean(-1).sqrt()


def _by_head(outputs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., heads * head_dim) -> (heads, everything else), fp32."""
    return outputs.float().unflatten(-1, (num_heads, -1)).transpose(0, -2).reshape(num_heads, -1)


def teacher_head_outputs(
    weights: AttentionWeights, inputs: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """Each teacher head's attention output before W_O, (B, L, H * d), from its probabilities and values."""
    v = _per_head(weights)["v"]
    values = F.linear(inputs, *v).unflatten(-1, (weights.num_heads, weights.head_dim))  # B L H d
    return torch.einsum("bhts,bshd->bthd", probs.to(values.dtype), values).flatten(-2)


def mixer_head_outputs(mixer: SSDMixer | GatedDeltaNet, inputs: torch.Tensor) -> torch.Tensor:
    """The mixer's per-head outputs before out_proj, (B, L, H * d)."""
    seen: list[torch.Tensor] = []
    handle = mixer.out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        mixer(inputs.to(mixer.out_proj.weight.dtype))
    finally:
        handle.remove()
    return seen[0]


# Per-step decays a = exp(log_a) a head may start with: from forgetting in a few tokens to barely at all.
DECAY_GRID = torch.tensor([0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9999])


@torch.no_grad()
def set_decay(mixer: SSDMixer | GatedDeltaNet, decay: torch.Tensor) -> None:
    """Give each head a constant per-step decay (a seeded mixer's dt does not depend on its input)."""
    rate = -torch.log(decay.double())  # -log a
    if isinstance(mixer, (Mamba2, GatedDeltaNet)):
        dt = rate / torch.exp(mixer.A_log.double())  # log a = -dt * exp(A_log)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    else:  # log a = -softplus(bias)
        rows = mixer.in_proj.bias[mixer.in_proj_rows()["dt"]]
        rows.copy_(rate + torch.log(-torch.expm1(-rate)))


@torch.no_grad()
def calibrate_mixer(
    mixer: SSDMixer | GatedDeltaNet, inputs: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Fit each seeded head to the teacher head it came from, on calibration `inputs`.

    `target` holds the teacher's per-head outputs (B, L, H * d) on those inputs. Per head, the decay
    is the one from DECAY_GRID whose output points most nearly the teacher's way (largest cosine),
    then the scale makes the output RMS equal the teacher's: the gated-norm gain for mamba2, the
    constant gate silu(z bias) for discrete_mamba2 (which has no norm). out_proj stays W_O.
    gated_deltanet picks its decay at BETA_SEED, then its beta from BETA_GRID the same way, and takes
    the scale in its gated-norm gain. Returns the chosen decays (and betas) and scale factors.
    """
    heads = mixer.config.n_heads
    teacher = _by_head(target, heads)

    def best(grid: torch.Tensor, apply: Callable[[torch.nn.Module, torch.Tensor], None]) -> torch.Tensor:
        cosines = []
        for value in grid:
            apply(mixer, value.expand(heads))
            ours = _by_head(mixer_head_outputs(mixer, inputs), heads)
            cosines.append(F.cosine_similarity(ours, teacher, dim=-1))
        chosen = grid[torch.stack(cosines).argmax(0)]
        apply(mixer, chosen)
        return chosen

    chosen = {"decay": best(DECAY_GRID, set_decay)}
    if isinstance(mixer, GatedDeltaNet):
        chosen["beta"] = best(BETA_GRID, set_beta)

    factors = head_rms(target, heads) / head_rms(mixer_head_outputs(mixer, inputs), heads).clamp(min=1e-12)
    per_channel = factors.repeat_interleave(mixer.config.head_dim)
    if isinstance(mixer, (Mamba2, GatedDeltaNet)):
        gain = mixer.norm.weight if isinstance(mixer, Mamba2) else mixer.o_norm.weight
        gain.mul_(per_channel.to(gain.dtype))
    else:
        z = mixer.in_proj.bias[mixer.in_proj_rows()["z"]]
        z.copy_(inverse_silu(F.silu(z.float()) * per_channel).to(z.dtype))
    return {**chosen, "scale": factors}


def inverse_silu(y: torch.Tensor) -> torch.Tensor:
    """The x >= 0 with silu(x) = y, for y >= 0 (bisection; silu is increasing there)."""
    lo, hi = torch.zeros_like(y), y.clamp(min=1.0) + 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        too_small = F.silu(mid) < y
        lo, hi = torch.where(too_small, mid, lo), torch.where(too_small, hi, mid)
    return (lo + hi) / 2
