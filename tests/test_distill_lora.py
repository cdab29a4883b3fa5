"""LoRA through the real loop: hidden and logits stages, exact resume, 2-process DDP, merged folders that load,
generate and export, the adapters on disk, what trains and what stays frozen, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from test_distill_run import (
    cli_error,
    distill_in_two_cpu_processes,
    max_difference,
    weights,
)
from test_distill_support import make_workspace, recipe_dict, stage, write_recipe
from transformers import AutoModelForCausalLM

from ssmify.cli import main
from ssmify.convert.student import is_student, mixer_layers, register
from ssmify.distill.lora import ADAPTER_DIR, MIXER_EXTRAS_FILE
from ssmify.distill.recipe import parse_recipe
from ssmify.distill.run import run_recipe

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

MIXER_LINEARS = ("in_proj.weight", "out_proj.weight")
MIXER_EXTRAS = ("A_log", "dt_bias", "D", "conv1d.weight", "conv1d.bias", "norm.weight")
STAGE_DIRS = ("1-hidden", "2-logits")


def lora_stages(dropout: float = 0.0) -> list[dict]:
    """hidden: adapters on the mixers' Linears and gate_proj (mixer extras by default); logits: adapters on
    the kept attention's q/v and the MLPs' up/down, with the mixer extras and the final norm trained fully.
    Six steps each, checkpoints every two."""
    hidden = {"lora": {"r": 4, "alpha": 8, "target_modules": ["in_proj", "out_proj", "gate_proj"]}}
    logits = {
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": dropout,
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
            "modules_to_save": ["mixer_extras", "model.norm"],
        }
    }
    return [
        stage("hidden", tokens=768, lr=1e-2, trainable=hidden),
        stage("logits", tokens=768, lr=1e-2, trainable=logits),
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def lora_run(workspace) -> Path:
    """One uninterrupted hidden + logits run with LoRA (dropout in the logits stage)."""
    out = workspace / "lora-run"
    raw = recipe_dict(
        workspace, lora_stages(dropout=0.1), output_dir=str(out), keep_finished_checkpoints=True
    )
    run_recipe(parse_recipe(raw))
    return out


def layer_weights(
    state: dict[str, torch.Tensor], layers: list[int], parts: tuple[str, ...] | None = None
) -> list[str]:
    """Keys of `state` in the given layers (whose dotted name ends with one of `parts`, when given)."""
    return [
        key
        for key in state
        if any(key.startswith(f"model.layers.{i}.") for i in layers)
        and (parts is None or any(key.endswith(f".{part}") for part in parts))
    ]


def assert_changed(before: dict, after: dict, keys: list[str]) -> None:
    assert keys
    for key in keys:
        assert (after[key] - before[key]).abs().max() > 1e-6, f"{key} did not train"


def assert_frozen(before: dict, after: dict, keys: list[str]) -> None:
    assert keys
    for key in keys:
        assert torch.equal(after[key], before[key]), f"{key} changed but is frozen"


def test_adapters_mixer_extras_and_modules_to_save_train_and_frozen_weights_do_not(workspace, lora_run):
    start, hidden, logits = (
        weights(d) for d in (workspace / "student", lora_run / "1-hidden", lora_run / "2-logits")
    )
    converted, kept = [0, 2], [1, 3]
    assert not any("lora" in k or "modules_to_save" in k or "original_module" in k for k in logits)

    # hidden: adapters on the mixers' Linears and gate_proj of the converted blocks; mixer extras by default
    assert_changed(
        start, hidden, layer_weights(start, converted, (*MIXER_LINEARS, *MIXER_EXTRAS, "gate_proj.weight"))
    )
    assert_frozen(
        start,
        hidden,
        layer_weights(start, converted, ("up_proj.weight", "down_proj.weight", "layernorm.weight")),
    )
    assert_frozen(start, hidden, layer_weights(start, kept))
    assert_frozen(start, hidden, ["model.embed_tokens.weight", "model.norm.weight"])

    # logits: adapters on q/v (kept attention) and up/down (every MLP); mixer extras and model.norm fully trained
    assert_changed(hidden, logits, layer_weights(hidden, kept, ("q_proj.weight", "v_proj.weight")))
    assert_changed(
        hidden, logits, layer_weights(hidden, [0, 1, 2, 3], ("up_proj.weight", "down_proj.weight"))
    )
    assert_changed(hidden, logits, layer_weights(hidden, converted, MIXER_EXTRAS) + ["model.norm.weight"])
    frozen = layer_weights(hidden, kept, ("k_proj.weight", "o_proj.weight"))
    frozen += layer_weights(hidden, converted, MIXER_LINEARS)
    frozen += layer_weights(hidden, [0, 1, 2, 3], ("gate_proj.weight", "layernorm.weight"))
    assert_frozen(hidden, logits, frozen + ["model.embed_tokens.weight"])

    summaries = [json.loads((lora_run / d / "summary.json").read_text()) for d in STAGE_DIRS]
    total = sum(t.numel() for t in start.values())
    assert all(0 < s["trainable_parameters"] < total / 2 for s in summaries)


def test_an_explicit_empty_modules_to_save_keeps_the_mixer_extras_frozen(workspace, tmp_path):
    only_adapters = {"lora": {"r": 2, "target_modules": ["in_proj", "out_proj"], "modules_to_save": []}}
    out = tmp_path / "run"
    run_recipe(
        parse_recipe(
            recipe_dict(
                workspace, [stage("logits", tokens=256, trainable=only_adapters)], output_dir=str(out)
            )
        )
    )
    start, after = weights(workspace / "student"), weights(out / "1-logits")
    assert_changed(start, after, layer_weights(start, [0, 2], MIXER_LINEARS))
    assert_frozen(start, after, layer_weights(start, [0, 2], MIXER_EXTRAS))
    assert not (out / "1-logits" / ADAPTER_DIR / MIXER_EXTRAS_FILE).exists()


@pytest.mark.parametrize("stopped_in", STAGE_DIRS)
def test_a_lora_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(
    workspace, lora_run, tmp_path, stopped_in
):
    """The run as a kill after step 2 of `stopped_in` leaves it: that stage holds only checkpoints/step-2, and
    the later stage does not exist yet. --resume must give the uninterrupted run's weights and adapters."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    (out / "recipe.yaml").write_text(yaml.safe_dump({**saved, "output_dir": str(out)}, sort_keys=False))
    later = STAGE_DIRS[STAGE_DIRS.index(stopped_in) + 1 :]
    for name in later:
        shutil.rmtree(out / name)
    stage_dir = out / stopped_in
    for item in stage_dir.iterdir():
        if item.name != "checkpoints":
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
    shutil.rmtree(stage_dir / "checkpoints" / "step-4")
    assert [p.name for p in (stage_dir / "checkpoints").iterdir()] == ["step-2"]
    checkpoint = load_file(str(stage_dir / "checkpoints" / "step-2" / "model.safetensors"))
    assert any("lora_A" in key for key in checkpoint)  # the adapters are in the checkpoint

    raw = recipe_dict(
        workspace, lora_stages(dropout=0.1), output_dir=str(out), keep_finished_checkpoints=True
    )
    run_recipe(parse_recipe(raw), resume=True)
    for name in STAGE_DIRS:
        assert max_difference(weights(out / name), weights(lora_run / name)) <= 1e-6
        resumed, reference = (
            load_file(str(d / name / ADAPTER_DIR / "adapter_model.safetensors")) for d in (out, lora_run)
        )
        assert max_difference(resumed, reference) <= 1e-6
        assert json.loads((out / name / "summary.json").read_text())["losses"] == pytest.approx(
            json.loads((lora_run / name / "summary.json").read_text())["losses"], abs=1e-6
        )


