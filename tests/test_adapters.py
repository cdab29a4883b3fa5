"""The adapters read each family's attention weights exactly.

The check does not trust the adapter's own layout code: a custom attention function registered with
transformers' AttentionInterface records the query/key/value tensors the teacher itself hands to attention,
with position_ids all zero so that RoPE is the identity (cos = 1, sin = 0), and returns a random tensor whose
image under the module's output projection is recorded by a forward hook. The canonical weights must
reproduce all of these from the attention module's input.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny_models import tiny_config, tiny_model
from transformers import AttentionInterface

from ssmify.convert.adapters import SUPPORTED_FAMILIES, AttentionWeights, get_adapter
from ssmify.errors import SsmifyError

ATOL = 1e-5
GQA_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma2"}
CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3", {"attention_bias": True}),
    ("phi", {}),
    ("phi", {"qk_layernorm": True}),
    ("phi3", {}),
    ("gemma2", {}),
    ("gemma2", {"attention_bias": True}),
    ("gpt2", {}),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    ("gpt_neox", {}),
    ("gpt_neox", {"attention_bias": False}),
]

_records: dict[int, dict] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Record what the teacher passes to attention; return a random attention output (B, L, H, d)."""
    batch, heads, length, head_dim = query.shape
    attn_output = torch.randn(batch, length, heads, head_dim)
    _records[id(module)].update(q=query, k=key, v=value, scaling=kwargs["scaling"], attn_output=attn_output)
    return attn_output, None


AttentionInterface.register("capture", _capture_attention)


@contextmanager
def _capturing(attention_modules):
    def pre_hook(module, args, kwargs):
        _records[id(module)] = {"x": args[0] if args else kwargs["hidden_states"]}

    def hook(module, args, kwargs, output):
        _records[id(module)]["out"] = output[0]

    handles = []
    for m in attention_modules:
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    _records.clear()
    try:
        yield _records
    finally:
        for h in handles:
            h.remove()


def _per_head_norm(t: torch.Tensor, w: AttentionWeights, weight, bias) -> torch.Tensor:
    if w.qk_norm == "rms":
        return weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + w.qk_norm_eps)
    mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    return (t - mean) / torch.sqrt(var + w.qk_norm_eps) * weight + bias


def _heads(x: torch.Tensor, weight, bias, n: int, d: int) -> torch.Tensor:
    """x @ weight.T + bias split into heads, as (B, n, L, d) like the tensors attention receives."""
    y = x @ weight.T + (bias if bias is not None else 0)
    return y.view(*x.shape[:2], n, d).transpose(1, 2)


@pytest.mark.parametrize(("model_type", "overrides"), CASES, ids=[f"{t}-{o}" for t, o in CASES])
def test_read_attention_reproduces_the_teachers_own_projections(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    adapter = get_adapter(model_type)
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    attention = [getattr(layer, adapter.attention_attr) for layer in layers]
    model.set_attn_implementation("capture")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with _capturing(attention) as records, torch.no_grad():
        model(input_ids=input_ids, position_ids=torch.zeros_like(input_ids))

    assert set(records) == {id(m) for m in attention}, (
        "attention_attr must name the module that runs attention"
    )
    hidden, heads, kv_heads, head_dim = adapter.dims(model.config)
    for attn in attention:
        rec, w = records[id(attn)], adapter.read_attention(attn)
        x = rec["x"]
        assert x.shape[-1] == hidden
        assert rec["q"].shape[1] == heads and rec["k"].shape[1] == kv_heads and rec["q"].shape[-1] == head_dim
        assert (w.num_heads, w.num_kv_heads, w.head_dim) == (heads, kv_heads, head_dim)
        assert w.scaling == pytest.approx(rec["scaling"])

        q = _heads(x, w.q_weight, w.q_bias, heads, head_dim)
        k = _heads(x, w.k_weight, w.k_bias, kv_heads, head_dim)
        v = _heads(x, w.v_weight, w.v_bias, kv_heads, head_dim)
        if w.qk_norm is not None:
            q = _per_head_norm(q, w, w.q_norm_weight, w.q_norm_bias)
            k = _per_head_norm(k, w, w.k_norm_weight, w.k_norm_bias)
        torch.testing.assert_close(q, rec["q"], atol=ATOL, rtol=0)
        torch.testing.assert_close(k, rec["k"], atol=ATOL, rtol=0)
        torch.testing.assert_close(v, rec["v"], atol=ATOL, rtol=0)

        projected = w.project(x)
        for mine, theirs in zip(projected, (rec["q"], rec["k"], rec["v"])):
            torch.testing.assert_close(mine.transpose(1, 2), theirs, atol=ATOL, rtol=0)

        o_in = rec["attn_output"].flatten(2)
        expected_out = o_in @ w.o_weight.T + (w.o_bias if w.o_bias is not None else 0)
        torch.testing.assert_close(expected_out, rec["out"], atol=ATOL, rtol=0)

    if model_type in GQA_FAMILIES:
        assert kv_heads < heads, "the tiny config must exercise GQA"


def test_gemma2_head_dim_differs_from_hidden_over_heads():
    hidden, heads, _, head_dim = get_adapter("gemma2").dims(tiny_config("gemma2"))
    assert head_dim != hidden // heads


def test_phi_qk_layernorm_is_read_as_a_layernorm_with_bias():
    model = tiny_model("phi", qk_layernorm=True)
    adapter = get_adapter("phi")
    w = adapter.read_attention(getattr(adapter.decoder_layers(model)[0], adapter.attention_attr))
    assert w.qk_norm == "layer" and w.q_norm_bias is not None and w.k_norm_bias is not None


def test_tiny_models_randomise_norms_and_biases():
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.abs().min() > 0
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_unsupported_model_type_names_the_supported_families():
    with pytest.raises(SsmifyError) as err:
        get_adapter("bert")
    message = str(err.value)
    assert "'bert'" in message and "\n" not in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_every_required_family_is_supported():
    required = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma2", "gpt2", "gpt_neox"}
    assert required <= set(SUPPORTED_FAMILIES)
    assert {t for t, _ in CASES} == set(SUPPORTED_FAMILIES)


def test_mismatched_config_is_a_clear_error():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.config = tiny_config("llama", num_key_value_heads=4)
    with pytest.raises(SsmifyError, match="k_weight has shape"):
        get_adapter("llama").read_attention(attn)
