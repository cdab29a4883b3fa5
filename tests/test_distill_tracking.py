"""Experiment tracking: TensorBoard event files hold each stage's loss and lr, a resumed stage continues
its run, and W&B (not installed here) would get the project, run name, tags and a stable resume id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distill_support import make_workspace, recipe_dict, stage

import ssmify.distill.loop as loop_module
import ssmify.distill.tracking as tracking
from ssmify.distill.recipe import parse_recipe
from ssmify.distill.run import run_recipe
from ssmify.errors import SsmifyError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tracking"))


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def scalars(folder: Path) -> dict[str, list[int]]:
    """{tag: steps} of the scalars in the TensorBoard event files of one run folder."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_loss_and_lr_and_a_resumed_stage_appends_to_its_run(
    workspace, tmp_path, monkeypatch
):
    stages = [stage("logits", tokens=512, checkpoint_every=2)]  # 4 steps, a checkpoint after step 2
    raw = recipe_dict(workspace, stages, output_dir=str(tmp_path / "run"))
    recipe = parse_recipe({**raw, "tracking": {"report_to": ["tensorboard"]}})
    real_save = loop_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run_recipe(recipe)
    logs = tmp_path / "run" / "logs"
    assert [p.name for p in logs.iterdir()] == ["1-logits"]
    before = scalars(logs / "1-logits")
    assert before["loss"] == [1, 2] and before["lr"] == [1, 2]

    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    run_recipe(recipe, resume=True)
    assert [p.name for p in logs.iterdir()] == ["1-logits"]  # the same run, not a new one
    event_files = sorted((logs / "1-logits").glob("events.out.tfevents.*"))
    assert len(event_files) == 2  # one per session, side by side
    after = scalars(logs / "1-logits")
    assert after["loss"] == [1, 2, 3, 4] and after["lr"] == [1, 2, 3, 4]
    assert after["val_loss"] == [4]
    summary = json.loads((tmp_path / "run" / "1-logits" / "summary.json").read_text())
    losses = EventAccumulator(str(logs / "1-logits"))
    losses.Reload()
    assert [e.value for e in losses.Scalars("loss")] == pytest.approx(summary["losses"], rel=1e-6)


def wandb_recipe(tmp_path: Path, workspace: Path, **tracking_fields):
    stages = [stage("matrix", seq_len=16, tokens=256), stage("logits")]
    raw = recipe_dict(workspace, stages, output_dir=str(tmp_path / "runs" / "my-run"))
    return parse_recipe({**raw, "tracking": {"report_to": ["wandb"], **tracking_fields}})


def test_wandb_runs_are_named_after_the_stage_in_a_project_named_after_the_run(
    workspace, tmp_path, monkeypatch
):
    monkeypatch.setattr(tracking, "check_installed", lambda recipe: None)
    recipe = wandb_recipe(tmp_path, workspace, tags=["hybrid", "smoke"])
    [tracker] = tracking.make_trackers(recipe, 1, main_process=True)
    saved = json.loads((tmp_path / "runs" / "my-run" / "2-logits" / "tracking.json").read_text())
    assert tracker.name == "wandb" and tracker.run_name == "my-run"  # accelerate: wandb.init(project=...)
    assert tracker.init_kwargs == {
        "name": "2-logits",
        "tags": ["hybrid", "smoke"],
        "resume": "allow",
        "id": saved["wandb_id"],
    }
    [again] = tracking.make_trackers(recipe, 1, main_process=True)  # a resumed stage
    assert again.init_kwargs["id"] == saved["wandb_id"]
    [matrix] = tracking.make_trackers(recipe, 0, main_process=True)
    assert matrix.init_kwargs["name"] == "1-matrix" and matrix.init_kwargs["id"] != saved["wandb_id"]

    named = wandb_recipe(tmp_path / "other", workspace, project="ssm", run_name="try3")
    [tracker] = tracking.make_trackers(named, 0, main_process=False)
    assert tracker.run_name == "ssm" and tracker.init_kwargs == {
        "name": "try3-1-matrix",
        "tags": [],
        "resume": "allow",
    }
    assert not (tmp_path / "other" / "runs").exists()  # only the main process writes the id


def test_a_tracker_that_is_not_installed_is_refused_before_any_model_loads(workspace, tmp_path, monkeypatch):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name)
    )
    recipe = wandb_recipe(tmp_path, workspace)
    with pytest.raises(SsmifyError, match=r"^tracking.report_to: wandb is not installed; install it"):
        run_recipe(recipe)
    assert not (tmp_path / "runs").exists()


def test_the_old_trackers_key_still_works_but_not_beside_the_tracking_block(workspace, tmp_path):
    raw = recipe_dict(workspace, [stage("logits")], output_dir=str(tmp_path / "run"))
    assert parse_recipe({**raw, "trackers": ["tensorboard"]}).tracking.report_to == ["tensorboard"]
    both = {**raw, "trackers": ["tensorboard"], "tracking": {"report_to": ["wandb"]}}
    with pytest.raises(SsmifyError, match=r"^recipe: trackers: the old form of tracking.report_to"):
        parse_recipe(both)