def test_a_merged_lora_stage_loads_generates_exports_and_its_adapter_rebuilds_it(
    workspace, lora_run, tmp_path
):
    register()
    folder = lora_run / "2-logits"
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert is_student(merged) and sorted(mixer_layers(merged)) == [0, 2]
    ids = torch.randint(4, 78, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = merged(input_ids=ids, use_cache=False).logits
        generated = merged.generate(
            ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert generated.shape == (1, 14)

    # the adapter folder on top of the stage's start student gives the merged student's outputs
    start = AutoModelForCausalLM.from_pretrained(lora_run / "1-hidden", dtype=torch.float32)
    extras = load_file(str(folder / ADAPTER_DIR / MIXER_EXTRAS_FILE))
    assert sorted({key.split("mixer.")[1] for key in extras}) == sorted(MIXER_EXTRAS)
    assert not start.load_state_dict(extras, strict=False).unexpected_keys
    adapted = PeftModel.from_pretrained(start, str(folder / ADAPTER_DIR)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(input_ids=ids, use_cache=False).logits, logits, atol=1e-5, rtol=1e-5
        )

    out = tmp_path / "exported"
    assert main(["export", str(folder), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not is_student(exported)
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids, use_cache=False).logits, logits, atol=1e-4, rtol=1e-4
        )


def test_two_cpu_processes_with_lora_give_the_weights_of_one_with_the_same_global_batch(workspace, tmp_path):
    stages = lora_stages(dropout=0.0)  # dropout draws differ between 1 and 2 processes
    path = write_recipe(
        tmp_path / "recipe.yaml", recipe_dict(workspace, stages, output_dir=str(tmp_path / "two"))
    )
    distill_in_two_cpu_processes(path)
    run_recipe(parse_recipe(recipe_dict(workspace, stages, output_dir=str(tmp_path / "one"))))
    for name in STAGE_DIRS:
        two, one = (
            json.loads((tmp_path / run / name / "summary.json").read_text()) for run in ("two", "one")
        )
        assert (two["processes"], one["processes"]) == (2, 1)
        assert max_difference(weights(tmp_path / "two" / name), weights(tmp_path / "one" / name)) <= 1e-5
        adapters = [
            load_file(str(tmp_path / run / name / ADAPTER_DIR / "adapter_model.safetensors"))
            for run in ("two", "one")
        ]
        assert max_difference(*adapters) <= 1e-5
    assert max_difference(weights(tmp_path / "one" / "2-logits"), weights(workspace / "student")) > 1e-3


def test_bad_lora_settings_stop_with_one_line_naming_the_field(workspace, tmp_path, capsys):
    def recipe_file(name: str, stages: list[dict]) -> str:
        raw = recipe_dict(workspace, stages, output_dir=str(tmp_path / name))
        return str(write_recipe(tmp_path / f"{name}.yaml", raw))

    def lora(**options) -> dict:
        return {"lora": {"r": 4, **options}}

    cases = {
        "unknown": (
            [stage("logits", trainable=lora(target_modules=["q_prj"]))],
            "stages.0.trainable.lora.target_modules: 'q_prj' matches no Linear layer in the student",
        ),
        "rank": (
            [stage("logits", trainable=lora(r=0))],
            "stages.0.trainable.lora.r: Input should be greater than",
        ),
        "dropout": (
            [stage("logits", trainable=lora(dropout=-0.1))],
            "stages.0.trainable.lora.dropout: Input should be greater than or equal to 0",
        ),
        "matrix": (
            [stage("matrix", trainable=lora())],
            "stages.0.trainable.lora: LoRA does not apply to the matrix stage",
        ),
        "inside-mixer": (
            [stage("logits", trainable=lora(modules_to_save=["conv1d"]))],
            "stages.0.trainable.lora.modules_to_save: 'conv1d' is inside a mixer",
        ),
        "overlap": (
            [stage("logits", trainable=lora(target_modules=["up_proj"], modules_to_save=["mlp"]))],
            "stages.0.trainable.lora.modules_to_save: 'mlp' (model.layers.0.mlp) overlaps a LoRA target",
        ),
        "regex": (
            [stage("logits", trainable=lora(target_modules="model\\.nothing.*"))],
            "stages.0.trainable.lora.target_modules: 'model\\\\.nothing.*' matches no Linear layer",
        ),
        "tied-head": (  # the workspace's teacher ties lm_head to the input embeddings
            [stage("logits", trainable=lora(target_modules=["q_proj"], modules_to_save=["embed_tokens"]))],
            "stages.0.trainable.lora.modules_to_save: model.embed_tokens shares its weight with the output head",
        ),
        "later-stage": (  # a bad second stage stops the run before the first one trains
            [stage("hidden"), stage("hidden", trainable=lora(target_modules=["q_proj"]))],
            "stages.1.trainable.lora.target_modules: 'q_proj' matches no Linear layer in the converted blocks",
        ),
    }
    for name, (stages, expected) in cases.items():
        assert expected in cli_error(["distill", recipe_file(name, stages)], capsys), name
        assert not (tmp_path / name / "1-hidden").exists() and not (tmp_path / name / "1-logits").exists(), (
            name
        )
