"""Shared pieces of the eval tests: a character tokenizer, text files, model folders, a recall oracle.

(No tests here; the other test_eval* modules import these helpers.)
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, the tiny configs' pad, bos and eos
CHARS = string.ascii_letters + string.digits + " .,;:!?'-()\n"

TEXT = (
    "A state space model carries a fixed-size state from token to token, while attention looks back "
    "at every earlier token. The student keeps the teacher's embeddings, norms and feed-forward blocks. "
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, 4 + 74 = 78 ids: fits the tiny configs' vocabulary of 128 with padding."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_texts(folder: Path) -> tuple[Path, Path]:
    """A .txt file and a .jsonl file of two documents; together about 900 characters (= tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    txt = folder / "notes.txt"
    txt.write_text(TEXT * 2)
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": TEXT[i:] + TEXT}) for i in (0, 40)) + "\n")
    return txt, jsonl


def save_model(model: PreTrainedModel, folder: Path) -> Path:
    """A model folder with the character tokenizer beside the weights."""
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


class RecallOracle(nn.Module):
    """A fake causal LM that solves associative recall by lookup: after token x it predicts whatever
    followed the latest earlier x. Tells a correctly built recall task (accuracy 1) from a broken one."""

    def __init__(self, vocab_size: int = 128, max_positions: int = 256, wrong: bool = False):
        super().__init__()
        self.head = nn.Linear(1, vocab_size, bias=False)
        self.config = SimpleNamespace(max_position_embeddings=max_positions, bos_token_id=1)
        self.wrong = wrong

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.head.out_features)
        for b in range(batch):
            last_seen: dict[int, int] = {}
            ids = input_ids[b].tolist()
            for t, token in enumerate(ids):
                if token in last_seen:
                    follower = ids[last_seen[token] + 1]
                    logits[b, t, (follower + 1) % self.head.out_features if self.wrong else follower] = 1.0
                last_seen[token] = t
        return SimpleNamespace(logits=logits)
