"""Kill sweep: SIGKILL `ssmify distill` at random moments of a tiny three-stage run, resume, compare.

    python scripts/kill_sweep.py --kills 50 --seed 0          # the full sweep (minutes on 2 cores)
    python scripts/kill_sweep.py --kills 4 --workdir /tmp/k   # a short one, keeping its folders
    python scripts/kill_sweep.py --full-disk                  # also fill a real disk mid-run (root)

It builds the tiny workspace the distill tests use (a 4-layer Llama teacher, a converted student, a
small corpus; tests/test_distill_support.py), runs the recipe below once uninterrupted as the
reference, then starts runs that it kills and resumes with `--resume` (one kill, sometimes several,
per run) until they finish, and compares every tensor of every stage's student with the reference.

Each kill aims at one moment of one stage: training inside it, a checkpoint write, the hand-off to
the next stage, or the save of its student (of the last stage: the final save), taking turns so that
each gets its share, with ties broken at random. It waits for the event that opens that moment (a line of the run's log, or a file appearing) and
then for a random part of how long the moment lasted in the reference run. The moment it actually
hit is read afterwards from what the killed run left: a `.tmp-step-N`/`.trash-step-N` folder means a
checkpoint write; otherwise the progress bars it printed say whether it had started or finished
the open stage's training. The table counts the observed moments.

Data lost: a kill after which the resume point (finished stages, then the newest checkpoint that
passes the resume check) is behind the one seen just before the kill, or a resumed run that did not
resume from that point. A mismatch: a finished run whose students differ from the reference by more
than 1e-6 anywhere. The exit code is 1 if there is either, or a run that failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the distill tests' tiny workspace, built the same way here
sys.path.insert(0, str(REPO))

from test_distill_support import make_workspace, recipe_dict, stage  # noqa: E402

from ssmify.distill.checkpoints import checkpoint_problem, step_folders  # noqa: E402

TOLERANCE = 1e-6
STAGES = ["1-matrix", "2-hidden", "3-logits"]
STEPS, CHECKPOINT_EVERY = 6, 2
CHECKPOINT_STEPS = list(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY))
MOMENTS = [
    "startup",
    "training",
    "checkpoint write",
    "hand-off into",
    "student save",
    "final save",
    "after the end",
]
BAR = re.compile(r"(\d+-\w+):\s+\d+%\|.*?\|\s*(\d+)/(\d+)")
SAVING = re.compile(r"Saving current state to (\S+)/(\d+-\w+)/checkpoints/\.tmp-step-(\d+)")
RESUMED = re.compile(r"(\d+-\w+): resuming from \S+/step-(\d+)")
POLL_S = 0.001


def sweep_recipe(workspace: Path, output_dir: Path) -> dict:
    """Three stages of STEPS optimizer steps each, a checkpoint every CHECKPOINT_EVERY, only the newest kept."""
    stages = [
        stage("matrix", seq_len=16, tokens=128 * STEPS, checkpoint_every=CHECKPOINT_EVERY),
        stage("hidden", lr=1e-3, tokens=128 * STEPS, checkpoint_every=CHECKPOINT_EVERY),
        stage("logits", lr=1e-3, tokens=128 * STEPS, checkpoint_every=CHECKPOINT_EVERY),
    ]
    return recipe_dict(workspace, stages, output_dir=str(output_dir), keep_checkpoints=1)


def child_env() -> dict[str, str]:
    """One thread (runs are then bit-reproducible and share the 2 cores fairly), offline, INFO logs."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }


