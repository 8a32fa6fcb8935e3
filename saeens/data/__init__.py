"""Data: text corpora -> token contexts -> activation cache (and the cache reader).

    docs = load_corpus("bbc-news")                      # list[Document]
    train, test = split_documents(docs, 0.1, seed=0)    # disjoint by document, stable
    packed = pack_documents(train, tokenizer, 128)      # int32 [n_ctx, 128], BOS first
    build_cache("smollm2-135m", 15, "resid_post", "bbc-news", 1_000_000, "acts")
    cache = ActivationCache("acts")
    contexts = held_out_contexts(cache, tokenizer, 64)  # its test documents, packed as it was built
"""

from saeens.data.cache import ActivationCache, CacheWriter, batch_indices, cache_from_array, flag_outliers
from saeens.data.corpora import (
    HUB_PRESETS,
    LOCAL_CORPORA,
    Document,
    load_corpus,
    load_hub_dataset,
    split_documents,
)
from saeens.data.build import build_cache, cache_documents, held_out_contexts, source_documents
from saeens.data.extract import extract_to_cache, model_acts_fn
from saeens.data.outliers import OUTLIER_FACTOR, kept_view
from saeens.data.tokens import (
    PackedContexts,
    bos_token_id,
    byte_tokenizer,
    iter_document_tokens,
    iter_packed,
    pack_documents,
)

__all__ = [
    "HUB_PRESETS",
    "LOCAL_CORPORA",
    "OUTLIER_FACTOR",
    "ActivationCache",
    "CacheWriter",
    "Document",
    "PackedContexts",
    "batch_indices",
    "bos_token_id",
    "build_cache",
    "byte_tokenizer",
    "cache_documents",
    "cache_from_array",
    "extract_to_cache",
    "flag_outliers",
    "held_out_contexts",
    "iter_document_tokens",
    "iter_packed",
    "kept_view",
    "load_corpus",
    "load_hub_dataset",
    "model_acts_fn",
    "pack_documents",
    "source_documents",
    "split_documents",
]
