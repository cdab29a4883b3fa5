"""Experiment trackers for a stage: TensorBoard and Weights & Biases, as the recipe's tracking block says.

Each stage is one run, named after its stage folder (1-matrix, ...), in a project named after
output_dir unless the recipe names them. A resumed stage continues its run: TensorBoard writes to the
same folder, output_dir/logs/<run>, and W&B resumes the run whose id the stage keeps in
<stage folder>/tracking.json.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from ssmify.atomic import write_text_atomic
from ssmify.distill.recipe import Recipe, stage_dir_name
from ssmify.errors import SsmifyError

TRACKING_FILE = "tracking.json"
LOGS_DIR = "logs"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs


def project_name(recipe: Recipe) -> str:
    """tracking.project, else the name of output_dir (e.g. smollm2-demo for runs/smollm2-demo)."""
    return recipe.tracking.project or Path(recipe.output_dir).resolve().name


def run_name(recipe: Recipe, index: int) -> str:
    """The stage's run: its folder name, after tracking.run_name when the recipe gives one."""
    stage_dir = stage_dir_name(index, recipe.stages[index])
    return f"{recipe.tracking.run_name}-{stage_dir}" if recipe.tracking.run_name else stage_dir


def check_installed(recipe: Recipe) -> None:
    """A one-line error for a tracker whose package is missing, before anything trains."""
    for tracker in recipe.tracking.report_to:
        if importlib.util.find_spec(PACKAGES[tracker]) is None:
            extra = " (the 'track' extra: pip install 'ssmify[track]')" if tracker == "tensorboard" else ""
            raise SsmifyError(
                f"tracking.report_to: {tracker} is not installed{extra}; install it (pip install {tracker}) "
                "or remove it"
            )


def wandb_run_id(stage_dir: Path, create: bool) -> str | None:
    """The W&B run id of this stage, kept in its tracking.json; made and saved on first use if `create`."""
    path = stage_dir / TRACKING_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8")).get("wandb_id")
        except (ValueError, AttributeError):
            raise SsmifyError(
                f"{path}: not the JSON ssmify wrote; delete it to start a new W&B run"
            ) from None
        if isinstance(saved, str) and saved:
            return saved
    if not create:
        return None
    run_id = secrets.token_hex(4)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"wandb_id": run_id}))
    return run_id


def wandb_init_kwargs(recipe: Recipe, index: int, run_id: str | None) -> dict:
    """The keyword arguments wandb.init gets (besides project): the run's name, tags, id and resume."""
    kwargs: dict = {"name": run_name(recipe, index), "tags": list(recipe.tracking.tags), "resume": "allow"}
    if run_id is not None:
        kwargs["id"] = run_id
    return kwargs


def make_trackers(recipe: Recipe, index: int, main_process: bool) -> list[GeneralTracker]:
    """The trackers of stage `index`, for `Accelerator(log_with=...)`; they log on the main process only."""
    check_installed(recipe)
    output_dir = Path(recipe.output_dir)
    stage_dir = output_dir / stage_dir_name(index, recipe.stages[index])
    trackers: list[GeneralTracker] = []
    for tracker in recipe.tracking.report_to:
        if tracker == "tensorboard":
            trackers.append(TensorBoardTracker(run_name(recipe, index), output_dir / LOGS_DIR))
        else:
            run_id = wandb_run_id(stage_dir, create=main_process)
            trackers.append(WandBTracker(project_name(recipe), **wandb_init_kwargs(recipe, index, run_id)))
    return trackers


def flush_trackers(trackers: list[GeneralTracker]) -> None:
    """Write TensorBoard's buffered events to disk now (W&B syncs by itself); it buffers up to 2 minutes."""
    for tracker in trackers:
        writer = getattr(tracker, "writer", None)  # set by start(), on the main process only
        if writer is not None:
            writer.flush()
