"""Resuming a streamed stage near its end: the time to its first step against the stage's uninterrupted run.

The demo recipe's logits stage (SmolLM2-135M-Instruct, a 50% hybrid student converted once beforehand, with
the attention layers spread evenly), cut to --tokens, reads its training text as a streamed dataset (`streaming: true`: the Wikipedia
train split written as a local jsonl folder, which `datasets` streams as it would a hub repository,
through a shuffle buffer). Three runs:

- uninterrupted: the whole stage, with one checkpoint at 90% of its steps; its wall time W (teacher
  and student loading, data, training, validation, saving);
- resumed at 90% from the saved stream position (the default): the stream starts at the position the
  checkpoint holds; the documents before it are read and dropped, not tokenized;
- resumed at 90% by replay: the same with the position ignored, so the stream is tokenized again from
  its start up to the step (what a resume did before the position was saved).

For each resume: the time from the call to the end of its first train step, as a fraction of W.
Target: the resume from the saved position within 10% of W.

    python scripts/bench/stream_resume.py                       # SmolLM2-135M, 16384 tokens
    python scripts/bench/stream_resume.py --quick --teacher DIR --train T.txt --heldout H.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main

TARGET = 0.10


def timed_run(raw: dict, resume: bool) -> tuple[float, float]:
    """(seconds to the end of the first train step, seconds of the whole run) of `ssmify distill`."""
    import ssmify.distill.loop as loop
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe

    original, first = loop.train_step, []

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        if not first:
            first.append(time.perf_counter())
        return result

    loop.train_step = train_step
    try:
        start = time.perf_counter()
        run_recipe(parse_recipe(raw), resume=resume)
        end = time.perf_counter()
    finally:
        loop.train_step = original
    return first[0] - start, end - start


def unfinish(stage_dir: Path) -> None:
    """Make a finished stage look killed after its last checkpoint: drop its summary and saved student."""
    for path in stage_dir.iterdir():
        if path.name != "checkpoints":
            path.unlink() if path.is_file() else shutil.rmtree(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: a smoke test")
    parser.add_argument("--recipe", default="recipes/smollm2-demo.yaml")
    add_input_args(parser)
    parser.add_argument("--tokens", type=int, default=16384, help="training tokens of the stage")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="runs/bench/stream-resume")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.tokens = 1280

    quiet_offline(args.threads)
    from ssmify.assets.corpus import read_documents
    from ssmify.distill.data import StreamedBlocks

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    stream = out / "streamed-train"
    stream.mkdir(parents=True)
    documents = read_documents(train)
    (stream / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents))

    from ssmify.convert.convert import convert

    convert(str(teacher_dir), out=out / "student", keep_attention=0.5, layer_choice="even")
    raw = yaml.safe_load(Path(args.recipe).read_text())
    logits = next(stage for stage in raw["stages"] if stage["name"] == "logits")
    if args.quick:
        logits.update(global_batch_tokens=128, micro_batch_size=2, seq_len=32, eval_tokens=64)
    steps = args.tokens // logits["global_batch_tokens"]
    logits.update(tokens=args.tokens, checkpoint_every=max(int(steps * 0.9), 1))
    raw.update(
        teacher=str(teacher_dir),
        student={"path": str(out / "student")},
        data={
            **raw["data"],
            "train": [{"hub": str(stream), "streaming": True}],
            "validation": [str(heldout)],
        },
        teacher_dtype="float32",
        stages=[logits],
        output_dir=str(out / "run"),
    )
    print(
        f"stream resume: {args.recipe} logits stage ({teacher_dir.name}), {args.tokens} tokens in {steps} steps, "
        f"checkpoint at step {logits['checkpoint_every']}, {len(documents)} streamed documents, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    first_uninterrupted, whole = timed_run(raw, resume=False)
    unfinish(out / "run" / "1-logits")
    from_position, _ = timed_run(raw, resume=True)

    unfinish(out / "run" / "1-logits")
    keep = StreamedBlocks.load_state_dict
    StreamedBlocks.load_state_dict = lambda self, state: None
    try:
        by_replay, _ = timed_run(raw, resume=True)
    finally:
        StreamedBlocks.load_state_dict = keep

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("| run | seconds to the first step | of the uninterrupted run |")
    print("|---|---|---|")
    print(
        f"| uninterrupted (whole run {whole:.1f} s) | {first_uninterrupted:.1f} | {first_uninterrupted / whole:.1%} |"
    )
    print(f"| resumed at 90%, saved position | {from_position:.1f} | {from_position / whole:.1%} |")
    print(f"| resumed at 90%, replay | {by_replay:.1f} | {by_replay / whole:.1%} |")
    print(
        f"target (resume within {TARGET:.0%} of the run): {'met' if from_position <= TARGET * whole else 'missed'}"
    )
    if args.json:
        result = {
            "tokens": args.tokens,
            "whole_seconds": whole,
            "first_step_uninterrupted": first_uninterrupted,
            "first_step_from_position": from_position,
            "first_step_by_replay": by_replay,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
