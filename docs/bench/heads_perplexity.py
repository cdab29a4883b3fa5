"""Held-out perplexity of student folders against the teacher's, word first and with BOS in place of each
window's first token, on the first N held-out tokens in 512-token windows (`--tokens`, default the bench's
4,096, on which `docs/bench/heads_rescore.py` computes the same numbers): a quick look at a stage folder, and
a less noisy one at more tokens.

    R=heads9/hand-2cc6ee/synthetic10
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/heads_perplexity.py runs/bench/heads_sink64/$R/seed0/3-logits \
        runs/bench/heads_tail2_syn50_attn_only/$R/seed0/3-logits
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/heads_perplexity.py --tokens 32768 runs/bench/heads_sink64/$R/seed0/4-logits
"""

import argparse
import json
from pathlib import Path

import torch

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.teacher import load_teacher
from ssmify.distill.students import load_student
from ssmify.eval.data import load_data
from ssmify.eval.perplexity import perplexity_result
from ssmify.eval.scan import scan_windows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("students", nargs="+", type=Path)
parser.add_argument("--tokens", type=int, default=4096)
args = parser.parse_args()

torch.set_grad_enabled(False)
teacher, tok = load_teacher(smollm2_teacher_dir(), dtype="float32")
windows = load_data([str(wikipedia_text()[1])], tok, 512, max_tokens=args.tokens).windows
bos = windows.clone()
bos[:, 0] = tok.bos_token_id


def ppl(m, w):
    return perplexity_result(scan_windows(m, w, None, 4, agreement=False, progress=False))["value"]


t, tb = ppl(teacher, windows), ppl(teacher, bos)
print(
    json.dumps(
        {"teacher": {"tokens": windows.numel(), "ppl word-first": round(t, 3), "ppl BOS-first": round(tb, 3)}}
    )
)
for p in args.students:
    m = load_student(p).eval()
    print(
        json.dumps(
            {
                "student": str(p),
                "ppl x word-first": round(ppl(m, windows) / t, 3),
                "ppl x BOS-first": round(ppl(m, bos) / tb, 3),
            }
        ),
        flush=True,
    )
