"""ssmify: turn a pretrained transformer into a distilled Mamba-2 state-space model or hybrid.

Importing ssmify registers the "ssmify" model type with transformers, so that
`AutoModelForCausalLM.from_pretrained(student_dir)` loads a student. The `ssmify` command itself
(console script or `python -m ssmify`) skips that here, so that building its parser loads no torch;
`ssmify.cli.main` registers before a subcommand runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssmify.errors import SsmifyError


def _started_as_command() -> bool:
    """Whether this process is the `ssmify` command: its console script, or `python -m ssmify`.

    While `python -m` locates a package, sys.argv[0] is "-m"; sys.orig_argv names the package.
    """
    if sys.argv[:1] == ["-m"]:
        argv = sys.orig_argv
        return "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["ssmify"]
    return bool(sys.argv) and Path(sys.argv[0]).stem == "ssmify" and not sys.argv[0].endswith(".py")


if not _started_as_command():
    from ssmify.convert import LayerPlan, convert
    from ssmify.export import export

__all__ = ["LayerPlan", "SsmifyError", "convert", "export"]
