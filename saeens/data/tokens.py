"""Documents -> fixed-length token contexts, each starting with BOS, streamed in batches.

Packing follows SAELens (`concat_and_batch_sequences` with its pretokenize defaults:
begin_batch_token = BOS, sequence_separator_token = BOS, no begin_sequence_token): documents are
tokenised without special tokens and concatenated; every context starts with BOS; inside a
context one BOS separates consecutive documents (none is added when a document starts a context,
the context's own BOS already marks it); a document longer than the room left continues in the
next context after that context's BOS; the final incomplete context is dropped. (sparsify instead
joins documents with EOS and starts chunks mid-stream without BOS; we need BOS at position 0 so
that the outlier BOS row can be dropped at a fixed place.) For tokenizers whose BOS is also
their EOS (GPT-2, SmolLM2) the two conventions agree on the separator.

Pack the train and test documents separately (see `corpora.split_documents`), so no document
reaches both splits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saeens.data.corpora import Document
from saeens.errors import SaeensError


@dataclass(frozen=True)
class PackedContexts:
    """A batch of packed contexts. Position 1 of context n holds token doc_offset_N[n] of
    document doc_index_N[n] (indices into the document sequence that was packed)."""

    tokens_NT: np.ndarray  # int32 [n_ctx, ctx], column 0 is BOS
    doc_index_N: np.ndarray  # int32 [n_ctx] the document each context starts in
    doc_offset_N: np.ndarray  # int32 [n_ctx] token offset within that document of position 1

    def __len__(self) -> int:
        return int(self.tokens_NT.shape[0])

    def rows(self, lo: int | None = None, hi: int | None = None) -> "PackedContexts":
        """Contexts lo:hi, with their provenance."""
        return PackedContexts(self.tokens_NT[lo:hi], self.doc_index_N[lo:hi], self.doc_offset_N[lo:hi])


def bos_token_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id, else its EOS id (GPT-2 style tokenizers have one token for both)."""
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise SaeensError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has neither a BOS nor an EOS "
        f"token: pass bos_id=<token id> explicitly"
    )


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def iter_document_tokens(
    docs: Iterable[Document | str], tokenizer: Any, batch_docs: int = 64
) -> Iterator[np.ndarray]:
    """Token ids of each document (no special tokens), tokenised lazily `batch_docs` at a time.
    Yields one int32 array per input document, in order (possibly empty)."""
    buf: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        ids = tokenizer(buf, add_special_tokens=False, verbose=False)["input_ids"]
        for row in ids:
            yield np.asarray(row, np.int32)
        buf.clear()

    for d in docs:
        buf.append(d.text if isinstance(d, Document) else str(d))
        if len(buf) >= batch_docs:
            yield from flush()
    if buf:
        yield from flush()


def iter_packed(
    docs: Sequence[Document | str] | Iterable[Document | str],
    tokenizer: Any,
    context_length: int,
    batch_size: int = 32,
    *,
    bos_id: int | None = None,
    max_contexts: int | None = None,
) -> Iterator[PackedContexts]:
    """Stream PackedContexts batches of up to `batch_size` contexts (the last may be smaller).
    Memory holds one batch and one tokenised group of documents, whatever the corpus size."""
    if context_length < 2:
        raise SaeensError(f"context length {context_length} is too short: use at least 2 (BOS + one token)")
    if batch_size < 1:
        raise SaeensError(f"batch size {batch_size} must be positive: use e.g. 32")
    if max_contexts is not None and max_contexts <= 0:
        return
    bos = bos_token_id(tokenizer) if bos_id is None else int(bos_id)
    T = int(context_length)
    ctx_BT = np.empty((batch_size, T), np.int32)
    doc_B = np.empty(batch_size, np.int32)
    off_B = np.empty(batch_size, np.int32)
    n_in_batch, n_total = 0, 0
    fill = 0  # tokens already in the context being built (0: none started)

    for di, ids in enumerate(iter_document_tokens(docs, tokenizer)):
        pos = 0
        while pos < ids.shape[0]:
            row = ctx_BT[n_in_batch]
            if fill == 0:
                row[0] = bos
                fill = 1
                doc_B[n_in_batch], off_B[n_in_batch] = di, pos
            elif pos == 0:
                row[fill] = bos  # separator between documents
                fill += 1
            take = min(T - fill, ids.shape[0] - pos)
            row[fill : fill + take] = ids[pos : pos + take]
            fill += take
            pos += take
            if fill == T:
                fill = 0
                n_in_batch += 1
                n_total += 1
                done = max_contexts is not None and n_total >= max_contexts
                if n_in_batch == batch_size or done:
                    yield PackedContexts(ctx_BT[:n_in_batch].copy(), doc_B[:n_in_batch].copy(), off_B[:n_in_batch].copy())
                    n_in_batch = 0
                if done:
                    return
    if n_in_batch:
        yield PackedContexts(ctx_BT[:n_in_batch].copy(), doc_B[:n_in_batch].copy(), off_B[:n_in_batch].copy())


def pack_documents(
    docs: Sequence[Document | str],
    tokenizer: Any,
    context_length: int,
    *,
    bos_id: int | None = None,
    max_contexts: int | None = None,
) -> PackedContexts:
    """All contexts of `docs` in memory (for small corpora and tests; `iter_packed` streams)."""
    parts = list(iter_packed(docs, tokenizer, context_length, 1024, bos_id=bos_id, max_contexts=max_contexts))
    if not parts:
        return PackedContexts(
            np.zeros((0, context_length), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
        )
    return PackedContexts(
        np.concatenate([p.tokens_NT for p in parts]),
        np.concatenate([p.doc_index_N for p in parts]),
        np.concatenate([p.doc_offset_N for p in parts]),
    )


def byte_tokenizer() -> Any:
    """A tiny byte-level BPE tokenizer with no merges (257 ids; id 0 = <|endoftext|> = BOS = EOS),
    built in memory: no download, exact round trip of any text. For tests and toy models."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.name_or_path = "saeens-byte-tokenizer"
    return hf
