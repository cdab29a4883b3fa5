"""Nothing is lost: SIGKILLs at every moment of a run, a damaged newest checkpoint, and a disk that fills.

The sweep itself is `scripts/kill_sweep.py`; here a short one kills one run at four chosen moments.
The other tests run in-process on a one-stage recipe with checkpoints at steps 2 and 4 of 6.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file, save_file
from test_distill_support import make_workspace, recipe_dict, stage, write_recipe

from ssmify.cli import main
from ssmify.distill.checkpoints import checkpoint_problem
from ssmify.distill.recipe import parse_recipe
from ssmify.distill.run import run_recipe
from ssmify.errors import SsmifyError

REPO = Path(__file__).resolve().parents[1]
STAGE = "1-logits"

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kill_sweep = load_script("kill_sweep")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("kill"))


def one_stage(workspace: Path, out: Path, keep: int = 2) -> dict:
    """Six steps, checkpoints after steps 2 and 4 (none after the last)."""
    stages = [stage("logits", lr=1e-3, tokens=128 * 6, checkpoint_every=2)]
    return recipe_dict(
        workspace, stages, output_dir=str(out), keep_checkpoints=keep, keep_finished_checkpoints=True
    )


@pytest.fixture(scope="module")
def reference(workspace: Path) -> Path:
    """The one-stage recipe run uninterrupted."""
    out = workspace / "reference"
    run_recipe(parse_recipe(one_stage(workspace, out)))
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / STAGE / "model.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    mine, theirs = weights(a), weights(b)
    assert mine.keys() == theirs.keys()
    return max((mine[k] - theirs[k]).abs().max().item() for k in theirs)


def test_a_short_sweep_kills_at_four_moments_and_every_resume_ends_at_the_reference(tmp_path):
    target = kill_sweep.Target
    plan = [
        target("training", "1-matrix"),
        target("checkpoint write", "2-hidden", 4),
        target("hand-off", "2-hidden"),
        target("student save", "3-logits"),
    ]
    lines: list[str] = []
    result = kill_sweep.sweep(tmp_path, kills=len(plan), seed=0, plan=plan, log=lines.append)

    log = "\n".join(lines)
    assert not result.failures, result.failures
    assert [k.target for k in result.kills] == plan, log
    assert result.runs == 1 and result.resumed == len(plan)
    assert all(k.after >= k.before and k.resumed_from == k.after for k in result.kills), log
    assert len(result.differences) == 1 and result.differences[0] <= kill_sweep.TOLERANCE, log
    assert result.ok


def test_the_sweep_sees_a_changed_tensor_and_a_lost_checkpoint(tmp_path, reference):
    for copy in ("a", "b"):
        for name in kill_sweep.STAGES:
            shutil.copytree(reference / STAGE, tmp_path / copy / name)
    assert kill_sweep.weights_difference(tmp_path / "a", tmp_path / "b") == 0.0
    changed = tmp_path / "b" / "2-hidden" / "model.safetensors"
    tensors = load_file(str(changed))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-5
    save_file(tensors, str(changed))
    assert kill_sweep.weights_difference(tmp_path / "a", tmp_path / "b") > kill_sweep.TOLERANCE

    kill = kill_sweep.Kill(
        0, kill_sweep.Target("training", "2-hidden"), 0.0, "training", "2-hidden", (1, 4), (1, 4)
    )
    kill.resumed_from = (1, 4)
    assert not kill.lost
    kill.resumed_from = (1, 2)  # resumed from an older checkpoint than the one on disk
    assert kill.lost
    kill.resumed_from, kill.after = None, (1, 2)  # the newest checkpoint went missing in the kill
    assert kill.lost


def open_copy(reference: Path, out: Path) -> Path:
    """A copy of the finished reference run whose stage is open again: only its checkpoints are left."""
    shutil.copytree(reference, out)
    (out / "recipe.yaml").unlink()  # it names the reference's output_dir
    for item in (out / STAGE).iterdir():
        if item.name != "checkpoints":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    return out / STAGE / "checkpoints"


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32  # same size: only the header parse can tell
    path.write_bytes(bytes(data))


def forget_sizes_and_cut(folder: Path) -> None:
    """A checkpoint from before sizes were recorded, cut: the safetensors header still tells."""
    progress = folder / "progress.json"
    record = json.loads(progress.read_text())
    record.pop("files")
    progress.write_text(json.dumps(record))
    cut_in_half(folder / "model.safetensors")


DAMAGE = {
    "safetensors cut in half": (lambda f: cut_in_half(f / "model.safetensors"), "model.safetensors is"),
    "garbled progress.json": (lambda f: (f / "progress.json").write_text('{"step": 4,'), "not valid JSON"),
    "missing progress.json": (lambda f: (f / "progress.json").unlink(), "progress.json is missing"),
    "missing optimizer.bin": (lambda f: (f / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "garbled safetensors header": (lambda f: garble_header(f / "model.safetensors"), "header"),
    "old checkpoint, cut": (forget_sizes_and_cut, "its header says"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(
    workspace, reference, tmp_path, caplog, damage
):
    out = tmp_path / "run"
    checkpoints = open_copy(reference, out)
    harm, reason = DAMAGE[damage]
    harm(checkpoints / "step-4")
    assert checkpoint_problem(checkpoints / "step-2") is None
    assert reason in checkpoint_problem(checkpoints / "step-4")

    caplog.set_level(logging.INFO, logger="ssmify.distill")
    run_recipe(parse_recipe(one_stage(workspace, out)), resume=True)

    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()
    ]
    assert len(warnings) == 1 and "step-4" in warnings[0] and reason in warnings[0], warnings
    assert "resuming from step-2" in warnings[0]
    assert any(
        r.getMessage().endswith("resuming from " + str(checkpoints / "step-2")) for r in caplog.records
    )
    assert (checkpoints / "step-4.invalid").is_dir()
    assert checkpoint_problem(checkpoints / "step-4") is None  # written again by the resumed run
    assert max_difference(out, reference) <= 1e-6


def test_with_every_checkpoint_damaged_the_stage_starts_over(workspace, reference, tmp_path, caplog):
    out = tmp_path / "run"
    checkpoints = open_copy(reference, out)
    for step in (2, 4):
        cut_in_half(checkpoints / f"step-{step}" / "optimizer.bin")

    caplog.set_level(logging.WARNING, logger="ssmify.distill")
    run_recipe(parse_recipe(one_stage(workspace, out)), resume=True)

    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [("step-4" in w, "step-2" in w) for w in warnings] == [(True, False), (False, True)]
    assert all("the stage starts over" in w for w in warnings)
    assert max_difference(out, reference) <= 1e-6


def error_line(err: str) -> str:
    """The CLI's error: exactly one line that says error, the last one, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]], err
    return lines[-1]


