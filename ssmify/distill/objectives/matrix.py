"""Stage 1 (matrix): each converted layer's mixing matrix is fitted to the teacher's attention matrix.

The input of every converted layer is the teacher's own attention input there, so all converted
layers train at once from one teacher forward pass, independently of each other. The loss of a
layer is the Frobenius norm of (student mixing matrix - teacher attention probabilities) per head
and sequence, averaged, as in MOHAWK; the stage's loss is the mean over layers. Memory is
O(L^2) per head, so this stage uses short sequences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MatrixLayerLoss(nn.Module):
    """One converted layer's matrix loss. It is the unit that FSDP wraps: its forward gathers the mixer."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, attention_input: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        heads = getattr(self.mixer, "teacher_heads", None)  # a mixed layer's mixer computes only these
        if heads is not None:
            attention = attention[:, list(heads)]
        mixing = self.mixer.materialize(attention_input)
        return torch.linalg.matrix_norm(mixing.float() - attention.float(), ord="fro").mean()


class MatrixObjective(nn.Module):
    """All converted layers' matrix losses; the teacher pass computes attention for those layers only."""

    _no_split_modules = ["MatrixLayerLoss"]

    def __init__(self, mixers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.layers = sorted(mixers)
        self.losses = nn.ModuleDict({str(i): MatrixLayerLoss(mixers[i]) for i in self.layers})

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, input_ids: torch.Tensor) -> Any:
        from ssmify.convert.probes import teacher_attention

        return teacher_attention(teacher, input_ids, self.layers)

    def forward(self, input_ids: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        per_layer = [self.losses[str(i)](targets[i].inputs, targets[i].probs) for i in self.layers]
        return {"loss": torch.stack(per_layer).mean()}
