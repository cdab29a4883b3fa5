"""The teacher's logits for a logits stage, computed once and stored: `ssmify teacher-cache`.

The teacher runs over the stage's exact token stream (global sequences 0 .. steps x batch - 1 in the
order `ssmify.distill.data` gives them, which is a function of the seed and the sequence index only,
so the cache serves any process count or batch split) and over its validation blocks. Per token it
keeps the top-K log-probabilities of softmax(logits / T) with their ids and the log of the rest of
the mass; the logits stage then trains on KL over those K ids plus a rest bucket
(`ssmify.distill.objectives.logits.top_k_kd_loss`) without running the teacher.

Layout of the cache folder:

    manifest.json              what it was made from (pins), K, dtypes, and each shard's bytes and sha256
    validation.safetensors     the validation blocks' targets
    train-00000.safetensors    consecutive runs of training sequences, cut at step boundaries
    ...

Each shard holds input_ids (the tokens it was made from, checked against the stage's batches when
read), ids (uint16 when the vocabulary fits, else int32), logprobs and log_rest (float16, bfloat16 or
float32). A shard is written under a temporary name and renamed, then listed in the manifest
(rewritten atomically), so a killed run leaves only whole, listed shards; a re-run continues after
the last one. A cache made from other data, seed, seq_len, temperature, tokenizer or teacher is
refused, naming the field; a shard whose size or sha256 differs from the manifest is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from ssmify.atomic import write_text_atomic
from ssmify.convert.teacher import load_teacher
from ssmify.distill.objectives.logits import TopKTargets, top_k_targets
from ssmify.distill.recipe import LossConfig, Recipe, stage_data, stage_seq_len
from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
VALIDATION = "validation.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def teacher_fingerprint(source: str) -> str:
    """A hash of the teacher's config and weight files (names, sizes, safetensors headers), not their bytes.

    A local folder or .gguf is hashed from disk; a hub id (no local files) by its name."""
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        if file.name == "config.json":
            digest.update(b"config.json" + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES and file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            with file.open("rb") as handle:  # a safetensors header names every tensor, dtype, shape, offset
                digest.update(handle.read(1 << 20))
    if not files:
        digest.update(f"hub:{source}".encode())
    return digest.hexdigest()


def stage_pins(recipe: Recipe, index: int, tokenizer: Any, teacher_dtype: str) -> dict[str, Any]:
    """What the cached targets depend on; a cache is used only when all of these are the recipe's."""
    from ssmify.distill.data import tokenizer_fingerprint

    stage = recipe.stages[index]
    data = stage_data(recipe, stage).model_dump(mode="json")
    data.pop("cache_dir")  # where tokens are cached, not what they are
    return {
        "data": data,
        "seed": recipe.seed,
        "seq_len": stage_seq_len(recipe, stage),
        "temperature": (stage.loss or LossConfig()).temperature,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "teacher": teacher_fingerprint(recipe.teacher),
        "teacher_dtype": teacher_dtype,
    }


def first_difference(cached: Any, wanted: Any, prefix: str) -> str | None:
    """The dotted path of the first field where two pin dicts differ, or None."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        for key in [*wanted, *(k for k in cached if k not in wanted)]:
            found = first_difference(cached.get(key), wanted.get(key), f"{prefix}.{key}")
            if found is not None:
                return found
        return None
    return None if cached == wanted else prefix


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise SsmifyError(f"teacher cache {folder}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SsmifyError(
            f"teacher cache {folder}: {MANIFEST} is not a format-{FORMAT} teacher cache manifest"
        )
    return manifest


def check_pins(folder: Path, manifest: dict, pins: dict, where: str) -> None:
    field = first_difference(manifest.get("pins", {}), pins, "pins")
    if field is not None:
        name = field.removeprefix("pins.")
        raise SsmifyError(
            f"{where} {folder}: made for another {name} than this recipe's; "
            "rebuild it with `ssmify teacher-cache` (or point to the matching cache)"
        )


def shard_problem(folder: Path, entry: dict) -> str | None:
    """Why a listed shard is not the one written (missing, other size), or None; reads no data."""
    path = folder / entry["name"]
    if not path.is_file():
        return f"shard {entry['name']} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"shard {entry['name']} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    return None


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard atomically; its manifest entry (bytes, sha256)."""
    blob = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every token id."""
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


@torch.no_grad()
def teacher_targets(
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    top_k: int,
    temperature: float,
    dtype: torch.dtype,
    batch: int,
) -> dict[str, torch.Tensor]:
    """The shard tensors of `blocks` (n, L): the teacher's top-K targets, micro batch by micro batch."""
    device = next(teacher.parameters()).device
    parts: list[TopKTargets] = []
    for i in range(0, len(blocks), batch):
        logits = teacher(input_ids=blocks[i : i + batch].to(device), use_cache=False).logits
        if top_k > logits.shape[-1]:
            raise SsmifyError(f"--top-k {top_k}: larger than the teacher's vocabulary ({logits.shape[-1]})")
        parts.append(top_k_targets(logits, top_k, temperature).to("cpu"))
        vocab = logits.shape[-1]
    return {
        "input_ids": blocks.to(id_dtype(vocab)),
        "ids": torch.cat([p.ids for p in parts]).to(id_dtype(vocab)),
        "logprobs": torch.cat([p.logprobs for p in parts]).to(dtype),
        "log_rest": torch.cat([p.log_rest for p in parts]).to(dtype),
    }


