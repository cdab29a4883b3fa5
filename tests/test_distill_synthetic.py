"""Synthetic lookup data: the seeded share, resume-exact draws, real lookups, off by default, recipe errors."""

from __future__ import annotations

import pytest
import torch
from test_distill_support import char_tokenizer, recipe_dict, stage, write_corpus

from ssmify.convert.lookup import INDUCTION_RUN, PASSKEY_QUESTION
from ssmify.distill.data import PackedBlocks, load_data
from ssmify.distill.recipe import DataConfig, SyntheticConfig, parse_recipe, stage_data
from ssmify.distill.synthetic import SyntheticBlocks
from ssmify.errors import SsmifyError

SEQ_LEN = 128  # the character tokenizer's passkey prompt needs about 120 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("synthetic") / "c.txt", 80)


def config(corpus, tmp_path, **fields) -> DataConfig:
    return DataConfig(
        train=[str(corpus)], validation_fraction=0.1, cache_dir=str(tmp_path / "cache"), **fields
    )


def mixed(corpus, tmp_path, tokenizer, seed: int = 0, **synthetic) -> SyntheticBlocks:
    cfg = config(corpus, tmp_path, synthetic={"fraction": 0.3, **synthetic})
    train = load_data(cfg, tokenizer, SEQ_LEN, seed).train
    assert isinstance(train, SyntheticBlocks)
    return train


def test_the_synthetic_share_is_the_configured_fraction_split_over_the_kinds(corpus, tmp_path, tokenizer):
    blocks = mixed(corpus, tmp_path, tokenizer, fraction=0.1)
    kinds = [blocks.draw(g)[0] for g in range(20_000)]
    assert kinds.count(None) / len(kinds) == pytest.approx(0.9, abs=0.01)
    for kind in ("induction", "kv", "passkey"):
        assert kinds.count(kind) / len(kinds) == pytest.approx(0.1 / 3, abs=0.008)

    rows, natural = blocks.take(0, 60), blocks.natural.take(0, 60)
    replaced = [not torch.equal(rows[i], natural[i]) for i in range(60)]
    assert replaced == [blocks.draw(g)[0] is not None for g in range(60)]
    assert rows.shape == (60, SEQ_LEN) and rows.dtype == torch.int64


def test_a_sequence_is_a_function_of_seed_and_index_so_a_resumed_run_sees_the_same_batches(
    corpus, tmp_path, tokenizer
):
    blocks = mixed(corpus, tmp_path, tokenizer)
    whole = blocks.take(0, 40)
    assert torch.equal(torch.cat([blocks.take(0, 17), blocks.take(17, 23)]), whole)
    assert torch.equal(mixed(corpus, tmp_path, tokenizer).take(17, 23), whole[17:])  # a fresh process
    assert not torch.equal(mixed(corpus, tmp_path, tokenizer, seed=1).take(0, 40), whole)


def test_synthetic_sequences_hold_their_lookups(corpus, tmp_path, tokenizer):
    blocks = mixed(corpus, tmp_path, tokenizer, fraction=0.9, kinds=["induction", "passkey"])
    rows = blocks.take(0, 20)
    seen = set()
    for g, row in enumerate(rows.tolist()):
        kind = blocks.draw(g)[0]
        seen.add(kind)
        if kind == "induction":
            run = row[-INDUCTION_RUN:]
            earlier = [row[i : i + INDUCTION_RUN] for i in range(len(row) - 2 * INDUCTION_RUN + 1)]
            assert run in earlier
        elif kind == "passkey":
            text = "".join(tokenizer.convert_ids_to_tokens(row[1:]))  # decode() spaces characters
            prompt, _, key = text.rpartition(PASSKEY_QUESTION.strip())
            assert len(key.strip()) == 5 and key.strip().isdigit()
            assert f"The pass key is {key.strip()}." in prompt
    assert seen >= {"induction", "passkey"}


def test_without_synthetic_or_at_fraction_zero_the_data_is_unchanged(corpus, tmp_path, tokenizer):
    plain = load_data(config(corpus, tmp_path), tokenizer, SEQ_LEN, 0)
    off = load_data(config(corpus, tmp_path, synthetic={"fraction": 0}), tokenizer, SEQ_LEN, 0)
    assert isinstance(plain.train, PackedBlocks) and isinstance(off.train, PackedBlocks)
    n = plain.train.num_blocks
    assert torch.equal(plain.train.take(0, 2 * n), off.train.take(0, 2 * n))

    on = load_data(config(corpus, tmp_path, synthetic={"fraction": 0.3}), tokenizer, SEQ_LEN, 0)
    assert torch.equal(on.validation.first(100), plain.validation.first(100))  # validation stays natural
    assert torch.equal(on.train.natural.take(0, n), plain.train.take(0, n))


