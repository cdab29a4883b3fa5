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

# Teacher forward-token equivalents per token, measured roughly on SmolLM2-135M with half its layers
# converted, on a shared 2-core CPU (PyTorch scan): a training token of the matrix stage (seq 64) costs
# about 1.8 teacher forward tokens, of the hidden stage 2.3, of the logits stage 4.8 (the teacher forward,
# plus the student's forward and backward, whose mixers cost more than attention there), checkpoints
# included; a validation token 1.2, 1.7 and 3.8. Expect +-30%. Other conversion ratios, or a GPU with
# the mamba_ssm kernels, give other ratios: pass measured ones.
STAGE_COST = {"matrix": 1.8, "hidden": 2.3, "logits": 4.8}
EVAL_COST = {"matrix": 1.2, "hidden": 1.7, "logits": 3.8}


def stage_seconds(
    stage: Stage,
    tokens: int,
    seq_len: int,
    forward_tokens_per_s: float,
    stage_cost: dict[str, float] = STAGE_COST,
    eval_cost: dict[str, float] = EVAL_COST,
) -> float:
    """The expected seconds of a stage with `tokens` training tokens, validation included."""
    steps = max(tokens // stage.global_batch_tokens, 1)
    evaluations = 2 + (steps // stage.eval_every if stage.eval_every else 0)
    eval_tokens = max(stage.eval_tokens // seq_len, 1) * seq_len
    cost = tokens * stage_cost[stage.name] + evaluations * eval_tokens * eval_cost[stage.name]
    return cost / forward_tokens_per_s


def fit_to_time(
    recipe: Recipe,
    seconds: float,
    forward_tokens_per_s: float,
    stage_cost: dict[str, float] = STAGE_COST,
    eval_cost: dict[str, float] = EVAL_COST,
) -> Recipe:
    """A copy of `recipe` whose stage token budgets, scaled by one common factor, fill about `seconds`.

    forward_tokens_per_s is the teacher's forward throughput on this machine, at the recipe's seq_len.
    """
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
