"""Shared pieces of the distill tests: a tiny teacher folder with a character tokenizer, text, and recipes.

(No tests here; the other test_distill_* modules import these helpers.)
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import yaml
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3: the tiny configs' pad, bos and eos
CHARS = string.ascii_letters + string.digits + " .,;:!?'-()\n"
WORDS = (
    "the a state space model mixes tokens with a decay while attention compares every pair of them "
    "teacher student layer matrix hidden logits learns from its copies and sees long text"
).split()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; fits the tiny configs' vocabulary of 128."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_teacher(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama teacher (4 layers, tied embeddings) with the character tokenizer, saved."""
    model = tiny_model("llama", seed=seed, tie_word_embeddings=True, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
    return " ".join(words).capitalize() + rng.choice(".!?")


def write_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Blank-line separated documents of random sentences over a small vocabulary."""
    rng = random.Random(seed)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def convert_student(teacher_dir: Path, out: Path, **options) -> Path:
    """A tiny converted student (half the layers keep attention unless options say otherwise)."""
    from ssmify.convert.convert import convert

    convert(str(teacher_dir), out=out, **{"keep_attention": 0.5, **options})
    return out


def stage(name: str, **fields) -> dict:
    """A small stage: 4 optimizer steps of 2 x 2 sequences of 32 tokens, checkpoints every 2 steps."""
    base = {
        "name": name,
        "tokens": 512,
        "micro_batch_size": 2,
        "global_batch_tokens": 128,
        "lr": 3.0e-3,
        "checkpoint_every": 2,
        "eval_tokens": 128,
    }
    return {**base, **fields}


def recipe_dict(root: Path, stages: list[dict], **fields) -> dict:
    """A recipe over the files that `make_workspace` wrote under `root`."""
    return {
        "teacher": str(root / "teacher"),
        "student": {"path": str(root / "student")},
        "data": {
            "train": [str(root / "train.txt")],
            "validation": [str(root / "held.txt")],
            "seq_len": 32,
            "cache_dir": str(root / "token-cache"),
        },
        "output_dir": str(root / "run"),
        "seed": 0,
        "stages": stages,
        **fields,
    }


def make_workspace(root: Path) -> Path:
    """teacher/, student/ (converted), train.txt and held.txt under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    write_teacher(root / "teacher")
    convert_student(root / "teacher", root / "student")
    write_corpus(root / "train.txt", 60, seed=0)
    write_corpus(root / "held.txt", 8, seed=1)
    return root