class Child:
    """One `ssmify distill` process whose log lines (tqdm's \\r-separated ones too) are kept with their arrival time."""

    def __init__(self, recipe: Path, resume: bool) -> None:
        argv = [sys.executable, "-m", "ssmify", "distill", str(recipe), *(["--resume"] if resume else [])]
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        pending = b""
        for chunk in iter(lambda: self.process.stderr.read1(65536), b""):
            now = time.monotonic()
            parts = re.split(rb"[\r\n]", pending + chunk)
            pending = parts.pop()
            self.lines.extend((now, part.decode("utf-8", "replace")) for part in parts if part.strip())
        if pending.strip():
            self.lines.append((time.monotonic(), pending.decode("utf-8", "replace")))

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join()
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: re.Pattern, accept=lambda match: True) -> tuple[float, re.Match] | None:
        """The arrival time and match of the first log line where `pattern` matches and `accept` agrees."""
        for when, line in list(self.lines):
            match = pattern.search(line)
            if match and accept(match):
                return when, match
        return None


def bar_time(child: Child, name: str, complete: bool) -> float | None:
    """When `child` first printed the progress bar of stage `name` (with all steps done, if `complete`)."""
    found = child.first(BAR, lambda m: m.group(1) == name and (not complete or m.group(2) == m.group(3)))
    return found[0] if found else None


def save_time(child: Child, name: str, step: int) -> float | None:
    found = child.first(SAVING, lambda m: m.group(2) == name and int(m.group(3)) == step)
    return found[0] if found else None


@dataclass
class Windows:
    """How long each moment lasted in the reference run, in seconds."""

    training: dict[str, float]
    checkpoint: float
    handoff: dict[str, float]  # keyed by the stage handed over from
    save: dict[str, float]

    def __str__(self) -> str:
        def ms(values: dict[str, float]) -> str:
            return ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in values.items())

        return (
            f"windows in ms: training {ms(self.training)}; checkpoint write {self.checkpoint * 1000:.0f}; "
            f"hand-off from {ms(self.handoff)}; student save {ms(self.save)}"
        )


def run_reference(recipe: Path, out: Path) -> Windows:
    """Run the recipe uninterrupted, timing its moments from its log and from the files it writes."""
    child = Child(recipe, resume=False)
    summary_at: dict[str, float] = {}
    written_at: dict[tuple[str, int], float] = {}
    while child.running():
        now = time.monotonic()
        for name in STAGES:
            if name not in summary_at and (out / name / "summary.json").is_file():
                summary_at[name] = now
            for step in CHECKPOINT_STEPS:
                if (name, step) not in written_at and (out / name / "checkpoints" / f"step-{step}").is_dir():
                    written_at[name, step] = now
        time.sleep(POLL_S)
    if child.wait() != 0:
        raise SystemExit(f"the reference run failed:\n{child.text()[-3000:]}")
    writes = [
        written_at[key] - save_time(child, *key) for key in written_at if save_time(child, *key) is not None
    ]
    training = {n: bar_time(child, n, True) - bar_time(child, n, False) for n in STAGES}
    handoff = {a: bar_time(child, b, False) - summary_at[a] for a, b in zip(STAGES, STAGES[1:])}
    save = {n: summary_at[n] - bar_time(child, n, True) for n in STAGES}
    return Windows(training, statistics.median(writes) if writes else 0.01, handoff, save)


@dataclass(frozen=True)
class Target:
    """Where a kill aims: a kind of moment in a stage (a checkpoint write also names its step)."""

    kind: str
    stage: str
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.stage}" + (f" step {self.step}" if self.step is not None else "")


def resume_point(out: Path) -> tuple[int, int]:
    """(finished stages, newest checkpoint step of the open stage that passes the resume check).

    Read while the run may be pruning: a checkpoint that vanishes while it is checked means a newer
    one has just been renamed in, so the whole reading starts again.
    """
    while True:
        finished = 0
        while finished < len(STAGES) and (out / STAGES[finished] / "summary.json").is_file():
            finished += 1
        if finished == len(STAGES):
            return finished, 0
        try:
            for step, folder in reversed(step_folders(out / STAGES[finished] / "checkpoints")):
                if checkpoint_problem(folder) is None:
                    return finished, step
        except FileNotFoundError:
            continue
        return finished, 0


