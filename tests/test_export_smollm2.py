"""The real SmolLM2-135M student exported: half of its attention layers kept, to Bamba and loaded without ssmify;
no attention at all, to the other two targets, exact in float64 (every target is held to the same on tiny
students in test_export_parity)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_export_parity import float64_difference
from test_export_support import check_in_fresh_process, save_reference

import ssmify
from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.export import TARGETS, export, exportable_targets
from ssmify.export.verify import TOLERANCE


@pytest.mark.slow
def test_smollm2_student_at_half_attention_exports_to_bamba_with_the_students_outputs(tmp_path):
    calibration = tmp_path / "calibration.txt"  # two 256-token windows: a seeded, calibrated student, quickly
    calibration.write_text(wikipedia_text()[0].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    student = ssmify.convert(smollm2_teacher_dir(), keep_attention=0.5, calibration_text=calibration)
    folder = export(student, "bamba", tmp_path / "export")
    reference = tmp_path / "reference.safetensors"
    tokens = save_reference(student, reference)
    result = check_in_fresh_process({folder: reference}, threads=1)
    assert result.pop("ssmify_modules") == []
    assert result[str(folder)]["class"] == "BambaForCausalLM"
    scale = load_file(str(reference))["logits"].abs().max().item()
    assert result[str(folder)]["max_abs_diff"] <= TOLERANCE["float32"] * scale  # float32 rounding only
    assert result[str(folder)]["generated"] == tokens
    config = json.loads((folder / "config.json").read_text())
    assert config["attn_layer_indices"] == student.config.ssmify["attention_layers"]
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_pure_ssm_smollm2_student_exports_to_granite_and_falcon_h1_exactly_in_float64(tmp_path):
    """An untrained pure SSM: its residual stream reaches 1e4, so float32 rounding alone moves its logits
    by more than the old absolute fp32 limit (1e-4), and only the float64 comparison can call it exact."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(wikipedia_text()[0].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    student = ssmify.convert(smollm2_teacher_dir(), keep_attention=0.0, calibration_text=calibration)
    with torch.no_grad():
        hidden = student(torch.arange(100, 164)[None], output_hidden_states=True).hidden_states
    assert max(h.abs().max().item() for h in hidden[:-1]) >= 1e4
    assert exportable_targets(student) == list(TARGETS)
    for target in ("granitemoehybrid", "falcon_h1"):
        folder = export(student, target, tmp_path / target)
        parity = json.loads((folder / "export_report.json").read_text())["parity"]
        assert parity["float64"]["forward"] <= 1e-9 * parity["logit_scale"]
        assert parity["float64"]["decode"] <= 1e-9 * parity["logit_scale"]
    difference, scale = float64_difference(student, folder)  # the last one, read back from its folder
    assert difference <= 1e-9 * scale
