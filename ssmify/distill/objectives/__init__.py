"""The three stage objectives. Each is an nn.Module that holds the student parts it trains.

An objective has `teacher_targets(teacher, input_ids)` (no gradients; what the student must match)
and `forward(input_ids, targets) -> {"loss": ..., ...}`. The training loop wraps the objective, not
the student, with accelerate, so DDP/FSDP/DeepSpeed see exactly the trained modules and the teacher
is never part of them.
"""

from __future__ import annotations

from torch import nn

from ssmify.distill.lora import merged
from ssmify.distill.objectives.hidden import HiddenObjective
from ssmify.distill.objectives.logits import LogitsObjective
from ssmify.distill.objectives.matrix import MatrixObjective
from ssmify.distill.recipe import LossConfig, Stage
from ssmify.distill.trainable import apply_trainable, converted_blocks, converted_mixers


def build_objective(stage: Stage, student: nn.Module, where: str = "trainable") -> nn.Module:
    """The stage's objective over `student`, with requires_grad set as the stage's `trainable` says.

    `where` is the recipe field that errors name, e.g. stages.2.trainable."""
    if stage.name == "matrix":
        apply_trainable(student, "mixers")
        return MatrixObjective(converted_mixers(student))
    if stage.name == "hidden":
        trained = apply_trainable(student, stage.trainable, "hidden", where)
        return HiddenObjective(
            converted_blocks(student),
            trained if trained is not student else None,
            first_position_weight=stage.first_position_weight,
        )
    return LogitsObjective(
        apply_trainable(student, stage.trainable, "logits", where),
        stage.loss or LossConfig(),
        where.rpartition(".")[0] + ".loss" if "." in where else "loss",
    )


def adapted_model(objective: nn.Module) -> nn.Module | None:
    """The peft model whose adapters `objective` trains, or None when it trains plain weights."""
    return getattr(objective, "adapted", None)


def trained_student(objective: nn.Module, student: nn.Module) -> nn.Module:
    """The plain student after training `objective` (LoRA merged into the weights)."""
    adapted = adapted_model(objective)
    return merged(adapted) if adapted is not None else student


__all__ = [
    "HiddenObjective",
    "LogitsObjective",
    "MatrixObjective",
    "adapted_model",
    "build_objective",
    "trained_student",
]