def full_disk(real, marker: str):
    """`real` (a writer taking a path second or first), except that under `marker` the disk fills mid-write."""

    def write(*args, **kwargs):
        path = next(str(a) for a in args if isinstance(a, (str, Path)))
        if marker in path:
            Path(path).write_bytes(b"\0" * 64)  # what fitted before the disk was full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(*args, **kwargs)

    return write


def test_a_disk_full_during_a_checkpoint_stops_with_one_line_and_resume_continues(
    workspace, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "recipe.yaml", one_stage(workspace, out))
    checkpoints = out / STAGE / "checkpoints"
    monkeypatch.setattr(
        accelerate.checkpointing, "save", full_disk(accelerate.checkpointing.save, ".tmp-step-4")
    )

    assert main(["distill", str(path)]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"ssmify: error: {checkpoints}: the disk is full"), err
    assert "checkpoint step-2 is intact" in err and "--resume" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]  # the half-written step-4 is gone
    assert checkpoint_problem(checkpoints / "step-2") is None

    monkeypatch.undo()  # space freed
    assert main(["distill", str(path), "--resume"]) == 0
    assert max_difference(out, reference) <= 1e-6


def test_a_disk_full_during_the_final_save_stops_with_one_line_and_resume_continues(
    workspace, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "recipe.yaml", one_stage(workspace, out))
    real = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk(real, ".student-tmp"))

    assert main(["distill", str(path)]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"ssmify: error: {out / STAGE}: the disk is full"), err
    assert "step-4 is intact" in err
    assert not (out / STAGE / ".student-tmp").exists() and not (out / STAGE / "summary.json").exists()

    monkeypatch.undo()
    assert main(["distill", str(path), "--resume"]) == 0
    assert max_difference(out, reference) <= 1e-6


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("unexpected pos 576 vs 534"), False),  # torch.save's failure, on a disk with room
    ],
)
def test_only_a_full_disk_becomes_the_disk_full_message(tmp_path, error, full):
    from ssmify.disk_full import stop_when_disk_full

    with pytest.raises(SsmifyError if full else type(error)) as raised:
        with stop_when_disk_full(tmp_path, "a file", "nothing lost"):
            raise error
    assert ("disk is full" in str(raised.value)) == full
