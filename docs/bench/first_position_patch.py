"""Retrieval on the 16 scored samples per point, a student as it is and with its position-0 residual stream
replaced by the teacher's after every layer (does the first-position sink decide the scored samples?).

    OMP_NUM_THREADS=2 .venv/bin/python docs/bench/first_position_patch.py \
        runs/bench/heads_tail2_syn50_s1/heads9/hand-2cc6ee/synthetic10/seed1/4-logits > docs/bench/first_position_patch.txt
"""

import json
import sys

import torch

sys.path.insert(0, "docs/bench")
from transformers import AutoModelForCausalLM

import ssmify  # noqa
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import against_teacher, induction, passkey, summarize

torch.set_grad_enabled(False)
teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
data = EvalData(tokenizer)
options = EvalOptions(lengths=(1024, 2048), samples=16, progress=False)


def scores(model):
    return {t: f(model, None, data, options) for t, f in (("induction", induction), ("passkey", passkey))}


reference = scores(teacher)


def patch(model):
    state = {"th": None}

    def pre(m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        fresh = ids is not None and ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0)
        state["th"] = teacher(ids[:, :1], output_hidden_states=True).hidden_states if fresh else None

    model.register_forward_pre_hook(pre, with_kwargs=True)
    n = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):

        def hook(m, a, out, i=i):
            if state["th"] is not None and i + 1 < n:
                h = out[0] if isinstance(out, tuple) else out
                h[:, 0] = state["th"][i + 1][:, 0]

        layer.register_forward_hook(hook)


for path in sys.argv[1:]:
    for patched in (False, True):
        student = AutoModelForCausalLM.from_pretrained(path).eval()
        if patched:
            patch(student)
        merged = against_teacher(scores(student), reference)
        s = summarize(merged)
        print(
            json.dumps(
                {
                    "student": path,
                    "pos0 patched": patched,
                    "accuracy": {
                        t: {p["length"]: round(p["accuracy"], 3) for p in r["points"]}
                        for t, r in merged.items()
                    },
                    "retention by length": {k: round(v, 3) for k, v in s["by_length"].items()},
                    "overall": round(s["overall"], 3),
                }
            ),
            flush=True,
        )
