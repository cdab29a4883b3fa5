"""The end-to-end sink with one block's position-0 output taken from the teacher: for one held-out
word-first 256-token window, the student's output of block b at position 0 is replaced by the teacher's
(b = none, 0, 1, 2, 10), and the residual norm at position 0 is printed at a few layer inputs (the
teacher's sink from layer 12 on: about 25,000).

    S=runs/bench/heads_tail2_syn50_attn_only/heads9/hand-2cc6ee/synthetic10/seed0
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/first_position_block_patch.py $S/2-hidden
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
io = capture_blocks(teacher, ids, range(30))
s = load_student(Path(sys.argv[1])).eval()
blocks = model_adapter(s).decoder_layers(s)
for upto in [None, 0, 1, 2, 10]:
    hs = []
    if upto is not None:

        def hook(m, a, k, out, i=upto):
            o = out[0] if isinstance(out, tuple) else out
            o = o.clone()
            o[:, 0] = io[i].output[:, 0]
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o

        hs.append(blocks[upto].register_forward_hook(hook, with_kwargs=True))
    h = s(input_ids=ids, output_hidden_states=True).hidden_states
    for x in hs:
        x.remove()
    print(
        json.dumps(
            {
                "patched pos0 after block": upto,
                "pos0 norm at layer input": {
                    i: round(h[i][0, 0].norm().item()) for i in (1, 2, 3, 11, 12, 20)
                },
            }
        ),
        flush=True,
    )
