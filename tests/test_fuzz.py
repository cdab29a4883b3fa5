"""Fuzzing: mutated recipes and random argument lists never end in a traceback.

Recipes are the shipped ones in recipes/*.yaml with 1-4 random mutations (a key deleted, renamed or
added, a value swapped for another type, an out-of-range or huge number, odd Unicode, nested junk),
sometimes followed by damage to the YAML text itself (truncated, stray bytes, not UTF-8). They go to
`load_recipe`, and through `ssmify distill` in-process. Argument lists are random flags of each
subcommand's own parser with random values, plus stray tokens.

Nothing heavy runs: the first step of each command that loads a model or builds the demo's text is
replaced by one that raises `ReachedHeavyStep`. Everything before it runs for real: argument parsing,
recipe validation, the up-front checks of data files, stage sizes, output folders, devices and model
configs. What follows it (loading weights, training, scoring) is not fuzzed here.

CI runs the "ci" profile (a fixed, bounded number of examples per test); SSMIFY_FUZZ_EXAMPLES=N runs N
random examples per test (`make fuzz`, output in docs/bench/fuzz.txt).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from test_distill_support import make_workspace

from ssmify.cli import SUBCOMMANDS, build_parser, main
from ssmify.distill.recipe import Recipe, load_recipe
from ssmify.errors import SsmifyError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
LONG_RUN = int(os.environ.get("SSMIFY_FUZZ_EXAMPLES", "0"))

settings.register_profile(
    "ssmify-ci",
    max_examples=80,
    derandomize=True,  # the same examples on every CI run: a red build is never a coin toss
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "ssmify-long",
    parent=settings.get_profile("ssmify-ci"),
    max_examples=max(LONG_RUN, 1),
    derandomize=False,
)
PROFILE = settings.get_profile("ssmify-long" if LONG_RUN else "ssmify-ci")


class ReachedHeavyStep(BaseException):
    """Raised where a command would start loading a model: every check before it has passed.

    A BaseException, so that no `except Exception` on the way can turn it into something else."""


def reached(*args: Any, **kwargs: Any) -> None:
    raise ReachedHeavyStep


# Every command's first heavy step, as the name its caller looks up at run time.
HEAVY_STEPS = (
    ("ssmify.convert.convert", "load_teacher"),
    ("ssmify.distill.run", "load_teacher"),
    ("ssmify.distill.teacher_cache", "load_teacher"),
    ("ssmify.eval.loading", "load_teacher"),
    ("ssmify.eval.lm_eval_adapter", "task_manager"),  # indexes the harness's tasks: seconds per call
    ("ssmify.export.export", "load_teacher"),
    ("ssmify.demo.pipeline", "_text"),
)

# Text with odd Unicode (combining marks, right-to-left, line and paragraph separators, emoji, NUL,
# and in arguments the lone surrogates a non-UTF-8 argv decodes to), but never a path separator: no
# example may reach outside its scratch folder.
ODD = "\x00\t\n\r\x0b\x0c\x1c\x85\u00a0\u0301\u200b\u200e\u2028\u2029\u202e\ufeff\U0001f600é中"
odd_text = st.text(
    alphabet=st.characters(exclude_characters="/\\", exclude_categories=("Cs",)) | st.sampled_from(ODD),
    max_size=40,
)
# An argument: no NUL (argv cannot hold one), but lone surrogates: how Python decodes non-UTF-8 argv bytes.
lone_surrogates = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"])
argv_text = st.text(
    alphabet=st.characters(exclude_characters="/\\\x00") | st.sampled_from(ODD[1:]) | lone_surrogates,
    max_size=40,
)
huge_text = st.sampled_from([1_000, 10_000, 100_000]).map(lambda n: "x" * n)
numbers = st.one_of(
    st.integers(),
    st.floats(),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 10**30, -(10**30), 1e308, 1e-308, -0.0, 0.5, float("inf")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
junk = st.recursive(
    scalars | huge_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)


def base_recipes() -> list[dict]:
    """The shipped recipes, reading their local data from the scratch folder's train.txt and held.txt."""
    bases = []
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        data = raw["data"]
        data["train"] = [s if isinstance(s, dict) else "train.txt" for s in data["train"]]
        data["validation"] = [s if isinstance(s, dict) else "held.txt" for s in data.get("validation") or []]
        raw["output_dir"] = "out"
        bases.append(raw)
    return bases