def build_teacher_cache(
    recipe: Recipe,
    index: int,
    top_k: int,
    out: Path,
    teacher: torch.nn.Module,
    tokenizer: Any,
    teacher_dtype: str,
    dtype: str = "float16",
    shard_tokens: int = 1 << 20,
) -> dict:
    """Cache the teacher's top-K targets for stage `index` of `recipe` in `out`, continuing a killed run.

    Shards hold whole steps (at least one) of about `shard_tokens` tokens. Returns the manifest.
    """
    from ssmify.distill.data import load_data
    from ssmify.distill.loop import plan_stage

    if top_k < 1:
        raise SsmifyError(f"--top-k {top_k}: give at least 1")
    stage = recipe.stages[index]
    plan = plan_stage(recipe, index, 1)  # the cache is indexed by global sequence: any process count reads it
    pins = stage_pins(recipe, index, tokenizer, teacher_dtype)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    settings = {"top_k": top_k, "dtype": dtype}
    if manifest is not None:
        check_pins(out, manifest, pins, "--out")
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise SsmifyError(
                    f"--out {out}: holds a cache with {key} {manifest.get(key)}, not {value}; choose another --out"
                )
        kept = []
        for entry in manifest["shards"]:
            problem = shard_problem(out, entry)
            if problem is not None:
                logger.warning("teacher cache %s: %s; rebuilding from there", out, problem)
                break
            kept.append(entry)
        manifest["shards"] = kept
        if manifest.get("validation") and shard_problem(out, manifest["validation"]):
            manifest["validation"] = None
    else:
        manifest = {"format": FORMAT, "pins": pins, **settings, "shards": [], "validation": None}
    sequences = plan.steps * plan.sequences_per_step
    manifest.update(
        stage=index,
        sequences=sequences,
        global_batch_tokens=stage.global_batch_tokens,
        micro_batch_size=stage.micro_batch_size,
    )
    data = load_data(stage_data(recipe, stage), tokenizer, plan.seq_len, recipe.seed)
    temperature, torch_dtype, batch = pins["temperature"], DTYPES[dtype], stage.micro_batch_size
    if manifest["validation"] is None:
        blocks = data.validation.first(max(stage.eval_tokens // plan.seq_len, 1))
        entry = write_shard(
            out, VALIDATION, teacher_targets(teacher, blocks, top_k, temperature, torch_dtype, batch)
        )
        manifest["validation"] = {**entry, "sequences": len(blocks)}
        write_manifest(out, manifest)

    per_shard = max(shard_tokens // plan.tokens_per_step, 1) * plan.sequences_per_step
    done = sum(entry["sequences"] for entry in manifest["shards"])
    if done:
        logger.info("teacher cache %s: %d of %d sequences are cached; continuing", out, done, sequences)
    bar = tqdm(total=sequences * plan.seq_len, initial=done * plan.seq_len, desc="teacher cache", unit="tok")
    start = time.perf_counter()
    try:
        for first in range(done, sequences, per_shard):
            count = min(per_shard, sequences - first)
            blocks = data.train.take(first, count)
            tensors = teacher_targets(teacher, blocks, top_k, temperature, torch_dtype, batch)
            entry = write_shard(out, f"train-{len(manifest['shards']):05d}.safetensors", tensors)
            manifest["shards"].append({**entry, "first": first, "sequences": count})
            write_manifest(out, manifest)
            bar.update(count * plan.seq_len)
            bar.set_postfix(
                tok_s=f"{(first + count - done) * plan.seq_len / (time.perf_counter() - start):.0f}"
            )
    finally:
        bar.close()
    return manifest


def cache_stage(
    recipe: Recipe, index: int, top_k: int, out: Path, dtype: str = "float16", shard_tokens: int = 1 << 20
) -> dict:
    """`ssmify teacher-cache`: load the recipe's teacher (in its teacher_dtype, on the GPU when there is one)
    and build or continue the cache of stage `index` in `out`. Returns the manifest."""
    from ssmify.distill.data import check_data_files
    from ssmify.distill.run import teacher_dtype
    from ssmify.distill.state import distributed_state

    check_data_files(recipe.data)
    resolved = teacher_dtype(recipe)
    teacher, tokenizer = load_teacher(recipe.teacher, resolved, recipe.trust_remote_code)
    if tokenizer is None:
        raise SsmifyError(
            f"teacher {recipe.teacher}: it has no tokenizer files; the data is tokenized with it"
        )
    teacher.requires_grad_(False)
    teacher.to(distributed_state().device)
    return build_teacher_cache(recipe, index, top_k, out, teacher, tokenizer, resolved, dtype, shard_tokens)


class TeacherCache:
    """A finished cache, read shard by shard as the stage asks for sequences; stands in for the teacher."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self._loaded: tuple[str, dict[str, torch.Tensor]] | None = None

    @classmethod
    def open(
        cls, folder: str | os.PathLike, pins: dict, sequences: int, validation: int, where: str
    ) -> TeacherCache:
        """Check the manifest against the recipe's pins and the sizes the stage needs; `where` names the field."""
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder)
        if manifest is None:
            raise SsmifyError(
                f"{where} {folder}: no {MANIFEST} there; make the cache with `ssmify teacher-cache`"
            )
        check_pins(folder, manifest, pins, where)
        cached = sum(entry["sequences"] for entry in manifest["shards"])
        if cached < sequences:
            raise SsmifyError(
                f"{where} {folder}: holds {cached} training sequences, the stage needs {sequences} "
                "(an unfinished cache run, or a cache for fewer tokens); rerun `ssmify teacher-cache`"
            )
        held = (manifest.get("validation") or {}).get("sequences", 0)
        if held < validation:
            raise SsmifyError(
                f"{where} {folder}: holds {held} validation blocks, the stage needs {validation}"
            )
        for entry in [manifest["validation"], *manifest["shards"]]:
            problem = shard_problem(folder, entry)
            if problem is not None:
                raise SsmifyError(f"{where} {folder}: {problem}; rerun `ssmify teacher-cache` to rebuild it")
        return cls(folder, manifest)

    def _shard(self, entry: dict) -> dict[str, torch.Tensor]:
        """The tensors of one shard, its size and sha256 checked against the manifest (one read)."""
        if self._loaded is None or self._loaded[0] != entry["name"]:
            problem = shard_problem(self.folder, entry)
            if problem is not None:
                raise SsmifyError(f"teacher cache {self.folder}: {problem}")
            blob = (self.folder / entry["name"]).read_bytes()
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise SsmifyError(
                    f"teacher cache {self.folder}: shard {entry['name']} does not match its sha256 in the "
                    "manifest (corrupted); rerun `ssmify teacher-cache` to rebuild it"
                )
            self._loaded = (entry["name"], load_safetensors(blob))
        return self._loaded[1]

    def _rows(self, entry: dict, rows: torch.Tensor, input_ids: torch.Tensor) -> TopKTargets:
        shard = self._shard(entry)
        if not torch.equal(shard["input_ids"][rows].long(), input_ids.cpu().long()):
            raise SsmifyError(
                f"teacher cache {self.folder}: shard {entry['name']} was made from other tokens than this "
                "stage's batches (the data or its files changed); rebuild it with `ssmify teacher-cache`"
            )
        return TopKTargets(
            shard["logprobs"][rows].float(), shard["ids"][rows].long(), shard["log_rest"][rows].float()
        )

    def train_targets(self, first: int, input_ids: torch.Tensor) -> TopKTargets:
        """The targets of global training sequences first .. first + len(input_ids) - 1."""
        parts, end = [], first + len(input_ids)
        for entry in self.manifest["shards"]:
            lo, hi = max(first, entry["first"]), min(end, entry["first"] + entry["sequences"])
            if lo < hi:
                rows = torch.arange(lo - entry["first"], hi - entry["first"])
                parts.append(self._rows(entry, rows, input_ids[lo - first : hi - first]))
        if sum(len(p.ids) for p in parts) != len(input_ids):
            raise SsmifyError(f"teacher cache {self.folder}: holds no sequences {first}..{end - 1}")
        if len(parts) == 1:
            return parts[0]
        return TopKTargets(*(torch.cat(t) for t in zip(*((p.logprobs, p.ids, p.log_rest) for p in parts))))

    def validation_targets(self, rows: torch.Tensor, input_ids: torch.Tensor) -> TopKTargets:
        """The targets of the validation blocks at positions `rows` of the stage's validation set."""
        return self._rows(self.manifest["validation"], rows, input_ids)
