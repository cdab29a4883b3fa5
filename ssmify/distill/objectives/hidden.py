"""Stage 2 (hidden): each converted block's output is fitted to the teacher block's output.

The student block runs on the very inputs the teacher block received (hidden states, position
embeddings, masks), captured in one teacher forward pass, so all converted layers train at once
and independently. The loss of a layer is the L2 norm of (student output - teacher output) per
token, averaged, as in MOHAWK; the stage's loss is the mean over layers. The recipe's `trainable`
says whether only the mixer or the whole block trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HiddenLayerLoss(nn.Module):
    """One converted block's hidden-state loss; the unit FSDP wraps, so its forward gathers the block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, io: Any) -> torch.Tensor:
        output = self.block(*io.args, **io.kwargs)
        output = output[0] if isinstance(output, tuple) else output
        target = io.output[0] if isinstance(io.output, tuple) else io.output
        return torch.linalg.vector_norm(output.float() - target.float(), dim=-1).mean()


class HiddenObjective(nn.Module):
    """All converted blocks' losses, from one teacher pass that captures their inputs and outputs."""

    _no_split_modules = ["HiddenLayerLoss"]

    def __init__(self, blocks: dict[int, nn.Module], adapted: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = sorted(blocks)
        self.losses = nn.ModuleDict({str(i): HiddenLayerLoss(blocks[i]) for i in self.layers})
        # The peft model around the whole student when the blocks carry LoRA adapters, for merging at the
        # end; kept out of the module tree, so that DDP, FSDP and checkpoints see only the blocks.
        object.__setattr__(self, "adapted", adapted)

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, input_ids: torch.Tensor) -> Any:
        from ssmify.convert.probes import capture_blocks

        return capture_blocks(teacher, input_ids, self.layers)

    def forward(self, input_ids: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        per_layer = [self.losses[str(i)](targets[i]) for i in self.layers]
        return {"loss": torch.stack(per_layer).mean()}
