"""Evaluation text: local .txt / .jsonl files, tokenized, joined with EOS, cut into windows.

Every window is scored on its own, so windows do not overlap and the first token of each one has
no context and is not scored.
"""

from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl")


@dataclass
class EvalData:
    """What the evaluators read: the tokenizer, and the token windows (N, seq_len) when text was given."""

    tokenizer: PreTrainedTokenizerBase | None
    windows: torch.Tensor | None = None
    files: tuple[str, ...] = ()


def check_files(paths: list[str]) -> None:
    """Fail early, before any model loads, on a data file that is missing, of an unknown type, or not UTF-8."""
    for path in map(Path, paths):
        _check_path(path)
        check_utf8(path)


def _check_path(path: Path) -> None:
    if not path.is_file():
        raise SsmifyError(f"{path}: data file not found")
    if path.suffix not in SUFFIXES:
        raise SsmifyError(
            f"{path}: unsupported data file type; use .txt or .jsonl (one {{'text': ...}} a line)"
        )


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text, naming the offset of its first bad byte (without reading it whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise SsmifyError(
                    f"{path}: not UTF-8 text (bad byte at offset {offset + err.start}); save it as UTF-8"
                ) from None
            if not data:
                return
            offset += len(data)


def read_documents(path: str | Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one document a line, in the string field "text"."""
    path = Path(path)
    _check_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        check_utf8(path)  # raises, naming the offset of the first bad byte
        raise
    if path.suffix == ".txt":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SsmifyError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SsmifyError(f'{path}:{number}: needs a string field "text"')
        documents.append(record["text"])
    return documents


def token_stream(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], max_tokens: int | None = None
) -> torch.Tensor:
    """The documents' tokens with EOS between them, cut at max_tokens (tokenizing stops there)."""
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    for index, document in enumerate(documents):
        if index and eos is not None:
            pieces.append(eos)
        pieces.extend(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
        if max_tokens is not None and len(pieces) >= max_tokens:
            break
    return torch.tensor(pieces[:max_tokens], dtype=torch.long)


def make_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len), ragged tail dropped; fewer tokens than seq_len: one window."""
    if seq_len < 2:
        raise SsmifyError(f"--seq-len {seq_len}: needs at least 2 tokens a window")
    if len(tokens) < 2:
        raise SsmifyError(f"the data holds {len(tokens)} token(s); scoring needs at least 2")
    if len(tokens) < seq_len:
        log.warning("only %d tokens of data: scoring one window of that length, not %d", len(tokens), seq_len)
        return tokens[None]
    count = len(tokens) // seq_len
    return tokens[: count * seq_len].view(count, seq_len)


def load_data(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase | None,
    seq_len: int,
    max_tokens: int | None = None,
) -> EvalData:
    """Read, tokenize and window the files in order."""
    if not paths:
        return EvalData(tokenizer)
    if tokenizer is None:
        raise SsmifyError("scoring text needs a tokenizer, but the model folder has none; save one beside it")
    documents = [doc for path in paths for doc in read_documents(path)]
    windows = make_windows(token_stream(tokenizer, documents, max_tokens), seq_len)
    log.info("data: %d windows of %d tokens from %d file(s)", *windows.shape, len(paths))
    return EvalData(tokenizer, windows, tuple(paths))
