"""Which of the student's layer-0 or layer-1 mixer heads the first-position sink needs: in 4 held-out
word-first 256-token windows, the teacher's head outputs at position 0 (its input to o_proj) for one KV
group (3 query heads), or all three, go into the student's mixer in place of its own at position 0
(least squares through the student's out_proj columns of those heads); printed is the residual norm at
position 0 entering layer 12 end to end (the teacher's sink: about 25,000).

    S=runs/bench/heads_tail2_syn50_attn_only/heads9/hand-2cc6ee/synthetic10/seed0
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/first_position_heads.py $S/2-hidden
"""

import json
import sys
from pathlib import Path

import torch

from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.teacher import load_teacher
from ssmify.distill.students import load_student

torch.set_grad_enabled(False)
teacher, tok = load_teacher(smollm2_teacher_dir(), dtype="float32")
text = wikipedia_text()[1].read_text(encoding="utf-8")
s = load_student(Path(sys.argv[1])).eval()
results = {}
for start in (1000, 3000, 5000, 7000):
    ids = tok(text[:60000], return_tensors="pt").input_ids[:, start : start + 256]
    for layer in (0, 1):
        rec = {}
        h = teacher.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, rec=rec: rec.__setitem__("t", a[0])
        )
        teacher(input_ids=ids)
        h.remove()
        t = rec["t"][0, 0]  # (576,) teacher heads' outputs at pos 0
        W_t = teacher.model.layers[layer].self_attn.o_proj.weight
        mixer = s.model.layers[layer].self_attn.mixer
        W_s = mixer.out_proj.weight
        for groups in ([], [0], [1], [2], [0, 1, 2]):

            def pre(m, a, groups=groups, t=t, W_t=W_t, W_s=W_s):
                x = a[0].clone()
                for g in groups:
                    cols = slice(192 * g, 192 * g + 192)
                    target = W_t[:, cols] @ t[cols]
                    x[0, 0, cols] = torch.linalg.lstsq(W_s[:, cols], target.unsqueeze(1)).solution[:, 0]
                return (x,)

            hh = mixer.out_proj.register_forward_pre_hook(pre)
            hs = s(input_ids=ids, output_hidden_states=True).hidden_states
            hh.remove()
            key = f"layer {layer} groups {groups}"
            results.setdefault(key, []).append(round(hs[12][0, 0].norm().item()))
print(
    json.dumps(
        {
            "pos0 norm at layer 12 input, 4 word-first windows, with the teacher's pos-0 head outputs patched in": results
        }
    )
)