def feasible_targets(point: tuple[int, int]) -> dict[str, list[Target]]:
    """The targets still ahead of a run resumed at `point`, by kind."""
    finished, step = point
    open_stages = STAGES[finished:]
    targets: dict[str, list[Target]] = {
        "training": [Target("training", n) for n in open_stages],
        "checkpoint write": [
            Target("checkpoint write", n, s)
            for i, n in enumerate(open_stages)
            for s in CHECKPOINT_STEPS
            if i > 0 or s > step
        ],
        "hand-off": [Target("hand-off", a) for a in open_stages[:-1]],
        "student save": [Target("student save", n) for n in open_stages],
    }
    return {kind: found for kind, found in targets.items() if found}


def pick_target(rng: random.Random, point: tuple[int, int], aimed: Counter) -> Target | None:
    """Among the (kind, stage) pairs still ahead, one of those aimed at least so far (ties at random),
    then a target of it (a checkpoint step) at random: every moment of every stage gets its share,
    though a run that is resumed can only be killed in the stages it has left."""
    targets = [t for found in feasible_targets(point).values() for t in found]
    if not targets:
        return None
    fewest = min(aimed[t.kind, t.stage] for t in targets)
    pairs = sorted({(t.kind, t.stage) for t in targets if aimed[t.kind, t.stage] == fewest})
    kind, name = rng.choice(pairs)
    target = rng.choice([t for t in targets if t.kind == kind and t.stage == name])
    aimed[kind, name] += 1
    return target


def window(windows: Windows, target: Target) -> float:
    return {
        "training": windows.training.get(target.stage, 0.0),
        "checkpoint write": windows.checkpoint,
        "hand-off": windows.handoff.get(target.stage, 0.0),
        "student save": windows.save.get(target.stage, 0.0),
    }[target.kind]


def trigger_time(child: Child, out: Path, target: Target, summaries_before: set[str]) -> float | None:
    """When the event that opens `target` happened in `child`, or None while it has not."""
    if target.kind == "training":
        return bar_time(child, target.stage, False)
    if target.kind == "checkpoint write":
        return save_time(child, target.stage, target.step)
    if target.kind == "student save":
        return bar_time(child, target.stage, True)
    if target.stage not in summaries_before and (out / target.stage / "summary.json").is_file():
        return time.monotonic()
    return None


def temporaries(out: Path) -> set[tuple[str, int, int]]:
    """Every checkpoint temporary (.tmp-step-N, .trash-step-N) under `out`, with inode and mtime to tell new from old."""
    found = set()
    for name in STAGES:
        folder = out / name / "checkpoints"
        for path in [*folder.glob(".tmp-step-*"), *folder.glob(".trash-step-*")] if folder.is_dir() else []:
            info = path.stat()
            found.add((f"{name}/{path.name}", info.st_ino, info.st_mtime_ns))
    return found


def observed_moment(child: Child, out: Path, before: set[tuple[str, int, int]]) -> tuple[str, str]:
    """(moment, stage) that a killed run was in, read from the files it left and the bars it printed."""
    fresh = temporaries(out) - before
    if fresh:
        return "checkpoint write", sorted(fresh)[0][0].split("/")[0]
    finished, _ = resume_point(out)
    if finished == len(STAGES):
        return "after the end", STAGES[-1]
    name = STAGES[finished]
    if bar_time(child, name, True) is not None:
        return ("final save" if name == STAGES[-1] else "student save"), name
    if bar_time(child, name, False) is not None:
        return "training", name
    earlier = any(bar_time(child, n, False) is not None for n in STAGES[:finished])
    return ("hand-off into" if earlier else "startup"), name


