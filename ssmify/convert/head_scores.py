"""Per-KV-head retrieval scores of a teacher, for choosing which heads keep attention.

The score is the induction copy mass: on sequences of random tokens repeated once (x, x), at every
position t of the second copy the token to predict is the one after the previous occurrence of the
current token, at position t - n + 1; a head's score is the attention probability it puts there,
averaged over positions and sequences. A KV group scores the maximum over its query heads.

Why this score: it measures the one thing a fixed-size recurrent state cannot do at long range, looking
up an exact earlier token by content, and it does so from the teacher alone in one forward pass (the
alternative, the drop in retrieval accuracy when one head alone is replaced, takes one pass per head,
90 for SmolLM2-135M, and mixes in how well that head's seeded mixer happens to do). Random tokens keep
language statistics out of it: the only way to predict the second copy is to copy. The maximum over a
group's heads, because a group's KV cache is the unit that is kept or dropped: one head that copies
needs the whole group's keys and values.

Induction mass alone misses the circuit: an induction head reads keys that previous-token heads in
earlier layers write, and those score near zero on it. `previous_token_scores` measures them on the same
sequences. On SmolLM2-135M, converting just its two strongest previous-token heads drops the teacher's
induction accuracy from 0.91 to 0.15. So a plan by count (`choose_heads`) spends a quarter of its heads,
rounded down, on the strongest previous-token groups below its induction groups and the rest on induction
mass: for SmolLM2-135M at 9 heads, 16:0 and 11:0 beside the 7 best induction groups, the plan that kept
retention 0.42 where the 9 best induction groups alone kept 0.17, at the same tokens (docs/benchmarks.md
section 13; one seed; other counts and teachers are not measured). `convert` still warns when a plan,
by hand or by budget, converts strong feeders (`unkept_feeders`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ssmify.convert.adapters import get_adapter
from ssmify.convert.head_plan import HeadPlan, ranked
from ssmify.convert.probes import teacher_attention

HEAD_SCORE = "induction copy mass, a quarter of the heads by previous-token mass below them"
FEEDER_SHARE = 0.25  # of a plan's heads, for the previous-token groups its induction groups read from
INDUCTION_LENGTH = 128  # tokens in each copy
INDUCTION_SEQUENCES = 4


def induction_head_scores(
    model: PreTrainedModel,
    length: int = INDUCTION_LENGTH,
    sequences: int = INDUCTION_SEQUENCES,
    seed: int = 0,
) -> torch.Tensor:
    """(num_layers, num_kv_heads): each KV group's induction copy mass (module docstring), in [0, 1]."""
    return _group_mass(model, length, sequences, seed, offset=length - 1)


def previous_token_scores(
    model: PreTrainedModel,
    length: int = INDUCTION_LENGTH,
    sequences: int = INDUCTION_SEQUENCES,
    seed: int = 0,
) -> torch.Tensor:
    """(num_layers, num_kv_heads): each KV group's previous-token mass, the attention on position t - 1 in
    the same repeated random sequences, in [0, 1].

    An induction head matches its query against keys that carry the previous token, which previous-token
    heads in earlier layers write. On SmolLM2-135M those (16:0 0.89, 11:0 0.85, ...) score near zero on
    induction mass, so a plan of induction heads alone converts them; `circuit_plan` keeps the strongest."""
    return _group_mass(model, length, sequences, seed, offset=1)


@torch.no_grad()
def _group_mass(model: PreTrainedModel, length: int, sequences: int, seed: int, offset: int) -> torch.Tensor:
    """(num_layers, num_kv_heads): the attention each query position t of the second copy puts on t - offset,
    averaged over positions and sequences; a KV group takes its best query head."""
    _, heads, kv_heads, _ = get_adapter(model.config.model_type).dims(model.config)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(min(100, vocab // 2), vocab, (sequences, length), generator=generator)
    ids = torch.cat([first, first], dim=1).to(model.device)
    layers = range(model.config.num_hidden_layers)
    probes = teacher_attention(model, ids, layers)
    t = torch.arange(length, 2 * length, device=model.device)  # query positions in the second copy
    scores = torch.empty(len(layers), kv_heads)
    for i in layers:
        mass = probes[i].probs[:, :, t, t - offset].float().mean(dim=(0, 2))  # (heads,)
        scores[i] = mass.view(kv_heads, heads // kv_heads).amax(-1).cpu()
    return scores


def unkept_feeders(
    plan: HeadPlan, induction: torch.Tensor, previous: torch.Tensor, reader: float = 0.25, feeder: float = 0.5
) -> list[tuple[int, int, float]]:
    """The KV groups with previous-token mass >= `feeder` that the plan converts, in the layers below its
    deepest kept induction head (induction mass >= `reader`): [(layer, group, mass)], strongest first."""
    readers = [layer for layer, group in plan.kept if induction[layer, group] >= reader]
    if not readers:
        return []
    kept = set(plan.kept)
    found = [
        (layer, group, float(previous[layer, group]))
        for layer in range(max(readers))
        for group in range(previous.shape[1])
        if previous[layer, group] >= feeder and (layer, group) not in kept
    ]
    return sorted(found, key=lambda item: -item[2])


def circuit_plan(induction: torch.Tensor, previous: torch.Tensor, count: int) -> HeadPlan:
    """`count` KV groups: the best by induction mass, and a quarter (rounded down) of the count given to the
    strongest previous-token groups in the layers below the deepest of those (module docstring). Where too
    few such groups exist, the next induction groups fill the plan."""
    feeders = int(count * FEEDER_SHARE)
    by_induction = ranked(induction)
    readers = by_induction[: count - feeders]
    deepest = max(layer for layer, _ in readers)
    below = [head for head in ranked(previous) if head[0] < deepest and head not in readers]
    kept = readers + below[:feeders]
    kept += [head for head in by_induction if head not in kept][: count - len(kept)]
    return HeadPlan(*induction.shape, tuple(kept))


def choose_heads(
    model: PreTrainedModel, wanted: HeadPlan | int
) -> tuple[HeadPlan, torch.Tensor, torch.Tensor]:
    """The plan (`wanted` itself, or `circuit_plan` of `wanted` KV groups), every KV group's induction score
    and its previous-token score."""
    scores, previous = induction_head_scores(model), previous_token_scores(model)
    plan = wanted if isinstance(wanted, HeadPlan) else circuit_plan(scores, previous, wanted)
    return plan, scores, previous
