"""Retrieval evaluators: induction and passkey on the same seeded samples for student and teacher,
retention against the teacher, generation-based passkey scoring, and one-line errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_eval_support import RecallOracle, char_tokenizer, save_model, write_texts
from tiny_models import copying_teacher, tiny_model
from torch import nn

from ssmify.cli import main
from ssmify.convert import convert
from ssmify.convert.lookup import PASSKEY_QUESTION, induction_sample, passkey_sample
from ssmify.errors import SsmifyError
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import induction, passkey, passkey_answered, summarize
from ssmify.eval.tasks import parse_tasks, run_tasks

OPTIONS = EvalOptions(lengths=(96, 160), samples=4, progress=False)


def test_a_student_identical_to_its_teacher_retains_exactly_everything():
    teacher = RecallOracle()  # looks tokens up, so it scores well above zero on induction
    result = induction(copy.deepcopy(teacher), teacher, EvalData(char_tokenizer()), OPTIONS)
    assert [p["length"] for p in result["points"]] == [96, 160]
    assert all(p["teacher_accuracy"] > 0.2 for p in result["points"])
    assert [p["retention"] for p in result["points"]] == [1.0, 1.0]
    assert summarize({"induction": result})["overall"] == 1.0


def test_a_student_with_every_attention_layer_kept_retains_exactly_everything():
    teacher = copying_teacher()  # an induction circuit: it passes the task
    student = convert(teacher, keep_attention=1.0)
    result = induction(student, teacher, EvalData(char_tokenizer()), OPTIONS)
    assert all(p["teacher_accuracy"] >= 0.5 and p["meaningful"] for p in result["points"])
    assert [p["retention"] for p in result["points"]] == [1.0, 1.0]


def test_random_mixers_in_every_layer_score_near_chance_on_induction():
    teacher = copying_teacher()
    student = convert(teacher, keep_attention=0.0, init="random")
    result = induction(student, teacher, EvalData(char_tokenizer()), OPTIONS)
    # 24-token runs drawn from 74 ordinary characters: chance is about 1/74 a token
    assert all(p["accuracy"] < 0.1 for p in result["points"])
    assert all(p["teacher_accuracy"] > 0.2 for p in result["points"])


def test_tasks_are_deterministic_given_the_seed():
    tokenizer = char_tokenizer()
    words, filler = torch.arange(4, 78), [5, 6, 7]
    first = [induction_sample(64, words, filler, 1, torch.Generator().manual_seed(3)) for _ in range(2)]
    again = [induction_sample(64, words, filler, 1, torch.Generator().manual_seed(3)) for _ in range(2)]
    other = induction_sample(64, words, filler, 1, torch.Generator().manual_seed(4))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))
    assert not torch.equal(first[0].input_ids, other.input_ids)
    keys = [
        passkey_sample(128, tokenizer, filler, torch.Generator().manual_seed(s)).passkey for s in (0, 0, 1)
    ]
    assert keys[0] == keys[1] != keys[2]
    oracle = RecallOracle()
    runs = [induction(oracle, None, EvalData(tokenizer), OPTIONS) for _ in range(2)]
    assert runs[0] == runs[1]


def test_an_induction_sample_holds_its_run_twice_and_scores_the_second_copy():
    words = torch.arange(100, 200)
    sample = induction_sample(80, words, [5, 6, 7], 1, torch.Generator().manual_seed(0))
    ids = sample.input_ids.tolist()
    run = ids[-24:]
    assert len(ids) == 80 and ids[0] == 1 and len(set(run)) == 24 and all(100 <= t < 200 for t in run)
    first = next(i for i in range(len(ids)) if ids[i : i + 24] == run)
    assert first < 80 - 24 and all(t in (5, 6, 7) for t in ids[1:first] + ids[first + 24 : -24])
    assert sample.answers.tolist() == run[1:]
    assert [ids[p + 1] for p in sample.positions.tolist()] == run[1:]


class PasskeyReader(nn.Module):
    """Generates the passkey by reading it out of the prompt's text; its forward logits are useless."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong = tokenizer, wrong
        self.config = SimpleNamespace(max_position_embeddings=4096, pad_token_id=0)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, **kwargs):
        raise AssertionError("passkey must be scored by generation, not by a forward pass")

    def generate(self, prompt, max_new_tokens, **kwargs):
        text = self.tokenizer.decode(prompt[0])
        key = text.split("The pass key is ")[1][:5]
        key = str(99999 - int(key)) if self.wrong else key
        answer = self.tokenizer(" " + key + ".", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([prompt, answer[:, :max_new_tokens]], dim=1)


def test_passkey_scores_the_generated_text():
    tokenizer = char_tokenizer()
    data = EvalData(tokenizer)
    options = EvalOptions(lengths=(128, 256), samples=3, progress=False)
    result = passkey(PasskeyReader(tokenizer), PasskeyReader(tokenizer, wrong=True), data, options)
    assert [p["accuracy"] for p in result["points"]] == [1.0, 1.0]
    assert [p["teacher_accuracy"] for p in result["points"]] == [0.0, 0.0]
    assert all(p["retention"] is None and not p["meaningful"] for p in result["points"])
    sample = passkey_sample(128, tokenizer, [5, 6], torch.Generator().manual_seed(0))
    assert tokenizer.decode(sample.prompt_ids).endswith(PASSKEY_QUESTION)
    assert len(sample.prompt_ids) == 128


@pytest.mark.parametrize(
    ("text", "right"),
    [
        (" 42111. Remember", True),
        ("42111", True),
        (" 4211111", False),  # looped on the repeated digit: contains the key, but is not it
        (" 4211. The", False),  # stopped a digit early
        (" 1 42111", False),  # the first number answers
        (" The sun", False),
    ],
)
def test_a_passkey_is_answered_only_when_the_first_number_is_the_key(text, right):
    assert passkey_answered("42111", text) is right


def test_retention_leaves_out_lengths_where_the_teacher_fails():
    results = {
        "induction": {
            "points": [
                {
                    "length": 256,
                    "accuracy": 0.9,
                    "teacher_accuracy": 1.0,
                    "retention": 0.9,
                    "meaningful": True,
                },
                {
                    "length": 1024,
                    "accuracy": 0.0,
                    "teacher_accuracy": 0.4,
                    "retention": 0.0,
                    "meaningful": False,
                },
            ]
        },
        "passkey": {
            "points": [
                {
                    "length": 256,
                    "accuracy": 0.5,
                    "teacher_accuracy": 1.0,
                    "retention": 0.5,
                    "meaningful": True,
                }
            ]
        },
    }
    summary = summarize(results)
    assert summary["overall"] == pytest.approx(1.4 / 2.0)
    assert summary["by_length"] == {"256": pytest.approx(0.7), "1024": None}
    assert summary["not_meaningful"] == [{"task": "induction", "length": 1024, "teacher_accuracy": 0.4}]


def test_lengths_past_the_models_positions_are_skipped_with_a_note():
    options = EvalOptions(lengths=(128, 512), samples=1, progress=False)
    result = induction(RecallOracle(max_positions=256), None, EvalData(char_tokenizer()), options)
    assert [p["length"] for p in result["points"]] == [128]
    assert result["skipped"] == [{"length": 512, "reason": "beyond max_position_embeddings=256"}]


def test_retrieval_names_all_three_tasks_and_run_tasks_adds_the_overall_retention():
    assert parse_tasks("perplexity,retrieval") == ["perplexity", "induction", "passkey", "recall"]
    oracle = RecallOracle()
    options = EvalOptions(lengths=(96,), samples=2, recall_queries=4, progress=False)
    results = run_tasks(
        oracle, copy.deepcopy(oracle), EvalData(char_tokenizer()), options, ["induction", "recall"]
    )
    assert set(results) == {"induction", "recall", "retrieval"}
    assert results["retrieval"]["overall"] == 1.0 and results["retrieval"]["tasks"] == ["induction", "recall"]


def test_a_teacher_without_a_tokenizer_gets_one_line():
    with pytest.raises(
        SsmifyError, match=r"^task passkey builds its prompts from text, and the model has no"
    ):
        passkey(RecallOracle(), None, EvalData(None), OPTIONS)
    with pytest.raises(SsmifyError, match=r"^task induction builds its prompts"):
        induction(RecallOracle(), None, None, OPTIONS)


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", "expected comma-separated token counts"), ("0,256", "expected token counts of at least 2")],
)
def test_bad_lengths_get_one_line(tmp_path, capsys, value, message):
    model = save_model(tiny_model("llama"), tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(model), "--tasks", "induction", "--lengths", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "--lengths" in err[-1]


def test_the_cli_reports_retrieval_with_a_plot(tmp_path, capsys):
    teacher = save_model(tiny_model("llama", seed=1), tmp_path / "teacher")
    student = tmp_path / "student"
    convert(str(teacher), out=student, attention_layers=[0, 2])
    texts = write_texts(tmp_path / "texts")
    out = tmp_path / "report"
    argv = ["eval", str(student), "--teacher", str(teacher), "--tasks", "retrieval", "--data", str(texts[0])]
    argv += ["--lengths", "96,128,512", "--samples", "2", "--filler", "data", "--out", str(out)]
    assert main(argv) == 0
    markdown = (out / "report.md").read_text()
    assert "## In-context retrieval" in markdown and "![retrieval](retrieval.png)" in markdown
    assert "induction skipped at 512: beyond max_position_embeddings=256" in markdown
    assert (out / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