def weights_difference(out: Path, reference: Path) -> float:
    """The largest absolute difference over every tensor of every stage's student (inf if the keys differ)."""
    worst = 0.0
    for name in STAGES:
        mine = load_file(str(out / name / "model.safetensors"))
        theirs = load_file(str(reference / name / "model.safetensors"))
        if mine.keys() != theirs.keys():
            return float("inf")
        for key, tensor in theirs.items():
            worst = max(worst, (mine[key].double() - tensor.double()).abs().max().item())
    return worst


@dataclass
class Kill:
    """One SIGKILL: where it aimed, where it landed, and whether the resume point survived it."""

    run: int
    target: Target
    delay: float
    moment: str
    stage: str
    before: tuple[int, int]
    after: tuple[int, int]
    resumed_from: tuple[int, int] | None = None

    @property
    def lost(self) -> bool:
        return self.after < self.before or (self.resumed_from is not None and self.resumed_from != self.after)


@dataclass
class Result:
    """What a sweep did and found."""

    kills: list[Kill] = field(default_factory=list)
    runs: int = 0
    resumed: int = 0
    missed: int = 0  # targets whose event never came (the run finished first)
    failures: list[str] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(d > TOLERANCE for d in self.differences)

    @property
    def lost(self) -> int:
        return sum(k.lost for k in self.kills)

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.lost or self.failures)


def resumed_point(child: Child) -> tuple[int, int] | None:
    """The point a resumed run started from, from its log: the stage and the checkpoint step (0: none).

    None when it was killed before it said.
    """
    found = child.first(RESUMED)
    if found is not None:
        return STAGES.index(found[1].group(1)), int(found[1].group(2))
    started = next((i for i, n in enumerate(STAGES) if bar_time(child, n, False) is not None), None)
    if started is None:
        return None
    return started, 0


def kill_at(child: Child, out: Path, target: Target, delay: float) -> tuple[int, int] | None:
    """SIGKILL `child` `delay` seconds after `target`'s event; the resume point just before, or None if it ended first."""
    summaries = {n for n in STAGES if (out / n / "summary.json").is_file()}
    deadline = None
    while child.running():
        if deadline is None:
            start = trigger_time(child, out, target, summaries)
            deadline = None if start is None else start + delay
        if deadline is not None and time.monotonic() >= deadline:
            before = resume_point(out)
            child.process.send_signal(signal.SIGKILL)
            child.wait()
            return before
        time.sleep(POLL_S)
    child.wait()
    return None


@dataclass
class Sweep:
    """The fixed parts of a sweep: its random source, the reference run and its windows, and the kill budget."""

    rng: random.Random
    reference: Path
    windows: Windows
    kills: int
    log: Callable[[str], None]
    aimed: Counter = field(default_factory=Counter)  # kills aimed so far, by (kind, stage)


def next_target(
    sweep: Sweep, result: Result, kills_here: int, plan: list[Target] | None, out: Path
) -> Target | None:
    """The next kill of this run: the plan's next, or at random (a second or later one with probability 1/2)."""
    if plan is not None:
        return plan.pop(0) if plan else None
    if len(result.kills) < sweep.kills and (kills_here == 0 or sweep.rng.random() < 0.5):
        return pick_target(sweep.rng, resume_point(out), sweep.aimed)
    return None


