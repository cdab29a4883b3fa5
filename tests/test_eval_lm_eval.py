"""The lm-eval adapter runs a local multiple-choice task offline and scores like a by-hand loglikelihood."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_support import (
    char_tokenizer,
)
from tiny_models import tiny_model

from ssmify.eval.data import EvalData
from ssmify.eval.lm_eval_adapter import lm_eval_tasks
from ssmify.eval.options import EvalOptions

DOCS = [
    {"question": question, "choices": choices, "label": i % len(choices)}
    for i, (question, choices) in enumerate(
        [
            ("The sky is", ["blue", "green", "red"]),
            ("Cats say", ["meow", "moo", "quack"]),
            ("Snow is", ["cold", "hot", "loud"]),
            ("Fish live in", ["water", "trees", "sand"]),
            ("Two and two make", ["four", "five", "nine"]),
            ("Bees make", ["honey", "milk", "glass"]),
            ("The sun is a", ["star", "moon", "rock"]),
            ("Ice is made of", ["water", "stone", "air"]),
        ]
    )
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data_file = folder / "tiny_choice.jsonl"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def accuracy_by_hand(model) -> float:
    """Pick the choice with the highest summed log-probability of " choice" after the question."""
    tokenizer = char_tokenizer()
    correct = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0]
            positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
            scores.append(logp[positions, torch.tensor(continuation)].sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(DOCS)


def test_lm_eval_scores_a_local_task_offline_for_student_and_teacher(task_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=5)
    expected_student, expected_teacher = accuracy_by_hand(student), accuracy_by_hand(teacher)
    assert expected_student != expected_teacher  # so that a swap of the two could not pass
    options = EvalOptions(lm_eval_tasks=["tiny_choice"], lm_eval_include=[str(task_dir)], batch_size=4)
    result = lm_eval_tasks(student, teacher, EvalData(char_tokenizer()), options)
    assert set(result) == {"tiny_choice"}
    assert result["tiny_choice"]["metrics"]["acc,none"] == pytest.approx(expected_student)
    assert result["tiny_choice"]["teacher_metrics"]["acc,none"] == pytest.approx(expected_teacher)
