"""`ssmify eval MODEL [--teacher T] --data FILE ... [--tasks ...]`: score a student and write a report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

TASK_HELP = (
    "comma list of perplexity, agreement, alignment, induction, passkey, recall, retrieval (= induction, "
    "passkey, recall), speed, lm-eval:TASK (default: perplexity, plus agreement with --teacher)"
)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated token counts, e.g. 512,1024"
        ) from err
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token counts of at least 2")
    return lengths


def register(subparsers) -> None:
    """Add the `eval` subcommand."""
    from ssmify.eval.options import RETRIEVAL_LENGTHS, SPEED_LENGTHS, EvalOptions

    defaults = EvalOptions()
    parser = subparsers.add_parser(
        "eval",
        help="score a student against its teacher: quality kept, speed gained",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("model", metavar="MODEL", help="student (or any causal LM): folder, hub id or .gguf")
    parser.add_argument("--teacher", metavar="T", help="the teacher to compare with: folder, hub id or .gguf")
    parser.add_argument(
        "--data", metavar="FILE", nargs="+", default=[], help=".txt or .jsonl ('text' field) files"
    )
    parser.add_argument("--tasks", help=TASK_HELP)
    parser.add_argument(
        "--seq-len", type=int, default=defaults.seq_len, help="window length for text scoring"
    )
    parser.add_argument("--max-tokens", type=int, help="read at most this many tokens of --data")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per forward")
    parser.add_argument(
        "--out", default="eval-report", metavar="DIR", help="where report.json/.md and plots go"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder that holds an earlier report",
    )
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="for recall samples and speed contexts"
    )
    alignment = parser.add_argument_group("alignment")
    alignment.add_argument(
        "--alignment-windows", type=int, default=defaults.alignment_windows, help="windows compared"
    )
    alignment.add_argument(
        "--alignment-seq-len", type=int, default=defaults.alignment_seq_len, help="tokens per window (O(L^2))"
    )
    retrieval = parser.add_argument_group("retrieval (induction, passkey, recall)")
    retrieval.add_argument(
        "--lengths",
        "--recall-lengths",
        dest="lengths",
        type=_lengths,
        default=RETRIEVAL_LENGTHS,
        metavar="N,N,...",
        help="context lengths (default %(default)s; those past the models' positions are skipped)",
    )
    retrieval.add_argument(
        "--samples",
        "--recall-samples",
        dest="samples",
        type=int,
        default=defaults.samples,
        help="sequences per task and length (the same ones for student and teacher)",
    )
    retrieval.add_argument(
        "--recall-queries", type=int, default=defaults.recall_queries, help="keys asked per recall sequence"
    )
    retrieval.add_argument(
        "--filler",
        choices=("builtin", "data"),
        default=defaults.filler,
        help="the haystack of induction and passkey: the built-in passkey filler, or the --data text",
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument("--speed-lengths", type=_lengths, default=SPEED_LENGTHS, metavar="N,N,...")
    speed.add_argument(
        "--decode-tokens", type=int, default=defaults.decode_tokens, help="tokens timed in decode"
    )
    harness = parser.add_argument_group("lm-eval")
    harness.add_argument(
        "--lm-eval-include",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of local lm-eval task YAML files (repeatable)",
    )
    harness.add_argument("--lm-eval-limit", type=int, help="at most this many documents per task")
    parser.set_defaults(func=run)


def _check_positive(args: argparse.Namespace) -> None:
    for flag in (
        "seq_len",
        "batch_size",
        "alignment_windows",
        "alignment_seq_len",
        "samples",
        "recall_queries",
        "decode_tokens",
        "max_tokens",
        "lm_eval_limit",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SsmifyError(f"--{flag.replace('_', '-')} {value}: must be at least 1")


def run(args: argparse.Namespace) -> int:
    """Check every input first, then load, evaluate and write the report."""
    from ssmify.atomic import atomic_directory, check_output_dir
    from ssmify.eval.data import check_files, load_data
    from ssmify.eval.loading import load_models
    from ssmify.eval.options import EvalOptions
    from ssmify.eval.report import write_report
    from ssmify.eval.tasks import check_tasks, default_tasks, lm_eval_names, parse_tasks, run_tasks

    _check_positive(args)
    tasks = parse_tasks(args.tasks) if args.tasks else default_tasks(args.teacher is not None)
    check_tasks(tasks, has_teacher=args.teacher is not None, has_data=bool(args.data))
    if args.filler == "data" and not args.data:
        raise SsmifyError("--filler data takes the haystack from --data: pass --data FILE")
    check_files(args.data)
    check_output_dir(args.out, args.overwrite)
    options = EvalOptions(
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        alignment_windows=args.alignment_windows,
        alignment_seq_len=args.alignment_seq_len,
        lengths=args.lengths,
        samples=args.samples,
        recall_queries=args.recall_queries,
        filler=args.filler,
        speed_lengths=args.speed_lengths,
        decode_tokens=args.decode_tokens,
        lm_eval_tasks=lm_eval_names(tasks),
        lm_eval_include=list(args.lm_eval_include),
        lm_eval_limit=args.lm_eval_limit,
        seed=args.seed,
    )
    if options.lm_eval_tasks:
        from ssmify.eval.lm_eval_adapter import task_manager

        task_manager(options.lm_eval_tasks, options.lm_eval_include)
    model, teacher, tokenizer = load_models(
        args.model, args.teacher, args.dtype, args.device, args.trust_remote_code
    )
    data = load_data(args.data, tokenizer, options.seq_len, options.max_tokens)
    results = run_tasks(model, teacher, data, options, tasks)
    report = {
        "model": args.model,
        "teacher": args.teacher,
        "tasks": tasks,
        "data": list(args.data),
        **results,
    }
    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        written = write_report(report, staging)
    log.info(
        "wrote %s and %s", Path(args.out) / written["json"].name, Path(args.out) / written["markdown"].name
    )
    return 0
