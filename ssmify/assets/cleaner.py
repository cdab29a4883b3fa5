"""Wikitext -> readable plain text: links keep their text, inline templates render, the rest goes.

Dropped: files, tables, references, comments, non-prose tags, interwiki links and the link-only
sections at an article's end (See also, References, ...).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

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
