"""Export to native transformers architectures: fresh-process parity, the identity layer, refusals, eval."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file
from test_eval_support import (
    save_model,
    write_texts,
)
from test_export_support import check_in_fresh_process, perturb_mixers, save_reference
from tiny_models import tiny_model

from ssmify.cli import main
from ssmify.convert import convert
from ssmify.errors import SsmifyError
from ssmify.export import check_exportable, export, exportable_targets
from ssmify.export.bamba import Bamba

TOLERANCE = 1e-4
PARTIAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def student(
    model_type: str,
    attention_layers: list[int],
    mixer: str = "mamba2",
    convert_options: dict | None = None,
    **overrides,
):
    """A converted tiny student with perturbed mixers; weights scaled up (init std 0.15) so that logits
    have a spread of about 1 and a 1e-4 tolerance means something. `convert_options` go to convert
    (e.g. mixer_width, gate); `overrides` to the teacher's config."""
    teacher = tiny_model(model_type, seed=1, initializer_range=0.15, **overrides)
    options = convert_options or {}
    converted = convert(teacher, attention_layers=attention_layers, mixer=mixer, chunk_size=16, **options)
    return perturb_mixers(converted) if mixer == "mamba2" else converted


# name: (family, attention layers kept, teacher overrides, --to, architecture expected)
CASES = {
    "llama-0%": ("llama", [], {}, "bamba", "BambaForCausalLM"),
    "llama-25%": ("llama", [1], {}, "auto", "GraniteMoeHybridForCausalLM"),
    "llama-100%": ("llama", [0, 1, 2, 3], {}, "auto", "GraniteMoeHybridForCausalLM"),
    "qwen2-50%": ("qwen2", [0, 2], {}, "auto", "GraniteMoeHybridForCausalLM"),
    "llama-25%-bamba": ("llama", [1], {}, "bamba", "BambaForCausalLM"),
    "llama-25%-granite": ("llama", [1], {}, "granitemoehybrid", "GraniteMoeHybridForCausalLM"),
    "llama-25%-falcon": ("llama", [1], {}, "falcon_h1", "FalconH1ForCausalLM"),
    "phi3-50%-partial-rope": ("phi3", [0, 2], {"rope_parameters": PARTIAL_ROPE}, "auto", "BambaForCausalLM"),
    "llama-25%-wide-mixer": ("llama", [1], {"head_dim": 24}, "auto", "FalconH1ForCausalLM"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported, and checked in one fresh process: {case: (export folder, student's tokens, result)}."""
    root = tmp_path_factory.mktemp("exports")
    folders, tokens, references = {}, {}, {}
    for name, (family, layers, overrides, target, _) in CASES.items():
        model = student(family, layers, **overrides)
        slug = name.replace("%", "pct")
        folders[name] = export(model, target, root / slug)
        references[folders[name]] = root / f"{slug}.safetensors"
        tokens[name] = save_reference(model, references[folders[name]])
    results = check_in_fresh_process(references)
    assert results.pop("ssmify_modules") == []
    return {name: (folders[name], tokens[name], results[str(folders[name])]) for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_without_ssmify_and_reproduces_the_student(exports, case):
    _, tokens, result = exports[case]
    assert result["class"] == CASES[case][-1]
    assert result["max_abs_diff"] <= TOLERANCE
    assert result["generated"] == tokens


def test_a_student_without_attention_gets_one_trailing_identity_attention_layer(exports):
    folder = exports["llama-0%"][0]
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["attn_layer_indices"]) == (5, [4])
    weights = load_file(str(folder / "model.safetensors"))
    identity = {k: v for k, v in weights.items() if k.startswith("model.layers.4.")}
    assert {k.split(".")[3] for k in identity} == {
        "self_attn",
        "feed_forward",
        "input_layernorm",
        "pre_ff_layernorm",
    }
    assert all(not v.any() for v in identity.values())
    assert all(f"model.layers.{i}.mamba.in_proj.weight" in weights for i in range(4))
    assert "identity layer" in (folder / "README.md").read_text()


def test_bamba_export_states_its_rotary_factor_instead_of_bambas_hard_coded_half(exports):
    for case, factor in (("llama-25%-bamba", 1.0), ("phi3-50%-partial-rope", 0.5)):
        config = json.loads((exports[case][0] / "config.json").read_text())
        assert config["rope_parameters"]["partial_rotary_factor"] == factor


# name: (family, attention layers kept, mixer, teacher overrides, --to, what the one-line refusal says)
REFUSALS = {
    "discrete_mamba2": ("llama", [1], "discrete_mamba2", {}, "auto", "its mixer is discrete_mamba2"),
    "gated_deltanet": (
        "llama",
        [],
        "gated_deltanet",
        {},
        "auto",
        "no native transformers architecture holds a Gated DeltaNet student of a llama teacher",
    ),
    "qwen3 B/C norms": ("qwen3", [], "mamba2", {}, "auto", "normalise B and C"),
    "qwen3 q/k norms": ("qwen3", [0], "mamba2", {}, "bamba", "normalise queries and keys"),
    "sliding window": ("mistral", [0], "mamba2", {"sliding_window": 8}, "auto", "see only the last 8 tokens"),
    "gemma2": ("gemma2", [0], "mamba2", {}, "auto", "norms after attention and after the MLP"),
    "gpt2": ("gpt2", [], "mamba2", {}, "auto", "learned absolute positions"),
    "gelu": ("llama", [0], "mamba2", {"hidden_act": "gelu"}, "auto", "hidden_act is 'gelu'"),
    "wide mixer to bamba": (
        "llama",
        [0],
        "mamba2",
        {"head_dim": 24},
        "bamba",
        "can be exported to falcon_h1",
    ),
    "partial rope to granite": (
        "phi3",
        [0],
        "mamba2",
        {"rope_parameters": PARTIAL_ROPE},
        "granitemoehybrid",
        "rotates 8 of 16",
    ),
    "mlp bias to granite": ("llama", [0], "mamba2", {"mlp_bias": True}, "granitemoehybrid", "MLP has biases"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_students_no_target_can_hold_exactly_are_refused_in_one_line(case):
    family, layers, mixer, overrides, target, reason = REFUSALS[case]
    model = student(family, layers, mixer=mixer, **overrides)
    with pytest.raises(SsmifyError) as refusal:
        check_exportable(model, target)
    message = str(refusal.value)
    assert reason in message and "\n" not in message
    assert "exports mamba2 students of llama-family teachers" in message or "can be exported to" in message


def test_each_rule_reads_the_config_a_sliding_window_matters_only_where_attention_is_kept():
    assert exportable_targets(student("mistral", [], sliding_window=8)) == [
        "granitemoehybrid",
        "bamba",
        "falcon_h1",
    ]
    wide = student("mistral", [0], sliding_window=256)  # as long as max_position_embeddings: full attention
    assert exportable_targets(wide) == ["granitemoehybrid", "bamba", "falcon_h1"]


def test_a_mixer_norm_eps_other_than_rms_norm_eps_is_refused():
    model = student("llama", [1])
    model.config.ssmify["mixer_config"]["norm_eps"] = 1e-3
    with pytest.raises(SsmifyError, match="mixer norm_eps 0.001 differs from rms_norm_eps"):
        check_exportable(model, "auto")


def test_a_plain_model_and_an_unknown_target_are_refused():
    with pytest.raises(SsmifyError, match="not an ssmify student"):
        check_exportable(tiny_model("llama"), "auto")
    with pytest.raises(
        SsmifyError, match=r"'mamba' is not a target; choose auto, an engine \(vllm, llama.cpp\)"
    ):
        check_exportable(student("llama", [1]), "mamba")


def test_an_export_that_does_not_reproduce_the_student_is_never_written(tmp_path, monkeypatch):
    make_weights = Bamba.make_weights

    def off_by_a_little(self, spec, shapes):
        weights = make_weights(self, spec, shapes)
        weights["model.layers.0.mamba.D"] = weights["model.layers.0.mamba.D"] + 1e-2
        return weights

    monkeypatch.setattr(Bamba, "make_weights", off_by_a_little)
    with pytest.raises(SsmifyError, match="does not reproduce the student"):
        export(student("llama", [1]), "bamba", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_refusal_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "student"
    student("llama", [1], mixer="discrete_mamba2").save_pretrained(folder)
    capsys.readouterr()
    code = main(["export", str(folder), "--to", "auto", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err.startswith("ssmify: error: cannot export this student: its mixer is discrete_mamba2")
        and "\n" not in err
    )
    assert not (tmp_path / "out").exists()


def test_ssmify_eval_scores_an_exported_folder_as_it_scores_the_student(tmp_path, capsys):
    teacher = save_model(tiny_model("llama", seed=1, initializer_range=0.15), tmp_path / "teacher")
    convert(str(teacher), out=tmp_path / "student", attention_layers=[1])
    assert main(["export", str(tmp_path / "student"), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "granitemoehybrid"
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    text, _ = write_texts(tmp_path / "texts")
    values = {}
    for name in ("student", "export"):
        argv = ["eval", str(tmp_path / name), "--data", str(text), "--tasks", "perplexity", "--seq-len", "64"]
        assert main([*argv, "--out", str(tmp_path / f"report-{name}")]) == 0
        report = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
        values[name] = report["perplexity"]["value"]
    capsys.readouterr()
    assert values["export"] == pytest.approx(values["student"], rel=1e-5)


def test_a_stage_export_card_names_the_teacher_and_the_distillation_and_overwrite_spares_other_folders(
    tmp_path, capsys
):
    teacher = save_model(tiny_model("llama", seed=1), tmp_path / "teacher")
    stage_dir = tmp_path / "run" / "1-logits"
    convert(str(teacher), out=stage_dir, attention_layers=[1])
    summary = {"stage": "1-logits", "tokens": 4096, "steps": 8, "seconds": 3.5, "loss_first": 2.0}
    summary |= {"loss_last": 1.5, "val_loss_first": 2.1, "val_loss_last": 1.6}
    (stage_dir / "summary.json").write_text(json.dumps(summary))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", str(stage_dir), "--out", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite replaces only a folder that ssmify wrote" in err and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "keep"

    assert main(["export", str(stage_dir), "--out", str(tmp_path / "export")]) == 0
    _, front, body = (tmp_path / "export" / "README.md").read_text().split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["base_model"] == str(teacher) and front["base_model_relation"] == "finetune"
    assert front["library_name"] == "transformers"
    assert "## Distillation" in body and "| 1-logits | 4,096 | 8 | 2.0000 -> 1.5000 |" in body
