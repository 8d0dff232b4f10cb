"""A bounded LRU of the local index's answers, looked up by `scheduler.SearchScheduler` before it routes a search.

Why caching is correct: the tantivy index and its corpus do not change while the server runs (its searcher is fixed
at open), and an answer depends only on the analysed query terms and topk (`TantivyRetriever.search_sync` searches
`query_terms(query)`, ties broken by corpus position). So the key is (tuple(query_terms(query)), topk): queries that
differ only in case, punctuation, stopwords or repeated words share an entry, and a cached answer is exactly what a
search would answer now. A remote retriever (`--retriever-url`) is never cached: its corpus can change under us.

Why it pays: RL rollouts repeat queries constantly (a GRPO group's samples and a tree's branches of one prompt issue
the same searches). A hit costs the query's analysis (~7 us on the synthetic world) and a dict look-up instead of a
BM25 search (~100 us); a miss costs the analysis once more than an uncached search would (~7%). The analysis itself
(two tantivy analyzer calls, ~7-10 us, a fifth of a cached batched step's CPU in bench_env) is remembered too: a query
string seen before (at most ALIAS_MAX_CHARS long) finds its key by a dict look-up (`key`), so a repeated query costs
two look-ups and no analysis.

What always holds:
- At most `size` entries; a look-up that finds an entry makes it the most recently used, a put past `size` drops
  the least recently used. Entries are tuples of frozen `Hit`s, and `get` returns a new list: a caller that changes
  its answer cannot change the cache.
- The remembered keys (query string and topk -> key) are at most `size` too, oldest out first, and only for queries
  of at most ALIAS_MAX_CHARS characters; `terms` is a pure function of the query, so a remembered key is the one an
  analysis would give now.
- Not thread-safe: the scheduler touches it only on the event loop (look-ups before routing, puts when answers are
  delivered, wherever the search ran).
- Memory: at most `size` entries of at most topk hits each, plus their passages' text. Measured (tracemalloc, 16384
  entries of 4-word queries, passages not counted): 1.1 KB an entry at topk 3, 2.2 KB at topk 20 (the key, the
  slotted `Hit`s, the dict's node). Passages come on top: a wiki passage is ~0.7 KB, shared with other entries only
  while its document is in the index's stored-document cache. So the default 16384 entries hold at most ~55 MB at
  topk 3 and ~280 MB at the server's max_topk of 20 (wiki passages, none shared); the synthetic world's ~0.13 KB
  passages, ~20 MB at topk 3. The remembered keys add at most `size` x (a query of ALIAS_MAX_CHARS + ~0.2 KB), ~7 MB
  at the default size with 200-character queries (a step's query is a few words: ~0.3 KB an alias).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

from env_server.retrieval.base import Hit

CacheKey = tuple[Hashable, int]
"""(the analysed query terms as a tuple, topk)."""
ALIAS_MAX_CHARS = 256
"""Queries up to this long have their key remembered (a search query is a few words); longer ones are analysed every
time, so that the remembered strings cannot take more than `size` x 256 characters whatever clients send."""


class SearchCache:
    """Answers by (analysed query, topk), least recently used out past `size` entries. `terms(query)` analyses a
    query as the index searches it (`TantivyRetriever.query_terms`)."""

    def __init__(self, size: int, terms: Callable[[str], list[tuple[str, str]]]) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (a server turns the cache off by not making one), got {size}")
        self.size = size
        self._terms = terms
        self._entries: collections.OrderedDict[CacheKey, tuple[Hit, ...]] = collections.OrderedDict()
        self._keys: dict[tuple[str, int], CacheKey] = {}  # query string, topk -> key; oldest first (insertion order)

    def key(self, query: str, topk: int) -> CacheKey:
        """The entry key of `query` at `topk`: remembered for a query seen before, else analysed (`terms`)."""
        alias = (query, topk)
        key = self._keys.get(alias)
        if key is None:
            key = tuple(self._terms(query)), topk
            if len(query) <= ALIAS_MAX_CHARS:
                if len(self._keys) >= self.size:
                    del self._keys[next(iter(self._keys))]  # the oldest remembered key
                self._keys[alias] = key
        return key

    def get(self, key: CacheKey) -> list[Hit] | None:
        """The cached answer (a new list), or None."""
        hits = self._entries.get(key)
        if hits is None:
            return None
        self._entries.move_to_end(key)
        return list(hits)

    def put(self, key: CacheKey, hits: list[Hit]) -> None:
        self._entries[key] = tuple(hits)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SearchCache({len(self._entries)}/{self.size} entries)"
