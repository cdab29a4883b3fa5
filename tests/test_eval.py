"""Evaluators on tiny random models: perplexity against transformers' loss, agreement, data, report, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_eval_support import (
    char_tokenizer,
    save_model,
    write_texts,
)
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ssmify.cli import main
from ssmify.convert import convert, is_student
from ssmify.errors import SsmifyError
from ssmify.eval.agreement import agreement
from ssmify.eval.data import EvalData, load_data, make_windows, read_documents
from ssmify.eval.options import EvalOptions
from ssmify.eval.perplexity import perplexity
from ssmify.eval.report import render_markdown, write_report
from ssmify.eval.retrieval import summarize

QUIET = EvalOptions(seq_len=64, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="module")
def data(texts):
    return load_data([str(p) for p in texts], char_tokenizer(), seq_len=64)


def reference_windows(texts) -> torch.Tensor:
    """The windows built by hand: every document's characters, EOS between documents, cut into 64s."""
    tokenizer = char_tokenizer()
    documents = [texts[0].read_text()] + [
        json.loads(line)["text"] for line in texts[1].read_text().splitlines()
    ]
    ids = []
    for i, document in enumerate(documents):
        ids += ([tokenizer.eos_token_id] if i else []) + [
            tokenizer.convert_tokens_to_ids(c) for c in document
        ]
    count = len(ids) // 64
    return torch.tensor(ids[: count * 64]).view(count, 64)


