"""Alignment of a converted student, checked against transformers' own attentions and hidden states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_eval_support import (
    char_tokenizer,
    write_texts,
)
from tiny_models import tiny_model

from ssmify.convert import convert
from ssmify.errors import SsmifyError
from ssmify.eval.alignment import alignment
from ssmify.eval.data import load_data
from ssmify.eval.options import EvalOptions

OPTIONS = EvalOptions(seq_len=48, alignment_windows=2, alignment_seq_len=32, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = write_texts(tmp_path_factory.mktemp("texts"))
    data = load_data([str(p) for p in texts], char_tokenizer(), seq_len=48)
    teacher = tiny_model("llama", seed=2)
    student = convert(teacher, attention_layers=[0, 3], tokenizer=char_tokenizer())
    return teacher, student, data


def reference_errors(teacher, student, windows: torch.Tensor, layer: int) -> tuple[float, float]:
    """The same two errors from transformers' outputs: eager attentions and hidden states, and a
    copy of the teacher whose attention at `layer` alone is the student's mixer (fed the teacher's input)."""
    eager = copy.deepcopy(teacher)
    eager.set_attn_implementation("eager")
    hybrid = copy.deepcopy(teacher)
    hybrid.model.layers[layer].self_attn = student.model.layers[layer].self_attn
    sums = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for window in windows:
            out = eager(input_ids=window[None], output_attentions=True, output_hidden_states=True)
            probs = out.attentions[layer]
            attention_input = teacher.model.layers[layer].input_layernorm(out.hidden_states[layer])
            mixing = student.model.layers[layer].self_attn.mixer.materialize(attention_input)
            hybrid_out = hybrid(input_ids=window[None], output_hidden_states=True).hidden_states[layer + 1]
            target = out.hidden_states[layer + 1]
            sums[0] += (mixing - probs).double().pow(2).sum().item()
            sums[1] += probs.double().pow(2).sum().item()
            sums[2] += (hybrid_out - target).double().pow(2).sum().item()
            sums[3] += target.double().pow(2).sum().item()
    return math.sqrt(sums[0] / sums[1]), math.sqrt(sums[2] / sums[3])


def test_alignment_reports_each_converted_layer_as_transformers_computes_it(setup):
    teacher, student, data = setup
    result = alignment(student, teacher, data, OPTIONS)
    assert [row["layer"] for row in result["layers"]] == [1, 2]
    assert result["windows"] == 2 and result["seq_len"] == 32
    windows = data.windows[:2, :32]
    for row in result["layers"]:
        matrix, hidden = reference_errors(teacher, student, windows, row["layer"])
        assert row["matrix_rel_error"] == pytest.approx(matrix, rel=1e-4)
        assert row["hidden_rel_error"] == pytest.approx(hidden, rel=1e-4)
        assert row["matrix_rel_error"] > 1e-3 and row["hidden_rel_error"] > 1e-3


def test_alignment_needs_a_converted_student(setup):
    teacher, _, data = setup
    with pytest.raises(SsmifyError, match="evaluate a converted student"):
        alignment(tiny_model("llama"), teacher, data, OPTIONS)
