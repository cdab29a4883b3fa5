"""llama.cpp (through llama-cpp-python): the export converted to GGUF by llama.cpp's own stock converter.

The converter runs in ssmify's venv (it needs torch and transformers, any recent version) with the
sdist's `gguf-py` first on the path, as llama.cpp documents; the GGUF is float32, so that the comparison
measures the engine and not a quantisation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssmify.export.engines.base import Engine
from ssmify.export.engines.envs import LLAMACPP, converter_dir


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    env = LLAMACPP
    runner = "llamacpp_runner.py"

    def prepare(self, export_dir: Path, workdir: Path) -> str:
        gguf = workdir / "model-f32.gguf"
        convert = converter_dir()
        cmd = [sys.executable, str(convert / "convert_hf_to_gguf.py"), str(export_dir)]
        cmd += ["--outfile", str(gguf), "--outtype", "f32"]
        self._call(cmd, workdir / "engine.log", {"PYTHONPATH": str(convert / "gguf-py")})
        return str(gguf)
