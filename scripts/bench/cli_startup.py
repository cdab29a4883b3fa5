"""Startup time of the `ssmify` command beside a bare interpreter, measured in one run.

Each command runs --repeat times in a fresh process, alternating, and the median wall time is kept:

    python scripts/bench/cli_startup.py              # python -c pass, ssmify --help, ssmify CMD --help
    python scripts/bench/cli_startup.py --repeat 3   # fewer runs

It prints one line per command (median seconds and the ratio to `python -c pass`) and, with --json,
the same as a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "ssmify --help": [sys.executable, "-m", "ssmify", "--help"],
    **{
        f"ssmify {cmd} --help": [sys.executable, "-m", "ssmify", cmd, "--help"]
        for cmd in ("convert", "distill", "eval", "export", "demo")
    },
    "ssmify --version": [sys.executable, "-m", "ssmify", "--version"],
}


def wall_seconds(argv: list[str]) -> float:
    """Seconds from start to exit of one fresh process (its output discarded; it must succeed)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, argv in COMMANDS.items():
            times[name].append(wall_seconds(argv))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["python -c pass"]
    for name, median in medians.items():
        print(f"{name:28s} {median:7.3f} s  {median / base:5.1f}x python -c pass")
    if args.json:
        print(
            json.dumps(
                {
                    "repeat": args.repeat,
                    "median_s": medians,
                    "ratio": {k: v / base for k, v in medians.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
