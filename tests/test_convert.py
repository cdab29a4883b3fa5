"""convert: kept attention is exact, seeding is exact, students round-trip and decode with a cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_model
from transformers import AttentionInterface, AutoModelForCausalLM

import ssmify
from ssmify.cli import main
from ssmify.convert import LayerPlan, mixer_layers
from ssmify.convert.adapters import SUPPORTED_FAMILIES, get_adapter
from ssmify.convert.student import MixerCacheLayer
from ssmify.errors import SsmifyError
from ssmify.mixers.ssd import ssd_chunked

# Each family once, with biases where the family allows them; GQA is on in every family that has it.
SEEDING_CASES = [
    ("llama", {"attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {"attention_bias": True}),
    ("phi", {"qk_layernorm": True}),
    ("phi3", {}),
    ("gemma2", {"attention_bias": True}),
    ("gpt2", {}),
    ("gpt_neox", {}),
]


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_keeping_every_attention_layer_reproduces_the_teacher(family):
    teacher = tiny_model(family)
    student = ssmify.convert(teacher, keep_attention=1.0)
    ids = torch.randint(3, 120, (2, 17))
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert mixer_layers(student) == {}


_linear: dict[int, dict] = {}


def _linear_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal linear attention sum_{s<=t} (q_t . k_s) v_s on the teacher's own q, k, v (KV heads repeated)."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = (query @ key.transpose(-1, -2)).tril()
    out = (scores @ value).transpose(1, 2)  # B L H d, as attention functions return
    if id(module) in _linear:
        _linear[id(module)]["core"] = out
    return out, None


AttentionInterface.register("linear_probe", _linear_attention)


@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
@pytest.mark.parametrize("family,overrides", SEEDING_CASES, ids=[c[0] for c in SEEDING_CASES])
def test_seeded_mixer_with_unit_decay_and_no_conv_or_gate_is_the_teachers_linear_attention(
    family, overrides, mixer
):
    teacher = tiny_model(family, **overrides)
    student = ssmify.convert(teacher, keep_attention=0.0, mixer=mixer)
    adapter = get_adapter(family)
    layer = 1
    attn = getattr(adapter.decoder_layers(teacher)[layer], adapter.attention_attr)

    # The teacher, at position 0 everywhere (RoPE is then the identity), computes linear attention
    # with its own projections, and its own output projection maps it to the block's residual stream.
    def keep_input(module, args, kwargs):
        _linear[id(module)] = {"u": args[0] if args else kwargs["hidden_states"]}

    def keep_output(module, args, kwargs, output):
        _linear[id(module)]["out"] = output[0]

    handles = [
        attn.register_forward_pre_hook(keep_input, with_kwargs=True),
        attn.register_forward_hook(keep_output, with_kwargs=True),
    ]
    teacher.set_attn_implementation("linear_probe")
    ids = torch.randint(3, 120, (2, 23))
    try:
        with torch.no_grad():
            teacher(ids, position_ids=torch.zeros_like(ids))
    finally:
        for h in handles:
            h.remove()
    seen = _linear[id(attn)]

    # The seeded mixer with the conv bypassed, decay 1 (log_a = 0, input unscaled) and no gate or norm.
    m = mixer_layers(student)[layer]
    with torch.no_grad():
        _, xbc, raw = m.project(seen["u"])
        x, B, C = m.split_xbc(xbc)
        core, _ = ssd_chunked(x, torch.zeros_like(raw), B, C, chunk_size=8)
        out = m.out_proj(core.flatten(-2))
    torch.testing.assert_close(core, seen["core"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
def test_seeded_conv_is_identity_and_gate_passes_through(mixer):
    student = ssmify.convert(tiny_model("llama"), keep_attention=0.0, mixer=mixer)
    m = mixer_layers(student)[0]
    u = torch.randn(2, 9, 64)
    with torch.no_grad():
        z, xbc, _ = m.project(u)
        conv = m.conv(xbc)
    expected = torch.nn.functional.silu(xbc) if mixer == "mamba2" else xbc
    torch.testing.assert_close(conv, expected)
    gate = torch.nn.functional.silu(z)
    # The gate does not depend on the input: 1 for mamba2 (its norm carries the scale), and the
    # calibrated per-head scale, constant over each head's channels, for discrete_mamba2.
    torch.testing.assert_close(gate, gate[:1, :1].expand_as(gate), atol=1e-6, rtol=0)
    per_head = gate[0, 0].view(m.config.n_heads, m.config.head_dim)
    torch.testing.assert_close(per_head, per_head[:, :1].expand_as(per_head), atol=1e-6, rtol=0)
    if mixer == "mamba2":
        torch.testing.assert_close(gate, torch.ones_like(gate), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
def test_calibration_picks_each_heads_best_decay_and_matches_its_output_scale(mixer):
    import copy

    from ssmify.convert.probes import teacher_attention
    from ssmify.convert.seed import (
        DECAY_GRID,
        calibrate_mixer,
        head_rms,
        mixer_head_outputs,
        set_decay,
        teacher_head_outputs,
    )

    teacher = tiny_model("llama")
    student = ssmify.convert(teacher, keep_attention=0.0, mixer=mixer)
    adapter = get_adapter("llama")
    weights = adapter.read_attention(adapter.decoder_layers(teacher)[2].self_attn)
    m = mixer_layers(student)[2]
    out_proj = m.out_proj.weight.clone()
    ids = torch.randint(3, 120, (2, 64))
    o_proj_inputs = []
    o_proj = adapter.decoder_layers(teacher)[2].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda mod, args: o_proj_inputs.append(args[0]))
    with torch.no_grad():
        teacher(ids)
        handle.remove()
        probe = teacher_attention(teacher, ids, [2])[2]
        target = teacher_head_outputs(weights, probe.inputs, probe.probs)
        # the target is what the teacher's heads really output, as its o_proj sees it
        torch.testing.assert_close(target, o_proj_inputs[0], rtol=1e-5, atol=1e-5)
        chosen = calibrate_mixer(m, probe.inputs, target)
        out = mixer_head_outputs(m, probe.inputs)

        def cosines(outputs):
            a, b = outputs.unflatten(-1, (4, -1)), target.unflatten(-1, (4, -1))
            return (a * b).sum((0, 1, 3)) / (a.square().sum((0, 1, 3)) * b.square().sum((0, 1, 3))).sqrt()

        best = cosines(out)
        for decay in DECAY_GRID:  # no decay on the grid points any head closer to its teacher head
            trial = copy.deepcopy(m)
            set_decay(trial, decay.expand(4))
            assert torch.all(cosines(mixer_head_outputs(trial, probe.inputs)) <= best + 1e-6)
    torch.testing.assert_close(head_rms(out, 4), head_rms(target, 4), rtol=1e-4, atol=0)
    assert torch.equal(m.out_proj.weight, out_proj)
    assert set(chosen["decay"].tolist()) <= set(DECAY_GRID.tolist())
    assert head_rms(target, 4).std() > 0  # heads differ, so one global scale would not pass


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_saved_student_loads_with_identical_logits(tmp_path, keep):
    teacher = tiny_model("qwen2")
    student = ssmify.convert(teacher, keep_attention=keep, out=tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = torch.randint(3, 120, (2, 15))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["model_type"] == "ssmify"
    assert config["ssmify"]["attention_layers"] == list(LayerPlan.keep_fraction(4, keep).attention_layers)
    assert (tmp_path / "student" / "README.md").read_text().count("import ssmify") == 1


def test_copied_folder_loads_offline_in_a_fresh_process_without_the_teacher(tmp_path):
    teacher = tiny_model("llama")
    student = ssmify.convert(teacher, keep_attention=0.5, out=tmp_path / "made")
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        expected = student(ids).logits
    shutil.copytree(tmp_path / "made", tmp_path / "copied")
    shutil.rmtree(tmp_path / "made")
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, ssmify
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "copied")!r})
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)["ids"]
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_greedy_generation_with_cache_equals_generation_without(family, keep):
    student = ssmify.convert(tiny_model(family), keep_attention=keep)
    ids = torch.randint(3, 120, (2, 11))
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True, min_new_tokens=20)
        uncached = student.generate(
            ids, max_new_tokens=20, do_sample=False, use_cache=False, min_new_tokens=20
        )
    assert cached.shape == (2, 31)
    assert torch.equal(cached, uncached)


def test_decoding_state_of_a_mixer_layer_does_not_grow_with_context():
    student = ssmify.convert(tiny_model("llama"), keep_attention=0.5)
    sizes = {}
    for length in (8, 200):
        out = student(torch.randint(3, 120, (1, length)), use_cache=True)
        cache = out.cache
        mixer_slots = [layer for layer in cache.layers if isinstance(layer, MixerCacheLayer)]
        kv_slots = [layer for layer in cache.layers if not isinstance(layer, MixerCacheLayer)]
        assert len(mixer_slots) == 2 and len(kv_slots) == 2
        assert all(slot.seen_tokens == length for slot in mixer_slots)
        sizes[length] = (sum(s.nbytes() for s in mixer_slots), kv_slots[0].keys.shape[-2])
    assert sizes[8][0] == sizes[200][0] > 0
    assert sizes[200][1] == 200  # while the KV cache grows with the context


def test_plan_spreads_kept_layers_evenly_and_validates():
    assert LayerPlan.keep_fraction(32, 0.25).attention_layers == (3, 7, 11, 15, 19, 23, 27, 31)
    assert LayerPlan.keep_fraction(30, 0.5).attention_layers == tuple(range(1, 30, 2))
    assert LayerPlan.keep_fraction(10, 0.0).converted == tuple(range(10))
    assert LayerPlan.keep_fraction(10, 1.0).converted == ()
    for bad in ((4, (1, 4)), (4, (2, 2)), (4, (-1,))):
        with pytest.raises(SsmifyError):
            LayerPlan(*bad)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


def _unsupported_dir(tmp_path: Path) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    return tmp_path / "opt"


def _corrupt_dir(tmp_path: Path, teacher_dir: Path) -> Path:
    shutil.copytree(teacher_dir, tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return tmp_path / "corrupt"


def _latin1_text(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 50)
    return path


BAD_INPUTS = {
    "unknown family": (lambda tmp, t: [str(_unsupported_dir(tmp))], "supported families"),
    "missing path": (lambda tmp, t: [str(tmp / "nowhere")], "no such file"),
    "layer out of range": (lambda tmp, t: [str(t), "--attention-layers", "1,9"], "out of range"),
    "layer repeated": (lambda tmp, t: [str(t), "--attention-layers", "1,1"], "more than once"),
    "fraction above 1": (lambda tmp, t: [str(t), "--keep-attention", "1.5"], "outside [0, 1]"),
    "layer choice without a fraction": (
        lambda tmp, t: [str(t), "--layer-choice", "sensitive"],
        "--keep-attention",
    ),
    "unknown layer choice": (
        lambda tmp, t: [str(t), "--keep-attention", "0.5", "--layer-choice", "best"],
        "--layer-choice",
    ),
    "unknown mixer width": (lambda tmp, t: [str(t), "--mixer-width", "half"], "--mixer-width: 'half'"),
    "unknown gate": (lambda tmp, t: [str(t), "--gate", "sigmoid"], "--gate: 'sigmoid'"),
    "mean gate for discrete_mamba2": (
        lambda tmp, t: [str(t), "--mixer", "discrete_mamba2", "--gate", "mean"],
        "only mamba2 takes a gate other than z",
    ),
    "corrupt safetensors": (lambda tmp, t: [str(_corrupt_dir(tmp, t))], "model.safetensors"),
    "calibration text not UTF-8": (
        lambda tmp, t: [str(t), "--calibration-text", str(_latin1_text(tmp))],
        "calibration.txt: not UTF-8",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_error_with_exit_code_2_and_no_output(case, tmp_path, teacher_dir, capsys):
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "student"
    args = make_args(tmp_path, teacher_dir)
    capsys.readouterr()
    code, err = run_cli(["convert", *args, "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ssmify: error:") and expected in err, err
    assert "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".student") for p in tmp_path.iterdir())


def test_existing_output_folder_needs_overwrite_and_overwrite_replaces_only_a_student(
    tmp_path, teacher_dir, capsys
):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["convert", str(teacher_dir), "--out", str(out)], capsys)
    assert code == 2 and "pass --overwrite" in err and err.count("\n") == 1
    code, err = run_cli(["convert", str(teacher_dir), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "only a folder that ssmify wrote" in err and str(out) in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli(["convert", str(teacher_dir), "--out", str(out)], capsys)[0] == 0
    (out / "stale.txt").write_text("from before")
    code, _ = run_cli(["convert", str(teacher_dir), "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_student_card_names_the_teacher_as_base_model(tmp_path, teacher_dir, capsys):
    out = tmp_path / "student"
    assert run_cli(["convert", str(teacher_dir), "--out", str(out)], capsys)[0] == 0
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["base_model"] == str(teacher_dir) and front["base_model_relation"] == "finetune"
    assert front["library_name"] == "transformers" and "ssmify" in front["tags"]
    assert body.startswith(f"# ssmify student of `{teacher_dir}`")


def test_cli_converts_and_reports_perplexity_before_training(tmp_path, teacher_dir, capsys):
    out = tmp_path / "student"
    assert main(["convert", str(teacher_dir), "--out", str(out), "--keep-attention", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity before training" in printed
    report = json.loads((out / "convert_report.json").read_text())
    assert report["attention_layers"] == [1, 3] and report["converted_layers"] == [0, 2]
    assert report["student_perplexity"] > 1 and report["teacher_perplexity"] > 1


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_probed_attention_probabilities_reproduce_each_familys_attention_output(family):
    from ssmify.convert.probes import teacher_attention

    teacher = tiny_model(family)
    adapter = get_adapter(family)
    attn = getattr(adapter.decoder_layers(teacher)[1], adapter.attention_attr)
    out_proj = getattr(attn, {"phi": "dense", "gpt_neox": "dense", "gpt2": "c_proj"}.get(family, "o_proj"))
    seen = []
    handle = out_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    ids = torch.randint(3, 120, (2, 40))
    with torch.no_grad():
        teacher(ids)
        handle.remove()
        probe = teacher_attention(teacher, ids, [1])[1]
    weights = adapter.read_attention(attn)
    assert probe.probs.shape == (2, weights.num_heads, 40, 40)
    torch.testing.assert_close(probe.probs.sum(-1), torch.ones(2, weights.num_heads, 40))
    assert torch.all(probe.probs.triu(1) == 0)
    values = weights.project(probe.inputs)[2].repeat_interleave(weights.num_heads // weights.num_kv_heads, 2)
    heads_out = torch.einsum("bhts,bshd->bthd", probe.probs, values).flatten(-2)
    torch.testing.assert_close(heads_out, seen[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,keep", [("llama", 0.0), ("gemma2", 0.5)])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(family, keep):
    student = ssmify.convert(tiny_model(family), keep_attention=keep)
    long, short = torch.randint(3, 120, (1, 12)), torch.randint(3, 120, (1, 7))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = student.generate(batch, attention_mask=mask, **settings)
        alone = [student.generate(p, **settings)[0, p.shape[1] :] for p in (long, short)]
    assert torch.equal(together[0, 12:], alone[0])
    assert torch.equal(together[1, 12:], alone[1])