def hf_perplexity(model, windows: torch.Tensor) -> float:
    """transformers' own shifted cross-entropy (labels=input_ids), one window at a time, averaged."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_data_joins_documents_with_eos_into_non_overlapping_windows(texts, data):
    assert torch.equal(data.windows, reference_windows(texts))
    assert data.windows.shape[0] >= 10


def test_perplexity_matches_transformers_loss_over_the_same_windows(texts, data):
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    result = perplexity(model, teacher, data, QUIET)
    windows = reference_windows(texts)
    expected, expected_teacher = hf_perplexity(model, windows), hf_perplexity(teacher, windows)
    assert result["value"] == pytest.approx(expected, rel=5e-3)
    assert result["teacher_value"] == pytest.approx(expected_teacher, rel=5e-3)
    assert result["ratio"] == pytest.approx(expected / expected_teacher, rel=1e-2)
    assert result["tokens"] == windows.shape[0] * 63
    assert result["seq_len"] == 64


def test_max_tokens_caps_what_is_read_and_scored(texts):
    data = load_data([str(texts[0])], char_tokenizer(), seq_len=32, max_tokens=100)
    assert data.windows.shape == (3, 32)
    result = perplexity(tiny_model("llama"), None, data, QUIET)
    assert result["tokens"] == 3 * 31
    assert "teacher_value" not in result


def test_agreement_with_an_identical_model_is_perfect(data):
    model = tiny_model("llama", seed=3)
    result = agreement(model, copy.deepcopy(model), data, QUIET)
    assert result["kl"] < 1e-6
    assert result["top1"] == 1.0


def test_agreement_matches_kl_div_between_different_models(data):
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    result = agreement(model, teacher, data, QUIET)
    with torch.no_grad():
        student_logp = F.log_softmax(model(input_ids=data.windows).logits[:, :-1], -1)
        teacher_logp = F.log_softmax(teacher(input_ids=data.windows).logits[:, :-1], -1)
    expected_kl = (
        F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
        / student_logp.shape[:2].numel()
    )
    expected_top1 = (student_logp.argmax(-1) == teacher_logp.argmax(-1)).float().mean()
    assert result["kl"] == pytest.approx(expected_kl.item(), rel=1e-4)
    assert result["top1"] == pytest.approx(expected_top1.item())
    assert result["kl"] > 1e-4 and result["top1"] < 1.0


def test_agreement_of_a_student_that_keeps_every_attention_layer_is_exact(data):
    teacher = tiny_model("llama", seed=5)
    student = convert(teacher, attention_layers=list(range(teacher.config.num_hidden_layers)))
    assert is_student(student)
    result = agreement(student, teacher, data, QUIET)
    assert result["kl"] < 1e-6
    assert result["top1"] == 1.0


def test_agreement_refuses_different_vocabularies(data):
    with pytest.raises(SsmifyError, match="agreement needs the same vocabulary"):
        agreement(tiny_model("llama"), tiny_model("llama", vocab_size=100), data, QUIET)


def test_bad_data_files_get_one_line_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(SsmifyError, match=r"broken.jsonl:2: needs a string field \"text\""):
        read_documents(broken)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(SsmifyError, match="use .txt or .jsonl"):
        read_documents(tmp_path / "table.csv")
    with pytest.raises(SsmifyError, match="at least 2"):
        make_windows(torch.tensor([5]), 64)


def test_windows_longer_than_the_model_context_are_refused():
    long_windows = EvalData(char_tokenizer(), torch.full((1, 300), 5))
    with pytest.raises(
        SsmifyError, match=r"--seq-len 300 is longer than the model's max_position_embeddings \(256\)"
    ):
        perplexity(tiny_model("llama"), None, long_windows, QUIET)


def test_text_tasks_need_data_and_agreement_needs_a_teacher():
    model = tiny_model("llama")
    with pytest.raises(SsmifyError, match="--data"):
        perplexity(model, None, EvalData(char_tokenizer()), QUIET)
    with pytest.raises(SsmifyError, match="--teacher"):
        agreement(model, None, EvalData(char_tokenizer(), torch.zeros(1, 8, dtype=torch.long)), QUIET)


def test_markdown_puts_teacher_beside_student_only_when_there_is_one():
    quality = {
        "perplexity": {"value": 30.0, "tokens": 630, "seq_len": 64, "teacher_value": 20.0, "ratio": 1.5}
    }
    with_teacher = render_markdown({"model": "s", "teacher": "t", "tasks": ["perplexity"], **quality})
    assert "| metric | student | teacher | student / teacher |" in with_teacher
    assert "| 30 | 20 | 1.5 |" in with_teacher
    alone = render_markdown(
        {
            "model": "s",
            "teacher": None,
            "tasks": ["perplexity"],
            "perplexity": {"value": 30.0, "tokens": 630, "seq_len": 64},
        }
    )
    assert "teacher" not in alone


def test_report_writes_json_markdown_and_one_retrieval_plot(tmp_path):
    recall_result = {
        "points": [
            {
                "length": 64,
                "pairs": 20,
                "queries": 8,
                "accuracy": 0.25,
                "teacher_accuracy": 0.75,
                "retention": 1 / 3,
                "meaningful": True,
            },
        ],
        "skipped": [{"length": 512, "reason": "beyond max_position_embeddings=256"}],
        "samples": 1,
        "queries_per_sample": 8,
        "chance": 0.02,
        "separated": True,
    }
    passkey_result = {
        "points": [
            {
                "length": 64,
                "scored": 4,
                "accuracy": 0.0,
                "teacher_accuracy": 0.25,
                "retention": 0.0,
                "meaningful": False,
            },
        ],
        "skipped": [],
        "samples": 4,
    }
    results = {"recall": recall_result, "passkey": passkey_result}
    summary = summarize(results)
    written = write_report(
        {"model": "s", "teacher": "t", "tasks": ["passkey", "recall"], **results, "retrieval": summary},
        tmp_path,
    )
    report = json.loads(written["json"].read_text())
    assert report["recall"] == recall_result
    assert report["plots"] == {"retrieval": "retrieval.png"}
    assert (tmp_path / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
    markdown = written["markdown"].read_text()
    assert "![retrieval](retrieval.png)" in markdown
    assert "| recall | 64 | 8 | 0.25 | 0.75 | 0.333 |" in markdown
    assert "| passkey | 64 | 4 | 0 | 0.25 | 0 (teacher < 50%) |" in markdown
    assert "recall skipped at 512: beyond max_position_embeddings=256" in markdown
    assert "**Overall retention 0.333**" in markdown
    assert "below 50% at: passkey at 64; retention there is not meaningful" in markdown


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A teacher folder and a hybrid student converted from it (attention kept in layers 0 and 2)."""
    root = tmp_path_factory.mktemp("models")
    teacher = save_model(tiny_model("llama", seed=1), root / "teacher")
    convert(str(teacher), out=root / "student", attention_layers=[0, 2])
    return root / "student", teacher


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_missing_data_file_is_a_one_line_error(model_dirs, tmp_path, capsys):
    code, err = _run(["eval", str(model_dirs[0]), "--data", str(tmp_path / "absent.txt")], capsys)
    assert code == 2
    assert err == f"ssmify: error: {tmp_path / 'absent.txt'}: data file not found"