def finish_run(
    sweep: Sweep, result: Result, run: int, recipe: Path, out: Path, plan: list[Target] | None
) -> None:
    """Start run `run`, kill it (more than once at random, or as `plan` says), resume it to the end, compare."""
    resume, kills_here = False, 0
    last_kill: Kill | None = None
    while True:
        target = next_target(sweep, result, kills_here, plan, out)
        before_temporaries = temporaries(out)
        child = Child(recipe, resume)
        result.resumed += resume
        # a planned kill comes right at its event: a delay drawn from the reference run's window can
        # overshoot a short moment when this run is faster than the reference was (a loaded machine)
        random_delay = target is not None and plan is None
        delay = sweep.rng.uniform(0.0, window(sweep.windows, target)) if random_delay else 0.0
        before = kill_at(child, out, target, delay) if target else None
        if target is None:
            child.wait()
        if last_kill is not None:
            last_kill.resumed_from = resumed_point(child)
        if before is None:
            if target is not None:
                result.missed += 1
                sweep.log(f"run {run}: {target}: the run finished before that moment")
            if child.process.returncode != 0:
                result.failures.append(f"run {run}: exit {child.process.returncode}: {child.text()[-500:]}")
                return
            break
        moment, stage_name = observed_moment(child, out, before_temporaries)
        last_kill = Kill(run, target, delay, moment, stage_name, before, resume_point(out))
        result.kills.append(last_kill)
        kills_here += 1
        resume = True
        sweep.log(
            f"kill {len(result.kills):3d}: run {run}, aimed at {target} +{delay * 1000:.0f} ms, "
            f"hit {moment} {stage_name}; resume point {before} -> {last_kill.after}"
        )
    if last_kill is not None and last_kill.lost:
        sweep.log(f"run {run}: data lost: resumed from {last_kill.resumed_from}, expected {last_kill.after}")
    difference = weights_difference(out, sweep.reference)
    result.differences.append(difference)
    sweep.log(
        f"run {run}: finished after {kills_here} kill(s); max |difference| from the reference {difference:.3g}"
    )


def sweep(
    workdir: Path,
    kills: int,
    seed: int,
    plan: list[Target] | None = None,
    log: Callable[[str], None] = print,
) -> Result:
    """Kill `kills` times at random (or once per target of `plan`, all in one run), resume, compare."""
    workspace = workdir / "workspace"
    if not (workspace / "student" / "config.json").is_file():
        make_workspace(workspace)
    reference = workdir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    recipe = workdir / "reference.yaml"
    recipe.write_text(yaml.safe_dump(sweep_recipe(workspace, reference), sort_keys=False))
    started = time.monotonic()
    windows = run_reference(recipe, reference)
    log(f"reference run: {time.monotonic() - started:.1f} s; {windows}")
    state = Sweep(random.Random(seed), reference, windows, kills, log)
    result = Result()
    while not result.failures and ((len(result.kills) < kills) if plan is None else result.runs == 0):
        out = workdir / f"run-{result.runs}"
        shutil.rmtree(out, ignore_errors=True)
        run_recipe = workdir / f"run-{result.runs}.yaml"
        run_recipe.write_text(yaml.safe_dump(sweep_recipe(workspace, out), sort_keys=False))
        finish_run(state, result, result.runs, run_recipe, out, None if plan is None else list(plan))
        shutil.rmtree(out, ignore_errors=True)
        run_recipe.unlink()
        result.runs += 1
    return result


