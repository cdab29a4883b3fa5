"""The real SmolLM2-135M student, half of its attention layers kept, exported to Bamba and loaded without ssmify."""

from __future__ import annotations

import json

import pytest
from test_export_support import check_in_fresh_process, save_reference

import ssmify
from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.export import export


@pytest.mark.slow
def test_smollm2_student_at_half_attention_exports_to_bamba_with_the_students_outputs(tmp_path):
    calibration = tmp_path / "calibration.txt"  # two 256-token windows: a seeded, calibrated student, quickly
    calibration.write_text(wikipedia_text()[0].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    student = ssmify.convert(smollm2_teacher_dir(), keep_attention=0.5, calibration_text=calibration)
    folder = export(student, "auto", tmp_path / "export")
    reference = tmp_path / "reference.safetensors"
    tokens = save_reference(student, reference)
    result = check_in_fresh_process({folder: reference}, threads=1)
    assert result.pop("ssmify_modules") == []
    assert result[str(folder)]["class"] == "BambaForCausalLM"
    assert result[str(folder)]["max_abs_diff"] <= 1e-4
    assert result[str(folder)]["generated"] == tokens
    config = json.loads((folder / "config.json").read_text())
    assert config["attn_layer_indices"] == student.config.ssmify["attention_layers"]
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