def test_cli_unknown_task_is_a_one_line_error(model_dirs, texts, capsys):
    code, err = _run(
        ["eval", str(model_dirs[0]), "--data", str(texts[0]), "--tasks", "perplexity,bogus"], capsys
    )
    assert code == 2
    assert err.startswith("ssmify: error: unknown task 'bogus'") and "\n" not in err


def test_cli_task_that_needs_a_teacher_without_one_is_a_one_line_error(model_dirs, texts, capsys):
    for task in ("agreement", "alignment"):
        code, err = _run(["eval", str(model_dirs[0]), "--data", str(texts[0]), "--tasks", task], capsys)
        assert code == 2
        assert err == f"ssmify: error: task {task} compares the student with its teacher: pass --teacher PATH"


def test_cli_writes_a_side_by_side_report(model_dirs, texts, tmp_path, capsys):
    student, teacher = model_dirs
    out = tmp_path / "report"
    argv = ["eval", str(student), "--teacher", str(teacher), "--data", *map(str, texts), "--seq-len", "64"]
    argv += ["--tasks", "perplexity,agreement,alignment,recall,speed", "--out", str(out)]
    argv += [
        "--recall-lengths",
        "64,96",
        "--recall-samples",
        "2",
        "--speed-lengths",
        "16",
        "--decode-tokens",
        "2",
    ]
    code, _ = _run(argv, capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["perplexity"]) >= {"value", "tokens", "seq_len", "teacher_value", "ratio"}
    assert set(report["agreement"]) >= {"kl", "top1"}
    assert [row["layer"] for row in report["alignment"]["layers"]] == [1, 3]
    assert [p["length"] for p in report["recall"]["points"]] == [64, 96]
    assert [p["length"] for p in report["speed"]["points"]] == [16]
    windows = load_data([str(p) for p in texts], char_tokenizer(), seq_len=64).windows
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    assert report["perplexity"]["teacher_value"] == pytest.approx(
        hf_perplexity(teacher_model, windows), rel=5e-3
    )
    assert report["plots"] == {name: f"{name}.png" for name in ("alignment", "retrieval", "speed")}
    assert all((out / f"{name}.png").is_file() for name in report["plots"])
    markdown = (out / "report.md").read_text()
    assert f"- teacher: `{teacher}`" in markdown
    assert "| context | prefill s (student / teacher) |" in markdown
    assert "![speed](speed.png)" in markdown


def test_cli_data_that_is_not_utf8_is_a_one_line_error(model_dirs, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 40)
    code, err = _run(
        ["eval", str(model_dirs[0]), "--data", str(latin1), "--out", str(tmp_path / "r")], capsys
    )
    assert code == 2 and "\n" not in err
    assert err.startswith(f"ssmify: error: {latin1}: not UTF-8 text (bad byte at offset 3)")


def test_cli_out_follows_the_overwrite_rule_of_convert_and_export(model_dirs, texts, tmp_path, capsys):
    argv = ["eval", str(model_dirs[0]), "--data", str(texts[0]), "--tasks", "perplexity", "--seq-len", "64"]
    report = tmp_path / "report"
    assert _run([*argv, "--out", str(report)], capsys)[0] == 0
    (report / "stale.png").write_bytes(b"from an earlier run")
    code, err = _run([*argv, "--out", str(report)], capsys)
    assert (
        code == 2
        and err
        == f"ssmify: error: --out {report}: folder exists and is not empty; pass --overwrite to replace it"
    )
    assert _run([*argv, "--out", str(report), "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in report.iterdir()) == ["report.json", "report.md"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = _run([*argv, "--out", str(mine), "--overwrite"], capsys)
    assert code == 2 and "only a folder that ssmify wrote" in err and "\n" not in err
    assert (mine / "notes.txt").read_text() == "keep"
