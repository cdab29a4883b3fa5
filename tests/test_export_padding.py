"""Zero-padding mixers is exact, proven in transformers: whole groups of zero heads (llama.cpp's expand 2)
and zero B/C rows of a larger d_state (`--pad-state`)."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import student
from transformers import BambaForCausalLM

from ssmify.errors import SsmifyError
from ssmify.export import export
from ssmify.export.bamba import Bamba
from ssmify.export.float64 import Float64Throughout, as_float64
from ssmify.export.padding import pad_state, pad_to_width
from ssmify.export.spec import read_student
from ssmify.mixers import Mamba2Config


def bamba_pair(model, layers_to_perturb: int = 0) -> tuple[BambaForCausalLM, BambaForCausalLM]:
    """The student exported to Bamba unpadded (its own width) and padded to expand 2, both loaded strictly."""
    spec = read_student(model)
    loaded = []
    for target in (Bamba(pad_to_expand=None), Bamba()):
        config, weights = target.build(spec)
        bamba = BambaForCausalLM(config).eval()
        bamba.load_state_dict(weights, strict=not config.tie_word_embeddings)
        loaded.append(bamba)
    return loaded[0], loaded[1]


@pytest.mark.parametrize("layers", [[], [1]], ids=["pure-ssm", "hybrid"])
def test_bamba_padded_to_expand_2_computes_exactly_what_the_unpadded_export_does(layers):
    model = student("llama", layers)
    plain, padded = bamba_pair(model)
    shape = [
        (m.config.mamba_expand, m.config.mamba_n_heads, m.config.mamba_n_groups) for m in (plain, padded)
    ]
    assert shape == [(1, 4, 4), (2, 8, 8)]
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # 2.5 chunks of 16
    with torch.no_grad(), as_float64(plain), as_float64(padded), Float64Throughout():
        expected, actual = plain(ids).logits, padded(ids).logits
        limit = 1e-12 * expected.abs().max().item()
        assert (expected - actual).abs().max().item() <= limit
        kwargs = {
            "max_new_tokens": 8,
            "do_sample": False,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        a, b = plain.generate(ids[:1], **kwargs), padded.generate(ids[:1], **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert (torch.cat(a.logits) - torch.cat(b.logits)).abs().max().item() <= limit


def test_a_pad_head_that_reads_its_input_would_change_the_outputs():
    """The control: the comparison above sees the pad heads, so a padding that is not zero fails it."""
    plain, padded = bamba_pair(student("llama", [1]))
    with torch.no_grad():
        mixer = padded.model.layers[0].mamba  # width 64 padded to 128: heads 4..7, channels 64..127
        mixer.in_proj.bias[64:128] = 1.0  # z: open the gate
        mixer.conv1d.bias[64:128] = 1.0  # x: a nonzero input
        mixer.D[4:] = 1.0  # y = D x
        mixer.out_proj.weight[:, 64:] = 0.5
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(ids).logits - padded(ids).logits).abs().max().item() > 1e-3


def test_padding_adds_whole_groups_or_refuses():
    mixer = Mamba2Config(d_model=64, n_heads=4, head_dim=16, d_state=16, n_groups=2)  # 2 heads per group
    padding = pad_to_width(mixer, 128)
    assert (padding.n_heads, padding.n_groups, padding.extra_heads, padding.extra_groups) == (8, 4, 4, 2)
    assert (pad_to_width(mixer, 96).n_heads, pad_to_width(mixer, 96).n_groups) == (6, 3)  # one more group
    one_group = Mamba2Config(d_model=64, n_heads=4, head_dim=16, d_state=16, n_groups=1)
    assert pad_to_width(one_group, 96) is None  # 2 more heads would share the real group's norm
    assert pad_to_width(mixer, 32) is None  # narrower than the mixer


@pytest.mark.parametrize("target", ["granitemoehybrid", "bamba"])
def test_pad_state_grows_d_state_with_zero_b_and_c_rows_and_the_export_stays_exact(tmp_path, target):
    folder = export(student("llama", [1]), target, tmp_path / "out", pad_state=32)  # d_state 16 -> 32
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "export_report.json").read_text())
    assert config["mamba_d_state"] == 32 and report["d_state"] == 32
    assert report["parity"]["float64"]["forward"] <= 1e-12 * report["parity"]["logit_scale"]
    assert report["parity"]["float64"]["decode"] <= 1e-12 * report["parity"]["logit_scale"]


def test_a_state_row_that_reads_b_would_change_the_outputs():
    """The control: with one padded B row and C row nonzero, the padded state is no longer silent."""
    spec = read_student(student("llama", []))
    padded = pad_state(spec, 32)
    key = "model.layers.0.self_attn.mixer.in_proj.weight"
    inner, groups = spec.mixer.n_heads * spec.mixer.head_dim, spec.mixer.n_groups
    b_row, c_row = 2 * inner + 16, 2 * inner + groups * 32 + 16  # group 0's first padded B and C rows
    assert not padded.weights[key][[b_row, c_row]].any()
    assert torch.equal(
        padded.weights[key][2 * inner : 2 * inner + 16], spec.weights[key][2 * inner : 2 * inner + 16]
    )
    assert torch.equal(
        padded.weights[key][c_row - 16 : c_row], spec.weights[key][2 * inner + groups * 16 :][:16]
    )


def test_pad_state_below_the_students_d_state_is_one_line(tmp_path):
    with pytest.raises(SsmifyError, match="^--pad-state 8 is below the student's d_state 16$"):
        export(student("llama", [1]), "granitemoehybrid", tmp_path / "out", pad_state=8)
