"""Shared pieces of the export tests: trained-looking students, and the check in a fresh Python process.

(No tests here; test_export*.py import these helpers.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ssmify.convert import mixer_layers

# Runs in a fresh interpreter that never imports ssmify: plain transformers must load each export.
# argv[1]: JSON {export folder: reference .safetensors}. Prints one JSON line.
FRESH_PROCESS = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

results = {}
for folder, reference in json.loads(sys.argv[1]).items():
    ref = load_file(reference)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt, new = ref["prompt"], ref["greedy"].shape[1] - ref["prompt"].shape[1]
    with torch.no_grad():
        logits = model(ref["input_ids"], use_cache=False).logits
        greedy = model.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0
        )
    results[folder] = {
        "class": type(model).__name__,
        "max_abs_diff": (logits - ref["logits"]).abs().max().item(),
        "generated": greedy[0, prompt.shape[1]:].tolist(),
    }
results["ssmify_modules"] = sorted(m for m in sys.modules if m == "ssmify" or m.startswith("ssmify."))
print(json.dumps(results))
"""


@torch.no_grad()
def perturb_mixers(student: PreTrainedModel, seed: int = 0, scale: float = 0.1) -> PreTrainedModel:
    """Add noise to every mixer parameter, as training would: then a weight that export drops or misplaces
    (a conv bias, D, a norm gain) changes the outputs, where a freshly seeded zero or one might hide it."""
    generator = torch.Generator().manual_seed(seed)
    for mixer in mixer_layers(student).values():
        for param in mixer.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return student


@torch.no_grad()
def save_reference(student: PreTrainedModel, path: Path, length: int = 37, new_tokens: int = 20) -> list[int]:
    """The student's logits on two random windows, and its cached greedy continuation of a short prompt,
    written for FRESH_PROCESS; returns the generated tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, student.config.vocab_size, (2, length), generator=generator)
    prompt = input_ids[:1, :8].clone()
    greedy = student.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    logits = student(input_ids, use_cache=False).logits
    save_file({"input_ids": input_ids, "logits": logits, "prompt": prompt, "greedy": greedy}, str(path))
    return greedy[0, prompt.shape[1] :].tolist()


def check_in_fresh_process(cases: dict[Path, Path], threads: int = 1, timeout: int = 300) -> dict:
    """Run FRESH_PROCESS on {export folder: reference file}; its results by folder, plus `ssmify_modules`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    argument = json.dumps({str(folder): str(reference) for folder, reference in cases.items()})
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, argument],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(next(iter(cases))).parent,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
