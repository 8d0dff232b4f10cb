"""The retriever seam: one abstract class, one hit type, one error.

Contracts every `Retriever` keeps:

- `search(queries, topk)` answers one list of hits per query, in query order, each list best first and at most
  `topk` long. It never blocks the event loop for long: CPU work runs in an executor (or, in the server's
  `scheduler.SearchScheduler`, inline within a bound of about a millisecond), network work is awaited.
- ANY query string (quotes, query-syntax operators, unbalanced brackets, emoji, 10 KB of junk, only punctuation)
  returns a list, possibly empty; an empty or blank query returns `[]`. Queries are text, never query syntax.
- Backend failures (a remote server down, a malformed answer, an unreadable index) raise `RetrieverError`; the env
  server turns that into a clear observation or a 502. Programming errors (a bad `topk`) raise `ValueError`.
- `corpus_id` fingerprints the corpus the hits come from; snapshots carry it so an episode restored elsewhere can
  tell whether it is searching the same documents.
- `Hit.contents` is FlashRAG's form, `'"Title"\\ntext'`, exactly as stored in the corpus.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class RetrieverError(Exception):
    """A retrieval backend failed (index unreadable, remote server down or answering garbage)."""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. Slotted: the server's search cache (`cache.SearchCache`) holds many."""

    id: str
    """The corpus document id (FlashRAG `id`); "" when a remote server does not send one."""
    contents: str
    """FlashRAG form: '"Title"\\ntext'."""
    score: float
    """Backend score (BM25 for tantivy); comparable only within one answer."""


def check_topk(topk: int) -> None:
    """Raises ValueError unless `topk` is a positive int (bool excluded)."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")


class Retriever(ABC):
    """Batched top-k search over one corpus. Subclasses set `corpus_id` in `__init__`."""

    corpus_id: str
    """Stable fingerprint of the corpus: "tantivy:<16 hex>" (hash of ids+contents) or "remote:<url>"."""

    @abstractmethod
    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """One best-first list of at most `topk` hits per query, in query order. Never blocks the event loop."""

    def search_sync(self, query: str, topk: int) -> list[Hit]:
        """Blocking single-query search for scripts, tests and data generation."""
        raise NotImplementedError(f"{type(self).__name__} has no synchronous search; use `await search(...)`")

    async def aclose(self) -> None:  # noqa: B027 — optional hook, not abstract
        """Releases executors, sessions and file handles. Idempotent."""

    @property
    def num_docs(self) -> int | None:
        """Number of documents in the corpus, or None when unknown (a remote server)."""
        return None