BASES = base_recipes()


def node_paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """The path of every value below `node` (keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from node_paths(value, (*prefix, key))


def at(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_recipe(draw: st.DrawFn) -> dict:
    """A shipped recipe with 1-4 mutations (mostly one), each at a random place in it."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        paths = list(node_paths(raw))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = at(raw, path[:-1]), path[-1]
        kinds = ["delete", "retype", "number", "text", "extra", "rename", "nest", "odd character"]
        kind = draw(st.sampled_from(kinds))
        event(f"mutation: {kind}")
        if kind == "delete":
            del parent[key]
        elif kind == "retype":
            parent[key] = draw(scalars | st.lists(scalars, max_size=3) | st.just({}))
        elif kind == "number":
            parent[key] = draw(numbers)
        elif kind == "text":
            parent[key] = draw(odd_text | huge_text)
        elif kind == "odd character":  # one odd character inside an otherwise valid text value
            texts = [p for p in paths if isinstance(at(raw, p), str)]
            if texts:
                where = draw(st.sampled_from(texts))
                at(raw, where[:-1])[where[-1]] += draw(
                    st.sampled_from(["\x00", "\n", "\u2028", "\U0001f600"])
                )
        elif kind == "nest":
            parent[key] = draw(junk)
        elif kind == "extra" and isinstance(parent, list):
            parent.append(draw(junk))
        elif kind == "extra":
            parent[draw(odd_text)] = draw(junk)
        elif isinstance(parent, dict):  # rename: a typo or another name
            name = str(key)
            typo = draw(st.integers(0, max(len(name) - 1, 0)))
            parent[draw(st.just(name[:typo] + name[typo + 1 :]) | odd_text)] = parent.pop(key)
    return raw


@st.composite
def recipe_bytes(draw: st.DrawFn) -> bytes:
    """A mutated recipe as YAML bytes, sometimes with the text itself damaged."""
    text = yaml.safe_dump(draw(mutated_recipe()), allow_unicode=True, sort_keys=False).encode("utf-8")
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "insert", "binary", "latin-1"]))
    event(f"text damage: {damage}")
    if damage == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if damage == "insert":
        at_byte = draw(st.integers(0, len(text)))
        return text[:at_byte] + draw(st.binary(min_size=1, max_size=8)) + text[at_byte:]
    if damage == "binary":
        return draw(st.binary(max_size=200))
    if damage == "latin-1":
        return text + "# café\n".encode("latin-1")
    return text


def override_strings(raw_paths: list[tuple]) -> st.SearchStrategy[list[str]]:
    """`--set` values: a real dotted key or junk, `=`, a YAML value or junk."""
    keys = st.sampled_from([".".join(map(str, p)) for p in raw_paths]) | odd_text
    values = odd_text | st.sampled_from(["1", "-1", "1e999", "[1, 2]", "{a: 1}", "[", "null", "no", "''"])
    pair = st.tuples(keys, st.sampled_from(["=", "", "=="]), values).map("".join)
    return st.lists(pair, max_size=2)


ALL_RECIPE_PATHS = sorted({p for base in BASES for p in node_paths(base)}, key=str)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder to run in: a tiny teacher and student, train.txt and held.txt, a file that is not UTF-8."""
    root = make_workspace(tmp_path_factory.mktemp("fuzz"))
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return root


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run in `folder` with every heavy step replaced by `reached`."""
    old = Path.cwd()
    os.chdir(folder)
    with pytest.MonkeyPatch.context() as patch:
        for module, name in HEAVY_STEPS:
            patch.setattr(importlib.import_module(module), name, reached)
        try:
            yield
        finally:
            os.chdir(old)


def run_cli(argv: list[str]) -> tuple[int | None, str]:
    """(exit code, or None when the heavy step was reached; stderr) of `ssmify ARGV`, in-process."""
    err, out = io.StringIO(), io.StringIO()
    code: int | None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse: --help, --version, or a usage error
            code = stop.code if isinstance(stop.code, int) else 2
        except ReachedHeavyStep:
            code = None
    return code, err.getvalue()


