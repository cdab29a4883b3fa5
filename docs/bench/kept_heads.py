"""Kept heads of distilled head-level and layer-level students: induction copy mass and previous-token mass of
each kept KV group (its best query head) on 4 random 128-token sequences repeated once, beside the teacher's
same heads, and the copy loss (cross-entropy on the second copy; the teacher copies at 2.44 nats, chance is
ln(49152) = 10.8).

The script that produced kept_heads.txt (docs/benchmarks.md section 13), B = runs/bench/heads_demo:
    .venv/bin/python docs/bench/kept_heads.py B/heads9/hand-2cc6ee/synthetic10/seed0/3-logits \
        B/heads9/induction/synthetic10/seed0/3-logits B/10pct/retrieval/synthetic10/seed0/3-logits \
        B/heads9/hand-2cc6ee/synthetic10/seed0/convert
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir

torch.set_num_threads(2)
L = 128
first = torch.randint(100, 49152, (4, L), generator=torch.Generator().manual_seed(0))
ids = torch.cat([first, first], 1)
t = torch.arange(L, 2 * L)


def kept_heads(model) -> list[tuple[int, int]]:
    block = model.config.ssmify
    heads = [(layer, g) for layer in block["attention_layers"] for g in range(3)]
    heads += [(int(layer), g) for layer, groups in block.get("attention_heads", {}).items() for g in groups]
    return sorted(heads)


def masses(path: str, heads: list[tuple[int, int]]) -> tuple[dict, float]:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    found = {}
    for layer in sorted({layer for layer, _ in heads}):
        sa = model.model.layers[layer].self_attn
        module, kept = (sa.attention, sa.kept_groups) if hasattr(sa, "kept_groups") else (sa, (0, 1, 2))

        def hook(m, a, out, layer=layer, kept=kept):
            w = out[1]  # (batch, kept query heads, L, L)
            per = w.shape[1] // len(kept)
            for i, group in enumerate(kept):
                part = w[:, i * per : (i + 1) * per]
                copy = part[:, :, t, t - L + 1].mean((0, 2)).max().item()
                prev = part[:, :, t, t - 1].mean((0, 2)).max().item()
                found[f"{layer}:{group}"] = (round(copy, 2), round(prev, 2))

        module.register_forward_hook(hook)
    with torch.no_grad():
        logits = model(ids).logits[:, L:-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, L + 1 :].reshape(-1)
    )
    return {h: v for h, v in found.items() if tuple(map(int, h.split(":"))) in heads}, round(loss.item(), 2)


for path in sys.argv[1:]:
    student = AutoModelForCausalLM.from_pretrained(path)
    heads = kept_heads(student)
    del student
    mine, loss = masses(path, heads)
    theirs, teacher_loss = masses(str(smollm2_teacher_dir()), heads)
    print(
        json.dumps(
            {
                "student": path,
                "copy_loss": loss,
                "teacher_copy_loss": teacher_loss,
                "heads (copy, previous): student / teacher": {h: [mine[h], theirs[h]] for h in mine},
            }
        )
    )
