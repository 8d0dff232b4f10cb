"""Where the env server searches (`env_server.retrieval.scheduler`, `--search-inline`): inline on the event loop, in
the search threads, or awaited (remote), and what holds wherever it searched.

- Inline and threaded search give the same answers (steps, tool calls, /retrieve; real servers on loopback).
- "auto" sends a slow index (a stand-in that burns 3 ms of CPU per search) to the threads, and the real synthetic index
  (~0.1 ms) inline; an index that gets fast again comes back inline.
- Inline searches give the loop back between slices of `search_inline_max_ms`, even when told "always".
- A failing query fails its own request only; a remote retriever is awaited, never inline.

No timing thresholds: the checks are on which route served a search (the `trace_env_searches` metric, the scheduler's
counters) and on the order of events. The servers here run with the search cache off (`search_cache=0`), since its
hits are searched on no route; tests/test_env_search_cache.py tests the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, RawHTTP, SlowRetriever, metric_value

from env_server.retrieval import Hit, RetrieverError, TantivyRetriever
from env_server.retrieval.scheduler import COST_EVERY, COST_WINDOW, SearchScheduler
from env_server.service import Resources

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]

QUERIES = ["Fozan Editions", "Kelmar Press", "Bagor Embers", "publishing house founded", "Redo Hezan", "x" * 3000]


def index_dir(cache: Path) -> Path:
    """The synthetic world's index, as the test servers' resources built it (conftest.env_resources)."""
    return cache / "synthetic-builtin.index"


class BusyIndex(TantivyRetriever):
    """The real index, made slow the way a big one is: each search first burns `busy_s` of CPU (while `busy_s` > 0),
    and a search of `fail_on` raises."""

    busy_s = 0.0
    fail_on = "\x00fail"
    log: list[str] | None = None

    def search_sync(self, query: str, topk: int) -> list[Hit]:
        if self.log is not None:
            self.log.append("search")
        end = time.thread_time() + self.busy_s
        while time.thread_time() < end:
            pass
        if query == self.fail_on:
            raise RetrieverError("this query breaks the index")
        return super().search_sync(query, topk)


@pytest.fixture
async def busy(env_cache_dir: Path, env_resources: Resources) -> AsyncIterator[tuple[BusyIndex, Resources]]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-search")
    index = BusyIndex(index_dir(env_cache_dir), executor=pool)
    yield index, Resources(index, env_resources.datasets, pool)
    await index.aclose()
    pool.shutdown(wait=True)


async def searches(http: RawHTTP) -> dict[str, float]:
    text = (await http.call("GET", "/metrics")).body.decode()
    return {w: metric_value(text, "trace_env_searches_total", {"where": w}) for w in ("inline", "thread", "remote")}


def without_ids(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k not in ("episode_id", "snapshot_id")}


async def play(http: RawHTTP) -> list[Any]:
    """Searches of every kind, singly and in a batch; the answers up to their ids."""
    out: list[Any] = []
    body = {"question": "Which company published Bagor Embers?", "answers": ["Sosgu Press"], "max_turns": 8}
    eid = (await http.call("POST", "/v1/episodes", body)).body["episode_id"]
    for i, q in enumerate(QUERIES):
        r = await http.call("POST", f"/v1/episodes/{eid}/step", {"action": f"<search> {q} </search>"})
        out.append(without_ids(r.body))
        call = {"tool_call": {"name": "search", "arguments": {"query": q, "topk": 1 + i % 5}}}
        eid2 = (await http.call("POST", "/v1/episodes", body)).body["episode_id"]
        out.append(without_ids((await http.call("POST", f"/v1/episodes/{eid2}/step", call)).body))
    ids = [(await http.call("POST", "/v1/episodes", body)).body["episode_id"] for _ in QUERIES]
    ops = [
        {"op": "step", "episode_id": e, "action": f"<search> {q} </search>"} for e, q in zip(ids, QUERIES, strict=True)
    ]
    out.append([without_ids(x) for x in (await http.call("POST", "/v1/batch", {"ops": ops})).body["results"]])
    r = await http.call("POST", "/retrieve", {"queries": [*QUERIES, "", "((("], "topk": 4})
    out.append(r.body)
    return out


async def test_inline_and_threaded_search_give_identical_answers(make_env_server: Make) -> None:
    answers = {}
    for mode in ("always", "never"):
        srv = await make_env_server(search_inline=mode, search_cache=0)
        http = RawHTTP(srv.url)
        try:
            answers[mode] = await play(http)
            counted = await searches(http)
        finally:
            await http.aclose()
        if mode == "always":
            assert counted["inline"] >= 20 and counted["thread"] == 0, counted
        else:
            assert counted["thread"] >= 20 and counted["inline"] == 0, counted
    assert answers["always"] == answers["never"]
    assert any(x.get("info", {}).get("num_hits") for x in answers["always"][:-2]), "the searches found something"


async def test_auto_searches_the_fast_index_inline(make_env_server: Make) -> None:
    """The synthetic index answers in ~0.1 ms: after COST_EVERY searches timed in the threads, auto searches inline."""
    srv = await make_env_server(search_inline="auto", search_cache=0)
    http = RawHTTP(srv.url)
    try:
        r = await http.call(
            "POST", "/retrieve", {"queries": [f"{q} {i}" for i in range(COST_EVERY) for q in QUERIES[:1]]}
        )
        assert r.status == 200
        assert (await searches(http))["thread"] == COST_EVERY  # not timed yet: the threads
        for q in QUERIES:
            assert (await http.call("POST", "/retrieve", {"queries": [q]})).status == 200
        assert (await searches(http))["inline"] == len(QUERIES)
    finally:
        await http.aclose()


async def test_auto_sends_a_slow_index_to_the_threads(make_env_server: Make, busy: tuple[BusyIndex, Resources]) -> None:
    """An index whose searches cost 3 ms of CPU (over the 1 ms bound) is searched in the threads only: it never
    holds the event loop, and its answers are the real index's."""
    index, resources = busy
    index.busy_s = 0.003
    srv = await make_env_server(resources=resources, search_inline="auto", search_inline_max_ms=1.0, search_cache=0)
    fast = await make_env_server(search_inline="never", search_cache=0)
    http, ref = RawHTTP(srv.url), RawHTTP(fast.url)
    try:
        body = {"queries": QUERIES * 8, "topk": 2}
        r = await http.call("POST", "/retrieve", body)
        assert r.status == 200 and r.body == (await ref.call("POST", "/retrieve", body)).body
        for q in QUERIES:
            assert (await http.call("POST", "/retrieve", {"queries": [q]})).status == 200
        counted = await searches(http)
        assert counted == {"inline": 0, "thread": 9 * len(QUERIES), "remote": 0}, counted
        scheduler = srv.service.search
        assert scheduler.cost.estimate is not None and scheduler.cost.estimate > scheduler.max_inline_s
        assert scheduler.counters.jobs < counted["thread"], "queries queued together went as shared jobs"
    finally:
        await http.aclose()
        await ref.aclose()


