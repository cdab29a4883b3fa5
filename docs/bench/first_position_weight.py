"""The hidden stage's first_position_weight w, tried on layers 0-2 alone: they train from the recipe's
1-matrix student on the teacher's own block inputs (the hidden stage's loss, lr and wsd shape, position 0
counted as w tokens); then, on 8 held-out word-first windows of 256 tokens, their error at position 0 and
their mean error elsewhere (teacher inputs), and the residual norm at position 0 entering layer 12 end to
end, with these three layers in that run's 2-hidden student (the teacher's sink: about 25,000).

    S=runs/bench/heads_tail2_syn50_attn_only/heads9/hand-2cc6ee/synthetic10/seed0
    for w in 1 64; do OMP_NUM_THREADS=1 .venv/bin/python docs/bench/first_position_weight.py $S $w 267; done
"""

import json
import sys
from pathlib import Path

import torch

from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.probes import capture_blocks
from ssmify.convert.teacher import load_teacher
from ssmify.distill.students import load_student

torch.manual_seed(0)
teacher, tok = load_teacher(smollm2_teacher_dir(), dtype="float32")
train, held = wikipedia_text()
tr = tok(train.read_text()[:1_500_000], return_tensors="pt").input_ids[0]
he = tok(held.read_text()[:200_000], return_tensors="pt").input_ids[0]
S = sys.argv[1]
w = float(sys.argv[2])
steps = int(sys.argv[3])
student = load_student(Path(S + "/1-matrix"))
e2e = load_student(Path(S + "/2-hidden")).eval()
LAYERS = [0, 1, 2]
blocks = {i: student.model.layers[i] for i in LAYERS}
params = [p for i in LAYERS for p in blocks[i].self_attn.mixer.parameters()]
for p in student.parameters():
    p.requires_grad_(False)
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=0.005, betas=(0.9, 0.95), weight_decay=0.0)
weights = torch.ones(256)
weights[0] = w
weights /= weights.sum()
for step in range(steps):
    lr = 0.005 * min(1, (step + 1) / (0.1 * steps), (steps - step) / (0.3 * steps))
    for g in opt.param_groups:
        g["lr"] = lr
    start = (step * 7919 * 256) % (len(tr) - 256)
    ids = tr[start : start + 256][None]
    with torch.no_grad():
        io = capture_blocks(teacher, ids, LAYERS)
    loss = 0
    for i in LAYERS:
        out = blocks[i](*io[i].args, **io[i].kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = loss + ((out - io[i].output).norm(dim=-1)[0] * weights).sum() / len(LAYERS)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
torch.set_grad_enabled(False)
report = {i: [[], []] for i in LAYERS}
sinks = []
for k in range(8):
    ids = he[k * 1000 : k * 1000 + 256][None]
    io = capture_blocks(teacher, ids, LAYERS)
    for i in LAYERS:
        out = blocks[i](*io[i].args, **io[i].kwargs)
        out = out[0] if isinstance(out, tuple) else out
        err = (out - io[i].output).norm(dim=-1)[0]
        report[i][0].append(err[0].item())
        report[i][1].append(err[1:].mean().item())
    for i in LAYERS:
        e2e.model.layers[i].self_attn.mixer.load_state_dict(blocks[i].self_attn.mixer.state_dict())
    sinks.append(round(e2e(input_ids=ids, output_hidden_states=True).hidden_states[12][0, 0].norm().item()))
print(
    json.dumps(
        {
            "w": w,
            "steps": steps,
            "layer: [pos0 err, mean err elsewhere]": {
                i: [round(sum(a) / len(a), 1), round(sum(b) / len(b), 2)] for i, (a, b) in report.items()
            },
            "e2e pos0 norm at layer 12": sinks,
        }
    ),
    flush=True,
)
