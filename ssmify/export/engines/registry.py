"""The engines `--verify-engine` knows, by the name it takes."""

from __future__ import annotations

from ssmify.errors import SsmifyError
from ssmify.export.engines.base import Engine
from ssmify.export.engines.llamacpp_engine import LlamaCppEngine
from ssmify.export.engines.vllm_engine import VllmEngine

ENGINES: dict[str, Engine] = {e.name: e for e in (VllmEngine(), LlamaCppEngine())}


def engines_named(names: str) -> list[Engine]:
    """`vllm`, `llama.cpp`, `all` or a comma-separated list -> the engines; an unknown name is one line."""
    chosen = []
    for name in names.split(","):
        if name == "all":
            chosen += ENGINES.values()
        elif name in ENGINES:
            chosen.append(ENGINES[name])
        else:
            raise SsmifyError(
                f"--verify-engine: {name!r} is not an engine; choose {', '.join(ENGINES)} or all"
            )
    return list(dict.fromkeys(chosen))
