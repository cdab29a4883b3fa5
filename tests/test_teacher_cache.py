"""The teacher cache: top-K targets stored once, the logits stage trained from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distill_support import make_workspace, recipe_dict, stage

import ssmify.distill.teacher_cache as cache_module
from ssmify.cli import main
from ssmify.convert.teacher import load_teacher
from ssmify.distill.objectives.logits import kd_loss, top_k_kd_loss, top_k_targets
from ssmify.distill.recipe import LossConfig, parse_recipe
from ssmify.distill.run import run_recipe
from ssmify.distill.teacher_cache import build_teacher_cache
from ssmify.errors import SsmifyError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

VOCAB = 128  # the tiny teacher's


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("teacher-cache"))


def logits_recipe(workspace: Path, out: Path, **stage_fields) -> dict:
    return recipe_dict(workspace, [stage("logits", lr=1e-3, **stage_fields)], output_dir=str(out))


def build(workspace: Path, raw: dict, out: Path, top_k: int, dtype: str = "float16", **kwargs) -> dict:
    teacher, tokenizer = load_teacher(raw["teacher"])
    recipe = parse_recipe(raw)
    return build_teacher_cache(recipe, 0, top_k, out, teacher, tokenizer, "float32", dtype, **kwargs)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_the_cached_kl_equals_the_online_kl_and_its_gradient_when_k_is_the_whole_vocabulary():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, VOCAB) * 3, torch.randn(2, 5, VOCAB, requires_grad=True)
    ids = torch.randint(0, VOCAB, (2, 5))
    config = LossConfig(temperature=2.0, ce_weight=0.5)
    online = kd_loss(student, teacher, ids, config)
    (online_grad,) = torch.autograd.grad(online["loss"], student)
    cached = top_k_kd_loss(student, top_k_targets(teacher, VOCAB, 2.0), ids, config)
    (cached_grad,) = torch.autograd.grad(cached["loss"], student)
    assert torch.allclose(cached["kl"], online["kl"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(cached_grad, online_grad, rtol=1e-4, atol=1e-7)
    # Fewer ids: the bucketed KL is below the full one (merging outcomes never raises a KL), and fp16
    # storage of the top-K log-probabilities moves it by a rounding error only.
    top = top_k_targets(teacher, 16, 2.0)
    bucketed = top_k_kd_loss(student, top, ids, config)["kl"]
    assert 0 < bucketed < online["kl"]
    top.logprobs, top.log_rest = top.logprobs.half().float(), top.log_rest.half().float()
    assert abs(top_k_kd_loss(student, top, ids, config)["kl"] - bucketed) < 1e-2 * bucketed


def test_a_stage_trained_from_a_full_vocabulary_cache_matches_the_online_one(workspace, tmp_path):
    online = logits_recipe(workspace, tmp_path / "online")
    summary_online = run_recipe(parse_recipe(online))[0]
    cache = tmp_path / "cache"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(json.dumps(logits_recipe(workspace, tmp_path / "cached")))
    code = main(
        ["teacher-cache", str(recipe_path), "--top-k", str(VOCAB), "--dtype", "float32", "--out", str(cache)]
    )
    assert code == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["sequences"] == 16 and manifest["validation"]["sequences"] == 4
    cached = logits_recipe(workspace, tmp_path / "cached", teacher_cache=str(cache))
    summary_cached = run_recipe(parse_recipe(cached))[0]
    assert summary_cached["val_loss_first"] == pytest.approx(summary_online["val_loss_first"], rel=1e-5)
    assert summary_cached["val_loss_last"] < summary_cached["val_loss_first"]  # it trained
    a, b = weights(tmp_path / "online" / "1-logits"), weights(tmp_path / "cached" / "1-logits")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_a_top_16_float16_cache_trains_the_student(workspace, tmp_path):
    raw = logits_recipe(workspace, tmp_path / "run")
    manifest = build(workspace, raw, tmp_path / "cache", 16, shard_tokens=128)
    assert len(manifest["shards"]) == 4  # one step of 128 tokens each
    shard = load_file(str(tmp_path / "cache" / "train-00000.safetensors"))
    assert shard["ids"].dtype == torch.uint16 and shard["logprobs"].dtype == torch.float16
    assert shard["ids"].shape == (4, 32, 16) and shard["log_rest"].shape == (4, 32)
    raw["stages"][0]["teacher_cache"] = str(tmp_path / "cache")
    summary = run_recipe(parse_recipe(raw))[0]
    assert summary["val_loss_last"] < summary["val_loss_first"]


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("seed", lambda raw: raw.update(seed=1)),
        ("seq_len", lambda raw: raw["stages"][0].update(seq_len=16)),
        ("data.validation", lambda raw: raw["data"].update(validation=raw["data"]["train"])),
        ("temperature", lambda raw: raw["stages"][0].update(loss={"temperature": 2.0})),
    ],
)
def test_a_cache_made_for_another_recipe_is_refused_naming_the_field(workspace, tmp_path, field, change):
    raw = logits_recipe(workspace, tmp_path / "run")
    build(workspace, raw, tmp_path / "cache", 8)
    raw["stages"][0]["teacher_cache"] = str(tmp_path / "cache")
    change(raw)
    with pytest.raises(SsmifyError, match=rf"stages\.0\.teacher_cache .*made for another {field} "):
        run_recipe(parse_recipe(raw))


def test_another_teacher_or_tokenizer_is_refused(workspace, tmp_path):
    raw = logits_recipe(workspace, tmp_path / "run")
    cache = tmp_path / "cache"
    build(workspace, raw, cache, 8)
    manifest = json.loads((cache / "manifest.json").read_text())
    for field in ("teacher", "tokenizer"):
        edited = {**manifest, "pins": {**manifest["pins"], field: "0" * 64}}
        (cache / "manifest.json").write_text(json.dumps(edited))
        raw["stages"][0]["teacher_cache"] = str(cache)
        with pytest.raises(SsmifyError, match=rf"made for another {field} "):
            run_recipe(parse_recipe(raw))


def test_a_truncated_or_corrupted_shard_is_refused_naming_it(workspace, tmp_path):
    raw = logits_recipe(workspace, tmp_path / "run")
    cache = tmp_path / "cache"
    build(workspace, raw, cache, 8, shard_tokens=256)
    raw["stages"][0]["teacher_cache"] = str(cache)
    shard = cache / "train-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-100])
    with pytest.raises(SsmifyError, match=r"shard train-00001\.safetensors is \d+ bytes, the manifest says"):
        run_recipe(parse_recipe(raw))
    flipped = bytearray(whole)
    flipped[-5] ^= 0xFF  # same size, one byte of the data changed
    shard.write_bytes(bytes(flipped))
    raw["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(SsmifyError, match=r"shard train-00001\.safetensors does not match its sha256"):
        run_recipe(parse_recipe(raw))


def test_a_killed_cache_run_continues_from_its_last_whole_shard(workspace, tmp_path, monkeypatch):
    raw = logits_recipe(workspace, tmp_path / "run")
    reference = build(workspace, raw, tmp_path / "whole", 8, shard_tokens=128)

    written = []
    write_shard = cache_module.write_shard

    def dies_on_the_third_training_shard(folder, name, tensors):
        if name == "train-00002.safetensors":
            (folder / f".{name}.tmp-1").write_bytes(b"half a shard")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        written.append(name)
        return write_shard(folder, name, tensors)

    monkeypatch.setattr(cache_module, "write_shard", dies_on_the_third_training_shard)
    with pytest.raises(KeyboardInterrupt):
        build(workspace, raw, tmp_path / "killed", 8, shard_tokens=128)
    assert written == ["validation.safetensors", "train-00000.safetensors", "train-00001.safetensors"]
    monkeypatch.setattr(cache_module, "write_shard", write_shard)

    calls = []
    targets = cache_module.teacher_targets
    monkeypatch.setattr(cache_module, "teacher_targets", lambda *a: calls.append(len(a[1])) or targets(*a))
    resumed = build(workspace, raw, tmp_path / "killed", 8, shard_tokens=128)
    assert calls == [4, 4]  # only the two missing shards of 4 sequences ran the teacher
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    with pytest.raises(SsmifyError, match="--out .* holds a cache with top_k 8, not 4"):
        build(workspace, raw, tmp_path / "killed", 4)
