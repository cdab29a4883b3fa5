"""`--verify-engine`: check before writing that the engines can run the export, then run it in each.

Pre-flight, from the config alone and before any weight loads: the engine name, the target's rules for
that engine (`engine_rules.py`) and the engine's venv. After the export passes its transformers parity
check, each engine runs it on `engine_prompts` and `parity.compare` holds it to the student.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedConfig, PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.export.base import ExportTarget
from ssmify.export.engines.base import Engine
from ssmify.export.engines.parity import compare
from ssmify.export.engines.prompts import NEW_TOKENS, engine_prompts
from ssmify.export.engines.registry import engines_named

log = logging.getLogger(__name__)


def engines_to_verify(names: str | None, target: ExportTarget, config: PreTrainedConfig) -> list[Engine]:
    """The engines to run the export in; `all` means every engine that runs this target for this student.

    One-line SsmifyError for an unknown name, an engine that cannot run this student's export exactly,
    and an engine whose venv is not built."""
    if not names:
        return []
    engines = engines_named(names)
    if names.split(",") == ["all"]:
        engines = [e for e in engines if not target.engine_problems(config, e.name)]
        if not engines:
            raise SsmifyError(
                f"--verify-engine all: no engine runs this student's {target.architecture} export"
            )
    for engine in engines:
        problems = target.engine_problems(config, engine.name)
        if problems:
            raise SsmifyError(
                f"--verify-engine {engine.name}: {engine.name} cannot run this student's "
                f"{target.architecture} export exactly: {'; '.join(problems)}"
            )
        engine.env.require()
    return engines


def verify_in_engines(student: PreTrainedModel, export_dir: Path, engines: list[Engine]) -> dict:
    """{engine: report} from running `export_dir` in each engine; raises SsmifyError on a mismatch."""
    prompts = engine_prompts(student.config)
    reports = {}
    for engine in engines:
        log.info("running the export in %s on prompts of %s tokens", engine.name, [len(p) for p in prompts])
        result = engine.run(export_dir, prompts, NEW_TOKENS)
        parity = compare(engine.name, student, prompts, result)
        meta = {
            key: result[key] for key in ("versions", "architecture", "block_size", "seconds") if key in result
        }
        reports[engine.name] = {**meta, **parity}
        log.info(
            "%s %s: greedy tokens %s; max |logprob difference| %.1e on prompts, %.1e on generated tokens",
            engine.name,
            result["versions"],
            ", ".join(p["tokens_matched"] for p in parity["prompts"]),
            max(p["max_prompt_logprob_diff"] for p in parity["prompts"]),
            max(p["max_generated_logprob_diff"] for p in parity["prompts"]),
        )
    return reports
