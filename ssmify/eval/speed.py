"""Prefill time, decode speed, peak memory and decoding-state size against context length.

Student and teacher are measured in the same run, on the same device, dtype and random contexts, so
their ratios compare like with like. For each context length L and each model:

- prefill_s: wall time of `generate(max_new_tokens=1)`, i.e. one forward over L tokens plus one
  token's selection;
- decode_tokens_per_s: greedy decoding with the model's own cache, timed between the first and the
  last new token of `generate(max_new_tokens=decode_tokens + 1)`;
- state_bytes: exact bytes of every tensor in the cache after the prefill (KV cache for attention
  layers, conv + recurrent state for SSM layers);
- peak_memory_bytes: see MEMORY below.

The generic `generate` path is used, so any causal LM (teacher, student, exported student) works;
an ssmify student's generate prefills in chunks of its `prefill_chunk_size` (see convert/student.py),
so its prefill memory is bounded by a chunk, while a plain transformers teacher prefills in one go.
A model is not tried at longer lengths once it fails from lack of memory, or past its declared
max_position_embeddings (learned position embeddings end there); the failure is listed under "skipped".
Any other error propagates: it is a bug, not a measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.recall import ordinary_tokens
from ssmify.eval.scan import max_positions

log = logging.getLogger(__name__)

MEMORY = {
    "cuda": "peak torch.cuda.max_memory_allocated during prefill + decode, minus what was allocated before "
    "(weights excluded)",
    "cpu": "peak resident set size (VmHWM, reset through /proc/self/clear_refs) during prefill + decode, "
    "minus the resident size before (weights excluded; includes allocator overhead)",
}
MEASURES = ("prefill_s", "decode_tokens_per_s", "peak_memory_bytes", "state_bytes")


class TokenClock(BaseStreamer):
    """Records when generate hands over each new token (its first put is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class PeakMemory:
    """Peak bytes above the starting level during a `with` block; None where the platform cannot tell."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu" and _reset_cpu_peak():
            self.start = _proc_status("VmRSS")
        else:
            self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = max(_proc_status("VmHWM") - self.start, 0)


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_cpu_peak() -> bool:
    """Hand freed heap pages back to the OS, then reset the kernel's peak-RSS mark; False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def tensor_bytes(obj: object) -> int:
    """Bytes of every distinct tensor reachable from a cache object (attributes, lists, tuples, dicts)."""
    seen: set[int] = set()
    stack, total = [obj], 0
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, (type, torch.device, torch.dtype)):
            stack.extend(vars(item).values())
    return total


def _pad_id(model: PreTrainedModel) -> int:
    """Any valid id: contexts have no padding, but generate wants one to be named."""
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, list) and candidate:
            return candidate[0]
        if isinstance(candidate, int):
            return candidate
    return 0


def _generate(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int, **kwargs):
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=_pad_id(model),
        **kwargs,
    )


@torch.no_grad()
def measure(model: PreTrainedModel, input_ids: torch.Tensor, decode_tokens: int) -> dict:
    """The four measures for one model at one context (1, L)."""
    device = model.device
    input_ids = input_ids.to(device)
    clock = TokenClock(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        prefill = _generate(model, input_ids, 1, return_dict_in_generate=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - start
        state_bytes = tensor_bytes(prefill.cache)
        del prefill
        _generate(model, input_ids, decode_tokens + 1, streamer=clock)
    decode_s = clock.times[-1] - clock.times[1]
    return {
        "prefill_s": prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "peak_memory_bytes": memory.peak,
        "state_bytes": state_bytes,
    }


def _explained(err: BaseException, length: int, model: PreTrainedModel) -> bool:
    """A failure that running out of memory or past the declared context explains; anything else is a bug."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    limit = max_positions(model)
    text = str(err).lower()
    return (limit is not None and length > limit) or "memory" in text or "allocate" in text


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def speed(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Per context length: the student's measures, the teacher's as teacher_*, and the ratios.

    prefill_speedup = teacher prefill_s / student prefill_s; decode_speedup = student tokens/s / teacher
    tokens/s; memory_ratio and state_ratio = student / teacher bytes. Above 1 means faster, below 1 smaller.
    """
    options = options or EvalOptions()
    tokenizer = data.tokenizer if data is not None else None
    generator = torch.Generator().manual_seed(options.seed)
    pool = ordinary_tokens(tokenizer, model)
    models = {"student": model} if teacher is None else {"student": model, "teacher": teacher}
    warmup = pool[torch.randint(len(pool), (1, 16), generator=generator)]
    for each in models.values():
        measure(each, warmup, 2)
    failed: set[str] = set()
    result = {
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "decode_tokens": options.decode_tokens,
        "memory": MEMORY.get(model.device.type, "not measured on this device"),
        "points": [],
        "skipped": [],
    }
    for length in options.speed_lengths:
        context = pool[torch.randint(len(pool), (1, length), generator=generator)]
        point: dict = {"length": length}
        for name, each in models.items():
            if name in failed:
                result["skipped"].append(
                    {"length": length, "model": name, "reason": "a shorter length failed"}
                )
                continue
            log.info("speed: %s at %d tokens", name, length)
            try:
                measured = measure(each, context, options.decode_tokens)
            except (torch.OutOfMemoryError, MemoryError, IndexError, RuntimeError) as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                if not _explained(err, length, each):
                    raise
                log.warning("speed: %s at %d tokens failed: %s", name, length, reason)
                result["skipped"].append({"length": length, "model": name, "reason": reason})
                failed.add(name)
                gc.collect()
                if each.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            prefix = "" if name == "student" else "teacher_"
            point.update({prefix + key: value for key, value in measured.items()})
        if "prefill_s" in point and "teacher_prefill_s" in point:
            point["prefill_speedup"] = _ratio(point["teacher_prefill_s"], point["prefill_s"])
            point["decode_speedup"] = _ratio(
                point["decode_tokens_per_s"], point["teacher_decode_tokens_per_s"]
            )
            point["memory_ratio"] = _ratio(point["peak_memory_bytes"], point["teacher_peak_memory_bytes"])
            point["state_ratio"] = _ratio(point["state_bytes"], point["teacher_state_bytes"])
        if len(point) > 1:
            log.info("speed at %d: %s", length, point)
            result["points"].append(point)
    return result
