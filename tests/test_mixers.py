"""The mixers' three paths (chunked forward, step, materialize) against a naive recurrence and HF."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config as HFMamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from ssmify.mixers import DiscreteMamba2, DiscreteMamba2Config, Mamba2, Mamba2Config
from ssmify.mixers.ssd import ssd_step, ssd_update_

D_MODEL, HEADS, HEAD_DIM, D_STATE, GROUPS = 24, 4, 6, 5, 2
# The lean variants: "_kv" projects x for 2 heads (each repeated to 2 of the 4) and B for 2 groups,
# "_kv1" x and B for one head / group (repeated to 4 heads / 2 groups), "_ungated" has no z rows.
VARIANTS = {"": {}, "_kv": {"n_kv_heads": 2}, "_kv1": {"n_kv_heads": 1}, "_ungated": {"gate": "none"}}


def make_mixer(kind: str, chunk_size: int = 8, bias: bool = True, bc_norm: str | None = None, seed: int = 0):
    """A mixer with every parameter random (not its initial values), so that no term hides."""
    torch.manual_seed(seed)
    suffix = next((s for s in VARIANTS if s and kind.endswith(s)), "")
    base, lean = kind.removesuffix(suffix), VARIANTS[suffix]
    sizes = dict(
        d_model=D_MODEL,
        n_heads=HEADS,
        head_dim=HEAD_DIM,
        d_state=D_STATE,
        n_groups=GROUPS,
        chunk_size=chunk_size,
        **lean,
    )
    if base == "mamba2":
        mixer = Mamba2(Mamba2Config(**sizes, bias=bias, bc_norm=bc_norm))
    else:
        mixer = DiscreteMamba2(DiscreteMamba2Config(**sizes, bias=bias, bc_norm=bc_norm))
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return mixer.double()


def naive_forward(mixer, u: torch.Tensor) -> torch.Tensor:
    """The mixer written out token by token from its raw parameters, with no code shared with ssmify."""
    c = mixer.config
    mamba2 = isinstance(mixer, Mamba2)
    b, L, _ = u.shape
    proj = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias)
    inner = c.n_heads * c.head_dim
    kv = c.n_kv_heads or 0  # x and B at kv heads / groups, repeated to every head / C group
    x_width, b_width = (kv * c.head_dim, kv * c.d_state) if kv else (inner, c.n_groups * c.d_state)
    conv_dim = x_width + b_width + c.n_groups * c.d_state
    gated = not mamba2 or c.gate == "z"
    if mamba2:
        z, xbc, raw = proj.split([inner if gated else 0, conv_dim, c.n_heads], -1)
    else:
        xbc, z, raw = proj.split([conv_dim, inner, c.n_heads], -1)
    w, cb = mixer.conv1d.weight[:, 0], mixer.conv1d.bias
    k = w.shape[-1]
    padded = torch.cat([xbc.new_zeros(b, k - 1, conv_dim), xbc], 1)
    conv = torch.stack([(padded[:, t : t + k] * w.T).sum(1) + cb for t in range(L)], 1)
    if mamba2:
        conv = F.silu(conv)
    x, Bm, Cm = conv.split([x_width, b_width, c.n_groups * c.d_state], -1)
    if kv:  # x head k serves heads k*H/kv ..., B group k serves C groups k*G/kv ...
        x = torch.cat(
            [x[..., (h * kv // c.n_heads) * c.head_dim :][..., : c.head_dim] for h in range(c.n_heads)], -1
        )
        Bm = torch.cat(
            [Bm[..., (g * kv // c.n_groups) * c.d_state :][..., : c.d_state] for g in range(c.n_groups)], -1
        )
    x = x.reshape(b, L, c.n_heads, c.head_dim)
    Bm = Bm.reshape(b, L, c.n_groups, c.d_state)
    Cm = Cm.reshape(b, L, c.n_groups, c.d_state)
    if c.bc_norm == "rms":
        Bm = Bm * torch.rsqrt(Bm.pow(2).mean(-1, keepdim=True) + c.bc_norm_eps) * mixer.B_norm.weight
        Cm = Cm * torch.rsqrt(Cm.pow(2).mean(-1, keepdim=True) + c.bc_norm_eps) * mixer.C_norm.weight
    elif c.bc_norm == "layer":
        Bm = F.layer_norm(Bm, (c.d_state,), mixer.B_norm.weight, mixer.B_norm.bias, c.bc_norm_eps)
        Cm = F.layer_norm(Cm, (c.d_state,), mixer.C_norm.weight, mixer.C_norm.bias, c.bc_norm_eps)
    heads_per_group = c.n_heads // c.n_groups
    ys = []
    state = u.new_zeros(b, c.n_heads, c.head_dim, c.d_state)
    for t in range(L):
        new_state = []
        for h in range(c.n_heads):
            g = h // heads_per_group
            if mamba2:
                dt = F.softplus(raw[:, t, h] + mixer.dt_bias[h])
                decay, xin = torch.exp(-dt * torch.exp(mixer.A_log[h])), x[:, t, h] * dt[:, None]
            else:
                decay, xin = torch.exp(-F.softplus(raw[:, t, h])), x[:, t, h]
            new_state.append(decay[:, None, None] * state[:, h] + xin[:, :, None] * Bm[:, t, g][:, None, :])
        state = torch.stack(new_state, 1)
        y = torch.einsum("bhpn,bhn->bhp", state, Cm[:, t].repeat_interleave(heads_per_group, 1))
        ys.append(y + x[:, t] * mixer.D[:, None])
    y = torch.stack(ys, 1).reshape(b, L, inner)
    if mamba2:
        y = y * F.silu(z) if gated else y
        y = y.reshape(b, L, c.n_groups, -1)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + c.norm_eps)
        y = y.reshape(b, L, inner) * mixer.norm.weight
    else:
        y = y * F.silu(z + (0 if c.bias else mixer.z_bias))
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)


KINDS = ["mamba2", "discrete_mamba2", "mamba2_kv", "mamba2_ungated", "discrete_mamba2_kv1"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [8, 64])
@pytest.mark.parametrize("L", [1, 7, 64, 129])
def test_chunked_forward_and_gradients_equal_naive_recurrence(kind, chunk_size, L):
    bc_norm = {7: "rms", 64: "layer"}.get(L)
    mixer = make_mixer(kind, chunk_size, bias=(L % 2 == 1), bc_norm=bc_norm).float()
    u = torch.randn(2, L, D_MODEL, requires_grad=True)
    probe = torch.randn(2, L, D_MODEL)

    out = mixer(u)
    grads = torch.autograd.grad((out * probe).sum(), [u, *mixer.parameters()])
    # The reference runs in fp64, so the tolerance measures the fp32 chunked scan alone.
    reference = copy.deepcopy(mixer).double()
    u64 = u.detach().double().requires_grad_()
    ref = naive_forward(reference, u64)
    ref_grads = torch.autograd.grad((ref * probe.double()).sum(), [u64, *reference.parameters()])

    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    names = ["input"] + [n for n, _ in mixer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        # A gradient sums over batch x length terms: 1e-5 absolute, or relative to its scale when above 1.
        error = (g.double() - r).abs().max() / r.abs().max().clamp(min=1.0)
        assert error < 1e-5, f"gradient of {name}: relative error {error:.1e}"


@pytest.mark.parametrize("kind", KINDS)
def test_materialized_matrix_times_x_plus_skip_equals_forward(kind):
    mixer = make_mixer(kind, chunk_size=8)
    u = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    z, xbc, _ = mixer.project(u)
    x, _, _ = mixer.split_xbc(mixer.conv(xbc))

    M = mixer.materialize(u)
    assert M.shape == (2, HEADS, 37, 37)
    assert torch.all(M.triu(1) == 0), "the mixing matrix must be causal"
    y_core = torch.einsum("bhts,bshp->bthp", M, x) + x * mixer.D[:, None]

    torch.testing.assert_close(mixer.output(y_core, z), mixer(u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_step_by_step_equals_forward(kind):
    mixer = make_mixer(kind).float()
    u = torch.randn(3, 29, D_MODEL)
    state = mixer.allocate_state(3)
    stepped = torch.stack([mixer.step(u[:, t], state) for t in range(29)], 1)
    torch.testing.assert_close(stepped, mixer(u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_in_place_update_gives_the_reference_steps_output_and_state(groups):
    g = torch.Generator().manual_seed(groups)
    state = torch.randn(3, HEADS, HEAD_DIM, D_STATE, generator=g)
    x = torch.randn(3, HEADS, HEAD_DIM, generator=g)
    log_a = -torch.rand(3, HEADS, generator=g)
    B, C = torch.randn(2, 3, groups, D_STATE, generator=g)
    y, expected = ssd_step(state, x, log_a, B, C)
    updated = state.clone()
    torch.testing.assert_close(ssd_update_(updated, x, log_a, B, C), y)
    torch.testing.assert_close(updated, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefill", [1, 5, 17])
def test_prefill_then_steps_equals_forward_on_whole_sequence(kind, prefill):
    mixer = make_mixer(kind).float()
    u = torch.randn(2, 30, D_MODEL)
    state = mixer.allocate_state(2)
    head = mixer(u[:, :prefill], state)
    tail = [mixer.step(u[:, t : t + 1], state) for t in range(prefill, 30)]
    torch.testing.assert_close(torch.cat([head, *tail], 1), mixer(u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_two_prefills_continue_the_sequence(kind):
    mixer = make_mixer(kind).float()
    u = torch.randn(2, 40, D_MODEL)
    state = mixer.allocate_state(2)
    parts = torch.cat([mixer(u[:, :19], state), mixer(u[:, 19:], state)], 1)
    torch.testing.assert_close(parts, mixer(u), atol=1e-5, rtol=1e-5)


def hf_mixer_and_ours(bias: bool):
    hf_config = HFMamba2Config(
        hidden_size=D_MODEL,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        expand=HEADS * HEAD_DIM // D_MODEL,
        n_groups=GROUPS,
        state_size=D_STATE,
        conv_kernel=4,
        chunk_size=8,
        use_bias=bias,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    hf = Mamba2Mixer(hf_config, layer_idx=0).eval()
    ours = Mamba2(
        Mamba2Config(
            d_model=D_MODEL,
            n_heads=HEADS,
            head_dim=HEAD_DIM,
            d_state=D_STATE,
            n_groups=GROUPS,
            chunk_size=8,
            bias=bias,
        )
    )
    return hf, ours


@pytest.mark.parametrize("bias", [False, True])
def test_mamba2_parameters_match_transformers_mixer(bias):
    hf, ours = hf_mixer_and_ours(bias)
    hf_shapes = {name: tuple(p.shape) for name, p in hf.named_parameters()}
    our_shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    assert our_shapes == hf_shapes


@pytest.mark.parametrize("bias", [False, True])
def test_mamba2_output_matches_transformers_mixer_with_copied_weights(bias):
    hf, ours = hf_mixer_and_ours(bias)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours.load_state_dict(hf.state_dict())
    u = torch.randn(2, 45, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(ours(u), hf(u), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernels_match_pytorch_reference(kind):
    mixer = make_mixer(kind, chunk_size=64).float()
    u = torch.randn(2, 200, D_MODEL)
    ref = mixer(u)
    state = mixer.allocate_state(2)
    ref_prefill = mixer(u[:, :150], state)
    ref_steps = torch.cat([mixer.step(u[:, t : t + 1], state) for t in range(150, 200)], 1)

    gpu = mixer.cuda()
    u = u.cuda()
    state = gpu.allocate_state(2)
    torch.testing.assert_close(gpu(u).cpu(), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu(u[:, :150], state).cpu(), ref_prefill, atol=1e-3, rtol=1e-3)
    steps = torch.cat([gpu.step(u[:, t : t + 1], state) for t in range(150, 200)], 1)
    torch.testing.assert_close(steps.cpu(), ref_steps, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_gradients_match_pytorch_reference(kind):
    """The gradients through mamba_ssm's chunked scan (what training uses) equal the PyTorch scan's."""
    mixer = make_mixer(kind, chunk_size=64).float()
    u = torch.randn(2, 200, D_MODEL, requires_grad=True)
    weight = torch.randn(2, 200, D_MODEL)
    (mixer(u) * weight).sum().backward()
    ref = {"input": u.grad, **{name: p.grad for name, p in mixer.named_parameters()}}

    gpu = copy.deepcopy(mixer).cuda()
    gpu.zero_grad(set_to_none=True)
    u_gpu = u.detach().cuda().requires_grad_(True)
    (gpu(u_gpu) * weight.cuda()).sum().backward()
    got = {"input": u_gpu.grad, **{name: p.grad for name, p in gpu.named_parameters()}}
    assert got.keys() == ref.keys()
    for name, grad in ref.items():
        scale = grad.abs().max().item() + 1e-6
        torch.testing.assert_close(got[name].cpu() / scale, grad / scale, atol=2e-3, rtol=2e-3, msg=name)
