"""The first position of a window: the teacher's massive activation, and whether a student keeps it.

For a held-out text window of 2,048 tokens, once as it is (its first token a word) and once with BOS in
place of its first token, prints per model:
- the residual stream's norm at position 0 and the median over the other positions, at chosen layers;
- for each layer with kept attention heads, the kept query heads' mean relative output error against
  the teacher's (`ssmify.distill.objectives.kept_heads.head_error`, their input to o_proj).

    S=runs/bench/heads_tail2_syn50_attn_only/heads9/hand-2cc6ee/synthetic10/seed0
    OMP_NUM_THREADS=2 .venv/bin/python docs/bench/first_position.py $S/convert $S/2-hidden $S/4-logits
"""

import json
import sys
from pathlib import Path

import torch

from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.teacher import load_teacher
from ssmify.distill.objectives.kept_heads import (
    head_error,
    kept_heads,
    out_projections,
    recorded_inputs,
    select,
)
from ssmify.distill.students import load_student

LENGTH, LAYERS = 2048, (2, 11, 12, 16, 20, 24, 29)
torch.set_grad_enabled(False)
teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
text = wikipedia_text()[1].read_text(encoding="utf-8")
ids = tokenizer(text[: 20 * LENGTH], return_tensors="pt").input_ids[:, :LENGTH]
windows = {
    "word first": ids,
    "BOS first": torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids[:, 1:]], 1),
}
print(json.dumps({"first tokens": tokenizer.convert_ids_to_tokens(ids[0, :3]), "bos": tokenizer.bos_token}))


def norms(model, window: torch.Tensor) -> dict:
    hidden = model(input_ids=window, output_hidden_states=True).hidden_states
    return {
        i: [round(hidden[i][0, 0].norm().item()), round(hidden[i][0, 1:].norm(dim=-1).median().item())]
        for i in LAYERS
    }


for name, window in windows.items():
    print(
        json.dumps(
            {
                "model": "teacher",
                "window": name,
                "residual norm at layer input: [position 0, median of the rest]": norms(teacher, window),
            }
        )
    )
for path in sys.argv[1:]:
    student = load_student(Path(path)).eval()
    kept = kept_heads(student)
    for name, window in windows.items():
        with recorded_inputs(out_projections(teacher, [h.layer for h in kept])) as inputs:
            teacher(input_ids=window)
        theirs = select(inputs, kept)
        with recorded_inputs(out_projections(student, [h.layer for h in kept])) as inputs:
            student(input_ids=window)
        ours = select(inputs, kept)
        errors = {
            h.layer: round(head_error({h.layer: ours[h.layer]}, {h.layer: theirs[h.layer]}).item(), 2)
            for h in kept
        }
        print(
            json.dumps(
                {
                    "model": path,
                    "window": name,
                    "residual norm at layer input: [position 0, median of the rest]": norms(student, window),
                    "kept heads' relative output error by layer": errors,
                    "all kept heads": round(head_error(ours, theirs).item(), 2),
                }
            ),
            flush=True,
        )
