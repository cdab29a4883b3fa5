"""Stage 3 (logits): end-to-end distillation, the KL between teacher and student next-token distributions.

forward_kl is KL(teacher || student), mass-covering, as in MambaInLlama; reverse_kl is
KL(student || teacher), mode-seeking. Both are computed at temperature T and multiplied by T^2
so that the gradient scale does not shrink with T. An optional cross-entropy term on the data's
next tokens is added with weight ce_weight. Positions where attention_mask is 0 are left out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmify.distill.recipe import LossConfig


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    config: LossConfig,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss", "kl", "ce"}: the mean per-token KL (and CE) over valid positions. Logits are (B, L, V)."""
    t = config.temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if config.kind == "forward_kl":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    per_token = per_token * t**2
    valid = torch.ones_like(per_token) if attention_mask is None else attention_mask.to(per_token.dtype)
    kl = (per_token * valid).sum() / valid.sum().clamp_min(1)
    loss = kl
    ce = torch.zeros((), device=kl.device)
    if config.ce_weight > 0:
        next_valid = valid[:, 1:] * valid[:, :-1]
        token_ce = F.cross_entropy(
            student_logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
        )
        ce = (token_ce * next_valid.flatten()).sum() / next_valid.sum().clamp_min(1)
        loss = loss + config.ce_weight * ce
    return {"loss": loss, "kl": kl.detach(), "ce": ce.detach()}


class LogitsObjective(nn.Module):
    """Holds the student (possibly peft-wrapped); forward returns the KD loss against teacher logits."""

    def __init__(self, student: nn.Module, config: LossConfig) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    @property
    def adapted(self) -> nn.Module | None:
        """The peft model when the student trains LoRA adapters, else None."""
        from peft import PeftModel

        return self.student if isinstance(self.student, PeftModel) else None

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return teacher(input_ids=input_ids, use_cache=False).logits

    def forward(self, input_ids: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        logits = self.student(input_ids=input_ids, use_cache=False).logits
        return kd_loss(logits, targets, input_ids, self.config)
