"""Training text -> packed token blocks, with a deterministic order that a resumed run can replay.

Documents come from local txt / jsonl / parquet files or a hub dataset, read through `datasets`.
Each is tokenized with the teacher's tokenizer, followed by EOS, and the documents are
concatenated and cut into `seq_len` blocks. The token stream of a local or downloaded corpus is
cached (keyed by the files, the tokenizer and the split settings), so a second run does not
tokenize again; a streamed hub corpus is tokenized on the fly and never stored.

The training order is a function of (seed, global sequence index) only: sequence g of the run is
block `perm_e[g mod N]` of epoch e = g // N. A run resumed at step s therefore sees exactly the
batches an uninterrupted run would have seen, without replaying the ones before. With
data.synthetic, `ssmify.distill.synthetic` replaces some training sequences by lookup samples, also
as a function of (seed, g); the validation blocks stay natural text.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ssmify.distill.recipe import DataConfig, HubSource
from ssmify.distill.state import distributed_state
from ssmify.distill.synthetic import SyntheticBlocks
from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
TOKENIZE_BATCH = 512
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}


class Blocks(Protocol):
    """Token blocks of one split."""

    seq_len: int

    def take(self, start: int, count: int) -> torch.Tensor:
        """Sequences start .. start+count-1 of the shuffled training order: (count, seq_len) int64."""
        ...

    def first(self, count: int) -> torch.Tensor:
        """The first `count` blocks in corpus order (at most as many as exist): a fixed validation set."""
        ...

    def state_dict(self) -> dict | None:
        """Where a stream stands, for a checkpoint (None when take() needs no position to be fast)."""
        ...

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from a checkpoint's state_dict()."""
        ...


@dataclass
class DistillData:
    train: Blocks
    validation: Blocks


def default_cache_root() -> Path:
    """~/.cache/ssmify/data, or $SSMIFY_CACHE/data."""
    base = os.environ.get("SSMIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ssmify")
    return Path(base) / "data"


def load_data(config: DataConfig, tokenizer: Any, seq_len: int, seed: int) -> DistillData:
    """The training and validation blocks of a recipe's data section, tokenized with `tokenizer`.

    Without data.validation, a validation_fraction of the training documents is held out.
    """
    if tokenizer.eos_token_id is None:
        raise SsmifyError(
            "teacher tokenizer: it has no eos_token, which packing needs as the document separator"
        )
    if config.bos and tokenizer.bos_token_id is None:
        raise SsmifyError("data.bos: the teacher's tokenizer has no bos_token; set bos: false")
    held_out = config.validation is None
    validation_sources = config.train if held_out else config.validation
    documents = {
        "train": DocumentSource(config.train, config, seed, keep="train" if held_out else "all"),
        "validation": DocumentSource(
            validation_sources, config, seed, keep="held_out" if held_out else "all"
        ),
    }
    streamed = {
        "train": any(_is_streamed(s) for s in config.train),
        "validation": any(_is_streamed(s) for s in validation_sources),
    }
    result: dict[str, Blocks] = {}
    cached = [name for name in documents if not streamed[name]]
    if cached:
        root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_root()
        token_streams = cached_token_streams({n: documents[n] for n in cached}, tokenizer, root)
        for name in cached:
            blocks = PackedBlocks(token_streams[name], seq_len, seed)
            if blocks.num_blocks == 0:
                raise SsmifyError(_too_little_text(name, len(token_streams[name]), seq_len, held_out))
            result[name] = blocks
    for name in documents:
        if streamed[name]:
            shuffle = name == "train"
            result[name] = StreamedBlocks(
                documents[name], tokenizer, seq_len, seed, shuffle, config.shuffle_buffer
            )
    if config.bos:
        result = {
            name: BosFirst(blocks, tokenizer.bos_token_id, config.bos) for name, blocks in result.items()
        }
    train = result["train"]
    if config.synthetic is not None and config.synthetic.fraction > 0:
        train = SyntheticBlocks(train, config.synthetic, tokenizer, seed)
    return DistillData(train, result["validation"])


def _too_little_text(split: str, tokens: int, seq_len: int, held_out: bool) -> str:
    hint = (
        " (give data.validation files or raise data.validation_fraction)"
        if split == "validation" and held_out
        else ""
    )
    return f"data.{split}: {tokens} tokens do not fill one block of seq_len {seq_len}{hint}"


def _is_streamed(source: str | HubSource) -> bool:
    return isinstance(source, HubSource) and source.streaming


