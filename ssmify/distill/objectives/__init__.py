"""The three stage objectives. Each is an nn.Module that holds the student parts it trains.

An objective has `teacher_targets(teacher, input_ids)` (no gradients; what the student must match)
and `forward(input_ids, targets) -> {"loss": ..., ...}`. The training loop wraps the objective, not
the student, with accelerate, so DDP/FSDP/DeepSpeed see exactly the trained modules and the teacher
is never part of them.
"""

from __future__ import annotations

from torch import nn

from ssmify.distill.objectives.hidden import HiddenObjective
from ssmify.distill.objectives.logits import LogitsObjective
from ssmify.distill.objectives.matrix import MatrixObjective
from ssmify.distill.recipe import LossConfig, Stage
from ssmify.distill.trainable import apply_trainable, converted_blocks, converted_mixers, merged


def build_objective(stage: Stage, student: nn.Module) -> nn.Module:
    """The stage's objective over `student`, with requires_grad set as the stage's `trainable` says."""
    if stage.name == "matrix":
        apply_trainable(student, "mixers")
        return MatrixObjective(converted_mixers(student))
    if stage.name == "hidden":
        apply_trainable(student, stage.trainable)
        return HiddenObjective(converted_blocks(student))
    return LogitsObjective(apply_trainable(student, stage.trainable), stage.loss or LossConfig())


def trained_student(objective: nn.Module, student: nn.Module) -> nn.Module:
    """The plain student after training `objective` (LoRA merged into the weights)."""
    if isinstance(objective, LogitsObjective):
        return merged(objective.student)
    return student


__all__ = ["HiddenObjective", "LogitsObjective", "MatrixObjective", "build_objective", "trained_student"]
