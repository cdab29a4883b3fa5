"""Held-out perplexity of student folders against the teacher's, on the bench's slice (the first 4,096
held-out tokens in 512-token windows), word first and with BOS in place of each window's first token, as
`docs/bench/heads_rescore.py` computes it without its retrieval scoring (the teacher's 15.368 and 15.509
are that script's): a quick look at a stage folder.

    R=heads9/hand-2cc6ee/synthetic10
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/heads_perplexity.py runs/bench/heads_sink64/$R/seed0/3-logits \
        runs/bench/heads_tail2_syn50_attn_only/$R/seed0/3-logits
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.distill.students import load_student
from ssmify.eval.data import load_data
from ssmify.eval.scan import scan_windows

torch.set_grad_enabled(False)
tok = AutoTokenizer.from_pretrained(str(smollm2_teacher_dir()))
windows = load_data([str(wikipedia_text()[1])], tok, 512, max_tokens=4096).windows
bos = windows.clone()
bos[:, 0] = tok.bos_token_id


def ppl(m, w):
    s = scan_windows(m, w, None, 4, agreement=False, progress=False)
    return float(torch.tensor(s.nll / s.tokens).exp())


t, tb = 15.368, 15.509
for p in sys.argv[1:]:
    m = load_student(Path(p)).eval()
    print(
        json.dumps(
            {
                "student": p,
                "ppl x word-first": round(ppl(m, windows) / t, 3),
                "ppl x BOS-first": round(ppl(m, bos) / tb, 3),
            }
        ),
        flush=True,
    )
