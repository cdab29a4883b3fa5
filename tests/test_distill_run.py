"""Whole runs: stages chained through their folders, resume after SIGKILL, 2-process DDP, NaN guard, bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distill_support import make_workspace, recipe_dict, stage, write_recipe, write_teacher
from transformers import AutoModelForCausalLM

import ssmify.distill.loop as loop_module
import ssmify.distill.run as run_module
from ssmify.cli import main
from ssmify.convert.student import is_student, mixer_layers, register
from ssmify.distill.data import StreamedBlocks
from ssmify.distill.objectives.logits import LogitsObjective
from ssmify.distill.recipe import parse_recipe
from ssmify.distill.run import check_same_recipe, run_recipe
from ssmify.errors import SsmifyError

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "stage",
    "tokens",
    "steps",
    "seconds",
    "loss_first",
    "loss_last",
    "val_loss_first",
    "val_loss_last",
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("distill"))


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def three_stages(**logits_fields) -> list[dict]:
    return [
        stage("matrix", seq_len=16, tokens=256),
        stage("hidden", lr=1e-3),
        stage("logits", lr=1e-3, **logits_fields),
    ]


def test_three_stages_chain_through_loadable_folders(workspace, tmp_path, monkeypatch):
    stages = three_stages()
    stages[1]["lr"] = 1e-9  # hidden barely moves, so its output must equal its input: the matrix stage's
    stages[2].update(tokens=768, eval_every=2)
    recipe = parse_recipe(
        recipe_dict(
            workspace,
            stages,
            output_dir=str(tmp_path / "run"),
            keep_checkpoints=1,
            keep_finished_checkpoints=True,
        )
    )
    summaries = run_recipe(recipe)

    out = tmp_path / "run"
    assert [s["stage"] for s in summaries] == ["1-matrix", "2-hidden", "3-logits"]
    for summary in summaries:
        assert SUMMARY_KEYS <= summary.keys()
        assert json.loads((out / summary["stage"] / "summary.json").read_text())["steps"] == summary["steps"]
    assert [s["tokens"] for s in summaries] == [256, 512, 768]
    assert sorted(p.name for p in (out / "3-logits" / "checkpoints").iterdir()) == ["step-4"]

    register()
    student = AutoModelForCausalLM.from_pretrained(out / "3-logits")
    assert is_student(student) and sorted(mixer_layers(student)) == [0, 2]
    start, matrix, hidden, logits = (
        weights(d) for d in (workspace / "student", out / "1-matrix", out / "2-hidden", out / "3-logits")
    )
    key = "model.layers.0.self_attn.mixer.in_proj.weight"
    assert not torch.allclose(matrix[key], start[key])
    assert torch.allclose(hidden[key], matrix[key], atol=1e-6)
    assert not torch.allclose(logits[key], hidden[key])
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(logits[mlp], start[mlp])  # trainable: mixers
    assert summaries[2]["val_loss_last"] < summaries[2]["val_loss_first"]
    assert len(summaries[2]["val_losses"]) == 4  # step 0, 2, 4 and the end
    front, card = front_matter_and_body(out / "2-hidden" / "README.md")
    assert front["base_model"] == str(workspace / "teacher") and front["library_name"] == "transformers"
    assert "| 1-matrix | 256 |" in card and "| 2-hidden | 512 |" in card and "3-logits" not in card

    def no_teacher(*args, **kwargs):
        raise AssertionError("a finished run must not load the teacher again")

    monkeypatch.setattr(run_module, "load_teacher", no_teacher)
    assert run_recipe(recipe, resume=True) == summaries
    with pytest.raises(SsmifyError, match="already holds a run; pass --resume"):
        run_recipe(recipe)


def test_a_finished_stage_drops_its_checkpoints_and_a_resume_drops_a_killed_cleanups_leftovers(
    workspace, tmp_path, monkeypatch
):
    written = []
    save_checkpoint = loop_module.save_checkpoint

    def recorded(accelerator, root, step, progress, keep):
        written.append(save_checkpoint(accelerator, root, step, progress, keep))
        return written[-1]

    monkeypatch.setattr(loop_module, "save_checkpoint", recorded)
    raw = recipe_dict(
        workspace, [stage("logits", tokens=128 * 6, checkpoint_every=2)], output_dir=str(tmp_path)
    )
    recipe = parse_recipe(raw)
    run_recipe(recipe)
    stage_dir = tmp_path / "1-logits"
    assert [p.name for p in written] == ["step-2", "step-4"]
    assert sorted(p.name for p in stage_dir.iterdir() if "checkpoints" in p.name) == []
    trained = weights(stage_dir)

    # a kill after the summary was written, in the middle of the cleanup, leaves both of these behind
    (stage_dir / "checkpoints" / "step-4").mkdir(parents=True)
    (stage_dir / ".trash-checkpoints" / "step-2").mkdir(parents=True)
    run_recipe(recipe, resume=True)
    assert sorted(p.name for p in stage_dir.iterdir() if "checkpoints" in p.name) == []
    assert all(torch.equal(trained[k], v) for k, v in weights(stage_dir).items())


def streamed_train(workspace: Path) -> list[dict]:
    """The training text as a streamed dataset (a local folder that `datasets` reads as a hub repository)."""
    folder = workspace / "streamed"
    if not folder.is_dir():
        folder.mkdir()
        documents = (workspace / "train.txt").read_text().split("\n\n")
        (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents))
    return [{"hub": str(folder), "streaming": True}]


@pytest.mark.parametrize(
    "synthetic", [None, {"fraction": 0.5, "kinds": ["kv"]}], ids=["natural", "synthetic"]
)
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(workspace, tmp_path, caplog, synthetic):
    long_stage = [stage("logits", tokens=128 * 60, checkpoint_every=2)]
    killed = recipe_dict(workspace, long_stage, output_dir=str(tmp_path / "a"))
    killed["data"]["synthetic"] = synthetic
    path = write_recipe(tmp_path / "recipe.yaml", killed)
    checkpoints = tmp_path / "a" / "1-logits" / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "ssmify", "distill", str(path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (checkpoints / "step-4").is_dir() and process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "a" / "1-logits" / "summary.json").exists()

    caplog.set_level(logging.INFO, logger="ssmify.distill.loop")
    run_recipe(parse_recipe(yaml.safe_load(path.read_text())), resume=True)
    assert any("resuming from" in r.getMessage() and "step-" in r.getMessage() for r in caplog.records)

    uninterrupted = recipe_dict(
        workspace, [{**long_stage[0], "checkpoint_every": 1000}], output_dir=str(tmp_path / "b")
    )
    uninterrupted["data"]["synthetic"] = synthetic
    run_recipe(parse_recipe(uninterrupted))
    resumed, reference = weights(tmp_path / "a" / "1-logits"), weights(tmp_path / "b" / "1-logits")
    assert max_difference(resumed, reference) <= 1e-6
    assert max_difference(reference, weights(workspace / "student")) > 1e-3  # it did train


def test_each_stage_trains_on_its_own_synthetic_fraction(workspace, tmp_path, monkeypatch):
    seen = []
    load_data = run_module.load_data

    def recording(config, tokenizer, seq_len, seed):
        seen.append(config.synthetic)
        return load_data(config, tokenizer, seq_len, seed)

    monkeypatch.setattr(run_module, "load_data", recording)
    stages = [stage("logits", tokens=128), stage("logits", tokens=128, synthetic_fraction=0.5)]
    stages.append(stage("logits", tokens=128, synthetic_fraction=0.0))
    raw = recipe_dict(workspace, stages, output_dir=str(tmp_path / "run"))
    raw["data"]["synthetic"] = {"fraction": 0.1, "kinds": ["kv"]}
    run_recipe(parse_recipe(raw))
    assert [(s.fraction, s.kinds) for s in seen] == [(0.1, ["kv"]), (0.5, ["kv"]), (0.0, ["kv"])]


def test_a_streamed_stage_resumes_from_the_stream_position_in_its_checkpoint(
    workspace, tmp_path, monkeypatch
):
    streamed = recipe_dict(workspace, [stage("logits", tokens=128 * 12, checkpoint_every=4)])
    streamed["data"].update(train=streamed_train(workspace), shuffle_buffer=16)
    save_checkpoint = loop_module.save_checkpoint

    def stops_after_step_8(accelerator, root, step, progress, keep):
        folder = save_checkpoint(accelerator, root, step, progress, keep)
        if step == 8:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(loop_module, "save_checkpoint", stops_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe({**streamed, "output_dir": str(tmp_path / "a")}))
    monkeypatch.setattr(loop_module, "save_checkpoint", save_checkpoint)
    progress = json.loads(
        (tmp_path / "a" / "1-logits" / "checkpoints" / "step-8" / "progress.json").read_text()
    )
    # Step 7 (from 0) holds sequences 28-31 in two micro batches of 2; the last take() started at 30.
    assert progress["data"]["block"] == 30

    starts = []
    stream = StreamedBlocks._stream
    monkeypatch.setattr(
        StreamedBlocks, "_stream", lambda self, at: starts.append(at["block"]) or stream(self, at)
    )
    run_recipe(parse_recipe({**streamed, "output_dir": str(tmp_path / "a")}), resume=True)
    assert starts == [30]  # read on from the saved position, not from the start of the stream
    monkeypatch.setattr(StreamedBlocks, "_stream", stream)
    run_recipe(
        parse_recipe(
            {
                **streamed,
                "output_dir": str(tmp_path / "b"),
                "stages": [stage("logits", tokens=128 * 12, checkpoint_every=100)],
            }
        )
    )
    assert max_difference(weights(tmp_path / "a" / "1-logits"), weights(tmp_path / "b" / "1-logits")) <= 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_in_two_cpu_processes(recipe: Path) -> None:
    """`ssmify distill RECIPE` under `accelerate launch` with 2 processes on CPU (the shipped DDP config)."""
    config = REPO / "recipes" / "accelerate" / "ddp.yaml"  # a GPU config, run on CPU: ACCELERATE_USE_CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    launch += ["-m", "ssmify", "distill", str(recipe)]
    result = subprocess.run(
        launch,
        cwd=REPO,
        env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_cpu_processes_give_the_weights_of_one_with_the_same_global_batch(workspace, tmp_path):
    stages = three_stages(trainable="all")
    path = write_recipe(
        tmp_path / "recipe.yaml", recipe_dict(workspace, stages, output_dir=str(tmp_path / "two"))
    )
    distill_in_two_cpu_processes(path)
    run_recipe(parse_recipe(recipe_dict(workspace, stages, output_dir=str(tmp_path / "one"))))
    for name in ("1-matrix", "2-hidden", "3-logits"):
        two, one = (
            json.loads((tmp_path / run / name / "summary.json").read_text()) for run in ("two", "one")
        )
        assert (two["processes"], one["processes"]) == (2, 1)
        assert two["accumulation"] * 2 == one["accumulation"]
        assert max_difference(weights(tmp_path / "two" / name), weights(tmp_path / "one" / name)) <= 1e-5


DRIVER = """
import sys
import accelerate
from ssmify.cli import main

