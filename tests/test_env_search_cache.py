"""The env server's search cache (`env_server.retrieval.cache`, `--search-cache`): answers of the local index by
(analysed query, topk), least recently used out.

- A cached answer is exactly what a search answers (tie groups and every topk included), on each route.
- Queries that differ only in case, punctuation or stopwords share one entry; topk does not.
- A hit is answered before routing: no search, no thread job.
- The cache holds at most its size (LRU eviction); 0 turns it off; a remote retriever is never cached.
- A caller that changes its answer does not change the cache; a failed search puts nothing.
- A query string's key is remembered (bounded, long queries never), and it is the analysed key.
- /metrics counts hits and misses (`trace_env_search_cache_total`) and the entries.

Behaviour only, no timings: checks are on answers, on the scheduler's counters and on the server's metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import LiveServer, RawHTTP, SlowRetriever, metric_value

from env_server.config import load_config
from env_server.retrieval import Hit, RetrieverError, TantivyRetriever, build_index
from env_server.retrieval.cache import ALIAS_MAX_CHARS, SearchCache
from env_server.retrieval.scheduler import SearchScheduler
from env_server.service import Resources

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]

QUERIES = ["Fozan Editions", "Kelmar Press", "Bagor Embers", "publishing house founded", "Redo Hezan", "", "((("]


@pytest.fixture
async def synthetic(
    env_cache_dir: Path, env_resources: Resources
) -> AsyncIterator[tuple[TantivyRetriever, ThreadPoolExecutor]]:
    """The synthetic world's index (as the test servers' resources built it) with a pool of its own."""
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-search")
    index = TantivyRetriever(env_cache_dir / "synthetic-builtin.index", executor=pool)
    yield index, pool
    await index.aclose()
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def ties(tmp_path_factory: pytest.TempPathFactory) -> TantivyRetriever:
    """300 documents with the same text (one tie group) and one other: every answer is decided by the tie-break."""
    docs = [(f"t{i:03d}", '"Same"\ntie words here') for i in range(300)] + [("x", '"Other"\nunrelated tie')]
    path = tmp_path_factory.mktemp("ties") / "index"
    build_index(docs, path, heap_mb=64)
    return TantivyRetriever(path)


@pytest.mark.parametrize("mode", ["always", "never"])
async def test_cached_answers_are_the_searched_answers(
    synthetic: tuple[TantivyRetriever, ThreadPoolExecutor], mode: str
) -> None:
    """Each query and topk searched once (a miss), then answered from the cache: both equal `search_sync`'s."""
    index, pool = synthetic
    scheduler = SearchScheduler(index, pool, mode=mode, cache_size=1000)
    try:
        for topk in (1, 3, 7):
            want = [index.search_sync(q, topk) for q in QUERIES]
            assert await scheduler.search(QUERIES, topk) == want  # misses: searched
            assert await scheduler.search(QUERIES, topk) == want  # hits
        assert scheduler.counters.cache_miss == scheduler.counters.cache_hit == 3 * len(QUERIES)
        assert len(scheduler.cache or ()) == 3 * (len(QUERIES) - 1)  # topk is part of the key; "" and "(((" are one
    finally:
        await scheduler.aclose()
    assert any(want), "the searches found something"


async def test_tie_groups_are_cached_in_corpus_order(ties: TantivyRetriever) -> None:
    pool = ThreadPoolExecutor(1)
    scheduler = SearchScheduler(ties, pool, mode="always", cache_size=100)
    try:
        for topk in (1, 5, 20, 250, 5):
            want = ties.search_sync("tie words", topk)
            assert [h.id for h in want] == [f"t{i:03d}" for i in range(topk)]
            assert await scheduler.search(["tie words"], topk) == [want]
            assert await scheduler.search(["Tie, WORDS!"], topk) == [want]
        assert (scheduler.counters.cache_miss, scheduler.counters.cache_hit) == (4, 6)  # topk 5 the second time: hit
    finally:
        await scheduler.aclose()
        pool.shutdown(wait=True)


