"""Gated DeltaNet: its three paths agree, transformers' delta rule agrees, seeding holds its identity,
and a student with it converts, distils, resumes and generates."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_distill_run import distill_in_two_cpu_processes
from test_distill_support import (
    char_tokenizer,
    convert_student,
    recipe_dict,
    stage,
    write_corpus,
    write_recipe,
    write_teacher,
)
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

import ssmify
from ssmify.cli import main
from ssmify.convert import mixer_layers
from ssmify.convert.adapters import get_adapter
from ssmify.convert.probes import teacher_attention
from ssmify.convert.seed import (
    BETA_GRID,
    DECAY_GRID,
    calibrate_mixer,
    head_rms,
    mixer_head_outputs,
    set_beta,
    teacher_head_outputs,
)
from ssmify.convert.student import MixerCacheLayer, register
from ssmify.distill.objectives.logits import LogitsObjective
from ssmify.distill.recipe import parse_recipe
from ssmify.distill.run import run_recipe
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
    params = list(mixer.parameters())
    g1 = torch.autograd.grad((from_matrix * probe).sum(), [u, *params])
    g2 = torch.autograd.grad((forward * probe).sum(), [u, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_step_by_step_and_prefill_then_steps_equal_forward():
    mixer = make_mixer().float()
    u = torch.randn(3, 29, D_MODEL)
    state = mixer.allocate_state(3)
    stepped = torch.stack([mixer.step(u[:, t], state) for t in range(29)], 1)
    # fp32, summed in another order by the chunked form: outputs reach ~8 and differ by ~1.2e-5 on some CPUs
    torch.testing.assert_close(stepped, mixer(u), atol=1e-4, rtol=1e-4)
    state = mixer.allocate_state(3)
    head = mixer(u[:, :11], state)
    tail = [mixer.step(u[:, t : t + 1], state) for t in range(11, 29)]
    torch.testing.assert_close(torch.cat([head, *tail], 1), mixer(u), atol=1e-4, rtol=1e-4)


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
        ({"n_kv_heads": 2}, "mixer_config.n_kv_heads"),
    ],
)
def test_bad_mixer_config_is_a_one_line_error_naming_the_field(options, field):
    sizes = {"d_model": D_MODEL, "n_heads": HEADS, "head_dim": HEAD_DIM, **options}
    with pytest.raises(SsmifyError) as err:
        GatedDeltaNetConfig(**sizes)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.gpu(kernels="fla")
def test_fla_kernels_match_pytorch_reference():
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


# --- seeding ------------------------------------------------------------------------------------


def teacher_qkv(teacher, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher layer's attention input and its per-head q, k, v before RoPE (after q/k norms), KV heads
    repeated: read off its own modules with hooks."""
    attn = teacher.model.layers[layer].self_attn
    seen: dict[str, torch.Tensor] = {}
    sources = {
        "u": attn,
        "q": getattr(attn, "q_norm", attn.q_proj),
        "k": getattr(attn, "k_norm", attn.k_proj),
    }
    sources["v"] = attn.v_proj
    handles = [
        attn.register_forward_pre_hook(lambda m, a, kw: seen.update(u=kw["hidden_states"]), with_kwargs=True)
    ]
    for name in "qkv":
        handles.append(
            sources[name].register_forward_hook(lambda m, a, out, name=name: seen.update({name: out}))
        )
    try:
        with torch.no_grad():
            teacher(ids)
    finally:
        for h in handles:
            h.remove()
    d = teacher.config.head_dim if getattr(teacher.config, "head_dim", None) else 16
    heads, kv = teacher.config.num_attention_heads, teacher.config.num_key_value_heads
    b, L = ids.shape
    out = {"u": seen["u"]}
    for name in "qkv":
        t = seen[name].reshape(b, L, -1, d)
        out[name] = t.repeat_interleave(heads // kv, 2) if t.shape[2] == kv else t
    return out


@pytest.mark.parametrize("family,overrides", [("llama", {"attention_bias": True}), ("qwen3", {})])
def test_seeded_gated_deltanet_with_unit_decay_and_vanishing_beta_is_the_teachers_linear_attention(
    family, overrides
):
    """The seeding identity. With the conv bypassed, decay 1 and beta -> 0, the core output over beta is
    sum_{s<=t} (q_t . k_s / sqrt(d)) v_s on the teacher's own l2-normalised q, k and its v; out_proj is W_O."""
    from ssmify.mixers.gated_deltanet import delta_chunked

    teacher = tiny_model(family, **overrides).double()
    student = ssmify.convert(teacher, keep_attention=0.0, mixer="gated_deltanet")
    layer = 1
    m = mixer_layers(student)[layer]
    ids = torch.randint(3, 120, (2, 19))
    seen = teacher_qkv(teacher, layer, ids)
    with torch.no_grad():
        q, k, v = m.split_qkv(m.qkv(seen["u"]))  # no conv
        beta = torch.full(q.shape[:3], 1e-7, dtype=q.dtype)
        core, _ = delta_chunked(q, k, v, torch.zeros_like(beta), beta, chunk_size=8)
    d = q.shape[-1]
    unit = lambda t: t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    scores = torch.einsum("bthd,bshd->bhts", unit(seen["q"]), unit(seen["k"])).tril() / math.sqrt(d)
    linear = torch.einsum("bhts,bshd->bthd", scores, seen["v"])
    torch.testing.assert_close(core / 1e-7, linear, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.v_proj(seen["u"]).unflatten(-1, (-1, d)), seen["v"])
    attn = teacher.model.layers[layer].self_attn
    assert torch.equal(m.out_proj.weight, attn.o_proj.weight)
    assert torch.equal(m.a_proj.weight, torch.zeros_like(m.a_proj.weight))  # decay independent of the input
    assert torch.equal(m.b_proj.weight, torch.zeros_like(m.b_proj.weight))  # beta too
    with torch.no_grad():
        x = torch.randn(2, 5, m.conv_dim, dtype=torch.float64)
        torch.testing.assert_close(m.conv(x), F.silu(x))  # the conv is the identity (then SiLU)
        torch.testing.assert_close(F.silu(m.g_proj(seen["u"])), torch.ones_like(m.g_proj(seen["u"])))


def test_calibration_picks_decay_then_beta_from_the_grids_and_matches_each_heads_output_scale():

    teacher = tiny_model("llama")
    student = ssmify.convert(teacher, keep_attention=0.0, mixer="gated_deltanet")
    adapter = get_adapter("llama")
    weights = adapter.read_attention(adapter.decoder_layers(teacher)[2].self_attn)
    m = mixer_layers(student)[2]
    ids = torch.randint(3, 120, (2, 64))
    with torch.no_grad():
        probe = teacher_attention(teacher, ids, [2])[2]
        target = teacher_head_outputs(weights, probe.inputs, probe.probs)
        chosen = calibrate_mixer(m, probe.inputs, target)
        out = mixer_head_outputs(m, probe.inputs)

        def cosines(outputs):
            a, b = outputs.unflatten(-1, (4, -1)), target.unflatten(-1, (4, -1))
            return (a * b).sum((0, 1, 3)) / (a.square().sum((0, 1, 3)) * b.square().sum((0, 1, 3))).sqrt()

        best = cosines(out)
        for beta in BETA_GRID:  # no beta on the grid points any head closer, at the chosen decay
            trial = copy.deepcopy(m)
            set_beta(trial, beta.expand(4))
            assert torch.all(cosines(mixer_head_outputs(trial, probe.inputs)) <= best + 1e-6)
        _, beta_now = m.gates(probe.inputs)
    torch.testing.assert_close(beta_now[0, 0], chosen["beta"].to(beta_now.dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(head_rms(out, 4), head_rms(target, 4), rtol=1e-4, atol=0)
    assert set(chosen["decay"].tolist()) <= set(DECAY_GRID.tolist())
    assert set(chosen["beta"].tolist()) <= set(BETA_GRID.tolist())


# --- a student with it ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_student_generates_the_same_with_and_without_cache_and_left_padded(keep):

    student = ssmify.convert(tiny_model("llama"), keep_attention=keep, mixer="gated_deltanet")
    ids = torch.randint(3, 120, (2, 11))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(ids, use_cache=True, **settings)
        uncached = student.generate(ids, use_cache=False, **settings)
        long, short = torch.randint(3, 120, (1, 12)), torch.randint(3, 120, (1, 7))
        batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
        mask = torch.ones_like(batch)
        mask[1, :5] = 0
        together = student.generate(batch, attention_mask=mask, **settings)
        alone = [student.generate(p, **settings)[0, p.shape[1] :] for p in (long, short)]
        cache = student(ids, use_cache=True).cache
    assert cached.shape == (2, 23) and torch.equal(cached, uncached)
    assert torch.equal(together[0, 12:], alone[0]) and torch.equal(together[1, 12:], alone[1])
    slots = [layer for layer in cache.layers if isinstance(layer, MixerCacheLayer)]
    assert len(slots) == round(4 * (1 - keep)) and slots[0].state.ssm.shape == (2, 4, 16, 16)


def test_saved_student_loads_with_its_settings_and_identical_logits(tmp_path):

    student = ssmify.convert(
        tiny_model("llama"),
        out=tmp_path / "s",
        keep_attention=0.5,
        mixer="gated_deltanet",
        mixer_options={"allow_neg_eigval": True, "d_conv": 3},
    )
    front = yaml.safe_load((tmp_path / "s" / "README.md").read_text().split("---")[1])
    assert "gated_deltanet" in front["tags"] and "mamba2" not in front["tags"]
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    mixer = next(iter(mixer_layers(loaded).values()))
    assert isinstance(mixer, GatedDeltaNet) and mixer.config.allow_neg_eigval and mixer.config.d_conv == 3
    ids = torch.randint(3, 120, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
    # seeding's betas are reached through 2 sigmoid(b) when negative eigenvalues are allowed
    _, beta = mixer.gates(torch.zeros(1, 1, 64))
    assert torch.all(beta < 1) and torch.all(beta > 0)


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--mixer", "gated_deltanet", "--mixer-option", "allow_neg_eigval=maybe"],
            "allow_neg_eigval: must be true or false",
        ),
        (
            ["--mixer", "gated_deltanet", "--mixer-option", "d_conv=0"],
            "d_conv: must be an integer from 1 to 16",
        ),
        (
            ["--mixer", "mamba2", "--mixer-option", "allow_neg_eigval=true"],
            "mamba2 has no option 'allow_neg_eigval'",
        ),
        (["--mixer", "gated_deltanet", "--mixer-option", "heads"], "'heads' is not KEY=VALUE"),
        (["--mixer", "gated_delta"], "'gated_delta' is not a mixer"),
    ],
)
def test_bad_mixer_options_are_one_line_errors_and_write_nothing(args, expected, tmp_path, capsys):

    teacher = write_teacher(tmp_path / "teacher")
    capsys.readouterr()
    code = main(["convert", str(teacher), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_tiny_student_distils_through_three_stages_resumes_generates_and_evaluates(
    tmp_path, monkeypatch, capsys, caplog
):
    write_teacher(tmp_path / "teacher")
    convert_student(tmp_path / "teacher", tmp_path / "student", mixer="gated_deltanet")
    write_corpus(tmp_path / "train.txt", 60, seed=0)
    write_corpus(tmp_path / "held.txt", 8, seed=1)
    stages = [stage("matrix", seq_len=16, tokens=256), stage("hidden", lr=1e-3), stage("logits", lr=1e-3)]

    calls = {"n": 0}
    forward = LogitsObjective.forward

    def interrupted(self, input_ids, targets):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:  # step 4's first micro batch, after the step-2 checkpoint
                raise RuntimeError("interrupted")
        return forward(self, input_ids, targets)

    monkeypatch.setattr(LogitsObjective, "forward", interrupted)
    recipe = parse_recipe(recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "a")))
    with pytest.raises(RuntimeError, match="interrupted"):
        run_recipe(recipe)
    monkeypatch.setattr(LogitsObjective, "forward", forward)
    assert (tmp_path / "a" / "2-hidden" / "summary.json").is_file()  # stages 1-2 finished before the stop
    assert not (tmp_path / "a" / "3-logits" / "summary.json").exists()
    caplog.set_level(logging.INFO, logger="ssmify.distill.loop")
    resumed = run_recipe(recipe, resume=True)
    assert any("resuming from" in r.getMessage() and "step-2" in r.getMessage() for r in caplog.records)
    run_recipe(parse_recipe(recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "b"))))
    assert [s["stage"] for s in resumed] == ["1-matrix", "2-hidden", "3-logits"]
    assert resumed[0]["loss_last"] < resumed[0]["loss_first"]  # the matrix stage fits materialize

    a, b = (load_file(str(tmp_path / run / "3-logits" / "model.safetensors")) for run in "ab")
    start = load_file(str(tmp_path / "student" / "model.safetensors"))
    key = "model.layers.0.self_attn.mixer.k_proj.weight"
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (a[key] - start[key]).abs().max() > 1e-4  # it trained

    register()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "3-logits")
    ids = torch.randint(3, 80, (1, 9))
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            student.generate(ids, **settings), student.generate(ids, use_cache=False, **settings)
        )

    out = tmp_path / "report"
    argv = ["eval", str(tmp_path / "a" / "3-logits"), "--teacher", str(tmp_path / "teacher")]
    argv += ["--data", str(tmp_path / "held.txt"), "--seq-len", "64", "--out", str(out)]
    argv += ["--tasks", "perplexity,agreement,alignment,retrieval,speed", "--lengths", "64", "--samples", "2"]
    argv += ["--speed-lengths", "16", "--decode-tokens", "2"]
    assert main(argv) == 0, capsys.readouterr().err

    report = json.loads((out / "report.json").read_text())
    assert [row["layer"] for row in report["alignment"]["layers"]] == [0, 2]
    assert {"induction", "passkey", "recall"} <= report.keys() and report["speed"]["points"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lora_on_the_gated_deltanet_projections_trains_and_merges(tmp_path):
    write_teacher(tmp_path / "teacher")
    convert_student(tmp_path / "teacher", tmp_path / "student", mixer="gated_deltanet")
    write_corpus(tmp_path / "train.txt", 60, seed=0)
    write_corpus(tmp_path / "held.txt", 8, seed=1)
    lora = {"lora": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}}
    stages = [stage("logits", lr=1e-2, tokens=256, trainable=lora)]
    run_recipe(parse_recipe(recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "run"))))
    start = load_file(str(tmp_path / "student" / "model.safetensors"))
    merged = load_file(str(tmp_path / "run" / "1-logits" / "model.safetensors"))
    assert merged.keys() == start.keys()  # adapters merged away
    key = "model.layers.0.self_attn.mixer.q_proj.weight"
    assert (merged[key] - start[key]).abs().max() > 1e-5
    gate = "model.layers.0.self_attn.mixer.g_proj.weight"
    assert torch.equal(merged[gate], start[gate])  # not a target


