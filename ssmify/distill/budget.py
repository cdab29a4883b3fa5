"""Size a recipe's stage token budgets to a wall-clock budget (the CPU demo uses it).

The cost of a stage is counted in teacher forward-pass tokens: on a given machine one training
token of a stage costs `stage_costs(share)[name]` of them, and one validation token
`eval_costs(share)[name]`, where `share` is the share of the teacher's layers that became mixers.
Given the teacher's forward throughput, every stage's `tokens` is scaled by one common factor so
that the stages together should take about the requested time. Budgets stay whole multiples of
global_batch_tokens and at least one batch.
"""

from __future__ import annotations

import math

from ssmify.distill.recipe import Recipe, Stage

# Teacher forward-token equivalents per training token, with no layer and with every layer converted;
# a share in between interpolates linearly. Measured on SmolLM2-135M (2 CPU cores, 2 threads, PyTorch
# scan) in the demo's runs at 50% and 0% attention: a hidden-stage token cost 2.9 teacher forward tokens
# with half the layers converted and 4.4 with all of them; a logits-stage token 3.7 and 4.6 (the
# teacher's forward plus the student's forward and backward, whose mixers cost more than attention on
# CPU). The matrix and hidden stages train only the converted layers, so they cost a teacher forward
# alone when nothing is converted. The values err on the slow side; expect +-20% on another machine, and
# other ratios on a GPU with the mamba_ssm kernels: pass measured ones.
STAGE_COST = {
    "none_converted": {"matrix": 1.0, "hidden": 1.0, "logits": 3.0},
    "all_converted": {"matrix": 3.0, "hidden": 4.8, "logits": 4.8},
}
# The same for a validation token (forward passes only).
EVAL_COST = {
    "none_converted": {"matrix": 1.0, "hidden": 1.0, "logits": 3.6},
    "all_converted": {"matrix": 1.4, "hidden": 2.4, "logits": 4.0},
}
HALF = 0.5


def interpolated(costs: dict[str, dict[str, float]], converted_share: float) -> dict[str, float]:
    """Per-stage costs for `converted_share` (0: no layer converted, 1: every layer) of the layers."""
    low, high = costs["none_converted"], costs["all_converted"]
    return {name: low[name] + (high[name] - low[name]) * converted_share for name in low}


def stage_costs(converted_share: float = HALF) -> dict[str, float]:
    """Teacher forward tokens per training token of each stage."""
    return interpolated(STAGE_COST, converted_share)


def eval_costs(converted_share: float = HALF) -> dict[str, float]:
    """Teacher forward tokens per validation token of each stage."""
    return interpolated(EVAL_COST, converted_share)


def stage_seconds(
    stage: Stage,
    tokens: int,
    seq_len: int,
    forward_tokens_per_s: float,
    stage_cost: dict[str, float] | None = None,
    eval_cost: dict[str, float] | None = None,
) -> float:
    """The expected seconds of a stage with `tokens` training tokens, validation included
    (costs default to half the layers converted)."""
    stage_cost = stage_cost or stage_costs()
    eval_cost = eval_cost or eval_costs()
    steps = max(tokens // stage.global_batch_tokens, 1)
    evaluations = 2 + (steps // stage.eval_every if stage.eval_every else 0)
    eval_tokens = max(stage.eval_tokens // seq_len, 1) * seq_len
    cost = tokens * stage_cost[stage.name] + evaluations * eval_tokens * eval_cost[stage.name]
    return cost / forward_tokens_per_s


def fit_to_time(
    recipe: Recipe,
    seconds: float,
    forward_tokens_per_s: float,
    converted_share: float = HALF,
    stage_cost: dict[str, float] | None = None,
    eval_cost: dict[str, float] | None = None,
) -> Recipe:
    """A copy of `recipe` whose stage token budgets, scaled by one common factor, fill about `seconds`.

    forward_tokens_per_s is the teacher's forward throughput on this machine, at the recipe's seq_len;
    converted_share the share of the teacher's layers that are mixers in the student. stage_cost and
    eval_cost, when given, replace the built-in estimates.
    """
    stage_cost = stage_cost or stage_costs(converted_share)
    eval_cost = eval_cost or eval_costs(converted_share)
    seq_lens = [s.seq_len or recipe.data.seq_len for s in recipe.stages]

    def total(factor: float) -> float:
        return sum(
            stage_seconds(s, scaled_tokens(s, factor), n, forward_tokens_per_s, stage_cost, eval_cost)
            for s, n in zip(recipe.stages, seq_lens)
        )

    low, high = 0.0, 1.0
    while total(high) < seconds and high < 1e9:
        high *= 2
    for _ in range(60):  # bisection: total() only grows with the factor
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) <= seconds else (low, middle)
    stages = [s.model_copy(update={"tokens": scaled_tokens(s, low)}) for s in recipe.stages]
    return recipe.model_copy(update={"stages": stages})


def scaled_tokens(stage: Stage, factor: float) -> int:
    batch = stage.global_batch_tokens
    return max(math.floor(stage.tokens * factor / batch), 1) * batch