class DocumentSource:
    """The documents of one split: the files or hub datasets listed, optionally filtered by the hold-out rule.

    keep is "all", "train" (the documents not held out) or "held_out". Record i of listed source j
    is held out when a hash of (seed, j, i) falls below validation_fraction. The rule needs no pass
    over the data and gives the same split whether a corpus is read at once or streamed.
    """

    def __init__(self, sources: list[str | HubSource], config: DataConfig, seed: int, keep: str) -> None:
        self.sources = sources
        self.config = config
        self.seed = seed
        self.keep = keep
        self.files = {j: expand_files(s) for j, s in enumerate(sources) if isinstance(s, str)}

    def fingerprint(self) -> dict[str, Any]:
        """What the documents depend on, for the cache key."""
        listed: list[Any] = []
        for j, source in enumerate(self.sources):
            if isinstance(source, str):
                listed.append(
                    [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files[j]]
                )
            else:
                listed.append(source.model_dump())
        fraction = self.config.validation_fraction if self.keep != "all" else None
        return {
            "sources": listed,
            "field": self.config.field,
            "documents": self.config.documents,
            "keep": self.keep,
            "validation_fraction": fraction,
            "seed": self.seed if fraction is not None else None,
        }

    def keeps(self, source_index: int, record_index: int) -> bool:
        if self.keep == "all":
            return True
        digest = hashlib.blake2b(
            f"{self.seed}:{source_index}:{record_index}".encode(), digest_size=8
        ).digest()
        held_out = int.from_bytes(digest, "little") / 2**64 < self.config.validation_fraction
        return held_out == (self.keep == "held_out")

    def documents(self, shuffle_seed: int | None = None, buffer_size: int = 10_000) -> Iterator[str]:
        """The non-empty texts in order; with shuffle_seed, streamed hub sources pass a shuffle buffer."""
        for j, source in enumerate(self.sources):
            if isinstance(source, str):
                texts = self._local_texts(j)
            else:
                texts = self._hub_texts(j, source, shuffle_seed, buffer_size)
            for text in texts:
                if isinstance(text, str) and text.strip():
                    yield text.strip()

    def _local_texts(self, j: int) -> Iterator[str]:
        from datasets import load_dataset

        index = 0
        for path in self.files[j]:
            builder = BUILDERS[path.suffix.lower()]
            kwargs: dict[str, Any] = {}
            if builder == "text":
                kwargs = {"sample_by": SAMPLE_BY[self.config.documents], "keep_linebreaks": True}
            dataset = load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)
            field = "text" if builder == "text" else self.config.field
            for example in _read_records(path, dataset):
                if field not in example:
                    raise SsmifyError(f"{path}: no field {field!r} in its records (set data.field)")
                if self.keeps(j, index):
                    yield example[field]
                index += 1

    def _hub_texts(
        self, j: int, source: HubSource, shuffle_seed: int | None, buffer_size: int
    ) -> Iterator[str]:
        from datasets import load_dataset

        try:
            dataset = load_dataset(
                source.hub,
                source.subset,
                split=source.split,
                revision=source.revision,
                streaming=source.streaming,
            )
        except Exception as err:  # datasets raises many types for a name it cannot resolve
            raise SsmifyError(
                f"data: hub dataset {source.hub!r} could not be opened: {err}".splitlines()[0]
            ) from None
        columns = dataset.column_names  # None when a stream does not declare its features
        if columns is not None and source.field not in columns:
            raise SsmifyError(
                f"data: hub dataset {source.hub!r} has no field {source.field!r} (set its field)"
            )
        if self.keep != "all":
            dataset = dataset.filter(lambda _, i: self.keeps(j, i), with_indices=True)
        if shuffle_seed is not None and source.streaming:
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=buffer_size)
        for example in dataset:
            yield example[source.field]


def _read_records(path: Path, dataset: Iterable[dict]) -> Iterator[dict]:
    """The records of a local file; a file that does not parse is an error naming it, not a traceback.

    datasets' file builders log a parse failure at ERROR before they raise it; that line is muted
    here, because the error this raises says the same in one line."""
    builders = logging.getLogger("datasets.packaged_modules")
    level = builders.level
    records = iter(dataset)
    while True:
        builders.setLevel(logging.CRITICAL)
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # datasets wraps parse errors (JSON, UTF-8, parquet) in several types
            raise SsmifyError(
                f"data: {path}: cannot be read as {path.suffix} data: {_root_cause(err)}"
            ) from None
        finally:
            builders.setLevel(level)
        yield record


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause of an error, which names what did not parse."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_data_files(config: DataConfig) -> None:
    """Fail early, before any model loads, when a listed local file or glob matches nothing."""
    for source in [*config.train, *(config.validation or [])]:
        if isinstance(source, str):
            expand_files(source)


