"""Search backends for the env server's `search` tool, chosen by `RETRIEVERS[config.type]`.

`tantivy`: a local on-disk BM25 index (built from a FlashRAG corpus jsonl or the synthetic world).
`remote`: any Search-R1-compatible `/retrieve` server. `format_observation` renders hits as Search-R1 does.
`scheduler.SearchScheduler` decides where the env server runs each search: inline, in threads, or awaited; before
that, it answers a repeated query of the local index from `cache.SearchCache`.
"""

from env_server.retrieval.base import Hit, Retriever, RetrieverError
from env_server.retrieval.format import format_observation
from env_server.retrieval.remote import RemoteRetriever
from env_server.retrieval.tantivy_index import TantivyRetriever, build_index, read_corpus_jsonl

RETRIEVERS: dict[str, type[Retriever]] = {"tantivy": TantivyRetriever, "remote": RemoteRetriever}

__all__ = [
    "RETRIEVERS",
    "Hit",
    "RemoteRetriever",
    "Retriever",
    "RetrieverError",
    "TantivyRetriever",
    "build_index",
    "format_observation",
    "read_corpus_jsonl",
]
