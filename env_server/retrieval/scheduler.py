"""Where the env server's searches run: inline on the event loop, in the search threads, or awaited (remote).

Why inline at all: a search of the local tantivy index costs ~0.1 ms of CPU on the synthetic world (~940 passages;
`bench/bench_env.py` prints it), less than handing it to a thread. Through the thread pool a step's search took
14-20 ms under load (the server's `trace_env_search_seconds`): the hop, the executor's queue, and above all the GIL,
which the search threads and the event loop hand back and forth (a thread that wants it waits out the 5 ms switch
interval while the loop runs). Searching inline while the index answers in microseconds removes all three; a big
index, whose searches take milliseconds, keeps the threads, so the loop is never held for long.

Contract of `SearchScheduler` (the `Retriever` the server's tools and `/retrieve` call):
- A remote retriever (`--retriever-url`) is awaited as it is; nothing here runs for it but the metrics.
- With `cache_size` > 0 a local index's answers are kept in a `cache.SearchCache` (its docstring: why that is
  correct, the key, the memory bound): each query is looked up first, and a hit is answered at once, before any
  routing (no thread hop, no inline slice, no queue). Only the misses are searched as below, and their answers are
  put when delivered. Misses of one key in flight together are each searched (no merging): inline searches, the fast
  index's route, finish before the next request looks, so only thread-routed ones can overlap.
- Local searches (the index's `search_sync`) run by `mode`: "never": in the `search_threads` pool; "always": inline;
  "auto": inline while the running cost estimate of one search (the COST_QUANTILE quantile of the last COST_WINDOW
  searches, recomputed every COST_EVERY) is at most `max_inline_s`, in the threads otherwise and until COST_EVERY
  searches have been timed. So "auto" moves a slow index (a big corpus, a cold page cache, long queries) to the
  threads and a fast one back. An inline search is timed by the wall clock (`time.perf_counter`, no system call:
  exactly how long it held the loop); a threaded one by its thread's CPU time (`time.thread_time`), since its wall
  time counts the waits for the GIL while the loop runs (14-20 ms for a 0.1 ms search, measured) and would keep a
  fast index in the threads for good. Why not CPU time inline too: `time.thread_time` is a system call (~1 us on an
  idle machine, but a point where a loaded kernel switches to another process: cProfile charged it 59 us a call in
  the server under bench/bench_env.py's load, half the search it timed), while `perf_counter` is not. A search
  preempted by another process shows up as a slow wall-clock sample, which is why the estimate is a high quantile
  rather than the maximum.
- The loop is held by inline searches for at most `max_inline_s` at a time, by estimate: within one turn of the
  loop, searches run inline while the (wall-clock) time they took plus the estimate of the next stays within the
  bound; a search that does not fit waits for a later turn (its caller yields to the loop first). A single search
  slower than its estimate overruns the bound once, and its time raises the estimate.
- Searches bound for the threads queue, and queries queued together are searched together: at most `threads` jobs of
  at most SEARCH_CHUNK queries each (one hop for many queries, not one each), as the searches of a /v1/batch of steps
  or of single steps arriving in the same turn of the loop do. While anything is queued, new searches queue behind
  it (first come, first served); one flush task works the queue off (inline in slices, should "auto" have turned
  inline meanwhile).
- Hits do not depend on where a search ran (`search_sync` either way). A query that fails fails its own request
  (its `search` call) only, and that request puts none of its answers in the cache. `search_sync` (for scripts)
  bypasses the cache, which is touched only on the event loop. `aclose` cancels the flush task, waits for jobs in the
  threads, and fails what is still queued with RetrieverError; it closes neither the retriever nor the pool (their
  owner, `Resources`, does).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from env_server.retrieval.base import Hit, Retriever, RetrieverError, check_topk
from env_server.retrieval.cache import SearchCache
from env_server.retrieval.tantivy_index import SEARCH_CHUNK, TantivyRetriever

log = structlog.get_logger("env_server")

InlineMode = Literal["auto", "always", "never"]
INLINE_MODES: tuple[str, ...] = ("auto", "always", "never")

COST_WINDOW = 256
"""Searches the cost estimate looks back over: long enough for a stable quantile (the 90th is its 26th-largest sample),
short enough that a change of index speed (a cold page cache warming up) shows within a few hundred searches."""
COST_QUANTILE = 0.9
"""The quantile of recent search costs that "auto" compares with the bound: high enough that an index whose searches
often take longer than the bound goes to the threads, low enough that a few searches preempted by other processes
(wall-clock samples of several ms on a loaded machine) do not send a 0.1 ms index there."""
COST_EVERY = 32
"""The estimate is recomputed every this many samples (a sort of COST_WINDOW floats, ~10 us), and "auto" decides
only once this many searches have been timed."""


class CostWindow:
    """The last COST_WINDOW per-search costs (seconds) and their COST_QUANTILE quantile, `estimate` (None until
    COST_EVERY samples)."""

    def __init__(self, size: int = COST_WINDOW, every: int = COST_EVERY, quantile: float = COST_QUANTILE) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._every = every
        self._quantile = quantile
        self._since = 0
        self.estimate: float | None = None

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._since += 1
        if self._since >= self._every:
            self._since = 0
            xs = sorted(self._samples)
            self.estimate = xs[min(len(xs) - 1, int(self._quantile * len(xs)))]


@dataclass
class _Request:
    """One `search` call waiting for its queries' hits."""

    results: list[list[Hit] | None]
    future: asyncio.Future[list[list[Hit]]]
    left: int = 0

    def deliver(self, i: int, hits: list[Hit] | None, error: BaseException | None) -> None:
        if self.future.done():  # an earlier query of this request failed, or the caller went away
            return
        if error is not None:
            self.future.set_exception(error)
            return
        self.results[i] = hits
        self.left -= 1
        if self.left == 0:
            self.future.set_result(self.results)  # type: ignore[arg-type]  # every slot is filled


