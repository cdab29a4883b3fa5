"""Associative recall and speed on tiny models: a solvable task, honest skips, complete JSON."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import (
    RecallOracle,
    char_tokenizer,
)
from tiny_models import tiny_model
from transformers import Mamba2Config, Mamba2ForCausalLM

from ssmify.convert import convert
from ssmify.convert.lookup import RecallFormat, kv_sample, separator, split_pools
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.recall import ordinary_tokens, recall
from ssmify.eval.speed import speed, tensor_bytes

RECALL = EvalOptions(lengths=(48, 128, 256, 512), samples=3, recall_queries=8, progress=False)


@pytest.mark.parametrize("separator_id", [None, 7])
def test_recall_sample_layout_is_pairs_then_queries_of_their_values(separator_id):
    keys, values = torch.arange(10, 60), torch.arange(60, 110)
    form = RecallFormat(bos_id=1, separator_id=separator_id)
    sample = kv_sample(50, 4, keys, values, form, torch.Generator().manual_seed(0))
    ids = sample.input_ids.tolist()
    width = 2 if separator_id is None else 3
    pairs_end = 50 - width * 4
    filler = (50 - 1) % width
    assert len(ids) == 50 and ids[0] == 1 and all(60 <= t < 110 for t in ids[1 : 1 + filler])
    body = ids[1 + filler : pairs_end]
    pairs = dict(zip(body[0::width], body[1::width]))
    assert len(pairs) == len(body) // width == form.pair_count(50, 4)
    assert all(k in range(10, 60) and v in range(60, 110) for k, v in pairs.items())
    if separator_id is not None:
        assert body[2::3] == [separator_id] * len(pairs) and ids[-1] == separator_id
    for position, answer in zip(sample.positions.tolist(), sample.answers.tolist()):
        assert position >= pairs_end and pairs[ids[position]] == answer and ids[position + 1] == answer


def test_recall_oracle_scores_one_and_a_wrong_oracle_zero_with_honest_skips():
    oracle = recall(RecallOracle(max_positions=256), RecallOracle(wrong=True), None, RECALL)
    assert [p["length"] for p in oracle["points"]] == [48, 128]
    assert [p["accuracy"] for p in oracle["points"]] == [1.0, 1.0]
    assert [p["teacher_accuracy"] for p in oracle["points"]] == [0.0, 0.0]
    assert all(p["queries"] == 24 for p in oracle["points"])
    reasons = {s["length"]: s["reason"] for s in oracle["skipped"]}
    assert reasons[256].startswith("needs 119 distinct keys")  # 127 ordinary ids (all but BOS): 63 keys
    assert reasons[512] == "beyond max_position_embeddings=256"
    separated = EvalOptions(lengths=(48, 96), samples=2, recall_queries=4, progress=False)
    result = recall(RecallOracle(), None, EvalData(char_tokenizer()), separated)
    assert result["separated"] and [p["accuracy"] for p in result["points"]] == [1.0, 1.0]


def test_recall_pools_avoid_special_tokens_and_the_separator_is_a_comma():
    tokenizer = char_tokenizer()
    model = tiny_model("llama")
    tokens = ordinary_tokens(tokenizer, model)
    assert set(tokens.tolist()) == set(range(4, len(tokenizer)))
    keys, values = split_pools(tokens, torch.Generator().manual_seed(0))
    assert not set(keys.tolist()) & set(values.tolist())
    assert separator(tokenizer) == tokenizer.convert_tokens_to_ids(",")


def test_recall_runs_on_a_tiny_model_with_the_documented_keys():
    options = EvalOptions(lengths=(40, 64), samples=2, recall_queries=4, progress=False)
    result = recall(tiny_model("llama"), tiny_model("llama", seed=1), EvalData(char_tokenizer()), options)
    assert set(result) == {"points", "skipped", "samples", "queries_per_sample", "chance", "separated"}
    for point in result["points"]:
        assert set(point) == {
            "length",
            "pairs",
            "queries",
            "accuracy",
            "teacher_accuracy",
            "retention",
            "meaningful",
        }
        assert 0.0 <= point["accuracy"] <= 1.0 and 0.0 <= point["teacher_accuracy"] <= 1.0
    assert result["chance"] == pytest.approx(1 / 37)  # 74 ordinary characters but ",": 36 keys, 37 values
    assert result["separated"]


def tiny_mamba2() -> Mamba2ForCausalLM:
    """transformers' own Mamba2 stands in for any student whose decoding state does not grow."""
    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        head_dim=32,
        state_size=16,
        n_groups=1,
    )
    return Mamba2ForCausalLM(config).eval()


def test_speed_measures_student_and_teacher_with_exact_state_sizes():
    teacher = tiny_model("llama")
    options = EvalOptions(speed_lengths=(16, 32), decode_tokens=4, progress=False)
    result = speed(tiny_mamba2(), teacher, EvalData(char_tokenizer()), options)
    assert set(result) == {"device", "dtype", "decode_tokens", "memory", "points", "skipped"}
    assert result["skipped"] == []
    measures = ["prefill_s", "decode_tokens_per_s", "peak_memory_bytes", "state_bytes"]
    ratios = ["prefill_speedup", "decode_speedup", "memory_ratio", "state_ratio"]
    for point in result["points"]:
        assert set(point) == {"length", *measures, *("teacher_" + m for m in measures), *ratios}
        assert point["prefill_s"] > 0 and point["decode_tokens_per_s"] > 0
        assert point["prefill_speedup"] == pytest.approx(point["teacher_prefill_s"] / point["prefill_s"])
        # fp32 KV cache: keys and values, 4 layers, 2 kv heads of 16 dims, one entry per context token
        assert point["teacher_state_bytes"] == 2 * 4 * 2 * 16 * point["length"] * 4
    short, long = result["points"]
    assert short["state_bytes"] == long["state_bytes"] > 0  # a recurrent state does not grow
    assert long["state_ratio"] == pytest.approx(short["state_ratio"] / 2)


def test_tensor_bytes_counts_each_tensor_once_through_nested_containers():
    shared = torch.zeros(10, dtype=torch.float32)
    cache = {"a": [shared, (shared, torch.zeros(3, dtype=torch.int64))], "b": shared}
    assert tensor_bytes(cache) == 40 + 24


def test_speed_of_a_hybrid_student_grows_its_state_only_in_the_attention_layer_it_keeps():
    teacher = tiny_model("llama")
    student = convert(teacher, attention_layers=[0], tokenizer=char_tokenizer())
    options = EvalOptions(speed_lengths=(16, 32), decode_tokens=3, progress=False)
    short, long = speed(student, teacher, EvalData(char_tokenizer()), options)["points"]
    kv_bytes_per_token_and_layer = 2 * 2 * 16 * 4  # keys and values, 2 kv heads of 16 dims, fp32
    assert long["state_bytes"] - short["state_bytes"] == kv_bytes_per_token_and_layer * 16
    assert long["teacher_state_bytes"] - short["teacher_state_bytes"] == 4 * kv_bytes_per_token_and_layer * 16
    assert short["state_bytes"] > kv_bytes_per_token_and_layer * 16  # plus the three mixers' fixed states