async def test_queries_differing_in_case_punctuation_or_stopwords_share_an_entry(
    synthetic: tuple[TantivyRetriever, ThreadPoolExecutor],
) -> None:
    index, pool = synthetic
    scheduler = SearchScheduler(index, pool, mode="never", cache_size=10)
    try:
        first = await scheduler.search(["Fozan Editions"], 3)
        jobs = scheduler.counters.jobs
        same = ["fozan editions", "FOZAN, Editions!", '"Fozan" (Editions)?', "the Fozan of editions fozan"]
        assert await scheduler.search(same, 3) == first * len(same)
        assert (scheduler.counters.cache_miss, scheduler.counters.cache_hit) == (1, len(same))
        assert scheduler.counters.thread == 1 and scheduler.counters.jobs == jobs, "a hit makes no thread job"
        assert len(scheduler.cache or ()) == 1
        await scheduler.search(["Fozan Editions house"], 3)  # another term: another entry
        assert len(scheduler.cache or ()) == 2
    finally:
        await scheduler.aclose()


async def test_the_cache_is_bounded_least_recently_used_out(
    synthetic: tuple[TantivyRetriever, ThreadPoolExecutor],
) -> None:
    index, pool = synthetic
    scheduler = SearchScheduler(index, pool, mode="always", cache_size=2)
    c = scheduler.counters

    async def search(q: str) -> str:
        before = c.cache_hit
        await scheduler.search([q], 3)
        return "hit" if c.cache_hit > before else "miss"

    try:
        assert [await search(q) for q in ("a Kelmar", "b Fozan", "a Kelmar", "c Bagor")] == [
            "miss",
            "miss",
            "hit",
            "miss",
        ]
        assert len(scheduler.cache or ()) == 2
        # "b Fozan" was the least recently used when "c Bagor" came in: it went; "a Kelmar" stayed.
        assert [await search(q) for q in ("a Kelmar", "c Bagor", "b Fozan", "a Kelmar")] == [
            "hit",
            "hit",
            "miss",
            "miss",
        ]
        assert len(scheduler.cache or ()) == 2
    finally:
        await scheduler.aclose()


async def test_an_answer_changed_by_its_caller_leaves_the_cache_as_it_was(
    synthetic: tuple[TantivyRetriever, ThreadPoolExecutor],
) -> None:
    index, pool = synthetic
    scheduler = SearchScheduler(index, pool, mode="always", cache_size=10)
    try:
        want = index.search_sync("Kelmar Press", 3)
        (got,) = await scheduler.search(["Kelmar Press"], 3)
        got.clear()
        (again,) = await scheduler.search(["Kelmar Press"], 3)
        again.append(Hit("junk", "junk", 0.0))
        assert await scheduler.search(["Kelmar Press"], 3) == [want] and scheduler.counters.cache_hit == 2
    finally:
        await scheduler.aclose()


class FailingIndex(TantivyRetriever):
    """The real index, but a search of `fail_on` raises."""

    fail_on = "Kelmar Press"

    def search_sync(self, query: str, topk: int) -> list[Hit]:
        if query == self.fail_on:
            raise RetrieverError("this query breaks the index")
        return super().search_sync(query, topk)


async def test_a_failed_search_is_not_cached(env_cache_dir: Path, env_resources: Resources) -> None:
    pool = ThreadPoolExecutor(1)
    index = FailingIndex(env_cache_dir / "synthetic-builtin.index", executor=pool)
    scheduler = SearchScheduler(index, pool, mode="never", cache_size=10)
    try:
        await scheduler.search(["Fozan Editions"], 3)
        for _ in range(2):
            with pytest.raises(RetrieverError, match="breaks the index"):
                await scheduler.search(["Fozan Editions", "Kelmar Press"], 3)
        assert (scheduler.counters.cache_hit, scheduler.counters.cache_miss) == (2, 3)  # Kelmar missed each time
        assert len(scheduler.cache or ()) == 1
        index.fail_on = ""
        assert await scheduler.search(["Kelmar Press"], 3) == [index.search_sync("Kelmar Press", 3)]
    finally:
        await scheduler.aclose()
        await index.aclose()
        pool.shutdown(wait=True)


async def cache_metrics(http: RawHTTP) -> dict[str, float]:
    text = (await http.call("GET", "/metrics")).body.decode()
    out = {r: metric_value(text, "trace_env_search_cache_total", {"result": r}) for r in ("hit", "miss")}
    out["entries"] = metric_value(text, "trace_env_search_cache_entries")
    out["searched"] = sum(metric_value(text, "trace_env_searches_total", {"where": w}) for w in ("inline", "thread"))
    return out


