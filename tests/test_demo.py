"""`ssmify demo`: the whole flow on a tiny teacher and tiny text at a tiny budget, reruns, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distill_support import write_corpus, write_teacher
from transformers import AutoModelForCausalLM

import ssmify.demo.budget as budget_module
import ssmify.demo.evaluation as evaluation_module
import ssmify.demo.pipeline as pipeline_module
import ssmify.distill.run as run_module
from ssmify.cli import main
from ssmify.convert.student import is_student, mixer_layers, register
from ssmify.demo.pipeline import DemoSettings, default_eval_tokens, run_demo
from ssmify.errors import SsmifyError

sensitivity_module = importlib.import_module("ssmify.convert.sensitivity")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_ROWS = ("teacher", "seeded student, untrained", "distilled student")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SSMIFY_CACHE", str(tmp_path / "cache"))  # never the user's cache


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_recipe(path: Path, cache: Path) -> Path:
    """The demo recipe's shape (matrix, hidden, logits; half the layers keep attention) at tiny sizes."""
    stage = {"micro_batch_size": 2, "global_batch_tokens": 64, "lr": 3.0e-3, "eval_tokens": 64}
    recipe = {
        "teacher": "replaced-by-the-demo",
        "student": {"keep_attention": 0.5, "mixer": "mamba2", "init": "seeded"},
        "data": {"train": ["replaced.txt"], "seq_len": 32, "cache_dir": str(cache)},
        "output_dir": "replaced",
        "seed": 0,
        "stages": [
            {**stage, "name": "matrix", "seq_len": 16, "tokens": 128},
            {**stage, "name": "hidden", "tokens": 128},
            {**stage, "name": "logits", "tokens": 128, "loss": {"kind": "forward_kl"}},
        ],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-assets")
    return {
        "teacher": write_teacher(root / "teacher"),
        "train_text": write_corpus(root / "train.txt", 40, seed=0),
        "heldout_text": write_corpus(root / "heldout.txt", 12, seed=1),
        "recipe": tiny_recipe(root / "recipe.yaml", root / "token-cache"),
    }


def tiny_settings(assets: dict[str, Path], out: Path, **fields) -> DemoSettings:
    options = {
        "out": out,
        "cache_dir": out.parent / "cache",
        "budget_minutes": 0.05,  # 3 s: less than the setup takes, so every stage runs its minimum
        "eval_seq_len": 64,
        "speed_context": 96,
        "decode_tokens": 4,
        "retrieval_lengths": (128, 192),
        "retrieval_samples": 2,
        "teacher_name": "tiny llama",
        "text_name": "random sentences",
        **assets,
    }
    return DemoSettings(**{**options, **fields})


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """One finished tiny demo run: (settings, result)."""
    settings = tiny_settings(assets, tmp_path_factory.mktemp("demo") / "run")
    return settings, run_demo(settings)


def test_tiny_demo_writes_the_report_with_the_table_and_plots(finished):
    settings, result = finished
    out = settings.out
    report = (out / "report.md").read_text()
    assert result.report == out / "report.md"
    assert result.table in report
    header, rule, *rows = result.table.splitlines()
    assert "perplexity" in header and "KL" in header and "decode tok/s @96" in header
    for column in ("induction @128", "induction @192", "passkey @128", "passkey @192", "retention"):
        assert column in header
    assert [row.split("|")[1].strip() for row in rows] == list(TABLE_ROWS)
    for png in ("loss_curves.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report
    for command in ("-m ssmify eval", "-m ssmify export", 'pipeline("text-generation"'):
        assert command in report


def test_tiny_demo_numbers_are_those_of_the_evaluation(finished):
    settings, result = finished
    numbers = json.loads((settings.out / "report.json").read_text())
    rows = {row["name"]: row for row in numbers["rows"]}
    results = numbers["results"]
    assert rows["teacher"]["perplexity"] == pytest.approx(results["distilled"]["perplexity"]["teacher_value"])
    # the teacher is scored on the same windows in both passes
    assert results["seeded"]["perplexity"]["teacher_value"] == pytest.approx(rows["teacher"]["perplexity"])
    assert results["seeded"]["perplexity"]["tokens"] == default_eval_tokens(0.05, 64) - 1
    for name in ("seeded", "distilled"):
        assert rows[name]["perplexity"] == pytest.approx(results[name]["perplexity"]["value"])
        assert rows[name]["ratio"] == pytest.approx(rows[name]["perplexity"] / rows["teacher"]["perplexity"])
        assert rows[name]["kl"] == pytest.approx(results[name]["agreement"]["kl"])
        assert f"{rows[name]['perplexity']:,.2f}" in result.table
    for task in ("induction", "passkey"):  # the teacher is scored once, each student alone, same samples
        assert [p["length"] for p in results["teacher"][task]["points"]] == [128, 192]
        teacher_accuracy = {p["length"]: p["accuracy"] for p in results["teacher"][task]["points"]}
        for name in ("seeded", "distilled"):
            accuracy = {p["length"]: p["accuracy"] for p in results[name][task]["points"]}
            assert rows[name]["retrieval"]["accuracy"][task] == {str(n): v for n, v in accuracy.items()}
            assert set(accuracy) == set(teacher_accuracy)
    speed = results["distilled"]["speed"]["points"][0]
    assert speed["length"] == 96
    assert rows["distilled"]["decode_tokens_per_s"] == speed["decode_tokens_per_s"]
    assert rows["teacher"]["decode_tokens_per_s"] == speed["teacher_decode_tokens_per_s"]
    assert [s["stage"] for s in numbers["stages"]] == ["1-matrix", "2-hidden", "3-logits"]
    assert all(s["steps"] == 1 for s in numbers["stages"])  # the budget left no time: one batch each


def test_tiny_demo_student_loads_and_is_the_trained_last_stage(finished):
    settings, result = finished
    out = settings.out
    assert result.student == out / "student"
    register()
    student = AutoModelForCausalLM.from_pretrained(result.student)
    kept = json.loads((out / "demo.json").read_text())["attention_layers"]
    assert len(kept) == 2 and is_student(student)
    assert sorted(mixer_layers(student)) == sorted(set(range(4)) - set(kept))
    final, last, seeded = (
        load_file(str(d / "model.safetensors")) for d in (result.student, out / "3-logits", out / "0-convert")
    )
    key = f"model.layers.{min(mixer_layers(student))}.self_attn.mixer.in_proj.weight"
    assert torch.equal(final[key], last[key])
    assert not torch.equal(final[key], seeded[key])
    output = student.generate(torch.tensor([[1, 10, 11]]), max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)
    assert not any((out / s / "checkpoints").exists() for s in ("1-matrix", "2-hidden", "3-logits"))


def test_rerunning_a_finished_demo_trains_and_scores_nothing_again(finished, monkeypatch):
    settings, result = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished demo must not train or score again")

    monkeypatch.setattr(run_module, "load_teacher", refuse)
    monkeypatch.setattr(evaluation_module, "run_tasks", refuse)
    again = run_demo(settings)
    assert again.table == result.table
    sessions = json.loads((settings.out / "report.json").read_text())["sessions"]
    assert len(sessions) == 2 and "distill" in sessions[1] and "convert" not in sessions[1]
    assert "over 2 sessions" in again.report.read_text()


def test_a_demo_folder_with_other_settings_is_refused(finished):
    settings, _ = finished
    changed = DemoSettings(**{**settings.__dict__, "keep_attention": 0.25})
    with pytest.raises(
        SsmifyError, match=r"other settings \(keep_attention: 0.5 there, 0.25 now\).*--overwrite"
    ):
        run_demo(changed)


def test_pure_ssm_demo_runs_and_overwrite_starts_over(assets, tmp_path):
    out = tmp_path / "pure"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SsmifyError, match="holds no demo run"):
        run_demo(tiny_settings(assets, out))
    (out / "notes.txt").unlink()
    first = run_demo(tiny_settings(assets, out, keep_attention=0.0))
    assert "| 0/4 " in first.table
    plan = json.loads((out / "demo.json").read_text())
    assert plan["attention_layers"] == []
    (out / "stale.txt").write_text("from the earlier run")
    run_demo(tiny_settings(assets, out, keep_attention=0.5, overwrite=True))
    assert not (out / "stale.txt").exists()
    assert len(json.loads((out / "demo.json").read_text())["attention_layers"]) == 2


def test_half_attention_keeps_the_most_sensitive_layers_measured_once(finished, tmp_path, monkeypatch):
    settings, _ = finished
    (cached,) = (settings.out.parent / "cache" / "layer-scores").glob("*.json")
    scores = {int(k): v for k, v in json.loads(cached.read_text())["scores"]["loss"].items()}
    assert sorted(scores) == [0, 1, 2, 3]
    kept = json.loads((settings.out / "demo.json").read_text())["attention_layers"]
    assert kept == sorted(sorted(scores, key=scores.get, reverse=True)[:2])

    def refuse(*args, **kwargs):
        raise AssertionError("the sensitivity is cached per teacher and text")

    monkeypatch.setattr(sensitivity_module, "layer_scores", refuse)
    again = run_demo(DemoSettings(**{**settings.__dict__, "out": tmp_path / "again"}))
    assert json.loads((tmp_path / "again" / "demo.json").read_text())["attention_layers"] == kept
    assert "costs the teacher most (loss)" in again.report.read_text()


def test_an_interrupted_demo_continues_with_its_plan_and_counts_both_sessions(assets, tmp_path, monkeypatch):
    settings = tiny_settings(assets, tmp_path / "run")
    real_distill = pipeline_module._distill

    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "_distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(settings)
    plan = json.loads((settings.out / "demo.json").read_text())
    assert [sorted(session) for session in plan["sessions"]] == [
        ["convert", "distill", "measure", "sensitivity", "teacher", "text", "total"]
    ]
    seeded = (settings.out / "0-convert" / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(pipeline_module, "_distill", real_distill)
    result = run_demo(DemoSettings(**{**settings.__dict__, "budget_minutes": 5.0}))
    numbers = json.loads((settings.out / "report.json").read_text())
    assert (settings.out / "0-convert" / "model.safetensors").stat().st_mtime_ns == seeded
    assert numbers["plan"]["budget_minutes"] == 0.05  # the plan it started with
    assert len(numbers["sessions"]) == 2
    assert numbers["wall_seconds"] == pytest.approx(sum(s["total"] for s in numbers["sessions"]))
    assert result.student.is_dir()


def test_a_demo_interrupted_before_its_plan_was_saved_plans_again(assets, tmp_path, monkeypatch):
    settings = tiny_settings(assets, tmp_path / "run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "fit_to_time", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(settings)
    assert "recipe" not in json.loads((settings.out / "demo.json").read_text())
    monkeypatch.undo()
    monkeypatch.setenv("SSMIFY_CACHE", str(tmp_path / "cache"))
    run_demo(settings)
    assert (settings.out / "report.md").is_file()


def test_layers_the_recipe_lists_are_kept_without_measuring_sensitivity(assets, tmp_path, monkeypatch):
    raw = yaml.safe_load(assets["recipe"].read_text())
    raw["student"] = {"attention_layers": [0, 3], "mixer": "mamba2"}
    listed = tmp_path / "listed.yaml"
    listed.write_text(yaml.safe_dump(raw))

    def refuse(*args, **kwargs):
        raise AssertionError("the recipe lists the layers: no sensitivity is needed")

    monkeypatch.setattr(sensitivity_module, "layer_scores", refuse)
    result = run_demo(tiny_settings(assets, tmp_path / "run", recipe=listed))
    assert json.loads((tmp_path / "run" / "demo.json").read_text())["attention_layers"] == [0, 3]
    assert "attention kept in layers 0, 3 (as listed.yaml lists them)" in result.report.read_text()
    assert "| 2/4 " in result.table


def test_keeping_every_layer_is_refused(assets, tmp_path):
    with pytest.raises(SsmifyError, match="--keep-attention 1 keeps attention in all 4 layers"):
        run_demo(tiny_settings(assets, tmp_path / "run", keep_attention=1.0))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def hide_packages(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("missing", [("gensim",), ("gguf",), ("gguf", "gensim")])
def test_missing_demo_extra_is_one_line_naming_the_package(missing, monkeypatch, tmp_path, capsys):
    hide_packages(monkeypatch, *missing)
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert all(name in err for name in missing)
    assert "pip install 'ssmify[demo]'" in err
    assert not (tmp_path / "run").exists()


def test_missing_wikipedia_data_is_one_line_naming_the_package(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    empty = tmp_path / "gensim-without-test-data"
    empty.mkdir()

    def find_spec(name, *args, **kwargs):
        spec = real(name, *args, **kwargs)
        if name == "gensim":
            spec = importlib.util.spec_from_loader("gensim", loader=None, is_package=True)
            spec.submodule_search_locations = [str(empty)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "missing from the installed gensim" in err and "pip install gensim" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-attention", "1.5"], "--keep-attention 1.5: must be between 0 and 1"),
        (["--budget-minutes", "0"], "--budget-minutes 0: must be more than 0"),
        (["--eval-tokens", "10"], "--eval-tokens 10: must be at least one window of 512 tokens"),
        (["--recipe", "no-such.yaml"], "no-such.yaml: recipe file not found"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), *args]) == 2
    assert message in one_line_error(capsys)


def test_default_eval_slice_grows_with_the_budget_up_to_eight_windows():
    assert default_eval_tokens(0.5, 512) == 512
    assert default_eval_tokens(5, 512) == 4 * 512
    assert default_eval_tokens(15, 512) == default_eval_tokens(60, 512) == 8 * 512


def test_fastest_threads_sets_the_count_that_measured_fastest(monkeypatch):
    speeds = {1: 100.0, 2: 300.0, 4: 200.0}
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(budget_module, "forward_tokens_per_s", lambda model, ids, repeats: speeds[chosen[-1]])
    best, measured = budget_module.fastest_threads(None, torch.zeros(1, 8, dtype=torch.long))
    assert (best, measured) == (2, speeds)
    assert chosen[-1] == 2


def test_evaluation_and_training_time_follow_the_measured_speed():
    slow, fast = budget_module.Throughput(100, 80), budget_module.Throughput(400, 320)
    assert budget_module.evaluation_seconds(slow, 4096, 4096, 16) > budget_module.evaluation_seconds(
        fast, 4096, 4096, 16
    )
    more = budget_module.evaluation_seconds(fast, 8192, 4096, 16) - budget_module.evaluation_seconds(
        fast, 4096, 4096, 16
    )
    assert more == pytest.approx(2 * 4096 * (1 / 400 + 1 / 320))
    assert budget_module.training_seconds(900, 60, 150, 2) - budget_module.training_seconds(
        600, 60, 150, 2
    ) == pytest.approx(300 * budget_module.PLAN_SHARE)