def fill_disk(folder: Path, leave: int) -> None:
    """Write a ballast file into `folder` so that about `leave` bytes stay free on its file system."""
    free = shutil.disk_usage(folder).free
    with (folder / "ballast").open("wb") as handle:
        for _ in range(max(free - leave, 0) // 2**16):
            handle.write(bytes(2**16))


FULL_DISK_LINE = re.compile(r"^ssmify: error: (\S+): the disk is full .* while writing (.+?); (.*)$")


def full_disk_check(workdir: Path) -> str:
    """Fill a real (tmpfs) disk during a run, then free it and resume; needs root to mount the tmpfs.

    The run is paused (SIGSTOP) when 2-hidden's step-2 appears, the disk is filled to leave room for
    a checkpoint's model file but not its optimizer state (torch.save's failure, which names no cause),
    and the run continues. It must stop with exit code 2 and one error line naming the folder, leave
    no temporary behind and every checkpoint whole, and, with the ballast deleted, resume to the
    reference weights. Returns "ok: ...", "skipped: ..." or "failed: ...".
    """
    disk = workdir / "full-disk"
    disk.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        return f"skipped: cannot mount a tmpfs ({mounted.stderr.decode().strip() or 'needs root'})"
    try:
        out = disk / "run"
        recipe = workdir / "full-disk.yaml"
        recipe.write_text(yaml.safe_dump(sweep_recipe(workdir / "workspace", out), sort_keys=False))
        child = Child(recipe, resume=False)
        while child.running() and not (out / "2-hidden" / "checkpoints" / "step-2").is_dir():
            time.sleep(POLL_S)
        child.process.send_signal(signal.SIGSTOP)
        fill_disk(
            disk, leave=(workdir / "reference" / "2-hidden" / "model.safetensors").stat().st_size + 150_000
        )
        child.process.send_signal(signal.SIGCONT)
        code = child.wait()
        last = child.lines[-1][1] if child.lines else ""
        match = FULL_DISK_LINE.match(last)
        if code != 2 or match is None or not match.group(1).startswith(str(out)):
            return f"failed: expected exit 2 and one disk-full line naming a folder of the run, got exit {code}: {last}"
        leftovers = [
            p for p in out.rglob("*") if p.name.startswith((".tmp-step-", ".trash-step-", ".student-tmp"))
        ]
        damaged = [
            f for n in STAGES for _, f in step_folders(out / n / "checkpoints") if checkpoint_problem(f)
        ]
        if leftovers or damaged:
            return f"failed: temporaries left {leftovers}, damaged checkpoints {damaged}"
        (disk / "ballast").unlink()
        resumed = Child(recipe, resume=True)
        if resumed.wait() != 0:
            return f"failed: the resume after freeing space exited {resumed.process.returncode}"
        difference = weights_difference(out, workdir / "reference")
        if difference > TOLERANCE:
            return f"failed: the resumed run differs from the reference by {difference:.3g}"
        where = Path(match.group(1)).relative_to(out)
        return f"ok: stopped in {where} while writing {match.group(2)} ({match.group(3)}); resumed to the reference"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def table(result: Result) -> str:
    """Kills per observed moment and stage, with totals."""
    counts = Counter((k.moment, k.stage) for k in result.kills)
    width = max(len(m) for m in MOMENTS) + 2
    lines = [f"{'moment':<{width}}" + "".join(f"{n:>10}" for n in STAGES) + f"{'total':>8}"]
    for moment in MOMENTS:
        row = [counts[moment, n] for n in STAGES]
        lines.append(f"{moment:<{width}}" + "".join(f"{c:>10}" for c in row) + f"{sum(row):>8}")
    totals = [sum(counts[m, n] for m in MOMENTS) for n in STAGES]
    lines.append(f"{'total':<{width}}" + "".join(f"{c:>10}" for c in totals) + f"{sum(totals):>8}")
    return "\n".join(lines)


def counts(result: Result) -> str:
    return (
        f"kills {len(result.kills)}, runs {result.runs}, runs resumed {result.resumed}, "
        f"mismatches {result.mismatches}, data lost {result.lost}, failed runs {len(result.failures)}, "
        f"missed targets {result.missed}, max |difference| {max(result.differences, default=0.0):.3g}"
    )


def print_now(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="how many SIGKILLs in all (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and delays (default 0)")
    parser.add_argument("--workdir", type=Path, help="where the runs go (kept); default a temporary folder")
    parser.add_argument(
        "--full-disk", action="store_true", help="also fill a real disk (a 16 MB tmpfs; needs root) mid-save"
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = sweep(workdir, args.kills, args.seed, log=print_now)
    full_disk = full_disk_check(workdir) if args.full_disk else "not run (--full-disk)"
    print()
    print(table(result))
    print()
    print(counts(result))
    print(f"full disk: {full_disk}")
    print(f"{time.monotonic() - started:.0f} s")
    for failure in result.failures:
        print(f"failed: {failure}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if result.ok and not full_disk.startswith("failed") else 1)


if __name__ == "__main__":
    main()