async def steps_and_retrieves(http: RawHTTP) -> list[object]:
    """The same searches by step, by tool call, in a batch and by /retrieve, twice over: the answers up to ids."""
    body = {"question": "Which company published Bagor Embers?", "answers": ["Sosgu Press"], "max_turns": 8}
    out: list[object] = []
    for _ in range(2):
        eid = (await http.call("POST", "/v1/episodes", body)).body["episode_id"]
        for q in QUERIES[:3]:
            r = await http.call("POST", f"/v1/episodes/{eid}/step", {"action": f"<search> {q.upper()} </search>"})
            out.append({k: v for k, v in r.body.items() if k not in ("episode_id", "snapshot_id")})
        call = {"tool_call": {"name": "search", "arguments": {"query": "kelmar press!", "topk": 5}}}
        out.append((await http.call("POST", f"/v1/episodes/{eid}/step", call)).body["observation"])
        ops = [{"op": "step", "episode_id": eid, "action": f"<search> {q} </search>"} for q in QUERIES[:2]]
        out.append([x["observation"] for x in (await http.call("POST", "/v1/batch", {"ops": ops})).body["results"]])
        out.append((await http.call("POST", "/retrieve", {"queries": QUERIES, "topk": 2})).body)
    return out


async def test_the_server_counts_hits_and_misses_and_answers_as_without_a_cache(make_env_server: Make) -> None:
    """Through HTTP: the second pass of the same searches is all hits, and every answer equals a cache-less server's.
    Misses in the first pass: 3 (steps, topk 3) + 1 (tool call, topk 5) + 7 (/retrieve, topk 2: "" and "(((" are one
    key, ((), 2), but looked up together both miss) = 11, for 10 entries; the batch's two are hits of the steps'."""
    cached, plain = await make_env_server(), await make_env_server(search_cache=0)
    assert cached.cfg.search_cache == load_config().search_cache > 0, "on by default"
    assert cached.service.search.cache is not None and plain.service.search.cache is None
    http, ref = RawHTTP(cached.url), RawHTTP(plain.url)
    try:
        assert await steps_and_retrieves(http) == await steps_and_retrieves(ref)
        searches = 3 + 1 + 2 + len(QUERIES)  # a pass: steps, tool call, batch, /retrieve
        assert await cache_metrics(http) == {"hit": 2 * searches - 11, "miss": 11, "entries": 10, "searched": 11}
        assert await cache_metrics(ref) == {"hit": 0, "miss": 0, "entries": 0, "searched": 2 * searches}
    finally:
        await http.aclose()
        await ref.aclose()


async def test_a_remote_retriever_is_never_cached(
    make_env_server: Make, make_slow_retriever: Callable[[float], Awaitable[SlowRetriever]]
) -> None:
    slow = await make_slow_retriever(0.0)
    srv = await make_env_server(resources=None, retriever_url=slow.url)
    assert srv.cfg.search_cache > 0 and srv.service.search.cache is None
    http = RawHTTP(srv.url)
    try:
        for _ in range(3):
            assert (await http.call("POST", "/retrieve", {"queries": ["Fozan"]})).status == 200
        assert slow.calls == 3
        assert await cache_metrics(http) == {"hit": 0, "miss": 0, "entries": 0, "searched": 0}
    finally:
        await http.aclose()


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="search_cache must be >= 0"):
        load_config(search_cache=-1)


def test_remembered_keys_are_the_analysed_keys_and_bounded() -> None:
    """`SearchCache.key` remembers a query string's key instead of analysing it again (the analysis was a fifth of a
    cached batched step's CPU): the remembered key is the analysed one, at most `size` are kept (oldest out), and a
    query longer than ALIAS_MAX_CHARS is analysed every time and never kept."""
    calls: list[str] = []

    def terms(query: str) -> list[tuple[str, str]]:
        calls.append(query)
        return [(w.lower(), w.lower()) for w in query.split()]

    cache = SearchCache(2, terms)
    assert cache.key("Fozan Editions", 3) == ((("fozan", "fozan"), ("editions", "editions")), 3)
    assert cache.key("Fozan Editions", 3) == cache.key("fozan editions", 3) and calls.count("Fozan Editions") == 1
    cache.key("Fozan Editions", 5)  # topk is part of the key: a third string/topk pair, the oldest goes
    assert len(cache._keys) == 2 and ("Fozan Editions", 3) not in cache._keys
    long = "word " * (ALIAS_MAX_CHARS // 5 + 1)
    assert cache.key(long, 3) == cache.key(long, 3) and calls.count(long) == 2 and (long, 3) not in cache._keys
