"""Data: packing with EOS, the held-out split, a deterministic shuffled order, the token cache, file types."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill_support import char_tokenizer, write_corpus

import ssmify.distill.data as data_module
from ssmify.distill.data import DocumentSource, StreamedBlocks, load_data
from ssmify.distill.recipe import DataConfig
from ssmify.errors import SsmifyError


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def config(tmp_path, **fields) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **fields)


def test_blocks_are_the_documents_joined_by_eos_and_cut_into_seq_len(tmp_path, tokenizer):
    corpus = tmp_path / "a.txt"
    corpus.write_text("first document.\n\nsecond one\nwith two lines.\n\nthird!\n")
    data = load_data(
        config(tmp_path, train=[str(corpus)], validation=[str(corpus)], seq_len=8), tokenizer, 8, 0
    )
    eos = tokenizer.eos_token_id
    expected = []
    for doc in ["first document.", "second one\nwith two lines.", "third!"]:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    blocks = data.validation.first(100)
    assert blocks.shape == (len(expected) // 8, 8)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]


def test_the_held_out_documents_are_exactly_those_missing_from_training(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", 200)
    cfg = config(tmp_path, train=[str(corpus)], validation_fraction=0.2)
    everything = list(DocumentSource(cfg.train, cfg, seed=0, keep="all").documents())
    train = list(DocumentSource(cfg.train, cfg, seed=0, keep="train").documents())
    held = list(DocumentSource(cfg.train, cfg, seed=0, keep="held_out").documents())
    assert 20 < len(held) < 60
    assert sorted(train + held) == sorted(everything)
    merged = iter(everything)
    assert all(doc in merged for doc in held)  # held-out documents keep corpus order
    other_seed = list(DocumentSource(cfg.train, cfg, seed=1, keep="held_out").documents())
    assert other_seed != held


def test_the_training_order_is_a_fixed_permutation_per_epoch(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "c.txt", 40)
    cfg = config(tmp_path, train=[str(corpus)], validation_fraction=0.1)
    first = load_data(cfg, tokenizer, 16, seed=3).train
    again = load_data(cfg, tokenizer, 16, seed=3).train
    other = load_data(cfg, tokenizer, 16, seed=4).train
    n = first.num_blocks
    epoch0, epoch1 = first.take(0, n), first.take(n, n)
    assert torch.equal(epoch0, again.take(0, n))
    assert not torch.equal(epoch0, other.take(0, n))
    assert not torch.equal(epoch0, epoch1)
    in_corpus_order = first.first(n)
    for epoch in (epoch0, epoch1):
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, in_corpus_order.tolist()))
    assert torch.equal(first.take(n - 3, 6), torch.cat([epoch0[-3:], epoch1[:3]]))


def test_a_second_load_reads_the_cache_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt", 30)
    cfg = config(tmp_path, train=[str(corpus)], validation_fraction=0.3)
    calls = []
    real = data_module.tokenize_documents
    monkeypatch.setattr(data_module, "tokenize_documents", lambda *a: calls.append(1) or real(*a))
    first = load_data(cfg, tokenizer, 16, 0)
    assert len(calls) == 2  # train and validation
    cached = sorted((tmp_path / "cache").rglob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = load_data(cfg, tokenizer, 32, 0)  # another seq_len reuses the same token stream
    assert len(calls) == 2
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert torch.equal(second.validation.first(2).flatten(), first.validation.first(4).flatten())
    corpus.write_text(corpus.read_text() + "\n\nOne more document.\n")
    load_data(cfg, tokenizer, 16, 0)
    assert len(calls) == 4  # the file changed, so the key did


def test_a_token_cache_another_process_stores_first_is_kept_and_this_ones_copy_dropped(
    tmp_path, tokenizer, monkeypatch
):
    corpus = write_corpus(tmp_path / "c.txt", 30)
    cfg = config(tmp_path, train=[str(corpus)], validation_fraction=0.3)
    reference = load_data(cfg, tokenizer, 16, 0).validation.first(4)
    (folder,) = (tmp_path / "cache").iterdir()
    stored = {p.name: p.read_bytes() for p in folder.iterdir()}
    for item in folder.iterdir():
        item.unlink()
    real_replace = data_module.os.replace

    def the_other_process_stores_first(src, dst):
        folder.mkdir()  # a finished folder appears just before this one's rename
        for name, content in stored.items():
            (folder / name).write_bytes(content)
        real_replace(src, dst)

    monkeypatch.setattr(data_module.os, "replace", the_other_process_stores_first)
    again = load_data(cfg, tokenizer, 16, 0).validation.first(4)
    assert torch.equal(again, reference)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no staging folder left


def test_jsonl_and_parquet_read_the_configured_field(tmp_path, tokenizer):
    docs = [f"document number {i}, with some words." for i in range(12)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": docs}), parquet)
    streams = []
    for path in (jsonl, parquet):
        cfg = config(tmp_path, train=[str(path)], validation=[str(path)], field="body")
        streams.append(load_data(cfg, tokenizer, 8, 0).validation.first(1000))
    assert torch.equal(streams[0], streams[1])
    with pytest.raises(SsmifyError, match=r"d.jsonl: no field 'text' in its records \(set data.field\)"):
        load_data(config(tmp_path, train=[str(jsonl)], validation=[str(jsonl)]), tokenizer, 8, 0)


def test_missing_and_unsupported_files_are_named(tmp_path, tokenizer):
    with pytest.raises(SsmifyError, match=r"^data: .*nothing-\*.txt: no such file$"):
        load_data(config(tmp_path, train=[str(tmp_path / "nothing-*.txt")]), tokenizer, 8, 0)
    odd = tmp_path / "corpus.csv"
    odd.write_text("a,b\n")
    with pytest.raises(SsmifyError, match="corpus.csv: unsupported file type"):
        load_data(config(tmp_path, train=[str(odd)]), tokenizer, 8, 0)


def test_too_little_validation_text_says_what_to_change(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "c.txt", 3)
    with pytest.raises(
        SsmifyError,
        match=r"data.validation: 0 tokens do not fill one block .* raise data.validation_fraction",
    ):
        load_data(config(tmp_path, train=[str(corpus)], validation_fraction=0.01), tokenizer, 64, 0)


def test_streamed_blocks_match_the_packed_ones_and_replay_after_a_restart(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "c.txt", 20)
    cfg = config(tmp_path, train=[str(corpus)], validation=[str(corpus)])
    packed = load_data(cfg, tokenizer, 16, 0).validation.first(10_000)
    stream = StreamedBlocks(DocumentSource(cfg.train, cfg, 0, "all"), tokenizer, 16, 0, True, 100)
    assert torch.equal(stream.take(0, len(packed)), packed)
    assert torch.equal(stream.take(len(packed) + 2, 3), packed[2:5])  # epoch 2 (local files keep their order)
    assert torch.equal(stream.take(4, 2), packed[4:6])  # going back restarts the stream and skips ahead
    assert torch.equal(stream.first(3), packed[:3])
    assert np.array_equal(data_module.pack([np.arange(5), np.arange(5, 12)], 4).__next__(), np.arange(4))


def test_a_streamed_hub_dataset_holds_out_what_the_same_local_file_holds_out(tmp_path, tokenizer):
    folder = tmp_path / "hub-dataset"  # load_dataset reads a local folder as it reads a hub repository
    folder.mkdir()
    docs = (write_corpus(tmp_path / "c.txt", 80).read_text()).split("\n\n")
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    local = load_data(
        config(tmp_path, train=[str(folder / "train.jsonl")], validation_fraction=0.2), tokenizer, 16, 0
    )
    hub = config(
        tmp_path, train=[{"hub": str(folder), "streaming": True}], validation_fraction=0.2, shuffle_buffer=8
    )
    streamed = load_data(hub, tokenizer, 16, 0)
    assert isinstance(streamed.train, StreamedBlocks)
    assert torch.equal(streamed.validation.first(1000), local.validation.first(1000))
    first = streamed.train.take(0, 12)
    assert torch.equal(load_data(hub, tokenizer, 16, 0).train.take(0, 12), first)
    assert not torch.equal(first, local.train.first(12))  # the stream is shuffled through its buffer


def test_a_streamed_split_resumes_at_its_saved_position_without_tokenizing_what_came_before(
    tmp_path, tokenizer, monkeypatch
):
    monkeypatch.setattr(data_module, "TOKENIZE_BATCH", 3)  # positions inside and across tokenizer batches
    corpus = write_corpus(tmp_path / "c.txt", 20)
    cfg = config(tmp_path, train=[str(corpus)])
    source = DocumentSource(cfg.train, cfg, 0, "all")
    reference = StreamedBlocks(source, tokenizer, 16, 0, True, 100).take(0, 400)  # more than one epoch
    tokenized = []
    tokenize = data_module.tokenize_documents

    def counting(texts, tok):
        texts = list(texts)
        tokenized.extend(texts)
        return tokenize(texts, tok)

    monkeypatch.setattr(data_module, "tokenize_documents", counting)
    for cut in (1, 37, 150, 260, 390):
        interrupted = StreamedBlocks(source, tokenizer, 16, 0, True, 100)
        interrupted.take(cut - 1, 1)
        state = json.loads(json.dumps(interrupted.state_dict()))  # it goes into a checkpoint's JSON
        assert state["block"] == cut - 1
        tokenized.clear()
        resumed = StreamedBlocks(source, tokenizer, 16, 0, True, 100)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.take(cut, 400 - cut), reference[cut:])
        replayed = StreamedBlocks(source, tokenizer, 16, 0, True, 100)
        skipped_documents = len(tokenized)
        tokenized.clear()
        replayed.take(cut, 400 - cut)
        assert skipped_documents <= len(tokenized) - state["documents"] + 3
        if state["documents"] > 3:
            assert skipped_documents < len(tokenized)
    assert torch.equal(resumed.take(5, 2), reference[5:7])  # an index before the position restarts the stream


def test_data_bos_puts_bos_in_place_of_each_windows_first_token_and_leaves_the_rest(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "c.txt", 40)
    plain_config = config(tmp_path, train=[str(corpus)], validation_fraction=0.1)
    plain = load_data(plain_config, tokenizer, 16, seed=3)
    with_bos = load_data(plain_config.model_copy(update={"bos": True}), tokenizer, 16, seed=3)
    for before, after in (
        (plain.train.take(5, 7), with_bos.train.take(5, 7)),
        (
            plain.validation.first(4),
            with_bos.validation.first(4),
        ),
    ):
        assert after.shape == before.shape
        assert (after[:, 0] == tokenizer.bos_token_id).all() and (
            before[:, 0] != tokenizer.bos_token_id
        ).any()
        assert torch.equal(after[:, 1:], before[:, 1:])


def test_data_bos_fraction_starts_that_share_of_windows_with_bos_and_the_same_ones_on_every_call(
    tmp_path, tokenizer
):
    corpus = write_corpus(tmp_path / "c.txt", 400)
    plain_config = config(tmp_path, train=[str(corpus)], validation_fraction=0.1)
    plain = load_data(plain_config, tokenizer, 16, seed=3)
    half = load_data(plain_config.model_copy(update={"bos": 0.5}), tokenizer, 16, seed=3)
    before, after = plain.train.take(0, 40), half.train.take(0, 40)
    assert (before[:, 0] != tokenizer.bos_token_id).all()
    chosen = after[:, 0] == tokenizer.bos_token_id
    assert 19 <= int(chosen.sum()) <= 21
    assert torch.equal(after[~chosen], before[~chosen]) and torch.equal(after[:, 1:], before[:, 1:])
    assert torch.equal(half.train.take(10, 5), after[10:15])  # a window's choice depends on its index only


def test_data_bos_with_a_tokenizer_without_bos_names_the_field(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "c.txt", 40)
    no_bos = char_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(
        SsmifyError, match=r"^data\.bos: the teacher's tokenizer has no bos_token; set bos: false$"
    ):
        load_data(config(tmp_path, train=[str(corpus)], bos=True), no_bos, 16, seed=0)
