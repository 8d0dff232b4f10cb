"""A Search-R1-style retrieval server as the search backend (`--retriever-url`).

Wire shape (Search-R1 `search_r1/search/retrieval_server.py`): `POST <url>/retrieve` with
`{"queries": [..], "topk": k, "return_scores": true}` answers `{"result": [[{"document": {"id", "contents", ..},
"score": s}, ..], ..]}`, one list per query. `url` may be the server root or the full `.../retrieve` endpoint (Search-R1
configs use the latter). Search-R1's own BM25 server sends documents without "id" (then `Hit.id` is "") and with
"title"/"text" besides "contents"; a document with only "title" and "text" gets contents '"title"\\ntext'.

Contracts: one aiohttp session (created on first use inside the running loop, closed by `aclose`); at most
`max_concurrency` requests in flight; batches over `MAX_BATCH` queries split into concurrent requests. Blank queries
are answered [] locally and never sent; queries are cut to `max_query_chars`. Connection errors (any aiohttp.ClientError), timeouts
(`timeout_s` per attempt, connecting included) and 5xx answers are retried `retries` times (`shared.retry`) with
exponential backoff starting at `backoff_s`; when the attempts run out, `RetrieverError` says how many were made, the
timeout of each and the last error. A 4xx or a malformed answer raises `RetrieverError` at once, naming the URL and
what was wrong. Lists longer than `topk` are cut to `topk`. `worst_case_s` is the longest one request can take
(every attempt timing out, plus the waits between them): a retriever that accepts connections and never answers
holds a step (and its episode's lock) that long.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import aiohttp

from env_server.retrieval.base import Hit, Retriever, RetrieverError, check_topk
from shared.retry import SERVER_ERRORS, RetryPolicy, StatusError, with_retries

MAX_BATCH = 128
"""Queries per HTTP request; larger batches are split so one huge batch neither times out nor hogs the server."""


class RemoteRetriever(Retriever):
    """Search through a Search-R1-compatible `/retrieve` server."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 15.0,
        max_concurrency: int = 16,
        retries: int = 2,
        backoff_s: float = 0.25,
        max_query_chars: int = 1000,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retriever url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or max_concurrency < 1 or retries < 0 or backoff_s < 0 or max_query_chars < 1:
            raise ValueError(
                f"bad RemoteRetriever settings: timeout_s={timeout_s} max_concurrency={max_concurrency} "
                f"retries={retries} backoff_s={backoff_s} max_query_chars={max_query_chars}"
            )
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/retrieve") else f"{base}/retrieve"
        self.corpus_id: str = f"remote:{self.endpoint}"
        self.timeout_s = timeout_s
        # ceil_threshold=inf: aiohttp would otherwise round a timeout of 5 s or more up to the next whole second.
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, ceil_threshold=math.inf)
        self.retries = retries
        self.backoff_s = backoff_s
        # Refused/reset connections, truncated bodies, timeouts and 5xx answers; never a 4xx or a malformed answer.
        self._retry = RetryPolicy(
            retries + 1, backoff_s, errors=(TimeoutError, aiohttp.ClientError), statuses=SERVER_ERRORS
        )
        self.max_query_chars = max_query_chars
        self._max_concurrency = max_concurrency
        self._semaphore: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def worst_case_s(self) -> float:
        """The longest one request can take: every attempt times out, with the backoff waits between them."""
        return self._retry.attempts * self.timeout_s + sum(
            self._retry.wait_s(n) for n in range(1, self._retry.attempts)
        )

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RetrieverError(f"RemoteRetriever({self.endpoint}) is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=self._max_concurrency)
            )
            self._semaphore = asyncio.Semaphore(self._max_concurrency)
        return self._session

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        check_topk(topk)
        for q in queries:
            if not isinstance(q, str):
                raise TypeError(f"query must be str, got {type(q).__name__}: {q!r:.80}")
        session = self._ensure_session()
        results: list[list[Hit]] = [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if q.strip()]
        chunks = [todo[s : s + MAX_BATCH] for s in range(0, len(todo), MAX_BATCH)]
        answers = await asyncio.gather(
            *(self._retrieve(session, [queries[i][: self.max_query_chars] for i in chunk], topk) for chunk in chunks)
        )
        for chunk, answer in zip(chunks, answers, strict=True):
            for i, hits in zip(chunk, answer, strict=True):
                results[i] = hits
        return results

    async def _retrieve(self, session: aiohttp.ClientSession, queries: list[str], topk: int) -> list[list[Hit]]:
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        assert self._semaphore is not None
        semaphore = self._semaphore

        async def once() -> bytes:
            async with semaphore, session.post(self.endpoint, json=payload) as resp:
                body = await resp.read()
            if resp.status >= 500:
                raise StatusError(resp.status, f"{body[:200]!r}")
            if resp.status != 200:
                raise RetrieverError(f"{self.endpoint} answered HTTP {resp.status}: {body[:300]!r}")
            return body

        try:
            body = await with_retries(self._retry, once, event="retriever_retry", endpoint=self.endpoint)
        except (StatusError, TimeoutError, aiohttp.ClientError) as e:  # all transient: the attempts ran out
            if isinstance(e, TimeoutError):
                last_error = f"no answer within {self.timeout_s:g} s"
            else:
                last_error = str(e) if isinstance(e, StatusError) else f"{type(e).__name__}: {e}"
            raise RetrieverError(
                f"{self.endpoint} failed after {self._retry.attempts} attempts (timeout {self.timeout_s:g} s each, "
                f"retries={self.retries}); last error: {last_error}"
            ) from e
        return self._parse(body, len(queries), topk)

    def _parse(self, body: bytes, n: int, topk: int) -> list[list[Hit]]:
        def bad(what: str) -> RetrieverError:
            return RetrieverError(f"{self.endpoint} answered a malformed result: {what}; body starts {body[:200]!r}")

        try:
            obj = json.loads(body)
        except ValueError as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("result"), list):
            raise bad('expected an object with a "result" list')
        result = obj["result"]
        if len(result) != n:
            raise bad(f'"result" has {len(result)} lists for {n} queries')
        out = []
        for qi, items in enumerate(result):
            if not isinstance(items, list):
                raise bad(f"result[{qi}] is {type(items).__name__}, not a list")
            hits = []
            for hi, item in enumerate(items[:topk]):
                where = f"result[{qi}][{hi}]"
                if not isinstance(item, dict) or not isinstance(item.get("document"), dict):
                    raise bad(f'{where} is not {{"document": {{..}}, "score": ..}}')
                hits.append(
                    Hit(
                        id=_doc_id(item["document"], where, bad),
                        contents=_contents(item, where, bad),
                        score=_score(item, where, bad),
                    )
                )
            out.append(hits)
        return out

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"RemoteRetriever({self.endpoint!r})"


def _doc_id(doc: dict[str, Any], where: str, bad: Callable[[str], RetrieverError]) -> str:
    doc_id = doc.get("id", "")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        return str(doc_id)
    if not isinstance(doc_id, str):
        raise bad(f"{where}.document.id is {type(doc_id).__name__}, not a string")
    return doc_id


def _contents(item: dict[str, Any], where: str, bad: Callable[[str], RetrieverError]) -> str:
    doc = item["document"]
    contents = doc.get("contents")
    if isinstance(contents, str):
        return contents
    title, text = doc.get("title"), doc.get("text")
    if contents is None and isinstance(title, str) and isinstance(text, str):
        return f'"{title}"\n{text}'
    raise bad(f'{where}.document has no string "contents" (nor "title" and "text"); keys {sorted(doc)}')


def _score(item: dict[str, Any], where: str, bad: Callable[[str], RetrieverError]) -> float:
    score = item.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise bad(f"{where}.score is {score!r:.40}, not a finite number")
    return float(score)
