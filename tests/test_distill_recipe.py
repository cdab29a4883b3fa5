"""The recipe schema: strict keys named by dotted path, --set, cross-field checks, schedules, sizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssmify.distill.budget import eval_costs, fit_to_time, stage_costs, stage_seconds
from ssmify.distill.loop import plan_stage
from ssmify.distill.recipe import Schedule, load_recipe, parse_recipe
from ssmify.distill.schedules import lr_factor
from ssmify.errors import SsmifyError


def minimal(**stage_fields) -> dict:
    stage = {"name": "logits", "tokens": 4096, "global_batch_tokens": 512, "lr": 1.0e-3, **stage_fields}
    return {
        "teacher": "teacher-dir",
        "student": {"path": "student-dir"},
        "data": {"train": ["corpus/*.txt"], "seq_len": 128},
        "output_dir": "runs/x",
        "stages": [stage],
    }


def error_of(raw: dict) -> str:
    with pytest.raises(SsmifyError) as info:
        parse_recipe(raw, source="recipe.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_minimal_recipe_parses_with_defaults():
    recipe = parse_recipe(minimal())
    assert recipe.stages[0].trainable == "mixers"
    assert recipe.stages[0].schedule.kind == "constant"
    assert recipe.data.validation_fraction == 0.02


def test_a_misspelt_key_is_named_by_its_dotted_path_with_a_suggestion():
    raw = minimal(lrr=1.0)
    assert error_of(raw) == "recipe.yaml: stages.0.lrr: unknown key (did you mean lr?)"


def test_a_misspelt_nested_key_in_a_union_branch_keeps_its_path():
    raw = minimal(trainable={"lora": {"rank": 8}})
    assert "stages.0.trainable.lora.rank: unknown key" in error_of(raw)
    raw = minimal()
    raw["data"]["train"] = [{"hub": "allenai/c4", "subsett": "en"}]
    assert "data.train.0.subsett: unknown key (did you mean subset?)" in error_of(raw)


def test_data_bos_takes_true_or_a_fraction_and_names_the_range_otherwise():
    for value, fraction in ((True, 1.0), (False, 0.0), (0.25, 0.25)):
        raw = minimal()
        raw["data"]["bos"] = value
        assert parse_recipe(raw).data.bos == fraction
    raw = minimal()
    raw["data"]["bos"] = 1.5
    assert error_of(raw) == "recipe.yaml: data.bos: Input should be less than or equal to 1 (got 1.5)"


def test_activation_checkpointing_is_refused_on_the_matrix_stage_only():
    assert parse_recipe(minimal(activation_checkpointing=True)).stages[0].activation_checkpointing
    assert error_of(minimal(name="matrix", activation_checkpointing=True)).startswith(
        "recipe.yaml: stages.0.activation_checkpointing: the matrix stage runs each mixer alone"
    )


def test_first_position_weight_belongs_to_the_hidden_stage_and_is_at_least_one():
    raw = minimal(name="hidden", first_position_weight=64)
    assert parse_recipe(raw).stages[0].first_position_weight == 64.0
    assert error_of(minimal(first_position_weight=64)) == (
        "recipe.yaml: stages.0.first_position_weight: only the hidden stage weights positions "
        "(got it on the logits stage)"
    )
    assert error_of(minimal(name="hidden", first_position_weight=0.5)) == (
        "recipe.yaml: stages.0.first_position_weight: Input should be greater than or equal to 1 (got 0.5)"
    )


def test_an_unknown_stage_name_lists_the_stages():
    message = error_of(minimal(name="matrx"))
    assert "stages.0.name: unknown stage 'matrx'; expected one of: matrix, hidden, logits" in message


def test_a_missing_required_key_is_named():
    raw = minimal()
    del raw["output_dir"]
    assert "output_dir: required key is missing" in error_of(raw)


def test_a_token_budget_smaller_than_one_batch_is_refused():
    message = error_of(minimal(tokens=100))
    assert "stages.0.tokens: 100 is smaller than one batch (global_batch_tokens 512)" in message


def test_a_global_batch_that_is_not_whole_sequences_is_refused():
    assert "stages.0.global_batch_tokens: 500 is not a multiple of seq_len 128" in error_of(
        minimal(global_batch_tokens=500, tokens=5000)
    )


def test_stage_specific_fields_are_checked_against_the_stage():
    assert "stages.0.loss: only the logits stage" in error_of(
        minimal(name="hidden", loss={"kind": "forward_kl"})
    )
    assert "stages.0.trainable: the matrix stage trains the mixers only" in error_of(
        minimal(name="matrix", trainable="all")
    )
    assert "stages.0.loss.hidden_weight: a teacher cache holds logits only" in error_of(
        minimal(teacher_cache="cache-dir", loss={"hidden_weight": 0.5})
    )
    assert parse_recipe(minimal(teacher_cache="cache-dir", loss={"hidden_weight": 0})).stages[0].teacher_cache
    assert "stages.0.loss.head_weight: a teacher cache holds logits only" in error_of(
        minimal(teacher_cache="cache-dir", loss={"head_weight": 0.5})
    )


def test_student_takes_a_path_or_convert_options_but_not_both():
    raw = minimal()
    raw["student"] = {"path": "x", "keep_attention": 0.5}
    assert "student: " in error_of(raw) and "not both" in error_of(raw)
    raw["student"] = {"keep_attention": 0.25, "mixer": "mamba2"}
    assert parse_recipe(raw).student.convert_kwargs() == {"keep_attention": 0.25, "mixer": "mamba2"}
    raw["student"] = {"keep_attention": 0.25, "layer_choice": "sensitive"}
    assert parse_recipe(raw).student.convert_kwargs() == {"keep_attention": 0.25, "layer_choice": "sensitive"}
    raw["student"] = {"path": "x", "layer_choice": "sensitive"}
    assert "not both" in error_of(raw)
    raw["student"] = {"keep_attention": 0.25, "layer_choice": "best"}
    assert "student.layer_choice" in error_of(raw)


def test_student_lean_options_reach_the_converted_mixers(tmp_path):
    from accelerate import PartialState
    from test_distill_support import char_tokenizer, write_teacher

    from ssmify.convert.student import mixer_layers
    from ssmify.distill.run import find_or_convert_student
    from ssmify.distill.students import load_student

    teacher_dir = write_teacher(tmp_path / "teacher")  # 4 query heads, 2 key/value heads
    raw = minimal()
    raw["student"] = {"keep_attention": 0.5, "layer_choice": "even", "mixer_width": "kv", "gate": "none"}
    recipe = parse_recipe(raw)
    teacher = load_student(teacher_dir)
    folder = find_or_convert_student(recipe, teacher, char_tokenizer(), tmp_path / "run", PartialState())
    configs = [m.config for m in mixer_layers(load_student(folder)).values()]
    assert configs and all(c.n_kv_heads == 2 and c.n_heads == 4 and c.gate == "none" for c in configs)


def test_student_lean_options_are_checked():
    raw = minimal()
    raw["student"] = {"mixer_width": "half"}
    assert "student.mixer_width" in error_of(raw) and "'full' or 'kv'" in error_of(raw)
    raw["student"] = {"gate": "sigmoid"}
    assert "student.gate" in error_of(raw)
    raw["student"] = {"mixer": "gated_deltanet", "gate": "mean"}
    assert "student: " in error_of(raw) and "gate mean is mamba2's alone" in error_of(raw)
    raw["student"] = {"path": "x", "gate": "mean"}
    assert "not both" in error_of(raw)


def test_yaml_no_means_no_mixed_precision():
    raw = yaml.safe_load("mixed_precision: no")
    recipe = parse_recipe({**minimal(), **raw})
    assert recipe.mixed_precision == "no"


def test_set_overrides_take_yaml_types_and_reach_into_lists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    recipe = load_recipe(
        path, ["stages.0.lr=2.5e-4", "stages.0.schedule.kind=wsd", "seed=7", "data.train=[a.txt, b.txt]"]
    )
    assert recipe.stages[0].lr == 2.5e-4
    assert recipe.stages[0].schedule.kind == "wsd"
    assert recipe.seed == 7
    assert recipe.data.train == ["a.txt", "b.txt"]


def test_set_errors_name_the_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(SsmifyError, match=r"--set stages.3.lr: stages.3: no such list index"):
        load_recipe(path, ["stages.3.lr=1"])
    with pytest.raises(SsmifyError, match=r"stages.0.lrr: unknown key \(did you mean lr\?\)"):
        load_recipe(path, ["stages.0.lrr=1"])
    with pytest.raises(SsmifyError, match="expected dotted.key=value"):
        load_recipe(path, ["seed"])


def test_unreadable_recipe_files_are_one_line_errors(tmp_path):
    with pytest.raises(SsmifyError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(SsmifyError, match=r"bad.yaml: not valid YAML \(line"):
        load_recipe(bad)


def test_accumulation_is_derived_from_the_global_batch_and_the_process_count():
    recipe = parse_recipe(minimal(micro_batch_size=2))  # 512 tokens = 4 sequences of 128
    assert plan_stage(recipe, 0, 1).accumulation == 2
    assert plan_stage(recipe, 0, 2).accumulation == 1
    assert plan_stage(recipe, 0, 2).steps == 8
    with pytest.raises(
        SsmifyError, match=r"stages.0.global_batch_tokens: 512 is not a multiple of .* 2 x 128 x 4"
    ):
        plan_stage(recipe, 0, 4)


def test_wsd_warms_up_holds_then_decays():
    schedule = Schedule(kind="wsd", warmup=0.1, decay=0.2)
    factors = [lr_factor(schedule, step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(f == 1.0 for f in factors[10:80])
    decay = factors[80:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] < 0.1


def test_cosine_falls_monotonically_to_the_floor_and_constant_stays():
    cosine = Schedule(kind="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cosine, step, 50) for step in range(50)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:]))
    assert 0.1 < factors[-1] < 0.11
    assert {lr_factor(Schedule(), step, 10) for step in range(10)} == {1.0}


def test_fit_to_time_scales_every_stage_to_the_time_budget():
    raw = minimal()
    raw["stages"] = [
        {"name": "matrix", "tokens": 512 * 100, "global_batch_tokens": 512, "lr": 1e-3, "seq_len": 64},
        {"name": "logits", "tokens": 512 * 400, "global_batch_tokens": 512, "lr": 1e-3},
    ]
    recipe = parse_recipe(raw)
    fitted = fit_to_time(recipe, seconds=3600, forward_tokens_per_s=250)
    total = sum(stage_seconds(s, s.tokens, s.seq_len or 128, 250) for s in fitted.stages)
    assert 3400 <= total <= 3600
    assert all(s.tokens % s.global_batch_tokens == 0 for s in fitted.stages)
    ratio = [f.tokens / s.tokens for f, s in zip(fitted.stages, recipe.stages)]
    assert ratio[0] == pytest.approx(ratio[1], rel=0.05)
    tiny = fit_to_time(recipe, seconds=1, forward_tokens_per_s=250)
    assert [s.tokens for s in tiny.stages] == [512, 512]


def test_a_student_with_more_layers_converted_gets_fewer_tokens_in_the_same_time():
    raw = minimal()
    raw["stages"] = [
        {"name": "hidden", "tokens": 512 * 100, "global_batch_tokens": 512, "lr": 1e-3},
        {"name": "logits", "tokens": 512 * 100, "global_batch_tokens": 512, "lr": 1e-3},
    ]
    recipe = parse_recipe(raw)
    tokens = {
        share: sum(s.tokens for s in fit_to_time(recipe, 3600, 250, converted_share=share).stages)
        for share in (0.25, 0.5, 1.0)
    }
    assert tokens[0.25] > tokens[0.5] > tokens[1.0]
    for share in (0.25, 0.5, 1.0):
        costs, evals = stage_costs(share), eval_costs(share)
        fitted = fit_to_time(recipe, 3600, 250, converted_share=share)
        total = sum(stage_seconds(s, s.tokens, 128, 250, costs, evals) for s in fitted.stages)
        assert 3400 <= total <= 3600
    assert stage_costs(0.0)["hidden"] == 1.0  # nothing converted: the teacher's forward alone
    assert stage_costs(0.5)["hidden"] == pytest.approx(
        (stage_costs(0.0)["hidden"] + stage_costs(1.0)["hidden"]) / 2
    )


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
LAUNCH_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml"))


def test_the_shipped_recipes_are_valid():
    assert {p.name for p in RECIPES} >= {
        "smollm2-demo.yaml",
        "mohawk-phi-1.5.yaml",
        "hybrid-llama-3.2-1b-25.yaml",
    }
    for path in RECIPES:
        recipe = load_recipe(path)
        for index in range(len(recipe.stages)):
            plan_stage(recipe, index, num_processes=1)
    mohawk = load_recipe(RECIPES[[p.name for p in RECIPES].index("mohawk-phi-1.5.yaml")])
    assert [s.tokens for s in mohawk.stages] == [80_000_000, 160_000_000, 2_760_000_000]
    assert {(s.lr, s.betas, s.weight_decay, s.schedule.kind) for s in mohawk.stages} == {
        (1e-4, (0.9, 0.95), 0.1, "wsd")
    }


def test_lora_settings_are_checked_and_the_matrix_stage_refuses_lora():
    lora = minimal(trainable={"lora": {"r": 8, "target_modules": "model\\.layers\\.[0-3]\\..*_proj"}})
    assert parse_recipe(lora).stages[0].trainable.lora.modules_to_save is None  # the default decides later
    assert "trainable.lora.target_modules: Value error, not a regular expression" in error_of(
        minimal(trainable={"lora": {"target_modules": "q_proj("}})
    )
    assert "trainable.lora.target_modules: Value error, give at least one module name" in error_of(
        minimal(trainable={"lora": {"target_modules": []}})
    )
    assert "trainable.lora.modules_to_save: Value error, list each module name once" in error_of(
        minimal(trainable={"lora": {"modules_to_save": ["mixer_extras", "mixer_extras"]}})
    )
    assert "stages.0.trainable.lora: LoRA does not apply to the matrix stage" in error_of(
        minimal(name="matrix", trainable={"lora": {}})
    )
    assert (
        "stages.0.trainable: the hidden stage trains mixers, blocks or LoRA adapters (got 'all')"
        in error_of(minimal(name="hidden", trainable="all"))
    )
    assert "(got 'mixers+attention')" in error_of(minimal(name="hidden", trainable="mixers+attention"))
    assert "(got 'attention')" in error_of(minimal(name="hidden", trainable="attention"))
    assert "(got 'attention')" in error_of(minimal(name="matrix", trainable="attention"))
    assert parse_recipe(minimal(name="logits", trainable="attention")).stages[0].trainable == "attention"
    assert (
        parse_recipe(minimal(name="logits", trainable="mixers+attention")).stages[0].trainable
        == "mixers+attention"
    )
    assert parse_recipe(minimal(name="hidden", trainable={"lora": {"r": 4}})).stages[0].trainable.lora.r == 4
    assert (
        "stages.0.attention_lr: it sets the kept attention's lr, which only trainable: mixers+attention "
        "trains apart from the mixers (got trainable 'blocks')"
    ) in error_of(minimal(name="logits", trainable="blocks", attention_lr=1e-3))
    both = minimal(name="logits", trainable="mixers+attention", attention_lr=1e-3)
    assert parse_recipe(both).stages[0].attention_lr == 1e-3


def test_the_lolcats_style_recipe_aligns_the_mixers_then_distils_with_lora():
    recipe = load_recipe(RECIPES[[p.name for p in RECIPES].index("lolcats-style-smollm2.yaml")])
    hidden, logits = recipe.stages
    assert (hidden.name, hidden.trainable, logits.name) == ("hidden", "mixers", "logits")
    lora = logits.trainable.lora
    assert set(lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert lora.modules_to_save == ["mixer_extras"]


def test_the_launch_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in LAUNCH_CONFIGS}
    assert kinds == {
        "ddp": "DistributedType.MULTI_GPU",
        "fsdp": "DistributedType.FSDP",
        "zero2": "DistributedType.DEEPSPEED",
        "zero3": "DistributedType.DEEPSPEED",
    }