def check_outcome(argv: list[str], code: int | None, stderr: str) -> None:
    """Exit 0, exit 2 with exactly one error line (after argparse's usage lines), or the heavy step."""
    event("reached the heavy step" if code is None else f"exit {code}")
    assert "Traceback" not in stderr, f"{argv!r}:\n{stderr}"
    if code is None or code == 0:
        return
    assert code == 2, f"{argv!r}: exit {code}\n{stderr}"
    check_lines(argv, stderr)


def check_lines(argv: list[str], stderr: str) -> None:
    """One error line, the last, after nothing but argparse's usage lines."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("ssmify") and ": error: " in line]
    assert errors == [lines[-1]], f"{argv!r}: the error is not one last line:\n{stderr}"
    before = lines[:-1]
    assert not before or before[0].startswith("usage: "), f"{argv!r}: lines before the error:\n{stderr}"


@PROFILE
@given(text=recipe_bytes(), overrides=override_strings(ALL_RECIPE_PATHS))
def test_mutated_recipes_load_or_fail_with_one_line(scratch, text, overrides):
    with inside(scratch):
        path = Path("recipe.yaml")
        path.write_bytes(text)
        try:
            recipe = load_recipe(path, overrides)
        except SsmifyError as err:
            event("refused")
            message = str(err)
            assert len(message.splitlines()) == 1, repr(message)
        else:
            event("accepted")
            assert isinstance(recipe, Recipe)


def with_output_dir(name: str) -> bytes:
    """A shipped recipe with this output_dir."""
    return yaml.safe_dump({**BASES[0], "output_dir": name}).encode()


@PROFILE
@example(text=with_output_dir("out\x00"), overrides=[], flags=[])  # was a ValueError from os.mkdir
@example(text=with_output_dir("x" * 10_000), overrides=[], flags=[])  # was an OSError: name too long
@given(
    text=recipe_bytes(),
    overrides=override_strings(ALL_RECIPE_PATHS),
    flags=st.lists(st.sampled_from(["--resume", "--force", "-v", "-q"]), max_size=3),
)
def test_mutated_recipes_through_ssmify_distill(scratch, fresh_accelerate_state, text, overrides, flags):
    with inside(scratch):
        Path("recipe.yaml").write_bytes(text)
        argv = ["distill", "recipe.yaml", *[a for o in overrides for a in ("--set", o)], *flags]
        check_outcome(argv, *run_cli(argv))


SUBPARSERS = {
    name: action.choices[name]
    for action in build_parser()._subparsers._actions
    if hasattr(action, "choices") and isinstance(action.choices, dict)
    for name in action.choices
}

# Values a flag or positional may get: sensible ones (paths that exist here, numbers, the choices)
# and junk. "teacher" and "student" are real tiny model folders: convert and export reach their model checks;
# "x" * 300 is a name longer than the OS allows.
PATHS = [
    "recipe.yaml",
    "teacher",
    "student",
    "train.txt",
    "latin1.txt",
    "missing",
    "missing.gguf",
    "out",
    ".",
    "teacher/config.json",
]
WORDS = [
    "",
    "-",
    "--",
    " ",
    ",",
    "-1",
    "0",
    "1",
    "0.5",
    "2",
    "1e999",
    "nan",
    "inf",
    "3,7,11",
    "1,x",
    "cpu",
    "cuda",
    "meta",
    "float32",
    "bfloat16",
    "int8",
    "mamba2",
    "auto",
    "perplexity",
    "retrieval",
    "lm-eval:",
    "lm-eval:x",
    "speed",
    "recipe.yaml",
    "--bogus",
    "-x",
]


# A command line of each subcommand that passes every check and reaches the heavy step.
VALID_ARGV = {
    "convert": ["teacher", "--out", "converted", "--keep-attention", "0.5"],
    "distill": ["recipe.yaml", "--set", "seed=1"],
    "teacher-cache": ["recipe.yaml", "--top-k", "8", "--out", "cache"],
    "eval": ["teacher", "--data", "train.txt", "--out", "report", "--device", "cpu"],
    "export": ["student", "--out", "exported"],
    "demo": ["--out", "demo", "--budget-minutes", "1"],
}


def argv_for(name: str) -> st.SearchStrategy[list[str]]:
    """Random argument lists for subcommand `name`: its positionals, then random flags with values."""
    parser = SUBPARSERS[name]
    positionals = [a for a in parser._actions if not a.option_strings]
    options = [a for a in parser._actions if a.option_strings]

    def value(action) -> st.SearchStrategy[str]:
        choices = list(action.choices) if action.choices else []
        sane = st.sampled_from(choices + PATHS + WORDS)
        numeric = st.integers(-3, 5000).map(str) | st.floats().map(str)
        return st.one_of(sane, numeric, argv_text)

    def option(action) -> st.SearchStrategy[list[str]]:
        flag = st.sampled_from(action.option_strings)
        if action.nargs == 0:
            return flag.map(lambda f: [f])
        count = st.integers(1, 3) if action.nargs in ("+", "*") else st.just(1)
        return st.tuples(flag, count.flatmap(lambda n: st.lists(value(action), min_size=n, max_size=n))).map(
            lambda pair: [pair[0], *pair[1]]
        )

    @st.composite
    def build(draw: st.DrawFn) -> list[str]:
        if draw(st.integers(0, 3)):  # mostly a working command line, with tokens dropped and flags added
            argv = [name, *(token for token in VALID_ARGV[name] if draw(st.integers(0, 9)))]
        else:  # else the positionals from scratch, and the required flags now and then
            argv = [
                name,
                *(draw(st.sampled_from(PATHS) | value(a)) for a in positionals if draw(st.integers(0, 9))),
            ]
            for action in options:
                if action.required and draw(st.integers(0, 9)):
                    argv.extend(draw(option(action)))
        for action in draw(st.lists(st.sampled_from(options), max_size=5)):
            if {"--help", "--version"} & set(action.option_strings) and draw(st.integers(0, 4)):
                continue  # keep --help rare, so that most lists reach the command
            argv.extend(draw(option(action)))
        if not draw(st.integers(0, 7)):
            argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(WORDS) | value(options[0])))
        return argv

    return build()


@pytest.mark.parametrize("name", SUBCOMMANDS)
@PROFILE
@given(data=st.data())
def test_random_argument_lists_exit_0_or_2_with_one_line(name, scratch, fresh_accelerate_state, data):
    argv = data.draw(argv_for(name), label="argv")
    with inside(scratch):
        Path("recipe.yaml").write_text(yaml.safe_dump(BASES[-1]))
        check_outcome(argv, *run_cli(argv))


def test_messages_that_quote_line_breaks_stay_one_line(scratch):
    """What the fuzzer found first: a key, an override or an unknown argument holding a line break."""
    assert str(SsmifyError("--set a\nb\u2028c: bad")) == "--set a\\nb\\u2028c: bad"
    cases = {
        (
            "distill",
            "recipe.yaml",
            "--set",
            "\r=",
        ): "ssmify: error: recipe.yaml: \\r: unknown key; expected one of: ",
        ("export", "student", "--out", "o", "x\ny"): "ssmify: error: unrecognized arguments: x\\ny",
    }
    with inside(scratch):
        Path("recipe.yaml").write_text(yaml.safe_dump(BASES[-1]))
        for argv, message in cases.items():
            code, stderr = run_cli(list(argv))
            assert code == 2 and stderr.splitlines()[-1].startswith(message), stderr
            check_lines(list(argv), stderr)


def test_a_path_the_os_cannot_use_is_one_line(scratch):
    """What the long fuzz run found: a name longer than the OS allows raised OSError from every command."""
    with inside(scratch):
        for argv in (
            ["convert", "teacher", "--out", "x" * 300],
            ["distill", "x" * 300],
            ["demo", "--out", "x" * 300],
        ):
            code, stderr = run_cli(argv)
            assert code == 2, stderr
            [line] = stderr.splitlines()  # the path shortened (the demo names a file inside it)
            assert re.fullmatch(r"ssmify: error: x{60}\.\.\. \(3\d\d characters\): File name too long", line)
