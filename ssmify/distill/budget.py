"""Size a recipe's stage token budgets to a wall-clock budget (the CPU demo uses it).

The cost of a stage is counted in teacher forward-pass tokens: on a given machine one training
token of a stage costs STAGE_COST[name] of them, and one validation token EVAL_COST[name]. Given
the teacher's forward throughput, every stage's `tokens` is scaled by one common factor so that
the stages together should take about the requested time. Budgets stay whole multiples of
global_batch_tokens and at least one batch.
"""

from __future__ import annotations

import math

from ssmify.distill.recipe import Recipe, Stage

# Teacher forward-token equivalents per token, per stage: a training step runs the teacher forward
# (1) plus the student part forward and backward (about 3x its forward); a validation pass runs both
# forward. Matrix and hidden stages run only the converted layers of the student.
STAGE_COST = {"matrix": 1.8, "hidden": 2.5, "logits": 4.0}
EVAL_COST = {"matrix": 1.3, "hidden": 1.5, "logits": 2.0}


def stage_seconds(stage: Stage, tokens: int, seq_len: int, forward_tokens_per_s: float) -> float:
    """The expected seconds of a stage with `tokens` training tokens, validation included."""
    steps = max(tokens // stage.global_batch_tokens, 1)
    evaluations = 2 + (steps // stage.eval_every if stage.eval_every else 0)
    eval_tokens = max(stage.eval_tokens // seq_len, 1) * seq_len
    cost = tokens * STAGE_COST[stage.name] + evaluations * eval_tokens * EVAL_COST[stage.name]
    return cost / forward_tokens_per_s


def fit_to_time(recipe: Recipe, seconds: float, forward_tokens_per_s: float) -> Recipe:
    """A copy of `recipe` whose stage token budgets, scaled by one common factor, fill about `seconds`."""
    seq_lens = [s.seq_len or recipe.data.seq_len for s in recipe.stages]

    def total(factor: float) -> float:
        return sum(
            stage_seconds(s, scaled_tokens(s, factor), n, forward_tokens_per_s)
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