def test_a_stage_too_short_for_a_kind_mixes_in_the_others_and_one_for_none_is_refused(
    corpus, tmp_path, tokenizer
):
    cfg = config(corpus, tmp_path, synthetic={"fraction": 0.5, "kinds": ["kv", "induction"]})
    short = load_data(cfg, tokenizer, 32, 0).train
    assert short.kinds == ["kv"]
    assert {short.draw(g)[0] for g in range(200)} == {None, "kv"}
    only = config(corpus, tmp_path, synthetic={"fraction": 0.1, "kinds": ["induction"]})
    with pytest.raises(
        SsmifyError, match=r"data\.synthetic\.kinds: none fits this stage: induction needs seq_len >= 49"
    ):
        load_data(only, tokenizer, 32, 0)


@pytest.mark.parametrize(
    ("synthetic", "message"),
    [
        ({"fraction": 0.1, "kinds": ["kv", "retrieval"]}, r"data\.synthetic\.kinds\.1: expected 'induction'"),
        ({"fraction": 1.5}, r"data\.synthetic\.fraction: Input should be less than 1 \(got 1\.5\)"),
        ({"fraction": 0.1, "kinds": []}, r"data\.synthetic\.kinds: List should have at least 1 item"),
        ({"fraction": 0.1, "kinds": ["kv", "kv"]}, r"data\.synthetic\.kinds: .*each kind once"),
        ({"kinds": ["kv"]}, r"data\.synthetic\.fraction: required key is missing"),
    ],
)
def test_bad_synthetic_settings_stop_with_one_line_naming_the_field(tmp_path, synthetic, message):
    raw = recipe_dict(tmp_path, [stage("logits")])
    raw["data"]["synthetic"] = synthetic
    with pytest.raises(SsmifyError, match=message) as err:
        parse_recipe(raw)
    assert "\n" not in str(err.value)


def test_a_valid_synthetic_section_parses_with_every_kind_by_default(tmp_path):
    raw = recipe_dict(tmp_path, [stage("logits")])
    raw["data"]["synthetic"] = {"fraction": 0.1}
    assert parse_recipe(raw).data.synthetic == SyntheticConfig(
        fraction=0.1, kinds=["induction", "kv", "passkey"]
    )


def test_a_stage_fraction_replaces_the_data_sections_and_turns_lookups_on_or_off(corpus, tmp_path, tokenizer):
    raw = recipe_dict(tmp_path, [stage("logits"), stage("logits", synthetic_fraction=0.4)])
    raw["data"] = config(corpus, tmp_path, seq_len=32).model_dump()
    recipe = parse_recipe(raw)
    assert stage_data(recipe, recipe.stages[0]).synthetic is None
    own = stage_data(recipe, recipe.stages[1])
    assert own.synthetic == SyntheticConfig(fraction=0.4, kinds=["induction", "kv", "passkey"])
    assert recipe.data.synthetic is None  # the recipe itself is left as it was
    blocks = load_data(own, tokenizer, SEQ_LEN, 0).train
    kinds = [blocks.draw(g)[0] for g in range(10_000)]
    assert kinds.count(None) / len(kinds) == pytest.approx(0.6, abs=0.02)

    raw["data"]["synthetic"] = {"fraction": 0.3, "kinds": ["kv"]}
    raw["stages"][1]["synthetic_fraction"] = 0.0
    recipe = parse_recipe(raw)
    assert isinstance(
        load_data(stage_data(recipe, recipe.stages[1]), tokenizer, SEQ_LEN, 0).train, PackedBlocks
    )
    assert isinstance(
        load_data(stage_data(recipe, recipe.stages[0]), tokenizer, SEQ_LEN, 0).train, SyntheticBlocks
    )


def test_a_stage_fraction_of_one_or_more_stops_with_one_line_naming_the_field(tmp_path):
    raw = recipe_dict(tmp_path, [stage("logits", synthetic_fraction=1.0)])
    with pytest.raises(
        SsmifyError, match=r"stages\.0\.synthetic_fraction: Input should be less than 1"
    ) as err:
        parse_recipe(raw)
    assert "\n" not in str(err.value)
