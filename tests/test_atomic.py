"""Atomic writes: a reader sees the old file or the new one, never a part, and no temporary is left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ssmify.atomic import check_output_dir, write_text_atomic, written_by_ssmify
from ssmify.errors import SsmifyError


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("previous")

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError):
        write_text_atomic(target, "half")
    assert target.read_text() == "previous"


@pytest.mark.parametrize(
    ("files", "ours"),
    [
        ({"config.json": '{"model_type": "ssmify", "ssmify": {"mixer": "mamba2"}}'}, True),
        ({"config.json": '{"model_type": "llama"}'}, False),
        ({"config.json": "not json"}, False),
        ({"export_report.json": "{}", "config.json": '{"model_type": "bamba"}'}, True),
        ({"summary.json": "{}"}, True),
        ({"report.json": "{}", "report.md": "# report"}, True),
        ({"report.json": "{}"}, False),
        ({"thesis.tex": "years of work"}, False),
    ],
)
def test_only_folders_that_ssmify_wrote_count_as_its_own(tmp_path: Path, files: dict, ours: bool):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert written_by_ssmify(tmp_path) is ours


def test_check_output_dir_refuses_a_file_a_full_folder_and_a_foreign_one_with_overwrite(tmp_path: Path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SsmifyError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(SsmifyError, match="pass --overwrite"):
        check_output_dir(foreign, overwrite=False)
    with pytest.raises(
        SsmifyError, match=f"--out {foreign}: --overwrite replaces only a folder that ssmify wrote"
    ):
        check_output_dir(foreign, overwrite=True)
    (foreign / "summary.json").write_text("{}")
    check_output_dir(foreign, overwrite=True)
