"""Layers 0-13 of a student one block at a time, on the teacher's own block inputs (as the hidden stage
trains them), for one held-out 256-token window, once word first and once with BOS in its place: the
teacher's output norm at position 0, the student's, the error at position 0, and the median error at the
other positions.

    S=runs/bench/heads_tail2_syn50_attn_only/heads9/hand-2cc6ee/synthetic10/seed0
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/first_position_blocks.py $S/convert $S/2-hidden
"""

import json
import sys
from pathlib import Path

import torch

from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.probes import capture_blocks, model_adapter
from ssmify.convert.teacher import load_teacher
from ssmify.distill.students import load_student

torch.set_grad_enabled(False)
teacher, tok = load_teacher(smollm2_teacher_dir(), dtype="float32")
text = wikipedia_text()[1].read_text(encoding="utf-8")
ids = tok(text[:40000], return_tensors="pt").input_ids[:, 1000:1256]
students = {p: load_student(Path(p)).eval() for p in sys.argv[1:]}
for name, window in {
    "word": ids,
    "bos": torch.cat([torch.tensor([[tok.bos_token_id]]), ids[:, 1:]], 1),
}.items():
    io = capture_blocks(teacher, window, range(30))
    for p, s in students.items():
        blocks = model_adapter(s).decoder_layers(s)
        row = {}
        for i in range(0, 14):
            out = blocks[i](*io[i].args, **io[i].kwargs)
            out = out[0] if isinstance(out, tuple) else out
            t = io[i].output
            err = (out - t).norm(dim=-1)[0]
            row[i] = [
                round(t[0, 0].norm().item()),
                round(out[0, 0].norm().item()),
                round(err[0].item()),
                round(err[1:].median().item(), 1),
            ]
        print(
            json.dumps(
                {
                    "student": p.split("/")[-1],
                    "window": name,
                    "layer: [teacher pos0 norm, student pos0 norm, pos0 err, median err]": row,
                }
            ),
            flush=True,
        )