save_state = accelerate.Accelerator.save_state


def fails_on_rank_1(self, *args, **kwargs):
    if self.process_index == 1:
        raise OSError(5, "simulated: rank 1 cannot write its part", args[0])
    return save_state(self, *args, **kwargs)


accelerate.Accelerator.save_state = fails_on_rank_1
sys.exit(main(["distill", sys.argv[1]]))
"""


def test_a_process_that_cannot_write_its_checkpoint_part_stops_every_process_in_one_line(workspace, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    recipe = recipe_dict(workspace, [stage("logits", checkpoint_every=2)], output_dir=str(tmp_path / "run"))
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    config = REPO / "recipes" / "accelerate" / "ddp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    result = subprocess.run(
        [*launch, str(driver), str(path)],
        cwd=REPO,
        env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ssmify: error:")]
    assert any("simulated: rank 1 cannot write its part" in line for line in errors), result.stderr[-3000:]
    assert any("checkpoint step-2: another process failed writing its part" in line for line in errors)
    checkpoints = tmp_path / "run" / "1-logits" / "checkpoints"
    assert not list(checkpoints.glob("*step-2*"))  # neither a checkpoint nor its temporary folder is left


def test_a_nan_loss_stops_the_run_and_points_at_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    calls = {"training": 0}
    forward = LogitsObjective.forward

    def poisoned(self, input_ids, targets):
        out = forward(self, input_ids, targets)
        if self.training:
            calls["training"] += 1
            if calls["training"] > 8:  # 2 micro batches a step: step 5 goes bad
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(LogitsObjective, "forward", poisoned)
    recipe = parse_recipe(
        recipe_dict(workspace, [stage("logits", tokens=128 * 8)], output_dir=str(tmp_path / "run"))
    )
    with pytest.raises(SsmifyError) as info:
        run_recipe(recipe)
    stage_dir = tmp_path / "run" / "1-logits"
    message = str(info.value)
    assert "the loss became nan at step 5" in message
    assert str(stage_dir / "checkpoints" / "step-4") in message
    assert (stage_dir / "checkpoints" / "step-4" / "model.safetensors").is_file()
    assert not (stage_dir / "summary.json").exists() and not (stage_dir / "model.safetensors").exists()


def front_matter_and_body(readme: Path) -> tuple[dict, str]:
    """A model card's YAML front matter, parsed, and the markdown after it."""
    _, front, body = readme.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(front), body


