"""Load the teacher: a Hugging Face causal LM from a local folder, a hub id, or a GGUF file.

Every way the input can be wrong that we can see before transformers does (a missing path,
a folder without config.json, a truncated safetensors file, a file that is not a GGUF, an
unknown model_type, remote code not allowed) becomes a one-line `SsmifyError` that names
the path and says what would be accepted. Weights load from safetensors; a `.bin`
fallback goes through transformers' `torch.load(weights_only=True)`. Remote code runs
only when the caller passes `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

ACCEPTED = "a local Hugging Face model folder (with config.json), a .gguf file, or a hub id"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# "org/name" or "name": what the hub accepts as a model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher lives, once the user's string has been checked."""

    kind: Literal["folder", "gguf", "hub"]
    location: str  # folder path, .gguf file path, or hub id

    def __str__(self) -> str:
        return self.location


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """fp32 unless asked otherwise; accepts a torch.dtype or a name such as "bf16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise SsmifyError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def locate(source: str | os.PathLike) -> TeacherSource:
    """Decide whether `source` is a model folder, a GGUF file or a hub id, and check it is usable."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        _check_folder(path)
        return TeacherSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SsmifyError(f"{path} is a file but not a .gguf; expected {ACCEPTED}")
        _check_gguf(path)
        return TeacherSource("gguf", str(path))
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return TeacherSource("hub", text)
    raise SsmifyError(f"{text}: no such file or folder; expected {ACCEPTED}")


def load_teacher(
    source: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load the causal LM at `source` in eval mode (fp32 by default) and its tokenizer, if it has one.

    `source` is a local HF folder, a hub id, or a `.gguf` file; a GGUF is dequantized into a
    plain dense model, and its tokenizer is read from the same file.
    """
    where = locate(source)
    torch_dtype = resolve_dtype(dtype)
    log.info("loading teacher %s (%s, %s)", where, where.kind, str(torch_dtype).removeprefix("torch."))
    if where.kind == "gguf":
        model = _load_gguf_model(Path(where.location), torch_dtype)
    else:
        config = _load_config(where, trust_remote_code)
        model = _from_pretrained(where, config, torch_dtype, trust_remote_code)
    model.eval()
    tokenizer = load_tokenizer(where, trust_remote_code=trust_remote_code)
    log.info("teacher: %s", describe(model))
    return model, tokenizer


def load_config(source: str | os.PathLike, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The config of the model at `source`, without loading its weights: enough to validate a plan cheaply."""
    where = locate(source)
    if where.kind == "gguf":
        gguf = Path(where.location)
        try:
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, OSError, KeyError, IndexError, struct.error) as err:
            raise SsmifyError(f"{gguf}: could not read its config: {_first_line(err)}") from err
    return _load_config(where, trust_remote_code)


def load_tokenizer(
    source: str | os.PathLike | TeacherSource, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase | None:
    """The tokenizer that ships with `source`, or None when a local folder has no tokenizer files."""
    where = source if isinstance(source, TeacherSource) else locate(source)
    if where.kind == "folder" and not any((Path(where.location) / f).is_file() for f in _TOKENIZER_FILES):
        log.info("%s has no tokenizer files; continuing without a tokenizer", where)
        return None
    try:
        if where.kind == "gguf":
            gguf = Path(where.location)
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(where.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise SsmifyError(f"{where}: could not load its tokenizer: {_first_line(err)}") from err


def describe(model: PreTrainedModel) -> str:
    """One line for logs: family, layers, heads / kv heads, head_dim, hidden size, parameter count."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{config.model_type}: {config.num_hidden_layers} layers, {heads} heads / {kv_heads} kv heads, "
        f"head_dim {head_dim}, hidden {config.hidden_size}, {params / 1e6:.1f}M params"
    )


def _check_folder(folder: Path) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it holds {ggufs[0]}: pass that file itself)" if ggufs else ""
        raise SsmifyError(f"{folder} has no config.json{hint}; expected {ACCEPTED}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SsmifyError(f"{config_path} is not valid JSON: {_first_line(err)}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise SsmifyError(f"{config_path} has no model_type field; expected a transformers config.json")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise SsmifyError(
            f"{config_path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; "
            "expected a family it knows (llama, qwen2, mistral, phi3, gpt2, ...) or a newer transformers"
        )
    _check_weights(folder)


def _check_weights(folder: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise SsmifyError(f"{index_path} is not a valid safetensors index (needs weight_map)") from err
        for shard in shards:
            if not (folder / shard).is_file():
                raise SsmifyError(f"{folder / shard} is listed in {index_path.name} but missing")
    weight_files = sorted(folder.glob("*.safetensors"))
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError, a bare Exception subclass
            raise SsmifyError(
                f"{path} is not a valid safetensors file, probably truncated or corrupt ({_first_line(err)}); "
                "re-download or re-save it"
            ) from err
    if not weight_files:
        if any(folder.glob("pytorch_model*.bin")):
            log.warning("%s has only .bin weights; loading them with torch.load(weights_only=True)", folder)
        else:
            raise SsmifyError(f"{folder} has no weights; expected model.safetensors (or sharded safetensors)")


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise SsmifyError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if importlib.util.find_spec("gguf") is None:
        raise SsmifyError(f"loading {path} needs the gguf package: pip install 'ssmify[demo]'")


def _load_config(where: TeacherSource, trust_remote_code: bool) -> transformers.PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(where.location, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise SsmifyError(
                f"{where} needs its own Python code (auto_map in config.json) to load; "
                "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust it"
            ) from err
        if "does not recognize this architecture" in str(err):
            raise SsmifyError(
                f"{where}: its model_type is unknown to transformers {transformers.__version__}; "
                "expected a family it knows (llama, qwen2, mistral, phi3, gpt2, ...) or a newer transformers"
            ) from err
        raise SsmifyError(f"{where}: could not read its config: {_first_line(err)}") from err
    except OSError as err:
        if where.kind != "hub":
            raise SsmifyError(f"{where}: could not read its config: {_first_line(err)}") from err
        if hub_constants.is_offline_mode():
            reason = "the model hub is offline (HF_HUB_OFFLINE=1) and it is not in the local HF cache"
        else:
            reason = "the model hub is unreachable or has no such model"
        raise SsmifyError(
            f"{where} is not a local path, and {reason}; pass a local model folder (with config.json) "
            "or a .gguf file instead"
        ) from err


def _from_pretrained(
    where: TeacherSource,
    config: transformers.PretrainedConfig,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            where.location,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            weights_only=True,
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise SsmifyError(
                f"{where}: model_type {config.model_type!r} has no causal-LM class in transformers; "
                "ssmify needs a *ForCausalLM model"
            ) from err
        raise SsmifyError(f"{where}: transformers could not load it: {_first_line(err)}") from err
    except OSError as err:
        raise SsmifyError(f"{where}: transformers could not load it: {_first_line(err)}") from err


def _load_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Dequantize every GGUF tensor into a dense model, so that it trains and saves like any other."""
    from transformers import GgufConfig

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, OSError, KeyError, IndexError, struct.error) as err:
        raise SsmifyError(
            f"{path}: transformers could not load this GGUF (truncated, corrupt, or an unsupported "
            f"architecture): {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
