"""Where a distilled student loses the passkey between 1,024 and 2,048 tokens.

On 8 passkey prompts per length (the evaluator's builtin filler, generator seed 1, so not the scored
samples), teacher-forced with the answer appended, at the positions that predict an answer token:
- answer accuracy (greedy argmax per answer token) and the answer's mean cross-entropy;
- for each kept KV group of the student, the attention its best query head puts on the passkey's tokens in
  the fact (as docs/bench/passkey_heads.py), beside the teacher's same group;
- the relative error of the student's residual stream against the teacher's, ||h_s - h_t|| / ||h_t||,
  after chosen layers.

    B=runs/bench/heads_logits_heavy
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/passkey_depth.py $B/heads9/hand-2cc6ee/synthetic10/seed0/3-logits \
        $B/10pct/retrieval/synthetic10/seed0/3-logits > docs/bench/passkey_depth.txt
"""

import json
import sys

import torch
from passkey_prompts import passkey_prompts
from transformers import AutoModelForCausalLM

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher

SAMPLES, LENGTHS, AFTER = 8, (1024, 2048), (4, 8, 12, 16, 18, 20, 24, 29)

teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")


def kept_groups(model) -> list[tuple[int, int]]:
    block = getattr(model.config, "ssmify", None)
    if block is None:
        return []
    heads = [(layer, g) for layer in block["attention_layers"] for g in range(3)]
    heads += [(int(layer), g) for layer, groups in block.get("attention_heads", {}).items() for g in groups]
    return sorted(heads)


def measure(model, groups: list[tuple[int, int]], length: int) -> dict:
    """Answer accuracy and loss, key attention per group, and the residual streams at AFTER."""
    mass: dict[str, float] = {}
    handles = []
    current: dict = {}
    for layer in sorted({layer for layer, _ in groups}):
        sa = model.model.layers[layer].self_attn
        module, kept = (sa.attention, sa.kept_groups) if hasattr(sa, "kept_groups") else (sa, (0, 1, 2))

        def hook(m, a, out, layer=layer, kept=kept):
            w = out[1][0][:, current["positions"]][..., current["key"]].sum(-1).mean(-1)  # (query heads,)
            per = w.shape[0] // len(kept)
            for i, group in enumerate(kept):
                name = f"{layer}:{group}"
                mass[name] = mass.get(name, 0.0) + w[i * per : (i + 1) * per].max().item() / SAMPLES

        handles.append(module.register_forward_hook(hook))
    right = total = 0
    loss = 0.0
    streams = []
    for ids, positions, answers, key in passkey_prompts(tokenizer, length, SAMPLES):
        current.update(positions=positions, key=key)
        with torch.no_grad():
            out = model(ids[None], output_hidden_states=True)
        logits = out.logits[0, positions]
        right += int((logits.argmax(-1) == answers).sum())
        total += len(answers)
        loss += torch.nn.functional.cross_entropy(logits, answers).item() / SAMPLES
        streams.append(torch.stack([out.hidden_states[i + 1][0, positions] for i in AFTER]))
    for handle in handles:
        handle.remove()
    return {"accuracy": right / total, "loss": loss, "mass": mass, "streams": streams}


def relative(student: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    s, t = torch.cat(student, 1), torch.cat(reference, 1)  # (len(AFTER), positions, hidden)
    return [round(((a - b).norm() / b.norm()).item(), 3) for a, b in zip(s, t)]


teacher_runs = {}
for path in sys.argv[1:]:
    student = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    groups = kept_groups(student)
    for length in LENGTHS:
        key = (length, tuple(groups))
        if key not in teacher_runs:
            teacher.config._attn_implementation = "eager"
            teacher_runs[key] = measure(teacher, groups, length)
        t, s = teacher_runs[key], measure(student, groups, length)
        print(
            json.dumps(
                {
                    "student": path,
                    "length": length,
                    "answer accuracy student / teacher": [round(s["accuracy"], 2), round(t["accuracy"], 2)],
                    "answer loss student / teacher": [round(s["loss"], 2), round(t["loss"], 2)],
                    "key attention per kept group, student / teacher": {
                        g: [round(s["mass"][g], 2), round(t["mass"][g], 2)] for g in s["mass"]
                    },
                    f"relative residual error after layers {list(AFTER)}": relative(
                        s["streams"], t["streams"]
                    ),
                }
            ),
            flush=True,
        )
