"""Lean students: the kv-width layout and the gate forms (z, mean, none), from seeding to export.

The tiny llama teacher has 4 query heads sharing 2 key/value heads (head_dim 16), so a kv-width mixer
projects x for 2 heads and B for 2 groups, each repeated to 4.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from test_export_parity import EXACT, float64_difference
from test_export_support import perturb_mixers
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ssmify.cli import main
from ssmify.convert import convert, mixer_layers
from ssmify.convert.adapters import get_adapter
from ssmify.convert.probes import teacher_attention
from ssmify.convert.seed import mixer_settings, seed_mean_gate, seed_mixer, set_decay
from ssmify.convert.student import build_student
from ssmify.errors import SsmifyError
from ssmify.export import check_exportable, export
from ssmify.export.engine_rules import llamacpp_problems
from ssmify.export.expand import expand_mixer_weights
from ssmify.mixers import MIXERS, build_mixer

# (mixer, gate) pairs; every one of them in both widths.
FORMS = [
    ("mamba2", "z"),
    ("mamba2", "mean"),
    ("mamba2", "none"),
    ("discrete_mamba2", "z"),
    ("gated_deltanet", "z"),
]


def attention_of(teacher, layer: int = 1):
    adapter = get_adapter(teacher.config.model_type)
    return adapter.read_attention(getattr(adapter.decoder_layers(teacher)[layer], adapter.attention_attr))


def seeded(mixer: str, weights, width: str, gate: str, inputs: torch.Tensor, ssm_from=None):
    """A seeded mixer in float64 with decay 0.9, taking dt_bias/A_log/D (or the discrete decay) from
    `ssm_from` if given, so that two widths differ in their layout alone."""
    module = build_mixer(mixer, mixer_settings(mixer, weights, chunk_size=8, width=width, gate=gate)).double()
    torch.manual_seed(0)
    seed_mixer(module, weights)
    with torch.no_grad():
        if ssm_from is not None and mixer != "discrete_mamba2":
            for name in ("dt_bias", "A_log", "D")[: 3 if mixer == "mamba2" else 2]:
                getattr(module, name).copy_(getattr(ssm_from, name))
        if gate == "mean":
            seed_mean_gate(module, inputs)
        set_decay(module, torch.full((module.config.n_heads,), 0.9))
    return module


def expand_gated_deltanet_weights(weights: dict[str, torch.Tensor], config) -> None:
    """The full layout of a kv-width gated_deltanet, in place: k_proj/v_proj rows and their conv channels
    repeated per head (gated_deltanet has no export, so this lives here)."""
    d, kv, times = config.head_dim, config.n_kv_heads, config.n_heads // config.n_kv_heads

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (kv, d)).repeat_interleave(times, dim=0).flatten(0, 1)

    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        if name in weights:
            weights[name] = repeat(weights[name])
    if "conv1d.weight" in weights:
        q, k, v = weights["conv1d.weight"].split([config.n_heads * d, kv * d, kv * d])
        weights["conv1d.weight"] = torch.cat([q, repeat(k), repeat(v)])


def expand_weights(weights: dict[str, torch.Tensor], config) -> None:
    if isinstance(config, MIXERS["gated_deltanet"][1]):
        expand_gated_deltanet_weights(weights, config)
    else:
        expand_mixer_weights(weights, "", config)


def expand_conv_state(kv_mixer, conv_state: torch.Tensor) -> torch.Tensor:
    """A kv-width conv state in the full layout: its x and B channels repeated as export repeats them."""
    weights = {"conv1d.weight": conv_state.transpose(0, 1)}  # channels first, as the conv weight
    expand_weights(weights, kv_mixer.config)
    return weights["conv1d.weight"].transpose(0, 1)


def paths(mixer, u: torch.Tensor, prefill: int) -> dict[str, torch.Tensor]:
    """Forward, materialize, and prefill-then-step outputs and the final cache state."""
    state = mixer.allocate_state(u.shape[0], dtype=torch.float64)
    head = mixer(u[:, :prefill], state)
    tail = [mixer.step(u[:, t : t + 1], state) for t in range(prefill, u.shape[1])]
    return {
        "forward": mixer(u),
        "matrix": mixer.materialize(u),
        "cached": torch.cat([head, *tail], 1),
        "ssm": state.ssm,
        "conv": state.conv,
    }


@pytest.mark.parametrize("mixer,gate", FORMS, ids=[f"{m}-{g}" for m, g in FORMS])
@torch.no_grad()
def test_kv_width_seeded_mixer_equals_full_width_seeded_mixer_on_every_path(mixer, gate):
    teacher = tiny_model("llama", seed=2, attention_bias=True).double()
    weights = attention_of(teacher)
    inputs = torch.randn(2, 40, 64, dtype=torch.float64) + 0.5  # a mean direction for the mean gate
    full = seeded(mixer, weights, "full", gate, inputs)
    kv = seeded(mixer, weights, "kv", gate, inputs, ssm_from=full)
    assert kv.conv_dim == 2 * 16 + 2 * 16 + 4 * 16 and full.conv_dim == 3 * 4 * 16
    assert sum(p.numel() for p in kv.parameters()) < sum(p.numel() for p in full.parameters())

    u = torch.randn(2, 21, 64, dtype=torch.float64)
    ours, reference = paths(kv, u, prefill=13), paths(full, u, prefill=13)
    assert ours["forward"].abs().max() > 1e-3  # not a trivially zero mixer
    for name in ("forward", "matrix", "cached", "ssm"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-12, msg=name)
    assert ours["conv"].shape[1] == kv.conv_dim
    torch.testing.assert_close(expand_conv_state(kv, ours["conv"]), reference["conv"], rtol=0, atol=0)


@pytest.mark.parametrize("mixer,gate", FORMS, ids=[f"{m}-{g}" for m, g in FORMS])
@torch.no_grad()
def test_kv_width_mixer_with_random_weights_equals_its_full_layout_expansion(mixer, gate):
    """What export writes: x and B rows and conv channels repeated. Random weights, so nothing hides."""
    weights = attention_of(tiny_model("llama", seed=2))
    config = mixer_settings(mixer, weights, chunk_size=8, width="kv", gate="none" if gate == "none" else "z")
    torch.manual_seed(1)
    kv = build_mixer(mixer, config).double()
    for param in kv.parameters():
        param.add_(0.2 * torch.randn_like(param))
    state = {key: value.clone() for key, value in kv.state_dict().items()}
    expand_weights(state, kv.config)
    full = MIXERS[mixer][0](dataclasses.replace(kv.config, n_kv_heads=None)).double()
    full.load_state_dict(state, strict=True)

    u = torch.randn(2, 21, 64, dtype=torch.float64)
    ours, reference = paths(kv, u, prefill=9), paths(full, u, prefill=9)
    for name in ("forward", "matrix", "cached", "ssm"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(expand_conv_state(kv, ours["conv"]), reference["conv"], rtol=0, atol=0)


@torch.no_grad()
def test_mean_gated_mixer_is_the_z_gated_one_where_the_input_leans_the_mean_way():
    """Both norm y * gate per head. A gate s > 0 constant over the head gives y / sqrt(m + eps / s^2)
    where the pass-through gate gives y / sqrt(m + eps) (m = mean(y^2) over the head): a relative
    difference of at most eps |1 - 1/s^2| / (2 m). Where r.u < 0 the mean gate is negative, and the
    output flips sign."""
    teacher = tiny_model("llama", seed=2, initializer_range=0.15)
    weights = attention_of(teacher)
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    inputs = teacher_attention(teacher, ids, [1])[1].inputs.double()
    z_gated = seeded("mamba2", weights, "full", "z", inputs)
    mean_gated = seeded("mamba2", weights, "full", "mean", inputs, ssm_from=z_gated)

    def normed_and_raw(mixer):
        seen = {}

        def keep(name):
            def hook(module, args):
                seen[name] = args[0]

            return hook

        hooks = [
            mixer.norm.register_forward_pre_hook(keep("y")),
            mixer.out_proj.register_forward_pre_hook(keep("normed")),
        ]
        mixer(inputs)
        for hook in hooks:
            hook.remove()
        return seen["normed"].unflatten(-1, (4, 16)), seen["y"].unflatten(-1, (4, 16))

    expected, y = normed_and_raw(z_gated)
    actual, _ = normed_and_raw(mean_gated)
    r = inputs.reshape(-1, 64).mean(0)
    leaning = (inputs @ (r / r.norm())) > 0  # (2, 64)
    assert 0.5 < leaning.double().mean() < 1.0  # both kinds of token occur
    gate = F.silu(mean_gated.project(inputs)[0])  # (2, 64, 64): one value per token
    torch.testing.assert_close(gate, gate[..., :1].expand_as(gate), rtol=1e-12, atol=0)
    s = gate[..., :1, None]
    eps = z_gated.config.norm_eps
    bound = eps * (1 - s.pow(-2)).abs() / (2 * y.pow(2).mean(-1, keepdim=True)) * expected.abs() + 1e-12
    assert ((actual - expected).abs() <= bound)[leaning].all()
    assert (gate[..., 0] > 3.9)[inputs @ (r / r.norm()) >= mean_gated_median(inputs)].all()  # typical tokens
    assert (actual[~leaning] * expected[~leaning] < 0).double().mean() > 0.9


def mean_gated_median(inputs: torch.Tensor) -> torch.Tensor:
    u = inputs.reshape(-1, inputs.shape[-1])
    r = u.mean(0)
    return (u @ (r / r.norm())).median()


def kv_student(gate: str, attention_layers: list[int], width: str = "kv", mixer: str = "mamba2"):
    teacher = tiny_model("llama", seed=1, initializer_range=0.15)
    student = convert(
        teacher, attention_layers=attention_layers, chunk_size=16, mixer=mixer, mixer_width=width, gate=gate
    )
    return perturb_mixers(student)


EXPORTS = [
    ("kv", "z", [], "bamba"),
    ("kv", "z", [1], "granitemoehybrid"),
    ("kv", "z", [1], "falcon_h1"),
    ("kv", "mean", [], "bamba"),
    ("full", "mean", [1], "bamba"),
]


@pytest.mark.parametrize("width,gate,layers,target", EXPORTS, ids=["-".join(map(str, c)) for c in EXPORTS])
def test_lean_students_export_exactly_in_float64(tmp_path, width, gate, layers, target):
    model = kv_student(gate, layers, width)
    folder = export(model, target, tmp_path / "export")
    difference, scale = float64_difference(model, folder)
    assert difference <= EXACT * scale
    exported = json.loads((folder / "config.json").read_text())
    assert exported["mamba_n_groups"] == exported["mamba_n_heads"]  # B expanded to a group per head
    assert exported["mamba_proj_bias"] is (gate == "z")


def test_an_ungated_student_is_refused_for_export_in_one_line():
    model = kv_student("none", [])
    for target in ("auto", "bamba", "llama.cpp"):
        with pytest.raises(SsmifyError, match="no output gate") as refusal:
            check_exportable(model, target)
        assert "\n" not in str(refusal.value)


def test_a_mean_gated_llama_student_has_no_bias_and_passes_the_llamacpp_rules():
    mean, z = kv_student("mean", []), kv_student("z", [])
    assert all(m.in_proj.bias is None and m.out_proj.bias is None for m in mixer_layers(mean).values())
    assert llamacpp_problems(mean.config) == []
    assert any("biases" in problem for problem in llamacpp_problems(z.config))
    check_exportable(mean, "llama.cpp")


def test_a_mean_gate_keeps_biases_when_the_teacher_has_them():
    student = convert(tiny_model("qwen2", seed=1), attention_layers=[], gate="mean")
    assert student.config.ssmify["mixer_config"]["bias"] is True
    assert student.convert_report["mean_gate"]["0"]["alpha"] > 0


# What convert wrote into mixer_config before the lean options existed (ssmify 2026-11).
OLD_MIXER_CONFIG = {
    "d_model": 64,
    "n_heads": 4,
    "head_dim": 16,
    "d_state": 16,
    "n_groups": 4,
    "chunk_size": 64,
    "bias": True,
    "bc_norm": None,
    "bc_norm_eps": 1e-6,
    "norm_eps": 1e-6,
}


def test_an_old_student_folder_loads_and_computes_as_before(tmp_path):
    teacher = tiny_model("llama", seed=1)
    # A default conversion still writes the old fields, no others.
    assert convert(teacher, attention_layers=[1]).config.ssmify["mixer_config"] == OLD_MIXER_CONFIG
    block = {"base_model_type": "llama", "mixer": "mamba2", "mixer_config": OLD_MIXER_CONFIG}
    old = perturb_mixers(build_student(teacher.config, {**block, "attention_layers": [1]}).eval())
    old.save_pretrained(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "config.json").read_text())["ssmify"]["mixer_config"]
    assert saved == OLD_MIXER_CONFIG
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    mixer = mixer_layers(loaded)[0]
    assert mixer.config.n_kv_heads is None and mixer.config.gate == "z"
    assert mixer.in_proj.weight.shape == (2 * 64 + 2 * 4 * 16 + 4, 64)  # [z | x | B | C | dt], full width
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, old(ids).logits, rtol=0, atol=0)


def mamba2_parameters(D: int, H: int, K: int, d: int, N: int, gate: str, bias: bool, d_conv: int = 4) -> int:
    """A seeded mamba2 mixer's parameter count, written out: x and B at K heads, C at H, d_state N."""
    conv_channels = K * d + K * N + H * N
    rows = (H * d if gate != "none" else 0) + conv_channels + H
    in_proj = D * rows + (rows if bias else 0)
    conv = conv_channels * d_conv + conv_channels
    return in_proj + conv + 3 * H + H * d + H * d * D + (D if bias else 0)


