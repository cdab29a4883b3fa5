"""FSDP2 on 2 CPU processes (gloo): each stage's weights equal one process's, a SIGKILL mid-stage resumes from
the sharded checkpoint to the same weights, and a sharded teacher gives the whole teacher's outputs.

The runs use the shipped recipes/accelerate/fsdp.yaml with `--num_processes 2 --mixed_precision no`
(bf16 autocast would make the comparisons meaningless) and ACCELERATE_USE_CPU=true; accelerate's FSDP
plugin then runs on CPU through `ssmify.distill.sharding.fsdp_plugin_for_stage`. The recipe also shards
the teacher (teacher_sharding: fsdp), which the 1-process run leaves whole.

Run as a script under `accelerate launch`, this file compares a sharded and a whole teacher on each process.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp.yaml"
STAGES = ("1-matrix", "2-hidden", "3-logits")
PROBED_LAYERS = [0, 2]  # the tiny student's converted layers


def launch(script: list[str], **popen) -> subprocess.Popen:
    """`accelerate launch` of `script` with 2 CPU processes over gloo."""
    from test_distill_run import free_port, subprocess_env

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    return subprocess.Popen(
        command + script,
        cwd=REPO,
        env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
        text=True,
        **popen,
    )


def kill_with_children(pid: int) -> None:
    """SIGKILL the launcher and every process under it (killing the launcher's process group misses the workers)."""
    import psutil  # accelerate's own dependency

    launcher = psutil.Process(pid)
    for process in [*launcher.children(recursive=True), launcher]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def distill(recipe: Path, *flags: str) -> str:
    """`ssmify distill RECIPE` on 2 CPU processes under the FSDP config; returns its log (stderr)."""
    process = launch(
        ["-m", "ssmify", "distill", str(recipe), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    return err


def fsdp_recipe(workspace: Path, out: Path) -> dict:
    """Three stages (the logits one trains everything), the teacher sharded, checkpoints every 2 steps."""
    from test_distill_support import recipe_dict, stage

    stages = [
        stage("matrix", seq_len=16, tokens=256),
        stage("hidden", lr=1e-3),  # trains the mixers inside whole blocks: frozen weights in each FSDP unit
        stage("logits", lr=1e-3, trainable="all"),
    ]
    return recipe_dict(
        workspace, stages, output_dir=str(out), teacher_sharding="fsdp", keep_finished_checkpoints=True
    )


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from test_distill_support import make_workspace

    return make_workspace(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def two_processes(workspace: Path) -> Path:
    """The recipe run uninterrupted with FSDP2 on 2 CPU processes."""
    from test_distill_support import write_recipe

    out = workspace / "two"
    distill(write_recipe(workspace / "two.yaml", fsdp_recipe(workspace, out)))
    return out


def test_fsdp2_on_two_cpu_processes_gives_each_stages_weights_of_one_process(
    workspace, two_processes, caplog
):
    from test_distill_run import max_difference, weights
    from transformers import AutoModelForCausalLM

    from ssmify.convert.student import is_student, register
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe

    caplog.set_level(logging.WARNING, logger="ssmify.distill.sharding")
    run_recipe(parse_recipe(fsdp_recipe(workspace, workspace / "one")))
    assert any("with 1 process: nothing to shard across" in r.getMessage() for r in caplog.records)

    for name in STAGES:
        two, one = (
            json.loads((workspace / run / name / "summary.json").read_text()) for run in ("two", "one")
        )
        assert (two["processes"], one["processes"]) == (2, 1)
        assert max_difference(weights(two_processes / name), weights(workspace / "one" / name)) <= 1e-5
    # The checkpoints were sharded: each process wrote its own part of the model and optimizer state.
    step = two_processes / "3-logits" / "checkpoints" / "step-2"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step / "model.safetensors").exists()
    # The stage folder itself holds the full weights, gathered, as a plain transformers folder.
    register()
    student = AutoModelForCausalLM.from_pretrained(two_processes / "3-logits")
    assert is_student(student)
    assert max_difference(weights(two_processes / "3-logits"), weights(workspace / "student")) > 1e-3


def test_a_sigkill_mid_stage_resumes_from_the_sharded_checkpoint_to_the_same_weights(
    workspace, two_processes, tmp_path
):
    from test_distill_run import max_difference, weights
    from test_distill_support import write_recipe

    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", fsdp_recipe(workspace, out))
    checkpoint = out / "3-logits" / "checkpoints" / "step-2"
    process = launch(
        ["-m", "ssmify", "distill", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        kill_with_children(process.pid)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / "2-hidden" / "summary.json").is_file() and not (out / "3-logits" / "summary.json").exists()

    log = distill(recipe, "--resume")
    assert f"3-logits: resuming from {checkpoint}" in log
    for name in STAGES:
        assert max_difference(weights(out / name), weights(two_processes / name)) <= 1e-6


def test_a_sharded_teacher_gives_the_whole_teachers_logits_attention_and_block_outputs(workspace, tmp_path):
    process = launch(
        [__file__, str(workspace / "teacher"), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log, _ = process.communicate()
    assert process.returncode == 0, log[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert found["local_parameters"] <= found["parameters"] // 2 + 64  # a half, up to padding
        assert found["logits"] <= 1e-5 and found["attention"] <= 1e-5 and found["blocks"] <= 1e-5, found
        assert found["logits_scale"] > 0.1  # the logits compared are not all zero


def test_fsdp1_on_cpu_processes_is_refused_with_one_line(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ssmify.distill.sharding import fsdp_plugin_for_stage
    from ssmify.errors import SsmifyError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no")
    accelerator = SimpleNamespace(state=state, is_main_process=True, num_processes=2)
    with pytest.raises(SsmifyError, match=r"fsdp_version 1 on CPU processes; only FSDP2 \(fsdp_version: 2\)"):
        fsdp_plugin_for_stage(accelerator)
    assert state.distributed_type == DistributedType.MULTI_CPU


def compare_sharded_teacher(teacher_dir: str, out: str) -> None:
    """On each process: the outputs of the teacher sharded over the processes, minus the whole teacher's."""
    from ssmify.convert.probes import capture_blocks, teacher_attention
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.sharding import shard_teacher
    from ssmify.distill.state import distributed_state

    state = distributed_state()
    torch.manual_seed(state.process_index)  # each process its own inputs
    input_ids = torch.randint(4, 128, (2, 24))
    whole, _ = load_teacher(teacher_dir, "float32")
    sharded, _ = load_teacher(teacher_dir, "float32")
    shard_teacher(sharded, state)

    def outputs(teacher) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            logits = teacher(input_ids=input_ids, use_cache=False).logits
            probes = teacher_attention(teacher, input_ids, PROBED_LAYERS)
            blocks = capture_blocks(teacher, input_ids, PROBED_LAYERS)
        return logits, [probes[i].probs for i in PROBED_LAYERS], [blocks[i].output for i in PROBED_LAYERS]

    (logits, attention, blocks), (s_logits, s_attention, s_blocks) = outputs(whole), outputs(sharded)

    def largest(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    result = {
        "parameters": sum(p.numel() for p in whole.parameters()),
        "local_parameters": sum(p.to_local().numel() for p in sharded.parameters()),
        "logits": (logits - s_logits).abs().max().item(),
        "logits_scale": logits.abs().max().item(),
        "attention": largest(attention, s_attention),
        "blocks": largest(blocks, s_blocks),
    }
    Path(out, f"rank-{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    compare_sharded_teacher(sys.argv[1], sys.argv[2])
