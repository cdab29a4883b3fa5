"""What an engine is to ssmify: a venv, a runner script run inside it, and the JSON they exchange.

The runner (`<engine>_runner.py`, beside this file) imports only the engine, never ssmify: ssmify and the
engine pin different torch and transformers versions, so they live in different venvs and talk through a
request and a result file.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from ssmify.errors import SsmifyError
from ssmify.export.engines.envs import EngineEnv

HERE = Path(__file__).parent


class Engine:
    """One serving engine. Subclasses set `name`, `env`, `runner` and may override `prepare`."""

    name: str  # the --verify-engine value
    env: EngineEnv
    runner: str  # the runner script's file name, beside this file
    timeout_s = 1800

    def prepare(self, export_dir: Path, workdir: Path) -> str:
        """The model path the runner loads: the export folder itself unless the engine needs a conversion."""
        return str(export_dir)

    def run(self, export_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict:
        """Run the export in the engine's venv on `prompts` (token ids), greedy; the runner's result dict.

        The engine's output goes to a log kept in a temporary folder, which a failure names; a model the
        engine converted (llama.cpp's GGUF) is deleted after a run that succeeds."""
        python = self.env.require()
        workdir = Path(tempfile.mkdtemp(prefix=f"ssmify-{self.env.name}-"))
        log = workdir / "engine.log"
        request = {
            "model": self.prepare(export_dir, workdir),
            "prompts": prompts,
            "new_tokens": new_tokens,
            "max_model_len": max(len(p) for p in prompts) + new_tokens,
            "threads": len(os.sched_getaffinity(0)),
        }
        (workdir / "request.json").write_text(json.dumps(request))
        self._call(
            [
                str(python),
                str(HERE / self.runner),
                str(workdir / "request.json"),
                str(workdir / "result.json"),
            ],
            log,
        )
        for path in workdir.iterdir():  # keep the log, request and result; drop converted models (GGUF)
            if path.suffix not in (".log", ".json"):
                path.unlink()
        return {**json.loads((workdir / "result.json").read_text()), "log": str(log)}

    def _call(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        """Run one step of the engine, appending to `log`; a failure is one line with the log's last line."""
        with log.open("a") as out:
            try:
                done = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    timeout=self.timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise SsmifyError(
                    f"{self.name} did not finish within {self.timeout_s} s; log: {log}"
                ) from None
        if done.returncode:
            raise SsmifyError(
                f"{self.name} failed on this export (exit {done.returncode}): {last_error(log)}; log: {log}"
            )


def last_error(log: Path) -> str:
    """The last line of `log` that names an error, else its last line: what a one-line failure quotes."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "assert" in line.lower()]
    return (errors or lines or ["no output"])[-1][-300:]
