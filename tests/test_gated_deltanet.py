"""Gated DeltaNet: its three paths agree, transformers' delta rule agrees, seeding holds its identity,
and a student with it converts, distils, resumes and generates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from ssmify.errors import SsmifyError
from ssmify.mixers import GatedDeltaNet, GatedDeltaNetConfig

D_MODEL, HEADS, HEAD_DIM = 24, 3, 5


def make_mixer(chunk_size: int = 8, seed: int = 0, **options) -> GatedDeltaNet:
    """A mixer in float64 with every parameter random (not its initial values), so that no term hides."""
    torch.manual_seed(seed)
    config = GatedDeltaNetConfig(
        d_model=D_MODEL, n_heads=HEADS, head_dim=HEAD_DIM, chunk_size=chunk_size, **options
    )
    mixer = GatedDeltaNet(config)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.5))
            elif name == "dt_bias":
                p.copy_(torch.randn_like(p) - 1)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return mixer.double()


def naive_forward(mixer: GatedDeltaNet, u: torch.Tensor) -> torch.Tensor:
    """The mixer written out token by token and head by head from its raw parameters, no ssmify code."""
    c = mixer.config
    b, L, _ = u.shape
    qkv = torch.cat([F.linear(u, p.weight, p.bias) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj)], -1)
    w = mixer.conv1d.weight[:, 0]
    padded = torch.cat([qkv.new_zeros(b, c.d_conv - 1, qkv.shape[-1]), qkv], 1)
    conv = F.silu(torch.stack([(padded[:, t : t + c.d_conv] * w.T).sum(1) for t in range(L)], 1))
    q, k, v = (t.reshape(b, L, c.n_heads, c.head_dim) for t in conv.split(c.n_heads * c.head_dim, -1))
    if c.qk_norm == "rms":
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps) * mixer.q_norm.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps) * mixer.k_norm.weight
    q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) / math.sqrt(c.head_dim)
    k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(F.linear(u, mixer.b_proj.weight, mixer.b_proj.bias))
    if c.allow_neg_eigval:
        beta = 2 * beta
    dt = F.softplus(F.linear(u, mixer.a_proj.weight) + mixer.dt_bias)
    decay = torch.exp(-torch.exp(mixer.A_log) * dt)
    eye = torch.eye(c.head_dim, dtype=u.dtype)
    outs = []
    for h in range(c.n_heads):
        S = u.new_zeros(b, c.head_dim, c.head_dim)
        per_t = []
        for t in range(L):
            kt, vt, bt = k[:, t, h], v[:, t, h], beta[:, t, h, None, None]
            transition = decay[:, t, h, None, None] * (eye - bt * kt[:, :, None] * kt[:, None, :])
            S = transition @ S + bt * kt[:, :, None] * vt[:, None, :]
            per_t.append(torch.einsum("bkv,bk->bv", S, q[:, t, h]))
        outs.append(torch.stack(per_t, 1))
    o = torch.stack(outs, 2)  # b L h d
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + c.norm_eps)
    gate = F.silu(F.linear(u, mixer.g_proj.weight, mixer.g_proj.bias))
    y = o.reshape(b, L, -1) * mixer.o_norm.weight * gate
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)


@pytest.mark.parametrize(
    "L,chunk_size,options",
    [
        (1, 8, {}),
        (7, 8, {"qk_norm": "rms"}),
        (29, 8, {"allow_neg_eigval": True, "bias": True}),
        (40, 64, {"d_conv": 2}),
    ],
)
def test_chunked_forward_and_gradients_equal_naive_recurrence(L, chunk_size, options):
    mixer = make_mixer(chunk_size, **options)
    u = torch.randn(2, L, D_MODEL, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    out = mixer(u)
    grads = torch.autograd.grad((out * probe).sum(), [u, *mixer.parameters()])
    reference = copy.deepcopy(mixer)
    u_ref = u.detach().clone().requires_grad_()
    ref = naive_forward(reference, u_ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [u_ref, *reference.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    names = ["input"] + [n for n, _ in mixer.named_parameters()]
    assert len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


def test_materialized_matrix_times_values_equals_forward_with_gradients():
    mixer = make_mixer(chunk_size=8, allow_neg_eigval=True)
    u = torch.randn(2, 37, D_MODEL, dtype=torch.float64, requires_grad=True)
    q, k, v = mixer.split_qkv(mixer.conv(mixer.qkv(u)))
    M = mixer.materialize(u)
    assert M.shape == (2, HEADS, 37, 37)
    assert torch.all(M.triu(1) == 0), "the mixing matrix must be causal"
    from_matrix = mixer.output(torch.einsum("bhts,bshd->bthd", M, v), u)
    forward = mixer(u)
    torch.testing.assert_close(from_matrix, forward, atol=1e-10, rtol=1e-10)
    probe = torch.randn_like(forward)
    params = [p for n, p in mixer.named_parameters() if not n.startswith("o_norm")]
    g1 = torch.autograd.grad((from_matrix * probe).sum(), [u, *params])
    g2 = torch.autograd.grad((forward * probe).sum(), [u, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_step_by_step_and_prefill_then_steps_equal_forward():
    mixer = make_mixer().float()
    u = torch.randn(3, 29, D_MODEL)
    state = mixer.allocate_state(3)
    stepped = torch.stack([mixer.step(u[:, t], state) for t in range(29)], 1)
    torch.testing.assert_close(stepped, mixer(u), atol=1e-5, rtol=1e-5)
    state = mixer.allocate_state(3)
    head = mixer(u[:, :11], state)
    tail = [mixer.step(u[:, t : t + 1], state) for t in range(11, 29)]
    torch.testing.assert_close(torch.cat([head, *tail], 1), mixer(u), atol=1e-5, rtol=1e-5)


def test_left_padding_masked_out_ends_in_the_unpadded_state():
    mixer = make_mixer().float()
    u = torch.randn(1, 13, D_MODEL)
    padded = torch.cat([torch.randn(1, 4, D_MODEL), u], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 13)], 1)
    plain, masked = mixer.allocate_state(1), mixer.allocate_state(1)
    out = mixer(u, plain)
    out_padded = mixer(padded, masked, mask=mask)
    torch.testing.assert_close(out_padded[:, 4:], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.ssm, plain.ssm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked.conv, plain.conv)


@pytest.mark.parametrize("L,chunk_size", [(37, 8), (64, 16)])
def test_transformers_gated_delta_rule_agrees_in_float64(L, chunk_size):
    """transformers' own delta rule (OLMo-Hybrid's chunked and recurrent paths) as the oracle, on our q, k,
    v, g and beta. It computes in float32 internally, hence 1e-5 rather than float64 rounding."""
    from ssmify.mixers.gated_deltanet import delta_chunked

    mixer = make_mixer(chunk_size, allow_neg_eigval=True)
    u = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = mixer.split_qkv(mixer.conv(mixer.qkv(u)))
        g, beta = mixer.gates(u)
        initial = torch.randn(2, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64) * 0.3
        ours, final = delta_chunked(q, k, v, g, beta, chunk_size, initial)
        # transformers scales q by 1/sqrt(d) itself: hand it our q without that factor
        oracle_q = q * math.sqrt(HEAD_DIM)
        for rule, extra in (
            (torch_chunk_gated_delta_rule, {"chunk_size": chunk_size}),
            (torch_recurrent_gated_delta_rule, {}),
        ):
            out, state = rule(
                oracle_q, k, v, g=g, beta=beta, initial_state=initial, output_final_state=True, **extra
            )
            torch.testing.assert_close(ours, out.double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(final, state.double(), atol=1e-5, rtol=1e-5)
    assert ours.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize(
    "options,field",
    [
        ({"head_dim": 0}, "mixer_config.head_dim"),
        ({"chunk_size": 2.5}, "mixer_config.chunk_size"),
        ({"qk_norm": "batch"}, "mixer_config.qk_norm"),
        ({"allow_neg_eigval": "yes"}, "mixer_config.allow_neg_eigval"),
        ({"norm_eps": 0.0}, "mixer_config.norm_eps"),
    ],
)
def test_bad_mixer_config_is_a_one_line_error_naming_the_field(options, field):
    sizes = {"d_model": D_MODEL, "n_heads": HEADS, "head_dim": HEAD_DIM, **options}
    with pytest.raises(SsmifyError) as err:
        GatedDeltaNetConfig(**sizes)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.gpu
def test_fla_kernels_match_pytorch_reference():
    pytest.importorskip("fla")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mixer = make_mixer(chunk_size=64).float()
    u = torch.randn(2, 200, D_MODEL)
    ref = mixer(u)
    state = mixer.allocate_state(2)
    ref_prefill = mixer(u[:, :150], state)
    ref_steps = torch.cat([mixer.step(u[:, t : t + 1], state) for t in range(150, 200)], 1)
    gpu, u = mixer.cuda(), u.cuda()
    state = gpu.allocate_state(2)
    torch.testing.assert_close(gpu(u).cpu(), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu(u[:, :150], state).cpu(), ref_prefill, atol=1e-3, rtol=1e-3)
    steps = torch.cat([gpu.step(u[:, t : t + 1], state) for t in range(150, 200)], 1)
    torch.testing.assert_close(steps.cpu(), ref_steps, atol=1e-3, rtol=1e-3)
