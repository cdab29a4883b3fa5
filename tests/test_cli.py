"""The command line itself: fast --help without torch, --version, -v/-q anywhere, levelled logs, rank 0 only."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssmify.cli import SUBCOMMANDS, build_parser
from ssmify.commands.export import TARGET_NAMES
from ssmify.version import version

REPO = Path(__file__).resolve().parents[1]


def run_ssmify(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ssmify ARGS` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ssmify", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    "command", [[], *([name] for name in SUBCOMMANDS)], ids=lambda c: " ".join(c) or "ssmify"
)
def test_help_is_fast_and_loads_no_torch(command):
    start = time.perf_counter()
    result = run_ssmify(*command, "--help")
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and "usage: ssmify" in result.stdout
    imported = {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert not {"torch", "transformers", "accelerate", "datasets"} & imported
    assert seconds < 1.5, f"ssmify {' '.join(command)} --help took {seconds:.2f} s"


def test_version_prints_the_package_version():
    result = run_ssmify("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ssmify {version()}"


def test_export_help_names_every_target():
    from ssmify.export.targets import TARGETS

    assert TARGET_NAMES == tuple(TARGETS)


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["eval", "m"], logging.INFO),
        (["-v", "eval", "m"], logging.DEBUG),
        (["eval", "m", "-v"], logging.DEBUG),
        (["-q", "distill", "r.yaml"], logging.WARNING),
        (["distill", "r.yaml", "--quiet"], logging.WARNING),
        (["convert", "t", "--out", "o", "-q"], logging.WARNING),
    ],
)
def test_verbosity_flags_work_before_and_after_the_subcommand(argv, level):
    assert build_parser().parse_args(argv).log_level == level


LOG_SCRIPT = """
import logging, sys
from ssmify.cli import setup_logging
setup_logging(logging.INFO)
log = logging.getLogger("ssmify.probe")
log.info("step done")
log.warning("disk nearly full")
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_log_lines_carry_their_level_and_only_rank_0_logs_info(rank, tmp_path):
    script = tmp_path / "ssmify"  # named as the console script is, which loads no torch until a command runs
    script.write_text(LOG_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": rank}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "False"
    lines = [line.split(" ", 1)[1] for line in result.stderr.splitlines()]
    if rank == "0":
        assert lines == ["INFO ssmify.probe: step done", "WARNING ssmify.probe: disk nearly full"]
    else:
        assert lines == ["WARNING [rank 1] ssmify.probe: disk nearly full"]


def imports_of(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_sensitivity_and_the_seeding_core_do_not_import_convert():
    convert_dir = REPO / "ssmify" / "convert"
    for name in ("sensitivity.py", "build.py"):
        assert "ssmify.convert.convert" not in imports_of(convert_dir / name), name
    assert "ssmify.convert.sensitivity" in imports_of(convert_dir / "convert.py")
