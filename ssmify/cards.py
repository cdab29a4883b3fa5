"""What every ssmify model card shares: the YAML front matter and the distillation history.

The front matter names the teacher as `base_model`, so that the Hub links a student or an export to
the model it came from; `base_model_relation` is "finetune", the Hub's relation for weights trained
further from the base (here with attention swapped for mixers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BASE_MODEL_RELATION = "finetune"
STAGE_FOLDER = re.compile(r"^(\d+)-[a-z]+$")
SUMMARY_FILE = "summary.json"  # a finished stage folder's summary (ssmify.distill.loop)


def front_matter(teacher: str | None, tags: list[str]) -> list[str]:
    """YAML front matter lines: library_name, base_model (the teacher, when known) and tags."""
    lines = ["---", "library_name: transformers"]
    if teacher and not teacher.startswith("<"):  # "<in-memory model>" names no model
        lines += [f"base_model: {json.dumps(teacher)}", f"base_model_relation: {BASE_MODEL_RELATION}"]
    return [*lines, f"tags: [{', '.join(tags)}]", "---"]


def distillation_history(folder: str | Path) -> list[dict]:
    """The summaries of the distillation stages that led to `folder`, when it is a finished stage folder
    (`<output_dir>/<n>-<name>/summary.json`): its own and those of the stages before it, in order."""
    folder = Path(folder)
    match = STAGE_FOLDER.match(folder.name)
    if match is None or not (folder / SUMMARY_FILE).is_file():
        return []
    number = int(match.group(1))
    stages = []
    for sibling in folder.parent.iterdir():
        found = STAGE_FOLDER.match(sibling.name)
        if found and 0 < int(found.group(1)) <= number and (sibling / SUMMARY_FILE).is_file():
            stages.append((int(found.group(1)), sibling / SUMMARY_FILE))
    return [json.loads(path.read_text(encoding="utf-8")) for _, path in sorted(stages)]


def distillation_section(summaries: list[dict]) -> list[str]:
    """A markdown table of the distillation stages: tokens, steps, training and validation loss, time."""
    if not summaries:
        return []
    lines = [
        "",
        "## Distillation",
        "",
        "| stage | tokens | steps | train loss (first -> last) | validation loss (first -> last) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['stage']} | {s['tokens']:,} | {s['steps']} | {s['loss_first']:.4f} -> {s['loss_last']:.4f} "
            f"| {s['val_loss_first']:.4f} -> {s['val_loss_last']:.4f} | {s['seconds']} |"
        )
    return lines