def expand_files(pattern: str) -> list[Path]:
    """The files a path or glob names, sorted; an error naming the pattern when there are none."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        raise SsmifyError(f"data: {pattern}: no such file")
    for path in files:
        if path.suffix.lower() not in BUILDERS:
            raise SsmifyError(
                f"data: {path}: unsupported file type; expected .txt, .jsonl, .json or .parquet"
            )
    return files


def tokenize_documents(texts: Iterable[str], tokenizer: Any) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, in batches (one uint32 array per batch)."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush() -> np.ndarray:
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]  # documents may be long
        return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.uint32)

    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield flush()
            batch = []
    if batch:
        yield flush()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids: the tokenizer's full serialization."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}:{text}".encode()).hexdigest()


def cached_token_streams(
    sources: dict[str, DocumentSource], tokenizer: Any, root: Path
) -> dict[str, np.ndarray]:
    """Each split's token stream, read from the cache or tokenized once and stored (atomically)."""
    key_data = {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "splits": {name: src.fingerprint() for name, src in sources.items()},
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]
    folder = root / key
    if not all((folder / f"{name}.npy").is_file() for name in sources):
        _build_cache(folder, sources, tokenizer, key_data)
    else:
        logger.info("token cache hit: %s", folder)
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in sources}


def _build_cache(folder: Path, sources: dict[str, DocumentSource], tokenizer: Any, key_data: dict) -> None:
    with distributed_state().main_process_first():
        if all((folder / f"{name}.npy").is_file() for name in sources):
            return  # the main process built it while this one waited
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            logger.info("tokenizing the %s split into %s", name, folder)
            chunks = list(tokenize_documents(source.documents(), tokenizer))
            tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
            np.save(tmp / f"{name}.npy", tokens)
        (tmp / "meta.json").write_text(json.dumps(key_data, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a second run, a test worker) stored the same tokens meanwhile
            if not all((folder / f"{name}.npy").is_file() for name in sources):
                raise
            shutil.rmtree(tmp)


class BosFirst:
    """Blocks of which a fraction start with BOS (`data.bos`): it replaces the window's first token, so that
    packing, seq_len and the token counts stay as they are.

    Why: a teacher makes the first position of any window an attention sink with a massive activation
    (SmolLM2-135M: a residual norm near 25,000 from layer 12 on, where other positions have about 170).
    A distilled student keeps that after BOS but may lose it after an ordinary first token (130 after a
    hidden stage without `first_position_weight`), so windows that start mid-text train its attention on a first position unlike the
    one it meets after BOS, where prompts start (docs/benchmarks.md section 13). A fraction below 1 keeps
    both kinds of window in training, so that text without BOS is not left to a regime never trained.

    Window g (its index in the training order, or in the validation set) starts with BOS when
    frac(g * golden ratio) < fraction: every run of consecutive windows holds the fraction to within one
    window, and a resumed run needs no state to choose the same ones.
    """

    GOLDEN = 0.6180339887498949

    def __init__(self, blocks: Blocks, bos: int, fraction: float) -> None:
        self.blocks = blocks
        self.bos = bos
        self.fraction = fraction
        self.seq_len = blocks.seq_len

    def _with_bos(self, block: torch.Tensor, start: int) -> torch.Tensor:
        index = torch.arange(start, start + block.shape[0], dtype=torch.float64)
        chosen = torch.remainder(index * self.GOLDEN, 1.0) < self.fraction
        block = block.clone()
        block[chosen, 0] = self.bos
        return block

    def take(self, start: int, count: int) -> torch.Tensor:
        return self._with_bos(self.blocks.take(start, count), start)

    def first(self, count: int) -> torch.Tensor:
        return self._with_bos(self.blocks.first(count), 0)

    def state_dict(self) -> dict | None:
        return self.blocks.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.blocks.load_state_dict(state)


class PackedBlocks:
    """Blocks cut from a token stream held in memory or memory-mapped; reshuffled every epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.seq_len = seq_len
        self.num_blocks = len(tokens) // seq_len
        self.blocks = tokens[: self.num_blocks * seq_len].reshape(self.num_blocks, seq_len)
        self.seed = seed

    @lru_cache(maxsize=4)  # noqa: B019 (the object lives as long as the run)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def take(self, start: int, count: int) -> torch.Tensor:
        rows = [
            self.permutation(g // self.num_blocks)[g % self.num_blocks] for g in range(start, start + count)
        ]
        return torch.from_numpy(self.blocks[rows].astype(np.int64))

    def first(self, count: int) -> torch.Tensor:
        """The first `count` blocks in file order (the validation set: fixed, not shuffled)."""
        return torch.from_numpy(self.blocks[: min(count, self.num_blocks)].astype(np.int64))

    def state_dict(self) -> None:
        return None  # any block is one index away

    def load_state_dict(self, state: dict | None) -> None:
        pass


class StreamedBlocks:
    """Blocks packed on the fly from streamed documents; epoch e reshuffles with seed + e.

    take() moves a cursor forward. Each block comes with its position in the stream: the epoch, the
    documents read before its tokenizer batch, the tokens carried over from the batch before, and its
    end within the batch's tokens. `state_dict()` gives the position of the block a recent take()
    started at; after `load_state_dict()` the stream starts there: the documents before it are read and
    dropped without being tokenized, and one tokenizer batch is tokenized again. Asking for an index
    before the cursor (or the loaded position) restarts the stream from the beginning and skips ahead.
    """

    def __init__(
        self, source: DocumentSource, tokenizer: Any, seq_len: int, seed: int, shuffle: bool, buffer_size: int
    ) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self._cursor = 0
        self._iterator: Iterator[tuple[np.ndarray, dict]] | None = None
        self._position: dict | None = None  # before block _cursor
        self._mark: dict | None = None  # before the block the last take() started at
        self._loaded: dict | None = None

    def _stream(self, position: dict) -> Iterator[tuple[np.ndarray, dict]]:
        """(block, the position after it) from a position (see state_dict)."""
        epoch, skip, offset = position["epoch"], position["documents"], position["offset"]
        carry = np.asarray(position["carry"], dtype=np.uint32)
        while True:
            whole_epoch = skip == 0 and offset == 0 and len(carry) == 0
            seed = self.seed + epoch if self.shuffle else None
            documents = itertools.islice(self.source.documents(seed, self.buffer_size), skip, None)
            read, produced = skip, 0
            while batch := list(itertools.islice(documents, TOKENIZE_BATCH)):
                tokens = np.concatenate([carry, *tokenize_documents(batch, self.tokenizer)])
                while offset + self.seq_len <= len(tokens):
                    offset += self.seq_len
                    produced += 1
                    after = {"epoch": epoch, "documents": read, "carry": carry.tolist(), "offset": offset}
                    yield tokens[offset - self.seq_len : offset], after
                carry, offset, read = tokens[offset:], 0, read + len(batch)
            if produced == 0 and whole_epoch:
                raise SsmifyError(
                    f"data: the streamed split holds less than one block of seq_len {self.seq_len}"
                )
            if not self.shuffle:
                return
            epoch, skip, carry, offset = epoch + 1, 0, np.zeros(0, dtype=np.uint32), 0

    def _next(self) -> np.ndarray:
        block, after = next(self._iterator)
        self._cursor += 1
        self._position = {"block": self._cursor, **after}
        return block

    def take(self, start: int, count: int) -> torch.Tensor:
        loaded = self._loaded if self._loaded is not None and self._loaded["block"] <= start else None
        if self._iterator is None or start < self._cursor or (loaded and self._cursor < loaded["block"]):
            origin = loaded or {"block": 0, "epoch": 0, "documents": 0, "carry": [], "offset": 0}
            self._iterator, self._cursor, self._position = self._stream(origin), origin["block"], origin
        while self._cursor < start:
            self._next()
        self._mark = self._position
        rows = [self._next() for _ in range(count)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict | None:
        """Where the stream stands: the position of a block at or before the cursor (JSON-able), or None."""
        return self._mark

    def load_state_dict(self, state: dict | None) -> None:
        """Start the stream at a saved position: take() of that block or a later one reads on from there."""
        self._loaded = state

    def first(self, count: int) -> torch.Tensor:
        rows = []
        for block, _ in self._stream({"epoch": 0, "documents": 0, "carry": [], "offset": 0}):
            rows.append(block)
            if len(rows) == count:
                break
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def pack(chunks: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Cut a stream of token arrays into consecutive seq_len blocks (the remainder is dropped)."""
    buffer = np.zeros(0, dtype=np.uint32)
    for chunk in chunks:
        buffer = np.concatenate([buffer, chunk])
        whole = len(buffer) // seq_len
        for i in range(whole):
            yield buffer[i * seq_len : (i + 1) * seq_len]
        buffer = buffer[whole * seq_len :]
