"""The settings every evaluator reads, in one place, so that a plain function call and the CLI agree."""

from __future__ import annotations

from dataclasses import dataclass, field

RECALL_LENGTHS = (256, 512, 1024, 2048, 4096)
SPEED_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EvalOptions:
    """What to measure and how much of it.

    seq_len / max_tokens / batch_size shape the windows that perplexity, agreement and alignment
    score; the recall_* and speed_* fields size those two tasks; lm_eval_* name the harness tasks.
    """

    seq_len: int = 512
    max_tokens: int | None = None
    batch_size: int = 4
    alignment_windows: int = 2
    alignment_seq_len: int = 256
    recall_lengths: tuple[int, ...] = RECALL_LENGTHS
    recall_samples: int = 16
    recall_queries: int = 8
    speed_lengths: tuple[int, ...] = SPEED_LENGTHS
    decode_tokens: int = 32
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    seed: int = 0
    progress: bool = True
