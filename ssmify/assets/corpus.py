"""The real text: gensim's English Wikipedia excerpt (105 articles) as clean train and held-out files.

Text format: UTF-8, one document (article) per block. A document is its title line followed
by its paragraphs, one per line; documents are separated by exactly one blank line, so
`text.split("\\n\\n")` gives the documents and no document contains an empty line.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from ssmify.assets.cache import build_lock, cache_root
from ssmify.assets.cleaner import clean_wikitext
from ssmify.atomic import atomic_directory
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning or the split changes, so that stale caches are not reused.
WIKI_FORMAT_VERSION = 1
DOCUMENT_SEPARATOR = "\n\n"


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
    with build_lock(folder):
        if not (train.is_file() and heldout.is_file()):  # else another process built it while this one waited
            _write_split(folder, heldout_fraction)
    return train, heldout


def _write_split(folder: Path, heldout_fraction: float) -> None:
    """Clean the dump's articles and write them, split by a hash of their titles, into `folder`."""
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
