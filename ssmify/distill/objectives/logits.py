"""Stage 3 (logits): end-to-end distillation, the KL between teacher and student next-token distributions.

forward_kl is KL(teacher || student), mass-covering, as in MambaInLlama; reverse_kl is
KL(student || teacher), mode-seeking. Both are computed at temperature T and multiplied by T^2
so that the gradient scale does not shrink with T. An optional cross-entropy term on the data's
next tokens is added with weight ce_weight. Positions where attention_mask is 0 are left out.

From a teacher cache (`ssmify.distill.teacher_cache`) the targets are the teacher's top-K
log-probabilities at temperature T, their ids S, and the log of the rest of the mass. With
p = softmax(z_teacher / T) and q = softmax(z_student / T), both distributions are bucketed into
the K ids plus one "rest" bucket, p_rest = 1 - sum_{i in S} p_i and q_rest = 1 - sum_{i in S} q_i:

    KL_K(p || q) = sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

(times T^2 as above; 0 log 0 = 0). It is the KL of the bucketed distributions, so it is at most the
full KL (merging outcomes never raises a KL) and equals it when S holds the whole vocabulary
(p_rest = q_rest = 0). The student's log q_rest is a logsumexp over the ids outside S, which keeps
its gradient exact where q_rest is tiny. Only forward_kl is defined from a cache: reverse_kl needs the
teacher's probability of every id the student puts mass on.

With loss.hidden_weight w > 0 the loss adds w times the end-to-end hidden error: for every layer l and
token, ||h_student_l - h_teacher_l|| / ||h_teacher_l||, averaged. Unlike the hidden stage, whose blocks
run on the teacher's inputs, here the student runs on its own earlier layers, so a mixer is also trained
to hand the layers after it what the teacher's would (in a head-level hybrid, the keys and queries the
kept heads read). Relative error, because the residual stream's norm grows with depth and would
otherwise let the last layers drown the first.

With loss.head_weight w > 0 the loss adds w times the kept attention heads' mean relative output error
(before o_proj), the student end to end against the teacher (`ssmify.distill.objectives.kept_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmify.distill.objectives.kept_heads import (
    head_error,
    kept_heads,
    out_projections,
    recorded_inputs,
    select,
)
from ssmify.distill.recipe import LossConfig
from ssmify.errors import SsmifyError

MASKED = -1e30  # a logit that exp() takes to 0, but finite: no inf - inf in the student's rest-of-mass


@dataclass
class TopKTargets:
    """The teacher's cached targets for a batch: top-K log-probs (B, L, K), their ids, log of the rest (B, L)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    log_rest: torch.Tensor

    def to(self, device: torch.device | str) -> TopKTargets:
        return TopKTargets(self.logprobs.to(device), self.ids.to(device), self.log_rest.to(device))


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    """The top-K log-probabilities of softmax(logits / T), their ids and log(1 - their mass), in float32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    log_rest = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return TopKTargets(logprobs, ids, log_rest)


def top_k_kd_loss(
    student_logits: torch.Tensor, targets: TopKTargets, input_ids: torch.Tensor, config: LossConfig
) -> dict[str, torch.Tensor]:
    """{"loss", "kl", "ce"} as kd_loss, with KL_K(p || q) over the cached top-K ids plus the rest bucket."""
    t = config.temperature
    logits = student_logits.float() / t
    log_norm = torch.logsumexp(logits, dim=-1)
    ids = targets.ids.long()
    log_q = logits.gather(-1, ids) - log_norm.unsqueeze(-1)
    log_q_rest = torch.logsumexp(logits.scatter(-1, ids, MASKED), dim=-1) - log_norm
    log_p = targets.logprobs.float()
    p = log_p.exp()
    top = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    has_rest = targets.log_rest.float() > float("-inf")
    log_p_rest = torch.where(has_rest, targets.log_rest.float(), 0.0)
    p_rest = torch.where(has_rest, log_p_rest.exp(), 0.0)
    per_token = (top + p_rest * (log_p_rest - log_q_rest)) * t**2
    kl = per_token.mean()
    return with_ce(kl, student_logits, input_ids, config, torch.ones_like(per_token))


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
    return with_ce(kl, student_logits, input_ids, config, valid)


def with_ce(
    kl: torch.Tensor,
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    config: LossConfig,
    valid: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The KD result, with the cross-entropy on the next tokens added at ce_weight when it is positive."""
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


@dataclass
class TeacherOutputs:
    """The teacher's logits (B, L, V), its layers' outputs for the end-to-end hidden term, and its kept
    heads' outputs (by layer, (B, L, heads, head_dim)) for the kept-head term."""

    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None
    heads: dict[int, torch.Tensor] | None = None


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers and tokens of ||h_s - h_t|| / ||h_t||: the layers' outputs, without the embeddings."""
    errors = [
        torch.linalg.vector_norm(s.float() - t.float(), dim=-1)
        / torch.linalg.vector_norm(t.float(), dim=-1).clamp_min(1e-6)
        for s, t in zip(student[1:], teacher[1:], strict=True)
    ]
    return torch.stack(errors).mean()


class LogitsObjective(nn.Module):
    """Holds the student (possibly peft-wrapped); forward returns the KD loss against teacher logits.

    `where` names the recipe's loss section in errors (e.g. stages.3.loss).
    """

    def __init__(self, student: nn.Module, config: LossConfig, where: str = "loss") -> None:
        super().__init__()
        self.student = student
        self.config = config
        self._no_split_modules = getattr(student, "_no_split_modules", None)
        self.kept = kept_heads(student) if config.head_weight > 0 else []
        if config.head_weight > 0 and not self.kept:
            raise SsmifyError(
                f"{where}.head_weight: {config.head_weight} aligns the kept attention heads' outputs, and "
                "this student keeps none (every layer is a mixer); set head_weight: 0"
            )

    @property
    def adapted(self) -> nn.Module | None:
        """The peft model when the student trains LoRA adapters, else None."""
        from peft import PeftModel

        return self.student if isinstance(self.student, PeftModel) else None

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor | TeacherOutputs:
        hidden = self.config.hidden_weight > 0
        if not hidden and not self.kept:
            return teacher(input_ids=input_ids, use_cache=False).logits
        projections = out_projections(teacher, [h.layer for h in self.kept])
        with recorded_inputs(projections) as inputs:
            out = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        heads = select(inputs, self.kept) if self.kept else None
        return TeacherOutputs(out.logits, out.hidden_states if hidden else None, heads)

    def forward(self, input_ids: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        if not isinstance(targets, TeacherOutputs):
            logits = self.student(input_ids=input_ids, use_cache=False).logits
            loss = top_k_kd_loss if isinstance(targets, TopKTargets) else kd_loss
            return loss(logits, targets, input_ids, self.config)
        hidden = targets.hidden is not None
        projections = out_projections(self.student, [h.layer for h in self.kept])
        with recorded_inputs(projections) as inputs:
            out = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        result = kd_loss(out.logits, targets.logits, input_ids, self.config)
        loss = result["loss"]
        if hidden:
            error = hidden_loss(out.hidden_states, targets.hidden)
            loss = loss + self.config.hidden_weight * error
            result["hidden"] = error.detach()
        if targets.heads is not None:
            error = head_error(select(inputs, self.kept), targets.heads)
            loss = loss + self.config.head_weight * error
            result["heads"] = error.detach()
        return {**result, "loss": loss}
