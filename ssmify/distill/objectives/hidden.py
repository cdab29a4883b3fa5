"""Stage 2 (hidden): each converted block's output is fitted to the teacher block's output.

The student block runs on the very inputs the teacher block received (hidden states, position
embeddings, masks), captured in one teacher forward pass, so all converted layers train at once
and independently. The loss of a layer is the L2 norm of (student output - teacher output) per
token, averaged, as in MOHAWK; the stage's loss is the mean over layers. The recipe's `trainable`
says whether only the mixer or the whole block trains.

`first_position_weight` w counts position 0 as w tokens in that average. Why: a teacher makes the first
position of a window an attention sink (SmolLM2-135M: a residual norm near 25,000 from layer 12 on, where
other positions have about 170), which its attention at position 0 sets up in the first layers: attending
to itself alone, it passes on its own value. A Mamba-2 mixer head normalizes its output (gated RMSNorm),
so that output has the same size at every position, and a plain token average, where position 0 is one
token in 256, lets the stage trade it away: after it, SmolLM2's layer-0 error at position 0 was 35 against
2.5 elsewhere, and end to end the sink was gone after a word (it survived after BOS). With w = 64 on layers
0-2 it was 13 against 3.1, and the sink survived in 8 of 8 held-out windows (docs/benchmarks.md section 13).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HiddenLayerLoss(nn.Module):
    """One converted block's hidden-state loss; the unit FSDP wraps, so its forward gathers the block."""

    def __init__(self, block: nn.Module, first_position_weight: float = 1.0) -> None:
        super().__init__()
        self.block = block
        self.first_position_weight = first_position_weight

    def forward(self, io: Any) -> torch.Tensor:
        output = self.block(*io.args, **io.kwargs)
        output = output[0] if isinstance(output, tuple) else output
        target = io.output[0] if isinstance(io.output, tuple) else io.output
        errors = torch.linalg.vector_norm(output.float() - target.float(), dim=-1)  # (batch, positions)
        return position_weighted_mean(errors, self.first_position_weight)


def position_weighted_mean(errors: torch.Tensor, first_position_weight: float) -> torch.Tensor:
    """The mean of (batch, positions) errors, position 0 counted as `first_position_weight` tokens."""
    if first_position_weight == 1.0:
        return errors.mean()
    weights = torch.ones(errors.shape[-1], dtype=errors.dtype, device=errors.device)
    weights[0] = first_position_weight
    return (errors * weights).sum(-1).mean() / weights.sum()


class HiddenObjective(nn.Module):
    """All converted blocks' losses, from one teacher pass that captures their inputs and outputs."""

    _no_split_modules = ["HiddenLayerLoss"]

    def __init__(
        self,
        blocks: dict[int, nn.Module],
        adapted: nn.Module | None = None,
        first_position_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.layers = sorted(blocks)
        self.losses = nn.ModuleDict(
            {str(i): HiddenLayerLoss(blocks[i], first_position_weight) for i in self.layers}
        )
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
