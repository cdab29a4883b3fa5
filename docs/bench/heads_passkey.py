"""Passkey accuracy alone for student folders, on the 16 samples per length that docs/bench/heads_rescore.py
draws (same options, same seed: it reproduces that script's passkey column), to see at which stage a run
loses it without scoring induction and perplexity too.

    R=heads9/hand-2cc6ee/synthetic10
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/heads_passkey.py runs/bench/gdn_s4/$R/seed4/{4-logits,3-logits,2-hidden} \
        runs/bench/gdn_s0/$R/seed0/3-logits > docs/bench/heads_gdn_passkey_by_stage.txt
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import passkey

_, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
data = EvalData(tokenizer)
options = EvalOptions(lengths=(1024, 2048), samples=16, progress=False)
for path in sys.argv[1:]:
    student = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        result = passkey(student, None, data, options)
    accuracy = {p["length"]: round(p["accuracy"], 3) for p in result["points"]}
    print(json.dumps({"student": path, "passkey": accuracy}), flush=True)
