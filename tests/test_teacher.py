"""load_teacher: tiny saved folders load exactly, and every kind of bad input is a one-line SsmifyError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ssmify.convert.teacher import describe, load_teacher, load_tokenizer
from ssmify.errors import SsmifyError

WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny random Llama with a word-level tokenizer, saved as a plain HF folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder, model


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_folder_loads_with_identical_logits_in_eval_mode_fp32(tiny):
    folder, reference = tiny
    model, tokenizer = load_teacher(folder)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer is not None
    assert tokenizer("the cat sat").input_ids == [1, 2, 3]


def test_dtype_option_and_path_as_string(tiny):
    folder, _ = tiny
    model, _ = load_teacher(str(folder), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(SsmifyError, match="int3.*float32"):
        load_teacher(folder, dtype="int3")


def test_folder_without_tokenizer_gives_none(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert load_tokenizer(folder) is None
    model, tokenizer = load_teacher(folder)
    assert tokenizer is None and model.config.num_hidden_layers == 3


def test_describe_names_family_layers_heads_and_params(tiny):
    _, model = tiny
    line = describe(model)
    params = sum(p.numel() for p in model.parameters())
    assert line.startswith("llama: 3 layers, 4 heads / 2 kv heads, head_dim 16, hidden 64")
    assert f"{params / 1e6:.1f}M params" in line


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(SsmifyError, match="no such file or folder") as err:
        load_teacher(missing)
    assert str(missing) in str(err.value) and ".gguf" in str(err.value)


def test_folder_without_config_names_folder_and_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(SsmifyError, match="has no config.json") as err:
        load_teacher(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_folder_with_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(SsmifyError, match=r"it holds model\.Q4\.gguf: pass that file itself"):
        load_teacher(tmp_path)


def test_hub_id_offline_says_so_and_suggests_a_local_folder(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SsmifyError, match="offline") as err:
        load_teacher("ssmify-tests/no-such-model")
    message = str(err.value)
    assert "ssmify-tests/no-such-model" in message and "local model folder" in message


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(SsmifyError, match="truncated or corrupt") as err:
        load_teacher(folder)
    assert str(weights) in str(err.value)


def test_garbage_safetensors_names_the_file(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SsmifyError, match=r"model\.safetensors is not a valid safetensors file"):
        load_teacher(folder)


def test_folder_without_weights_says_what_is_expected(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SsmifyError, match="has no weights; expected model.safetensors") as err:
        load_teacher(folder)
    assert str(folder) in str(err.value)


def test_file_that_is_not_gguf_names_it(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(SsmifyError, match="not a GGUF file") as err:
        load_teacher(fake)
    assert str(fake) in str(err.value)


def test_gguf_with_magic_but_broken_body_names_it(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(SsmifyError, match="could not load this GGUF") as err:
        load_teacher(fake)
    assert str(fake) in str(err.value)


def test_other_file_types_are_refused(tiny, tmp_path):
    weights = tiny[0] / "model.safetensors"
    with pytest.raises(SsmifyError, match="is a file but not a .gguf") as err:
        load_teacher(weights)
    assert str(weights) in str(err.value)


def test_unknown_model_type_names_config_and_type(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    edit_config(folder, model_type="not-a-family")
    with pytest.raises(SsmifyError, match="model_type 'not-a-family' is unknown to transformers") as err:
        load_teacher(folder)
    assert str(folder / "config.json") in str(err.value)


def test_invalid_config_json_names_it(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SsmifyError, match="is not valid JSON") as err:
        load_teacher(folder)
    assert str(folder / "config.json") in str(err.value)


def write_remote_code(folder: Path, model_type: str) -> Path:
    """auto_map pointing at a module that leaves a marker file when it is imported."""
    marker = folder / "remote_code_ran"
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(
        folder,
        model_type=model_type,
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"},
    )
    return marker


def test_remote_code_is_refused_by_default_and_says_which_flag(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    marker = write_remote_code(folder, model_type="custom-family")
    with pytest.raises(SsmifyError, match=r"pass trust_remote_code=True \(CLI: --trust-remote-code\)") as err:
        load_teacher(folder)
    assert str(folder) in str(err.value)
    assert not marker.exists()


def test_known_family_with_auto_map_loads_builtin_class_without_running_remote_code(tiny, tmp_path):
    folder = copy_of(tiny[0], tmp_path)
    marker = write_remote_code(folder, model_type="llama")
    model, _ = load_teacher(folder)
    assert type(model) is LlamaForCausalLM
    assert not marker.exists()
