"""The settings every evaluator reads, in one place, so that a plain function call and the CLI agree."""

from __future__ import annotations

from dataclasses import dataclass, field

RETRIEVAL_LENGTHS = (256, 1024, 2048, 4096)
SPEED_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EvalOptions:
    """What to measure and how much of it.

        seq_len / max_tokens / batch_size shape the windows that perplexity, agreement and alignment
        score; lengths / samples size the retrieval tasks (induction, passkey, recall: samples per task
    and length), filler is their haystack ("builtin" or "data"), recall_queries the keys asked per recall
    sample; the speed_* fields size speed; lm_eval_* name the harness tasks.
    """

    seq_len: int = 512
    max_tokens: int | None = None
    batch_size: int = 4
    alignment_windows: int = 2
    alignment_seq_len: int = 256
    lengths: tuple[int, ...] = RETRIEVAL_LENGTHS
    samples: int = 8
    recall_queries: int = 8
    filler: str = "builtin"
    speed_lengths: tuple[int, ...] = SPEED_LENGTHS
    decode_tokens: int = 32
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    seed: int = 0
    progress: bool = True
