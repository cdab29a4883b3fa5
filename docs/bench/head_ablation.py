"""Ablation of single KV groups in the SmolLM2 teacher: convert only the named groups to seeded mixers, keep
every other head's attention, and score induction and passkey at 1k and 2k (4 samples each).

The script that produced head_ablation.txt (docs/benchmarks.md section 13), tidied after the run (same cases, same calls):
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/head_ablation.py
"""

import json
import sys
import time
from pathlib import Path

import torch

import ssmify
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher
from ssmify.eval.options import EvalOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
from retrieval import retrieval_scores  # noqa: E402  (a benchmark script, not a package)

CASES = {
    "prev-token heads 16:0 + 11:0": {(16, 0), (11, 0)},
    "low-score heads 5:1 + 27:2": {(5, 1), (27, 2)},
}

torch.set_num_threads(1)
teacher_dir = smollm2_teacher_dir()
_, tokenizer = load_teacher(teacher_dir, dtype="float32")
options = EvalOptions(lengths=(1024, 2048), samples=4, progress=False)
for name, converted in CASES.items():
    keep = ",".join(
        f"{layer}:{group}" for layer in range(30) for group in range(3) if (layer, group) not in converted
    )
    start = time.time()
    student = ssmify.convert(str(teacher_dir), attention_heads=keep, tokenizer=tokenizer)
    scores = retrieval_scores(student.eval(), tokenizer, options)
    print(name, json.dumps(scores), f"{time.time() - start:.0f} s", flush=True)