async def test_auto_brings_an_index_back_inline_when_it_gets_fast(busy: tuple[BusyIndex, Resources]) -> None:
    index, resources = busy
    scheduler = SearchScheduler(index, resources.executor, mode="auto", max_inline_s=1e-3, threads=2)
    try:
        index.busy_s = 0.002
        await scheduler.search(QUERIES[:1] * COST_EVERY, 3)
        assert not scheduler.inline_now() and scheduler.counters.inline == 0
        index.busy_s = 0.0  # warmed up: the window fills with cheap searches, in the threads
        await scheduler.search(QUERIES[:1] * COST_WINDOW, 3)
        assert scheduler.inline_now()
        before = scheduler.counters.thread
        await scheduler.search(QUERIES, 3)
        assert scheduler.counters.inline == len(QUERIES) and scheduler.counters.thread == before
    finally:
        await scheduler.aclose()


async def test_inline_searches_give_the_loop_back_between_slices(busy: tuple[BusyIndex, Resources]) -> None:
    """Told "always", a slow index still never holds the loop for more than one slice: with 5 ms searches and a
    1 ms bound, every search after the first runs in a turn of the loop of its own (a ticker runs between any two)."""
    index, resources = busy
    index.busy_s = 0.005
    index.log = events = []
    scheduler = SearchScheduler(index, resources.executor, mode="always", max_inline_s=1e-3)
    done = False

    async def ticker() -> None:
        while not done:
            events.append("tick")
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0)
        results = await asyncio.gather(scheduler.search(QUERIES, 3), scheduler.search(QUERIES[:2], 1))
    finally:
        done = True
        await tick
        await scheduler.aclose()
    assert [len(r) for r in results] == [len(QUERIES), 2] and scheduler.counters.inline == len(QUERIES) + 2
    searched = [i for i, e in enumerate(events) if e == "search"]
    assert len(searched) == len(QUERIES) + 2
    assert all(b - a > 1 for a, b in itertools.pairwise(searched)), events


async def test_a_failing_query_fails_its_own_request_only(busy: tuple[BusyIndex, Resources]) -> None:
    index, resources = busy
    for mode in ("always", "never"):
        scheduler = SearchScheduler(index, resources.executor, mode=mode, max_inline_s=1e-3)
        try:
            calls = [scheduler.search([q, index.fail_on if i == 2 else q], 2) for i, q in enumerate(QUERIES)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await scheduler.aclose()
        assert isinstance(results[2], RetrieverError), (mode, results[2])
        ok = [r for i, r in enumerate(results) if i != 2]
        assert all(isinstance(r, list) and len(r) == 2 and r[0] == r[1] for r in ok), (mode, ok)
        assert [len(r[0]) for r in ok[:4]] == [2, 2, 2, 2]


async def test_a_remote_retriever_is_awaited_never_inline(
    make_env_server: Make, make_slow_retriever: Callable[[float], Awaitable[SlowRetriever]]
) -> None:
    slow = await make_slow_retriever(0.05)
    srv = await make_env_server(resources=None, retriever_url=slow.url, search_inline="always")
    http = RawHTTP(srv.url)
    try:
        eid = (await http.call("POST", "/v1/episodes", {"question": "q?", "answers": ["a"]})).body["episode_id"]
        r = await http.call("POST", f"/v1/episodes/{eid}/step", {"action": "<search> Fozan </search>"})
        assert r.status == 200 and "Fozan" in r.body["observation"]
        assert (await searches(http)) == {"inline": 0, "thread": 0, "remote": 1}
        assert slow.calls == 1
    finally:
        await http.aclose()


async def test_a_search_fails_rather_than_hangs_when_the_threads_are_gone(env_cache_dir: Path) -> None:
    """Searches queued for the threads while the pool shuts down (the server closing) fail with RetrieverError: none
    is left waiting for an answer that cannot come."""
    pool = ThreadPoolExecutor(1)
    index = TantivyRetriever(index_dir(env_cache_dir), executor=pool)
    scheduler = SearchScheduler(index, pool, mode="never")
    try:
        assert len((await scheduler.search(QUERIES[:2], 1))[0]) == 1
        pool.shutdown(wait=True)
        with pytest.raises(RetrieverError, match="search threads are gone"):
            await asyncio.wait_for(scheduler.search(QUERIES[:2], 1), timeout=10)
    finally:
        await scheduler.aclose()
        await index.aclose()
