"""Layer sensitivity: the loss a layer's seeded mixer costs the teacher, and the layers it keeps attention in."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_eval_support import char_tokenizer, save_model
from tiny_models import copying_teacher, tiny_model

from ssmify.convert.sensitivity import (
    cached_layer_scores,
    choose_layers,
    combined_scores,
    layer_scores,
    layer_sensitivity,
    most_sensitive_layers,
)
from ssmify.errors import SsmifyError


@pytest.fixture
def teacher():
    return tiny_model("llama", num_hidden_layers=4)


def tokens(windows: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(4, 128, (windows, length), generator=torch.Generator().manual_seed(0))


def test_a_layer_whose_attention_adds_nothing_costs_nothing_and_is_not_kept(teacher):
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()  # its attention output is always 0
    scores = layer_sensitivity(teacher, tokens(), progress=False)
    assert sorted(scores) == [0, 1, 2, 3]
    assert scores[2] == pytest.approx(0.0, abs=1e-6)  # its mixer's out_proj is the same zero W_O
    assert all(abs(scores[i]) > 1e-4 for i in (0, 1, 3))
    assert 2 not in most_sensitive_layers(scores, 0.75)


def test_sensitivity_leaves_the_teacher_as_it_was(teacher):
    ids = tokens()
    with torch.no_grad():
        before = teacher(ids).logits
    modules = [layer.self_attn for layer in teacher.model.layers]
    layer_sensitivity(teacher, ids, progress=False)
    assert [layer.self_attn for layer in teacher.model.layers] == modules
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, before)


def test_most_sensitive_layers_keeps_the_top_fraction_sorted_ties_to_the_lower_index():
    scores = {0: 0.5, 1: 0.1, 2: 0.3, 3: 0.3, 4: 0.0, 5: 0.2}
    assert most_sensitive_layers(scores, 0.5) == (0, 2, 3)
    assert most_sensitive_layers(scores, 1 / 3) == (0, 2)
    assert most_sensitive_layers(scores, 0.0) == ()
    assert most_sensitive_layers(scores, 1.0) == (0, 1, 2, 3, 4, 5)


def test_sensitivity_needs_windows_of_tokens(teacher):
    with pytest.raises(SsmifyError, match=r"input_ids must be \(windows, length >= 2\), got \(48,\)"):
        layer_sensitivity(teacher, tokens()[0], progress=False)


def test_convert_with_sensitive_layer_choice_keeps_attention_where_the_sensitivity_is_highest(
    teacher, monkeypatch
):
    import ssmify

    sensitivity_module = importlib.import_module("ssmify.convert.sensitivity")
    from ssmify.convert.student import mixer_layers

    scores = {0: 0.9, 1: 0.1, 2: 0.8, 3: 0.0}
    calls = []

    def measured(
        model, input_ids, metrics, tokenizer=None, mixer="mamba2", seed=0, progress=True, layout=None
    ):
        calls.append((model, tuple(input_ids.shape), mixer, layout))
        return {"loss": scores}

    monkeypatch.setattr(sensitivity_module, "layer_scores", measured)
    student = ssmify.convert(
        teacher, keep_attention=0.5, layer_choice="sensitive", mixer="discrete_mamba2", chunk_size=32
    )
    assert len(calls) == 1 and calls[0][0] is teacher and calls[0][2] == "discrete_mamba2"
    assert calls[0][3]["chunk_size"] == 32  # scored with the mixer the student gets
    assert calls[0][1][0] >= 1 and calls[0][1][1] > 1  # windows of calibration tokens
    report = student.convert_report
    assert report["attention_layers"] == [0, 2] and sorted(mixer_layers(student)) == [1, 3]
    assert student.config.ssmify["attention_layers"] == [0, 2]
    assert report["layer_choice"] == "sensitive" and report["layer_scores"] == {"loss": scores}
    even = ssmify.convert(teacher, keep_attention=0.5)
    assert even.convert_report["attention_layers"] == [1, 3] and len(calls) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_choice": "sensitive"}, "give --keep-attention"),
        (
            {"keep_attention": 0.5, "layer_choice": "best"},
            "choose one of even, sensitive, kl, retrieval, auto",
        ),
    ],
)
def test_convert_refuses_a_layer_choice_it_cannot_make(teacher, options, message):
    import ssmify

    with pytest.raises(SsmifyError, match=message):
        ssmify.convert(teacher, **options)


def test_kl_scores_a_layer_whose_attention_adds_nothing_as_zero_and_does_not_keep_it(teacher):
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
    scores = layer_scores(teacher, tokens(), ("loss", "kl"), progress=False)
    assert set(scores) == {"loss", "kl"}
    assert scores["kl"][1] == pytest.approx(0.0, abs=1e-7)
    assert all(scores["kl"][i] > 1e-6 for i in (0, 2, 3))
    assert 1 not in choose_layers(scores, "kl", 0.75)


def test_retrieval_scores_are_accuracy_drops_with_the_answer_loss_beside_them(teacher):
    scores = layer_scores(teacher, tokens(), ("retrieval",), char_tokenizer(), progress=False)
    assert set(scores) == {"retrieval", "retrieval_nll"}
    assert sorted(scores["retrieval"]) == [0, 1, 2, 3]
    assert all(-1.0 <= v <= 1.0 for v in scores["retrieval"].values())
    assert any(abs(v) > 1e-4 for v in scores["retrieval_nll"].values())


def test_retrieval_choice_needs_the_teachers_tokenizer(teacher):
    with pytest.raises(SsmifyError, match=r"^task retrieval \(layer choice\) builds its prompts from text"):
        layer_scores(teacher, tokens(), ("retrieval",), None, progress=False)


def test_auto_sums_kl_and_retrieval_each_over_its_largest_value():
    scores = {"kl": {0: 2.0, 1: 1.0, 2: 0.0}, "retrieval": {0: 0.0, 1: 0.5, 2: -0.1}, "retrieval_nll": {}}
    assert combined_scores(scores) == {0: 1.0, 1: 1.5, 2: 0.0}
    assert choose_layers(scores, "auto", 1 / 3) == (1,)
    assert choose_layers(scores, "kl", 1 / 3) == (0,)


def test_retrieval_ties_go_to_the_larger_answer_loss_rise():
    scores = {"retrieval": {0: 0.0, 1: 0.0, 2: 0.0}, "retrieval_nll": {0: 0.1, 1: 0.3, 2: 0.2}}
    assert choose_layers(scores, "retrieval", 1 / 3) == (1,)


def test_layer_scores_are_cached_per_teacher_folder_and_text(tmp_path, monkeypatch):
    sensitivity_module = importlib.import_module("ssmify.convert.sensitivity")
    folder = save_model(tiny_model("llama", num_hidden_layers=4), tmp_path / "teacher")
    model = tiny_model("llama", num_hidden_layers=4)
    first = cached_layer_scores(
        model, tokens(), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache"
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the cached scores should have been used")

    monkeypatch.setattr(sensitivity_module, "layer_scores", refuse)
    again = cached_layer_scores(
        model, tokens(), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache"
    )
    assert again == first
    with pytest.raises(AssertionError, match="cached scores"):  # other text: measured again
        cached_layer_scores(
            model, tokens(length=40), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache"
        )


def test_layer_scores_measure_the_mixer_layout_the_student_gets_and_cache_it_apart(tmp_path, monkeypatch):
    sensitivity_module = importlib.import_module("ssmify.convert.sensitivity")
    folder = save_model(tiny_model("llama", num_hidden_layers=4), tmp_path / "teacher")
    model = tiny_model("llama", num_hidden_layers=4)
    default = {"chunk_size": 64, "mixer_options": None, "width": "full", "gate": "z"}
    plain = cached_layer_scores(
        model, tokens(), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache", layout=default
    )
    lean = {**default, "width": "kv", "gate": "none"}
    measured = layer_scores(model, tokens(), ("kl",), progress=False, layout=lean)
    assert measured["kl"] != plain["kl"]

    def refuse(*args, **kwargs):
        raise AssertionError("the cached scores should have been used")

    monkeypatch.setattr(sensitivity_module, "layer_scores", refuse)
    assert (
        cached_layer_scores(model, tokens(), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache")
        == plain
    )
    with pytest.raises(AssertionError, match="cached scores"):  # another layout: measured again
        cached_layer_scores(
            model, tokens(), ("kl",), None, "mamba2", 0, folder, False, tmp_path / "cache", layout=lean
        )


def test_retrieval_choice_keeps_the_layers_that_copy_over_layers_that_do_not():
    import ssmify

    copier, tokenizer = copying_teacher(), char_tokenizer()
    scores = layer_scores(copier, tokens(), ("retrieval",), tokenizer, progress=False)
    assert scores["retrieval"][0] > 0.3 and scores["retrieval"][1] > 0.3  # the induction circuit
    assert scores["retrieval"][2] == scores["retrieval"][3] == 0.0  # attention that adds nothing
    student = ssmify.convert(copier, keep_attention=0.5, layer_choice="retrieval", tokenizer=tokenizer)
    assert student.convert_report["attention_layers"] == [0, 1]
    assert student.convert_report["layer_scores"]["retrieval"] == scores["retrieval"]
    even = ssmify.convert(copier, keep_attention=0.5, tokenizer=tokenizer)
    assert even.convert_report["attention_layers"] == [1, 3]