def test_convert_reports_parameters_that_a_count_by_hand_confirms(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher_dir)
    out = tmp_path / "student"
    args = ["convert", str(teacher_dir), "--out", str(out), "--attention-layers", "1"]
    assert main([*args, "--mixer-width", "kv", "--gate", "mean"]) == 0
    assert "parameters: student" in capsys.readouterr().out
    report = json.loads((out / "convert_report.json").read_text())
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k, v (2 kv heads of 16), o; no biases
    mixer = mamba2_parameters(64, 4, 2, 16, 16, "mean", bias=False)
    teacher = sum(p.numel() for p in tiny_model("llama").parameters())
    parameters = report["parameters"]
    assert parameters["layers"]["0"] == {
        "attention": attention,
        "mixer": mixer,
        "mixer_per_attention": mixer / attention,
    }
    assert parameters["teacher"] == teacher
    assert parameters["student"] == teacher + 3 * (mixer - attention)
    assert report["mixer_width"] == "kv" and report["gate"] == "mean"
    assert set(report["mean_gate"]) == {"0", "2", "3"}
    assert 0 <= report["mean_gate"]["0"]["nonpositive_fraction"] < 0.5


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("gate", ["mean", "none"])
def test_a_kv_width_student_goes_through_the_three_distillation_stages(tmp_path, gate):
    """matrix (materialize), hidden and logits each train the lean mixer, and the result loads."""
    from safetensors.torch import load_file
    from test_distill_support import convert_student, recipe_dict, stage, write_corpus, write_teacher

    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe

    write_teacher(tmp_path / "teacher")
    convert_student(tmp_path / "teacher", tmp_path / "student", mixer_width="kv", gate=gate)
    write_corpus(tmp_path / "train.txt", 60, seed=0)
    write_corpus(tmp_path / "held.txt", 8, seed=1)
    stages = [stage("matrix", seq_len=16, tokens=256), stage("hidden", lr=1e-3), stage("logits", lr=1e-3)]
    run_recipe(parse_recipe(recipe_dict(tmp_path, stages, keep_checkpoints=1)))

    folders = [tmp_path / "student", *(tmp_path / "run" / s for s in ("1-matrix", "2-hidden", "3-logits"))]
    key = "model.layers.0.self_attn.mixer.in_proj.weight"
    stored = [load_file(str(folder / "model.safetensors"))[key] for folder in folders]
    assert stored[0].shape == (64 * (gate == "mean") + 2 * 16 + 2 * 16 + 4 * 16 + 4, 64)
    for before, after in zip(stored, stored[1:]):
        assert not torch.equal(before, after)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "3-logits")
    mixer = mixer_layers(student)[0]
    assert mixer.config.n_kv_heads == 2 and mixer.in_proj.bias is None


