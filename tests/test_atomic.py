"""Atomic writes: a reader sees the old file or the new one, never a part, and no temporary is left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ssmify.atomic import write_text_atomic


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