def cli_error(args: list[str], capsys) -> str:
    """The CLI's error line; it must exit 2 with exactly one such line, last, and no traceback."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]]
    assert lines[-1].startswith("ssmify: error: ")
    return lines[-1]


def test_bad_recipes_stop_with_one_line_naming_the_field(workspace, tmp_path, capsys):
    def recipe_file(name: str, **changes) -> str:
        raw = recipe_dict(workspace, [stage("logits")], output_dir=str(tmp_path / name))
        for dotted, value in changes.items():
            node = raw
            *parents, last = dotted.split("__")
            for part in parents:
                node = node[int(part)] if part.isdigit() else node[part]
            node[last] = value
        return str(write_recipe(tmp_path / f"{name}.yaml", raw))

    assert "stages.0.lrr: unknown key (did you mean lr?)" in cli_error(
        ["distill", recipe_file("typo", stages__0__lrr=0.1)], capsys
    )
    assert "stages.0.name: unknown stage 'logit'" in cli_error(
        ["distill", recipe_file("name", stages__0__name="logit")], capsys
    )
    assert "stages.0.tokens: 64 is smaller than one batch" in cli_error(
        ["distill", recipe_file("budget", stages__0__tokens=64)], capsys
    )
    missing = str(workspace / "no-such-corpus.txt")
    assert f"{missing}: no such file" in cli_error(
        ["distill", recipe_file("data", data__train=[missing])], capsys
    )
    assert not (tmp_path / "data").exists()  # stopped before writing anything


def test_a_student_with_another_vocabulary_is_refused(workspace, tmp_path, capsys):
    from test_distill_support import convert_student

    write_teacher(tmp_path / "other-teacher", vocab_size=96)
    convert_student(tmp_path / "other-teacher", tmp_path / "other-student")
    raw = recipe_dict(workspace, [stage("logits")], output_dir=str(tmp_path / "run"))
    raw["student"] = {"path": str(tmp_path / "other-student")}
    path = write_recipe(tmp_path / "r.yaml", raw)
    line = cli_error(["distill", str(path)], capsys)
    assert "other-student: vocab_size 96 does not match the teacher's 128" in line


def test_input_errors_found_before_any_model_loads_are_one_line(workspace, tmp_path, capsys, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not load before the inputs are checked")

    monkeypatch.setattr(run_module, "load_teacher", no_teacher)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("teacher: caf\u00e9\n".encode("latin-1"))
    assert f"{latin1}: not UTF-8 text" in cli_error(["distill", str(latin1)], capsys)

    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    raw = recipe_dict(workspace, [stage("logits")], output_dir=str(a_file))
    line = cli_error(["distill", str(write_recipe(tmp_path / "file.yaml", raw))], capsys)
    assert f"output_dir {a_file}: exists and is not a folder" in line

    later = stage("logits", micro_batch_size=3)  # 128 tokens a batch is not 3 sequences of 32
    raw = recipe_dict(workspace, [stage("matrix"), later], output_dir=str(tmp_path / "sizes"))
    line = cli_error(["distill", str(write_recipe(tmp_path / "sizes.yaml", raw))], capsys)
    assert "stages.1.global_batch_tokens: 128 is not a multiple of micro_batch_size x seq_len" in line
    assert not (tmp_path / "sizes").exists()


def test_a_malformed_jsonl_line_in_the_data_is_a_one_line_error(workspace, tmp_path, capsys):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text('{"text": "a fine first document"}\n{"text": "cut off\n{"text": "third"}\n')
    raw = recipe_dict(workspace, [stage("logits")], output_dir=str(tmp_path / "run"))
    raw["data"]["train"] = [str(corpus)]
    line = cli_error(["distill", str(write_recipe(tmp_path / "r.yaml", raw))], capsys)
    assert f"data: {corpus}: cannot be read as .jsonl data" in line


def test_resume_refuses_a_changed_recipe_unless_forced(workspace, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    raw = recipe_dict(workspace, [stage("logits")], output_dir=str(out))
    started = parse_recipe(raw)
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(started.model_dump(mode="json"), sort_keys=False))
    (out / "1-logits").mkdir()
    (out / "1-logits" / "summary.json").write_text(json.dumps({"stage": "1-logits"}))  # finished
    changed = write_recipe(
        tmp_path / "changed.yaml", {**raw, "seed": 7, "stages": [stage("logits", lr=1e-4)]}
    )

    line = cli_error(["distill", str(changed), "--resume"], capsys)
    assert "recipe differs from the run's" in line and "seed, stages.0.lr; pass --force" in line
    caplog.set_level(logging.WARNING, logger="ssmify.distill.run")
    assert main(["distill", str(changed), "--resume", "--force"]) == 0
    assert any("seed, stages.0.lr" in r.getMessage() for r in caplog.records)
    forced = {**raw, "seed": 7}  # the run's recipe is now the one it was forced to resume with
    extended = parse_recipe({**forced, "stages": [stage("logits", lr=1e-4), stage("logits")]})
    check_same_recipe(extended, out / "recipe.yaml", force=False)  # appended stages extend the run
    reordered = parse_recipe({**forced, "stages": [stage("logits"), stage("logits", lr=1e-4)]})
    with pytest.raises(SsmifyError, match=r"in stages\.0\.lr; pass --force"):
        check_same_recipe(reordered, out / "recipe.yaml", force=False)


def test_activation_checkpointing_recomputes_the_blocks_and_trains_to_the_same_weights(
    workspace, tmp_path, monkeypatch
):
    import transformers.modeling_utils

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)

    def run(name: str, checkpointing: bool) -> Path:
        stages = [
            stage("hidden", lr=1e-3, activation_checkpointing=checkpointing),
            stage("logits", lr=1e-3, trainable="all", activation_checkpointing=checkpointing),
        ]
        run_recipe(parse_recipe(recipe_dict(workspace, stages, output_dir=str(tmp_path / name))))
        return tmp_path / name

    plain = run("plain", False)
    assert not calls
    recomputed = run("recomputed", True)
    assert calls  # the blocks ran through torch.utils.checkpoint
    for folder in ("1-hidden", "2-logits"):
        assert max_difference(weights(plain / folder), weights(recomputed / folder)) < 1e-6
    assert max_difference(weights(workspace / "student"), weights(plain / "2-logits")) > 1e-4