@dataclass
class _Item:
    query: str
    topk: int
    request: _Request
    index: int  # position of the query in its request


@dataclass
class SearchCounters:
    """Queries searched by route, thread jobs and cache look-ups: plain ints on the hot path (a Prometheus counter
    takes a lock per increment); `EnvService.refresh_gauges` copies them into `trace_env_searches` and
    `trace_env_search_cache` when /metrics is scraped. A cache hit is not searched, so it counts under no route."""

    inline: int = 0
    thread: int = 0
    remote: int = 0
    jobs: int = 0  # executor jobs (thread hops)
    cache_hit: int = 0
    cache_miss: int = 0


class SearchScheduler(Retriever):
    """Runs searches of `inner` inline, in `executor`'s threads or awaited (module docstring). `executor` None means
    `inner` is remote: its `search` is awaited. `cache_size` > 0 caches a local `TantivyRetriever`'s answers (that
    many entries; a remote one is never cached). `observe(seconds)` gets each `search` call's latency; `counters`
    counts the queries searched by route and the cache's hits and misses (the server copies them into its metrics
    when scraped)."""

    def __init__(
        self,
        inner: Retriever,
        executor: concurrent.futures.Executor | None,
        *,
        mode: InlineMode = "auto",
        max_inline_s: float = 1e-3,
        threads: int = 4,
        cache_size: int = 0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        if mode not in INLINE_MODES:
            raise ValueError(f"mode must be one of {INLINE_MODES}, got {mode!r}")
        if max_inline_s <= 0 or threads < 1 or cache_size < 0:
            raise ValueError(
                f"max_inline_s must be > 0, threads >= 1 and cache_size >= 0, got {max_inline_s}, {threads}, "
                f"{cache_size}"
            )
        self.cache: SearchCache | None = None
        if cache_size and executor is not None:  # local; a remote corpus could change under us: never cached
            if not isinstance(inner, TantivyRetriever):
                raise TypeError(f"only a TantivyRetriever's answers can be cached (its query_terms), got {inner!r}")
            self.cache = SearchCache(cache_size, inner.query_terms)
        self.inner = inner
        self.corpus_id = inner.corpus_id
        self.mode = mode
        self.max_inline_s = max_inline_s
        self.threads = threads
        self.cost = CostWindow()
        self.counters = SearchCounters()
        self._executor = executor
        self._observe = observe
        self._queue: collections.deque[_Item] = collections.deque()
        self._flush_task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Future[Any]] = set()
        self._slice_spent = 0.0  # seconds of inline search in this turn of the loop
        self._slice_reset_pending = False
        self._closed = False

    @property
    def num_docs(self) -> int | None:
        return self.inner.num_docs

    def search_sync(self, query: str, topk: int) -> list[Hit]:
        return self.inner.search_sync(query, topk)

    # ------------------------------------------------------------------ routing
    def inline_now(self) -> bool:
        """Whether a search would run inline now: a local one, by mode and for "auto" the cost estimate."""
        if self._executor is None:
            return False
        if self.mode != "auto":
            return self.mode == "always"
        est = self.cost.estimate
        return est is not None and est <= self.max_inline_s

    def _fits(self) -> bool:
        """Whether one more inline search fits in this turn of the loop."""
        return self._slice_spent == 0.0 or self._slice_spent + (self.cost.estimate or 0.0) <= self.max_inline_s

    def _charge(self, seconds: float) -> None:
        if not self._slice_reset_pending:  # the next turn of the loop starts a new slice
            self._slice_reset_pending = True
            asyncio.get_running_loop().call_soon(self._reset_slice)
        self._slice_spent += seconds

    def _reset_slice(self) -> None:
        self._slice_spent = 0.0
        self._slice_reset_pending = False

    def _search_inline(self, query: str, topk: int) -> list[Hit]:
        t0 = time.perf_counter()
        try:
            return self.inner.search_sync(query, topk)
        finally:
            took = time.perf_counter() - t0
            self.cost.add(took)
            self._charge(took)
            self.counters.inline += 1

    # ------------------------------------------------------------------ searching
    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        t0 = time.perf_counter()
        try:
            if self._executor is None:
                self.counters.remote += len(queries)
                return await self.inner.search(queries, topk)
            return await self._search_local(queries, topk)
        finally:
            if self._observe is not None:
                self._observe(time.perf_counter() - t0)

    async def _search_local(self, queries: list[str], topk: int) -> list[list[Hit]]:
        check_topk(topk)
        if self._closed:
            raise RetrieverError("the search scheduler is closed (the server is shutting down)")
        if not queries:
            return []
        cache = self.cache
        if cache is None:
            return await self._route(queries, topk)
        if len(queries) == 1:  # a step's search: a hit needs none of the lists below
            hits = cache.get(cache.key(queries[0], topk))
            if hits is not None:
                self.counters.cache_hit += 1
                return [hits]
        keys = [cache.key(q, topk) for q in queries]
        answers = [cache.get(k) for k in keys]
        missed = [i for i, hits in enumerate(answers) if hits is None]
        self.counters.cache_hit += len(queries) - len(missed)
        self.counters.cache_miss += len(missed)
        if missed:
            searched = await self._route([queries[i] for i in missed], topk)
            for i, hits in zip(missed, searched, strict=True):
                cache.put(keys[i], hits)
                answers[i] = hits
        return answers  # type: ignore[return-value]  # every slot is filled

    async def _route(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Search `queries` (non-empty) inline now, or queue them for the flush task (module docstring)."""
        done: list[list[Hit]] = []
        while not self._queue and len(done) < len(queries) and self.inline_now():  # nothing queued ahead: inline
            if self._fits():
                done.append(self._search_inline(queries[len(done)], topk))
                continue
            await asyncio.sleep(0)  # the loop's turn is used up: give it back, search in the next turn
            if self._closed:
                raise RetrieverError("the search scheduler is closed (the server is shutting down)")
        if len(done) == len(queries):
            return done
        loop = asyncio.get_running_loop()
        request = _Request([None] * (len(queries) - len(done)), loop.create_future(), len(queries) - len(done))
        self._queue.extend(_Item(q, topk, request, i) for i, q in enumerate(queries[len(done) :]))
        if self._flush_task is None:
            self._flush_task = asyncio.create_task(self._flush(), name="search-flush")
        return done + await request.future

    async def _flush(self) -> None:
        """Work the queue off: inline in slices of at most `max_inline_s` (the loop gets control between slices), or
        all that is queued at once as thread jobs. Ends when the queue is empty."""
        try:
            while self._queue:
                if not self.inline_now():
                    self._to_threads()
                    continue
                if not self._fits():
                    await asyncio.sleep(0)  # give the loop back; the next turn starts a new slice
                    continue
                item = self._queue.popleft()
                if item.request.future.done():  # failed already, or the caller went away
                    continue
                try:
                    hits = self._search_inline(item.query, item.topk)
                except Exception as e:  # this query's failure is its request's, not the other requests'
                    item.request.deliver(item.index, None, e)
                else:
                    item.request.deliver(item.index, hits, None)
        except Exception:  # a bug here must not leave the queued requests waiting forever
            log.exception("search flush failed; failing the queued searches")
            self._fail_queued(RetrieverError("internal error in the search scheduler; see the server log"))
        finally:
            self._flush_task = None

    def _fail_queued(self, error: RetrieverError) -> None:
        while self._queue:
            it = self._queue.popleft()
            it.request.deliver(it.index, None, error)

    def _to_threads(self) -> None:
        """Hand every queued query to the pool: at most `threads` jobs of at most SEARCH_CHUNK queries each."""
        items = [it for it in self._queue if not it.request.future.done()]
        self._queue.clear()
        if not items:
            return
        size = min(SEARCH_CHUNK, -(-len(items) // self.threads))
        loop = asyncio.get_running_loop()
        for s in range(0, len(items), size):
            chunk = items[s : s + size]
            try:
                job = loop.run_in_executor(self._executor, self._run_job, [(it.query, it.topk) for it in chunk])
            except RuntimeError as e:  # the pool is shut down (the server is closing)
                for it in chunk:
                    it.request.deliver(it.index, None, RetrieverError(f"the search threads are gone: {e}"))
                continue
            self._jobs.add(job)
            job.add_done_callback(lambda f, chunk=chunk: self._deliver_job(chunk, f))
            self.counters.jobs += 1

    def _run_job(self, queries: list[tuple[str, int]]) -> list[tuple[list[Hit] | None, Exception | None, float]]:
        """In a search thread: each query's hits (or error) and the CPU time it took."""
        out: list[tuple[list[Hit] | None, Exception | None, float]] = []
        for query, topk in queries:
            t0 = time.thread_time()
            try:
                out.append((self.inner.search_sync(query, topk), None, time.thread_time() - t0))
            except Exception as e:
                out.append((None, e, time.thread_time() - t0))
        return out

    def _deliver_job(self, chunk: list[_Item], job: asyncio.Future[Any]) -> None:
        self._jobs.discard(job)
        if job.cancelled():
            for it in chunk:
                it.request.deliver(it.index, None, RetrieverError("the search was cancelled (shutting down)"))
            return
        if (exc := job.exception()) is not None:  # the pool itself failed (shut down): every query of the job fails
            for it in chunk:
                it.request.deliver(it.index, None, RetrieverError(f"search thread pool failed: {exc!r}"))
            return
        for it, (hits, error, cpu_s) in zip(chunk, job.result(), strict=True):
            self.cost.add(cpu_s)
            it.request.deliver(it.index, hits, error)
        self.counters.thread += len(chunk)

    async def aclose(self) -> None:
        """Stop: cancel the flush task, wait for jobs in the threads, fail what is still queued."""
        self._closed = True
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        self._fail_queued(RetrieverError("the server shut down before this search ran"))

    def __repr__(self) -> str:
        return f"SearchScheduler({self.inner!r}, mode={self.mode!r}, max_inline_s={self.max_inline_s})"