GENERATIONS = [
    ("mamba2", "kv", "z"),
    ("mamba2", "kv", "mean"),
    ("mamba2", "kv", "none"),
    ("mamba2", "full", "none"),
    ("gated_deltanet", "kv", "z"),
]


@pytest.mark.parametrize("mixer,width,gate", GENERATIONS, ids=["-".join(c) for c in GENERATIONS])
def test_lean_students_generate_the_same_with_and_without_the_cache_and_kv_state_is_smaller(
    mixer, width, gate
):
    student = kv_student(gate, [1], width, mixer)
    ids = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
        uncached = student.generate(
            ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False
        )
        assert torch.equal(cached, uncached)
        state = mixer_layers(student)[0].allocate_state(1)
    x_and_b = 2 * (2 if width == "kv" else 4) * 16  # x and B channels: 2 KV heads or 4 heads of 16
    assert state.conv.shape == (1, x_and_b + 4 * 16, 4) and state.ssm.shape == (1, 4, 16, 16)


@pytest.mark.parametrize(
    "field,value", [("gate", "sigmoid"), ("n_kv_heads", 3), ("n_kv_heads", 0), ("n_kv_heads", 1.5)]
)
def test_a_bad_lean_field_in_mixer_config_is_a_one_line_error_naming_it(field, value):
    with pytest.raises(SsmifyError) as err:
        build_mixer("mamba2", {**OLD_MIXER_CONFIG, field: value})
    assert str(err.value).startswith(f"mixer_config.{field}:") and "\n" not in str(err.value)