@pytest.mark.parametrize("choice", ["kl", "retrieval"])
def test_layer_choices_score_gated_deltanet_mixers(choice):
    teacher = tiny_model("llama")
    student = ssmify.convert(
        teacher, keep_attention=0.5, layer_choice=choice, mixer="gated_deltanet", tokenizer=char_tokenizer()
    )
    scores = student.convert_report["layer_scores"]
    assert len(student.config.ssmify["attention_layers"]) == 2 and len(mixer_layers(student)) == 2
    assert all(isinstance(m, GatedDeltaNet) for m in mixer_layers(student).values())
    assert scores and len(next(iter(scores.values()))) == 4  # one score per layer


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_cpu_processes_distil_a_gated_deltanet_student_as_one_does(tmp_path):
    """DDP: the matrix stage leaves v/g/out projections unused (materialize does not read them)."""
    write_teacher(tmp_path / "teacher")
    convert_student(tmp_path / "teacher", tmp_path / "student", mixer="gated_deltanet")
    write_corpus(tmp_path / "train.txt", 60, seed=0)
    write_corpus(tmp_path / "held.txt", 8, seed=1)
    stages = [stage("matrix", seq_len=16, tokens=256), stage("hidden", lr=1e-3, tokens=256)]
    path = write_recipe(
        tmp_path / "recipe.yaml", recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "two"))
    )
    distill_in_two_cpu_processes(path)
    run_recipe(parse_recipe(recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "one"))))
    for name in ("1-matrix", "2-hidden"):
        two, one = (load_file(str(tmp_path / run / name / "model.safetensors")) for run in ("two", "one"))
        assert max((two[k] - one[k]).abs().max().item() for k in two) <= 1e-5, name
