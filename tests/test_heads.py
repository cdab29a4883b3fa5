"""Head-level hybrids: mixed layers (attention in some KV groups, a mixer for the rest), head plans,
the induction head score, caching, save/load and the export refusal. Tiny Llama with GQA 4 heads / 2 KV."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import ssmify
from ssmify.convert.adapters import get_adapter
from ssmify.convert.build import seeded_student
from ssmify.convert.head_plan import HeadPlan, budget_count, head_count
from ssmify.convert.head_scores import (
    circuit_plan,
    induction_head_scores,
    previous_token_scores,
    unkept_feeders,
)
from ssmify.convert.mixed_layer import MixedAttention, MixedCacheLayer, make_mixed_attention, subset_weights
from ssmify.convert.plan import LayerPlan
from ssmify.errors import SsmifyError
from tests.tiny_models import copying_teacher, tiny_model

CALIBRATION = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama")


def _o_proj_inputs(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """What layer `layer`'s output projection receives: the per-head outputs, in the teacher's order."""
    attention = model.model.layers[layer].self_attn
    seen = []
    handle = attention.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def test_mixed_layer_keeping_every_group_is_the_teachers_attention_exactly(teacher):
    model = copy.deepcopy(teacher)
    block = {"base_model_type": "llama", "mixer": "mamba2", "mixer_config": {}}
    layer = model.model.layers[1]
    layer.self_attn = make_mixed_attention(layer.self_attn, block, [0, 1], 1)
    assert layer.self_attn.mixer is None and isinstance(layer.self_attn, MixedAttention)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, teacher(input_ids=IDS).logits)


def test_mixed_layer_keeping_no_group_is_the_converted_layer_exactly(teacher):
    converted = seeded_student(teacher, LayerPlan(4, (0, 2, 3)), "mamba2", "seeded", CALIBRATION)
    whole = converted.model.layers[1].self_attn
    mixed_model = copy.deepcopy(converted)
    mixed = make_mixed_attention(
        copy.deepcopy(teacher.model.layers[1].self_attn), converted.config.ssmify, [], 1
    )
    assert mixed.attention is None
    missing, unexpected = mixed.mixer.load_state_dict(whole.mixer.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["out_proj.bias", "out_proj.weight"]
    # seeding wrote W_O (and a zero bias) into the converted mixer's out_proj: the mixed layer's o_proj
    assert torch.equal(whole.mixer.out_proj.weight, mixed.o_proj.weight)
    assert not whole.mixer.out_proj.bias.any()
    mixed_model.model.layers[1].self_attn = mixed
    with torch.no_grad():
        assert torch.equal(mixed_model(input_ids=IDS).logits, converted(input_ids=IDS).logits)


def test_kept_heads_of_a_mixed_layer_equal_the_teachers_heads(teacher):
    # layers 0, 1 and 3 whole: layer 2 sees the teacher's input and keeps KV group 1 (query heads 2, 3)
    plan = HeadPlan(4, 2, ((0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (3, 0), (3, 1)))
    student = seeded_student(teacher, plan, "mamba2", "seeded", CALIBRATION)
    assert isinstance(student.model.layers[2].self_attn, MixedAttention)
    ours, theirs = _o_proj_inputs(student, 2, IDS), _o_proj_inputs(teacher, 2, IDS)
    kept = slice(2 * 16, 4 * 16)  # head_dim 16
    torch.testing.assert_close(ours[..., kept], theirs[..., kept], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours[..., : kept.start], theirs[..., : kept.start], atol=1e-3)  # mixer heads


def test_mixed_mixer_is_seeded_from_its_own_heads(teacher):
    plan = HeadPlan(4, 2, ((2, 1),))
    student = seeded_student(teacher, plan, "mamba2", "seeded", CALIBRATION)
    mixer = student.model.layers[2].self_attn.mixer
    assert mixer.config.n_heads == 2 and mixer.teacher_heads == (0, 1)
    weights = subset_weights(get_adapter("llama").read_attention(teacher.model.layers[2].self_attn), [0])
    inner = mixer.inner
    # mamba2 in_proj rows: z | x | B | C | dt; C <- W_Q of heads 0, 1; B, x <- W_K, W_V of KV group 0
    assert torch.equal(mixer.in_proj.weight[3 * inner : 4 * inner], weights.q_weight)
    assert torch.equal(mixer.in_proj.weight[2 * inner : 2 * inner + 16], weights.k_weight)
    assert torch.equal(mixer.in_proj.weight[inner : inner + 16], weights.v_weight)


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.fixture(scope="module", params=["mamba2", "gated_deltanet"])
def head_student(teacher, request):
    plan = HeadPlan(4, 2, ((0, 1), (2, 0), (2, 1), (3, 0)))  # mixed 0 and 3, whole 2, converted 1
    return seeded_student(teacher, plan, request.param, "seeded", CALIBRATION)


def test_cached_generation_equals_generation_without_cache(head_student):
    prompt = IDS[:1, :10]
    cached = head_student.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(cached, _greedy_without_cache(head_student, prompt, 8))


def test_generation_cache_holds_kept_groups_and_mixer_state(head_student):
    out = head_student(input_ids=IDS[:1, :10], use_cache=True)
    slot = out.past_key_values.layers[0]
    assert isinstance(slot, MixedCacheLayer)
    assert slot.keys.shape == (1, 1, 10, 16)  # one kept KV group
    assert slot.state is not None and slot.seen_tokens == 10
    assert out.past_key_values.layers[2].keys.shape == (1, 2, 10, 16)  # the whole attention layer


def test_left_padded_batch_equals_each_prompt_alone(head_student):
    short, long = IDS[0, :6], IDS[1, :11]
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0, 5:], batch[1] = short, long
    mask = (torch.arange(11) >= torch.tensor([[5], [0]])).long()
    together = head_student.generate(
        batch, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6
    )
    for row, prompt in ((0, short), (1, long)):
        alone = head_student.generate(prompt[None], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(together[row, 11:], alone[0, len(prompt) :])


def test_save_and_load_round_trip_the_head_plan(head_student, tmp_path):
    head_student.save_pretrained(tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())["ssmify"]
    assert block["attention_layers"] == [2] and block["attention_heads"] == {"0": [1], "3": [0]}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[3].self_attn, MixedAttention)
    assert loaded.model.layers[3].self_attn.kept_groups == (0,)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, head_student(input_ids=IDS).logits)


def test_matrix_alignment_compares_a_mixed_mixer_with_its_own_heads(head_student, teacher):
    from ssmify.convert.probes import teacher_attention
    from ssmify.distill.objectives.matrix import MatrixLayerLoss

    mixer = head_student.model.layers[3].self_attn.mixer  # computes teacher heads 2, 3
    probe = teacher_attention(teacher, IDS, [3])[3]
    loss = MatrixLayerLoss(mixer)(probe.inputs, probe.probs)
    mixing = mixer.materialize(probe.inputs)
    expected = torch.linalg.matrix_norm(mixing.float() - probe.probs[:, 2:].float(), ord="fro").mean()
    assert torch.allclose(loss, expected)


def test_export_refuses_a_head_level_student_and_not_a_whole_layer_one(head_student, teacher):
    from ssmify.export.checks import choose_target

    with pytest.raises(SsmifyError, match=r"layers 0, 3 mix attention and mixer heads.*ssmify-native"):
        choose_target(head_student.config)
    whole = seeded_student(teacher, HeadPlan(4, 2, ((1, 0), (1, 1))), "mamba2", "seeded", CALIBRATION)
    assert "attention_heads" not in whole.config.ssmify and whole.config.ssmify["attention_layers"] == [1]
    assert choose_target(whole.config)  # a whole-layer head plan is a layer plan


def test_induction_score_finds_the_induction_head():
    scores = induction_head_scores(copying_teacher(), length=48, sequences=2)
    assert scores.shape == (4, 3)
    assert divmod(int(scores.argmax()), 3) == (1, 0)  # layer 1, head 0 is the hand-set induction head
    assert scores[1, 0] > 0.5 and scores[2:].max() < 0.5


def test_previous_token_score_finds_the_head_that_feeds_the_induction_head():
    model = copying_teacher()
    previous = previous_token_scores(model, length=48, sequences=2)
    induction = induction_head_scores(model, length=48, sequences=2)
    assert divmod(int(previous.argmax()), 3) == (0, 0)  # layer 0, head 0 is the hand-set previous-token head
    assert previous[0, 0] > 0.5 and previous[1:].max() < 0.5
    only_induction = HeadPlan(4, 3, ((1, 0),))
    assert [(layer, group) for layer, group, _ in unkept_feeders(only_induction, induction, previous)] == [
        (0, 0)
    ]
    assert unkept_feeders(HeadPlan(4, 3, ((0, 0), (1, 0))), induction, previous) == []


def test_convert_warns_when_a_plan_drops_the_previous_token_head_and_reports_its_score(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ssmify.convert.convert"):
        ssmify.convert(copying_teacher(), out=tmp_path / "s", attention_heads="1:0")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("previous-token heads below its induction heads (0:0 " in w for w in warnings)
    report = json.loads((tmp_path / "s" / "convert_report.json").read_text())
    assert torch.tensor(report["previous_token_scores"]).shape == (4, 3)
    assert report["previous_token_scores"][0][0] > 0.5


def test_convert_keep_heads_keeps_the_induction_head_with_the_previous_token_head_it_reads(caplog):
    with caplog.at_level("WARNING", logger="ssmify.convert.convert"):
        student = ssmify.convert(copying_teacher(), keep_heads=4)
    report = student.convert_report
    assert {(0, 0), (1, 0)} <= {tuple(head) for head in report["attention_heads"]}
    assert report["kv_heads_kept"] == 4
    assert not [r for r in caplog.records if "previous-token heads below" in r.getMessage()]


def test_convert_keep_heads_keeps_the_best_scoring_groups_and_reports_scores(teacher, tmp_path):
    student = ssmify.convert(teacher, out=tmp_path / "s", keep_heads=3)
    report = json.loads((tmp_path / "s" / "convert_report.json").read_text())
    scores = torch.tensor(report["head_scores"])
    assert scores.shape == (4, 2) and report["kv_heads_kept"] == 3 and report["kv_heads_total"] == 8
    kept = torch.zeros(4, 2, dtype=torch.bool)
    for layer, group in report["attention_heads"]:
        kept[layer, group] = True
    assert scores[kept].min() >= scores[~kept].max()
    assert student.config.ssmify.get("attention_heads", {}) == report["mixed_layers"]


def test_a_plan_by_count_spends_a_quarter_on_the_previous_token_groups_below_its_induction_groups():
    induction = torch.tensor([[0.0, 0.01], [0.7, 0.0], [0.0, 0.8], [0.9, 0.0]])
    previous = torch.tensor([[0.1, 0.9], [0.0, 0.6], [0.0, 0.0], [0.0, 0.95]])
    # 3 induction groups (3:0, 2:1, 1:0) and 1 feeder: 3:1 is stronger but not below layer 3, so 0:1.
    assert circuit_plan(induction, previous, 4).kept == ((0, 1), (1, 0), (2, 1), (3, 0))
    assert circuit_plan(induction, previous, 3).kept == ((1, 0), (2, 1), (3, 0))  # under 4: induction only
    assert circuit_plan(induction, previous, 8).kept == HeadPlan.parse(4, 2, "0:all,1:all,2:all,3:all").kept
    # Induction heads in layer 0 alone have no layers below them: the next induction groups fill the plan.
    low = torch.tensor([[0.9, 0.8], [0.5, 0.0], [0.0, 0.4], [0.3, 0.0]])
    assert circuit_plan(low, previous, 4).kept == ((0, 0), (0, 1), (1, 0), (2, 1))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4:0", r"layer 4 out of range; this model has layers 0\.\.3"),
        ("1:2", r"KV group 2 of layer 1 out of range; each layer has KV groups 0\.\.1"),
        ("1:0,1:0", r"1:0 given more than once"),
        ("1-0", r"'1-0' is not LAYER:KV_GROUP"),
        ("1:some", r"'1:some' is not LAYER:KV_GROUP or LAYER:all"),
        ("1:all,1:1", r"1:1 given more than once"),
        ("7:all", r"layer 7 out of range"),
    ],
)
def test_bad_attention_heads_get_one_line_errors(text, message):
    with pytest.raises(SsmifyError, match=message) as err:
        HeadPlan.parse(4, 2, text)
    assert "\n" not in str(err.value)


def test_layer_all_keeps_every_kv_group_of_that_layer_as_a_whole_attention_layer():
    plan = HeadPlan.parse(4, 2, "3:all, 1:0")
    assert plan.kept == ((1, 0), (3, 0), (3, 1))
    assert plan.attention_layers == (3,)


def test_bad_head_budgets_get_one_line_errors(teacher):
    with pytest.raises(SsmifyError, match=r"--keep-heads: 0 is out of range; give a count 1\.\.8"):
        head_count(0, 8)
    with pytest.raises(SsmifyError, match=r"--keep-heads: 9 is out of range"):
        head_count(9, 8)
    with pytest.raises(SsmifyError, match=r"--keep-heads: 0.01 of 8 KV heads keeps none"):
        head_count(0.01, 8)
    assert head_count(0.5, 8) == 4 and head_count(3, 8) == 3
    # one KV head of head_dim 64 at 2048 tokens in float32: 2 * 64 * 2048 * 4 bytes = 1 MiB
    assert budget_count(3.5, 2048, 64, torch.float32, 90) == 3
    with pytest.raises(
        SsmifyError, match=r"--kv-budget-mib: 0.5 MiB at 2048 tokens holds 0 KV heads .*1 to 90"
    ):
        budget_count(0.5, 2048, 64, torch.float32, 90)
    with pytest.raises(SsmifyError, match=r"holds 100 KV heads"):
        budget_count(100, 2048, 64, torch.float32, 90)
    with pytest.raises(SsmifyError, match=r"layer plan .* or a head plan, not both"):
        ssmify.convert(teacher, keep_attention=0.5, keep_heads=2)
    with pytest.raises(SsmifyError, match=r"head-level plans support .* not gpt2"):
        ssmify.convert(tiny_model("gpt2"), keep_heads=2)


def _head_level_recipe(tmp_path, heads: str, stages: list[dict], **fields):
    """A tiny teacher, its student converted with `--attention-heads heads`, a corpus, and the parsed recipe
    of `stages` writing to tmp_path / "run"."""
    from test_distill_support import convert_student, recipe_dict, write_corpus, write_teacher

    from ssmify.distill.recipe import parse_recipe

    write_teacher(tmp_path / "teacher")
    convert_student(tmp_path / "teacher", tmp_path / "student", keep_attention=None, attention_heads=heads)
    write_corpus(tmp_path / "train.txt", 30, seed=0)
    write_corpus(tmp_path / "held.txt", 4, seed=1)
    return parse_recipe(recipe_dict(tmp_path, stages, output_dir=str(tmp_path / "run"), **fields))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_distill_stages_train_the_mixer_heads_keep_the_kept_heads_and_resume(tmp_path, caplog):
    from safetensors.torch import load_file
    from test_distill_support import stage

    from ssmify.distill.run import run_recipe

    stages = [
        stage("matrix", seq_len=16, tokens=256),
        stage("hidden", tokens=256),
        stage("logits", tokens=384, checkpoint_every=1),
    ]
    recipe = _head_level_recipe(tmp_path, "0:1,2:0,2:1", stages, keep_finished_checkpoints=True)
    summaries = run_recipe(recipe)

    start, end = (
        load_file(tmp_path / "student" / "model.safetensors"),
        load_file(tmp_path / "run" / "3-logits" / "model.safetensors"),
    )
    assert start.keys() == end.keys()
    mixer = "model.layers.0.self_attn.mixer.in_proj.weight"
    assert not torch.allclose(start[mixer], end[mixer])  # the mixer heads trained
    for kept in (
        "model.layers.0.self_attn.attention.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ):
        assert torch.equal(start[kept], end[kept])  # trainable "mixers": the kept heads stay frozen
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "3-logits")
    assert loaded.config.ssmify["attention_heads"] == {"0": [1]}
    assert loaded.config.ssmify["attention_layers"] == [2]
    assert run_recipe(recipe, resume=True) == summaries

    # killed in the logits stage after its checkpoint at step 2 of 3: only the checkpoints are left
    logits = tmp_path / "run" / "3-logits"
    for item in logits.iterdir():
        if item.name != "checkpoints":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    with caplog.at_level(logging.INFO, logger="ssmify.distill.loop"):
        run_recipe(recipe, resume=True)
    assert "3-logits: resuming from" in caplog.text and "checkpoints/step-2" in caplog.text
    resumed = load_file(logits / "model.safetensors")
    assert resumed.keys() == end.keys()
    assert all(torch.equal(resumed[k], end[k]) for k in end)
    assert AutoModelForCausalLM.from_pretrained(logits).config.ssmify["attention_heads"] == {"0": [1]}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_attention_lr_moves_the_kept_heads_at_their_own_lr_and_the_mixers_at_the_stages(tmp_path):
    from safetensors.torch import load_file
    from test_distill_support import stage

    from ssmify.distill.run import run_recipe

    steps, lr, attention_lr = 3, 1e-2, 1e-6
    logits = stage("logits", tokens=384, lr=lr, trainable="mixers+attention", attention_lr=attention_lr)
    recipe = _head_level_recipe(tmp_path, "0:1,2:0,2:1", [logits])
    assert run_recipe(recipe)[0]["steps"] == steps
    start, end = (
        load_file(tmp_path / "student" / "model.safetensors"),
        load_file(tmp_path / "run" / "1-logits" / "model.safetensors"),
    )

    def moved(name: str) -> float:
        return float((end[name] - start[name]).abs().max())

    # AdamW moves a weight by about lr per step (times weight decay, 0 here): far less at attention_lr
    for kept in (
        "model.layers.0.self_attn.attention.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ):
        assert 0 < moved(kept) < 10 * steps * attention_lr
    assert moved("model.layers.0.self_attn.mixer.in_proj.weight") > 100 * steps * attention_lr


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lora_trains_a_head_level_students_mixer_heads_and_merges_into_a_folder_that_keeps_the_plan(tmp_path):
    from safetensors.torch import load_file
    from test_distill_support import stage

    from ssmify.distill.run import run_recipe

    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": ["in_proj", "out_proj"]}}
    run_recipe(
        _head_level_recipe(tmp_path, "0:1,2:0", [stage("hidden", tokens=256, lr=1e-2, trainable=lora)])
    )

    start, merged = (
        load_file(tmp_path / "student" / "model.safetensors"),
        load_file(tmp_path / "run" / "1-hidden" / "model.safetensors"),
    )
    assert start.keys() == merged.keys()  # merged: no adapter weights left in the folder's model
    for layer in (0, 1, 2):  # mixed layers 0 and 2, a whole mixer layer 1: every mixer's Linears trained
        assert (
            merged[f"model.layers.{layer}.self_attn.mixer.in_proj.weight"]
            - start[f"model.layers.{layer}.self_attn.mixer.in_proj.weight"]
        ).abs().max() > 1e-6
    for kept in (
        "model.layers.0.self_attn.attention.k_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
    ):
        assert torch.equal(start[kept], merged[kept])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "1-hidden")
    assert loaded.config.ssmify["attention_heads"] == {"0": [1], "2": [0]}
    assert isinstance(loaded.model.layers[2].self_attn, MixedAttention)


def test_speed_state_grows_only_by_the_kept_kv_heads(head_student, teacher):
    from test_distill_support import char_tokenizer

    from ssmify.eval.data import EvalData
    from ssmify.eval.options import EvalOptions
    from ssmify.eval.speed import speed

    options = EvalOptions(speed_lengths=(16, 32), decode_tokens=2, progress=False)
    short, long = speed(head_student, teacher, EvalData(char_tokenizer()), options)["points"]
    per_kv_head_and_token = 2 * 16 * 4  # keys and values of 16 dims, fp32
    assert long["state_bytes"] - short["state_bytes"] == 4 * per_kv_head_and_token * 16  # 4 of 8 KV heads
    assert long["teacher_state_bytes"] - short["teacher_state_bytes"] == 8 * per_kv_head_and_token * 16
    assert short["state_bytes"] > 4 * per_kv_head_and_token * 16  # plus the mixers' fixed states


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--attention-heads", "2:0,9:1"],
            "--attention-heads: layer 9 out of range; this model has layers 0..3",
        ),
        (["--attention-heads", "2:0,2:0"], "--attention-heads: 2:0 given more than once"),
        (["--keep-heads", "12"], "--keep-heads: 12 is out of range; give a count 1..8"),
        (
            ["--kv-budget-mib", "0.001", "--context", "64"],
            "--kv-budget-mib: 0.001 MiB at 64 tokens holds 0 KV heads",
        ),
        (["--keep-heads", "2", "--keep-attention", "0.5"], "not allowed with argument"),
    ],
)
def test_convert_cli_rejects_bad_head_plans_in_one_line(teacher, tmp_path, capsys, args, message):
    from ssmify.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    try:
        code = main(["convert", str(tmp_path / "teacher"), "--out", str(tmp_path / "out"), *args])
    except SystemExit as exit:  # argparse: mutually exclusive flags
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_recipe_converts_a_head_level_student_with_keep_heads(tmp_path):
    from test_distill_support import recipe_dict, stage, write_corpus, write_teacher

    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe

    write_teacher(tmp_path / "teacher")
    write_corpus(tmp_path / "train.txt", 10, seed=0)
    write_corpus(tmp_path / "held.txt", 2, seed=1)
    raw = recipe_dict(tmp_path, [stage("logits", tokens=128)], output_dir=str(tmp_path / "run"))
    raw["student"] = {"keep_heads": 3}
    recipe = parse_recipe(raw)
    assert recipe.student.convert_kwargs() == {"keep_heads": 3}
    run_recipe(recipe)
    (folder,) = [p for p in (tmp_path / "run").iterdir() if p.name.endswith("logits")]
    block = AutoModelForCausalLM.from_pretrained(folder).config.ssmify
    kept = 2 * len(block["attention_layers"]) + sum(len(g) for g in block.get("attention_heads", {}).values())
    assert kept == 3


def test_a_recipe_states_a_kv_budget_at_a_context_and_context_alone_is_refused(tmp_path):
    from test_distill_support import recipe_dict, stage

    from ssmify.distill.recipe import parse_recipe

    raw = recipe_dict(tmp_path, [stage("logits", tokens=128)], output_dir=str(tmp_path / "run"))
    raw["student"] = {"kv_budget_mib": 1.5, "context": 8192}
    assert parse_recipe(raw).student.convert_kwargs() == {"kv_budget_mib": 1.5, "context": 8192}
    raw["student"] = {"keep_heads": 3, "context": 8192}
    with pytest.raises(SsmifyError, match=r"student.*give kv_budget_mib too") as err:
        parse_recipe(raw)
    assert "\n" not in str(err.value)


def test_alignment_eval_scores_a_mixed_layer_against_its_own_heads(head_student, teacher):
    from ssmify.convert.probes import teacher_attention
    from ssmify.eval.alignment import alignment
    from ssmify.eval.data import EvalData
    from ssmify.eval.options import EvalOptions

    data = EvalData(None, windows=IDS)
    options = EvalOptions(alignment_windows=1, alignment_seq_len=16, progress=False)
    layers = {r["layer"]: r for r in alignment(head_student, teacher, data, options)["layers"]}
    assert sorted(layers) == [0, 1, 3]  # the mixed layers 0 and 3 and the converted layer 1
    probe = teacher_attention(teacher, IDS[:1, :16], [3])[3]
    probs = probe.probs[:, 2:].float()  # layer 3's mixer computes teacher heads 2 and 3
    mixing = head_student.model.layers[3].self_attn.mixer.materialize(probe.inputs).float()
    expected = math.sqrt((mixing - probs).double().pow(2).sum().item() / probs.double().pow(2).sum().item())
    assert layers[3]["matrix_rel_error"] == pytest.approx(expected, rel=1e-5)
