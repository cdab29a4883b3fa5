"""The stage objectives: the KD loss's math, what each stage trains, and that each loss goes down."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from test_distill_support import char_tokenizer
from tiny_models import tiny_model

from ssmify.convert.convert import convert
from ssmify.convert.student import mixer_layers
from ssmify.distill.objectives import build_objective, trained_student
from ssmify.distill.objectives.logits import LogitsObjective, kd_loss
from ssmify.distill.recipe import LossConfig, Stage
from ssmify.errors import SsmifyError


@pytest.fixture(scope="module")
def pair():
    """(teacher, student factory): a tiny Llama and fresh copies of its student (mixers in layers 0 and 2)."""
    teacher = tiny_model("llama", seed=0)
    student = convert(teacher, tokenizer=char_tokenizer(), attention_layers=[1, 3])
    state = {k: v.clone() for k, v in student.state_dict().items()}

    def fresh():
        student.load_state_dict(state)
        return student.train()

    return teacher, fresh


def make_stage(name: str, **fields) -> Stage:
    return Stage(name=name, tokens=1024, global_batch_tokens=64, lr=1e-2, **fields)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 78, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_forward_kl_matches_torch_kl_div_and_vanishes_for_equal_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    got = kd_loss(student, teacher, ids, LossConfig(kind="forward_kl"))["loss"]
    oracle = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum") / 10
    assert got.item() == pytest.approx(oracle.item(), rel=1e-5)
    assert kd_loss(teacher, teacher, ids, LossConfig())["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_reverse_kl_swaps_the_roles_and_temperature_scales_by_t_squared():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    ids = torch.zeros(1, 4, dtype=torch.long)
    reverse = kd_loss(student, teacher, ids, LossConfig(kind="reverse_kl"))["loss"]
    swapped = kd_loss(teacher, student, ids, LossConfig(kind="forward_kl"))["loss"]
    assert reverse.item() == pytest.approx(swapped.item(), rel=1e-5)
    hot = kd_loss(student, teacher, ids, LossConfig(temperature=2.0))["loss"]
    manual = kd_loss(student / 2, teacher / 2, ids, LossConfig())["loss"] * 4
    assert hot.item() == pytest.approx(manual.item(), rel=1e-5)


def test_masked_positions_do_not_count_and_ce_is_the_next_token_cross_entropy():
    torch.manual_seed(2)
    student, teacher = torch.randn(1, 6, 9), torch.randn(1, 6, 9)
    ids = torch.randint(0, 9, (1, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    masked = kd_loss(student, teacher, ids, LossConfig(), attention_mask=mask)["kl"]
    changed = student.clone()
    changed[:, 4:] += 10
    assert kd_loss(changed, teacher, ids, LossConfig(), attention_mask=mask)["kl"].item() == pytest.approx(
        masked.item()
    )
    assert kd_loss(student[:, :4], teacher[:, :4], ids[:, :4], LossConfig())["kl"].item() == pytest.approx(
        masked.item(), rel=1e-5
    )
    out = kd_loss(student, teacher, ids, LossConfig(ce_weight=0.5))
    ce = F.cross_entropy(student[0, :-1], ids[0, 1:])
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["kl"].item() + 0.5 * ce.item(), rel=1e-5)


def train(objective, teacher, steps: int = 30, lr: float = 1e-2) -> list[float]:
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = batch(step % 3)
        loss = objective(ids, objective.teacher_targets(teacher, ids))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def fell(losses: list[float], by: float) -> bool:
    """Whether the mean of the last five losses is below (1 - by) times the first loss."""
    return sum(losses[-5:]) / 5 < (1 - by) * losses[0]


def teacher_passes(teacher, objective, ids) -> tuple[int, dict]:
    """How many forward passes of the whole teacher one call of teacher_targets makes, and the targets."""
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    try:
        targets = objective.teacher_targets(teacher, ids)
    finally:
        handle.remove()
    return len(calls), targets


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_matrix_stage_trains_only_mixers_from_the_converted_layers_attention(pair):
    teacher, fresh = pair
    student = fresh()
    objective = build_objective(make_stage("matrix"), student)
    passes, targets = teacher_passes(teacher, objective, batch())
    assert passes == 1 and sorted(targets) == [0, 2]
    assert targets[0].probs.shape == (2, 4, 32, 32)
    assert trainable_names(student) and all(".mixer." in n for n in trainable_names(student))
    assert fell(train(objective, teacher), by=0.2)


@pytest.mark.parametrize("trainable", ["mixers", "blocks"])
def test_hidden_stage_matches_block_outputs_and_trains_what_the_recipe_says(pair, trainable):
    teacher, fresh = pair
    student = fresh()
    objective = build_objective(make_stage("hidden", trainable=trainable), student)
    passes, targets = teacher_passes(teacher, objective, batch())
    assert passes == 1 and sorted(targets) == [0, 2]
    names = trainable_names(student)
    assert all(n.startswith(("model.layers.0.", "model.layers.2.")) for n in names)
    assert any(".mlp." in n for n in names) == (trainable == "blocks")
    assert fell(train(objective, teacher, lr=3e-3), by=0.2)


def test_hidden_stage_first_position_weight_counts_position_zero_as_that_many_tokens(pair):
    teacher, fresh = pair
    student = fresh()
    plain = build_objective(make_stage("hidden"), student)
    weighted = build_objective(make_stage("hidden", first_position_weight=8.0), student)
    targets = plain.teacher_targets(teacher, batch())
    with torch.no_grad():
        per_layer = []
        for i in (0, 2):
            block = student.model.layers[i]
            output = block(*targets[i].args, **targets[i].kwargs)
            output = output[0] if isinstance(output, tuple) else output
            per_layer.append(torch.linalg.vector_norm(output - targets[i].output, dim=-1))
        errors = torch.stack(per_layer)  # (layers, batch, positions)
        length = errors.shape[-1]
        expected = ((8.0 * errors[..., 0] + errors[..., 1:].sum(-1)) / (8.0 + length - 1)).mean()
        assert torch.allclose(plain(batch(), targets)["loss"], errors.mean())
        assert torch.allclose(weighted(batch(), targets)["loss"], expected)
    assert not torch.allclose(expected, errors.mean())


def test_mixers_and_attention_trains_the_kept_heads_and_whole_attention_layers_not_the_mlps():
    teacher = tiny_model("llama", seed=0)
    student = convert(teacher, tokenizer=char_tokenizer(), attention_heads="1:0,3:all")
    objective = build_objective(make_stage("logits", trainable="mixers+attention"), student)
    names = trainable_names(student)
    mixed = student.model.layers[1].self_attn
    assert {n for n, p in mixed.attention.named_parameters()} == {
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
    }
    for kept in (
        "model.layers.1.self_attn.attention.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ):
        assert kept in names
    assert (
        "model.layers.3.self_attn.q_proj.weight" in names and "model.layers.1.self_attn.mixer.A_log" in names
    )
    assert all(".self_attn." in n for n in names)  # no MLP, norm or embedding
    with torch.no_grad():
        before = student.model.layers[1].self_attn.attention.q_proj.weight.clone()
    train(objective, teacher, lr=3e-3, steps=2)
    assert not torch.equal(student.model.layers[1].self_attn.attention.q_proj.weight, before)


def test_trainable_attention_trains_the_kept_heads_and_leaves_the_mixers_as_they_were():
    teacher = tiny_model("llama", seed=0)
    student = convert(teacher, tokenizer=char_tokenizer(), attention_heads="1:0,3:all")
    objective = build_objective(make_stage("logits", trainable="attention"), student)
    names = trainable_names(student)
    assert {
        "model.layers.1.self_attn.attention.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.3.self_attn.q_proj.weight",
    } <= names
    assert not any(".mixer." in n or ".mlp." in n for n in names)
    with torch.no_grad():
        before = {n: p.clone() for n, p in student.named_parameters()}
    train(objective, teacher, lr=3e-3, steps=2)
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.1.self_attn.attention.q_proj.weight" in moved and moved <= names


def test_trainable_attention_on_a_student_that_keeps_none_says_to_train_the_mixers():
    student = convert(tiny_model("llama", seed=0), tokenizer=char_tokenizer(), keep_attention=0)
    with pytest.raises(
        SsmifyError,
        match=r"^stages\.0\.trainable: 'attention' trains the kept attention, "
        r"and this student keeps none; use mixers$",
    ):
        build_objective(make_stage("logits", trainable="attention"), student, "stages.0.trainable")


def test_logits_stage_with_mixers_lowers_the_kl(pair):
    teacher, fresh = pair
    student = fresh()
    objective = build_objective(make_stage("logits"), student)
    assert all(".mixer." in n for n in trainable_names(student))
    assert fell(train(objective, teacher), by=0.3)


def test_logits_stage_hidden_term_adds_each_layers_relative_error_with_the_student_on_its_own_inputs(pair):
    teacher, fresh = pair
    student = fresh()
    ids = batch()
    plain = build_objective(make_stage("logits"), student)
    objective = build_objective(make_stage("logits", loss=LossConfig(hidden_weight=0.5)), student)
    passes, targets = teacher_passes(teacher, objective, ids)
    assert passes == 1 and len(targets.hidden) == teacher.config.num_hidden_layers + 1
    result = objective(ids, targets)
    with torch.no_grad():
        ours = student(input_ids=ids, output_hidden_states=True).hidden_states
        theirs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    errors = [((s - t).norm(dim=-1) / t.norm(dim=-1)).mean() for s, t in zip(ours[1:], theirs[1:])]
    expected = plain(ids, targets.logits)["loss"] + 0.5 * torch.stack(errors).mean()
    torch.testing.assert_close(result["loss"], expected)
    assert result["hidden"] > 0.01  # layer 0 is a mixer: its output differs from the teacher's
    assert fell(train(objective, teacher), by=0.3)


def test_hidden_term_vanishes_for_the_teacher_itself(pair):
    teacher, _ = pair
    objective = LogitsObjective(teacher, LossConfig(hidden_weight=1.0))
    ids = batch()
    result = objective(ids, objective.teacher_targets(teacher, ids))
    assert result["hidden"].item() == pytest.approx(0.0, abs=1e-6)
    assert result["loss"].item() == pytest.approx(0.0, abs=1e-5)


def o_proj_inputs(model, layers) -> dict[int, torch.Tensor]:
    """Each layer's o_proj input in one forward pass over batch(), recorded by the test's own hooks."""
    seen = {}
    handles = [
        model.model.layers[i].self_attn.o_proj.register_forward_hook(
            lambda module, args, out, i=i: seen.__setitem__(i, args[0].detach())
        )
        for i in layers
    ]
    with torch.no_grad():
        model(input_ids=batch())
    for handle in handles:
        handle.remove()
    return seen


def test_logits_stage_head_term_adds_the_kept_heads_relative_output_error_and_training_lowers_it():
    teacher = tiny_model("llama", seed=0)
    student = convert(teacher, tokenizer=char_tokenizer(), attention_heads="1:0,3:all")
    ids = batch()
    stage = make_stage("logits", trainable="mixers+attention", loss=LossConfig(head_weight=0.5))
    objective = build_objective(stage, student)
    passes, targets = teacher_passes(teacher, objective, ids)
    assert passes == 1 and sorted(targets.heads) == [1, 3] and targets.hidden is None
    result = objective(ids, targets)
    ours, theirs = o_proj_inputs(student, [1, 3]), o_proj_inputs(teacher, [1, 3])
    # layer 1 keeps KV group 0: query heads 0 and 1 of 4, channels 0-31 of 64; layer 3 keeps every head
    kept = {1: slice(0, 32), 3: slice(0, 64)}
    errors = []
    for i in (1, 3):
        s, t = (x[..., kept[i]].unflatten(-1, (-1, 16)) for x in (ours[i], theirs[i]))
        errors.append(((s - t).norm(dim=-1) / t.norm(dim=-1)).flatten())
    expected = torch.cat(errors).mean()
    plain = LogitsObjective(student, LossConfig())(ids, targets.logits)
    torch.testing.assert_close(result["heads"], expected)
    torch.testing.assert_close(result["loss"], plain["loss"] + 0.5 * expected)
    assert result["heads"] > 0.01  # layer 0 is a mixer: the kept heads read a stream off the teacher's
    train(objective, teacher, lr=3e-3, steps=20)
    assert objective(ids, targets)["heads"] < 0.8 * result["heads"]


def test_head_term_vanishes_for_the_teacher_itself(pair):
    teacher, _ = pair
    objective = LogitsObjective(teacher, LossConfig(head_weight=1.0))
    ids = batch()
    result = objective(ids, objective.teacher_targets(teacher, ids))
    assert len(objective.kept) == teacher.config.num_hidden_layers
    assert result["heads"].item() == pytest.approx(0.0, abs=1e-6)


def test_head_term_on_a_student_that_keeps_no_attention_names_the_field():
    student = convert(tiny_model("llama", seed=0), tokenizer=char_tokenizer(), keep_attention=0)
    stage = make_stage("logits", loss=LossConfig(head_weight=0.5))
    with pytest.raises(
        SsmifyError,
        match=r"^stages\.2\.loss\.head_weight: 0\.5 aligns the kept attention heads' outputs, and this "
        r"student keeps none \(every layer is a mixer\); set head_weight: 0$",
    ):
        build_objective(stage, student, "stages.2.trainable")


def test_lora_adapters_train_and_merge_into_a_plain_student(pair):
    teacher, fresh = pair
    student = fresh()
    stage = make_stage("logits", trainable={"lora": {"r": 4, "target_modules": ["in_proj", "out_proj"]}})
    objective = build_objective(stage, student)
    assert isinstance(objective.student, PeftModel)
    names = trainable_names(objective)
    extras = [n for n in names if "lora_" not in n]  # the mixers are targets: mixer_extras train beside them
    assert len(extras) < len(names) and all(".mixer." in n and "_proj" not in n for n in extras)
    assert {n.rsplit(".", 1)[-1] for n in extras} >= {"A_log", "dt_bias", "D"}
    assert fell(train(objective, teacher, steps=15), by=0.1)
    ids = batch(7)
    with torch.no_grad():
        adapted = objective.student(input_ids=ids).logits
        plain = trained_student(objective, student)
        merged = plain(input_ids=ids).logits
    assert not isinstance(plain, PeftModel)
    assert not any("lora" in k for k in plain.state_dict())
    assert sorted(mixer_layers(plain)) == [0, 2]
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
