"""Retrieval: a real tantivy index on a small corpus, and a real loopback aiohttp server playing Search-R1's
retriever for RemoteRetriever. No patches."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from env_server.retrieval import (
    RETRIEVERS,
    Hit,
    RemoteRetriever,
    RetrieverError,
    TantivyRetriever,
    build_index,
    format_observation,
    read_corpus_jsonl,
)
from env_server.retrieval.tantivy_index import INDEX_META, split_contents

CORPUS = [
    ("d1", '"Varo Tessin"\nVaro Tessin was a painter born in Kelmar in 1861. Tessin was known for bold ideas.'),
    ("d2", '"Dalen Tessin"\nDalen Tessin was a poet born in Orlan in 1870.'),
    ("d3", '"Kelmar"\nKelmar is a city in Norvia, founded in 1204. Kelmar is known for its canals.'),
    ("d4", '"Kelmar Press"\nKelmar Press is a publishing house founded in 1901 by Varo Tessin.'),
    ("d5", '"Vulke"\nVulke is a city in Norvia known for its mills.'),
    ("d6", '"Vulkes"\nVulkes is a country on a chain of islands. Its capital is Orlan.'),
    ("d7", '"Orlan"\nOrlan is a city in Vulkes, founded in 1350. Orlan has old bridges.'),
    ("d8", '"Zürich Tides"\nZürich Tides is a jazz album recorded by Dalen Tessin, released in 1899.'),
]

ADVERSARIAL = [
    '"quoted phrase',
    'title:"Varo Tessin"',
    "Kelmar AND OR NOT Press",
    "AND",
    "OR OR OR",
    "NOT",
    "field:value",
    "contents:Kelmar id:d1",
    "*",
    "Kel*",
    "Kelmar~2",
    "Kelmar^10",
    "((Kelmar",
    "Kelmar))",
    "[1900 TO 2000]",
    "{a TO b}",
    "+Kelmar -Press",
    "\\",
    "'",
    "Zürich",
    "東京 北京 ٱلْعَرَبِيَّة",
    "😀🔥💯",
    "\x00\x01\x02",
    "\u200b\u200d\ufeff",
    "x" * 10_000,
    "Kelmar " * 3000,
    "".join(chr(c) for c in range(32, 127)) * 50,
    "!?.,;:-_/|<>@#$%&=",
    "<search>Kelmar</search>",
    "a" * 41 + " Kelmar",
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retrieval") / "index"
    build_index(CORPUS, path)
    return path


@pytest.fixture
async def retriever(index_dir: Path):
    r = TantivyRetriever(index_dir)
    yield r
    await r.aclose()


def ids(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


# --------------------------------------------------------------------------------------------------------------
# tantivy


def test_registry_names() -> None:
    assert RETRIEVERS == {"tantivy": TantivyRetriever, "remote": RemoteRetriever}


@pytest.mark.parametrize(
    ("query", "first"),
    [
        ("Varo Tessin", "d1"),
        ("Dalen Tessin", "d2"),
        ("Kelmar", "d3"),
        ("Kelmar Press", "d4"),
        ("who founded Kelmar Press?", "d4"),
        ("Orlan", "d7"),
        ("Zurich Tides", "d8"),  # ASCII folding: "Zürich" in the corpus
        ("zürich tides", "d8"),
    ],
)
def test_relevant_doc_ranks_first(retriever: TantivyRetriever, query: str, first: str) -> None:
    hits = retriever.search_sync(query, 3)
    assert hits[0].id == first, (query, [(h.id, h.score) for h in hits])
    assert hits[0].contents == dict(CORPUS)[first]
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_exact_title_beats_a_stem_sibling(retriever: TantivyRetriever) -> None:
    """Regression: with a stemmed title field "Vulkes" and "Vulke" are one term and tie, so the oracle query
    "Vulkes" found the city half the time. Titles are indexed unstemmed; bodies stemmed."""
    assert retriever.search_sync("Vulkes", 1)[0].id == "d6"
    assert retriever.search_sync("Vulke", 1)[0].id == "d5"


def test_ties_break_by_corpus_position(tmp_path: Path) -> None:
    """Regression: tantivy breaks equal scores by doc address, which depends on how the parallel indexer split the
    corpus into segments, so a rebuilt index (same corpus_id) could answer tied hits in another order and a restored
    snapshot would continue differently. Ties now go to the earlier corpus position, on any segment layout."""
    docs = [(f"t{i:03d}", '"Same"\ntie words here') for i in range(300)] + [("x", '"Other"\nunrelated')]
    build_index(docs, tmp_path / "ties", heap_mb=64)  # two indexing threads where there are two cores
    r = TantivyRetriever(tmp_path / "ties")
    assert ids(r.search_sync("tie words", 5)) == ["t000", "t001", "t002", "t003", "t004"]
    assert ids(r.search_sync("tie", 250))[-2:] == ["t248", "t249"]  # a tie group longer than the first fetch


def test_adversarial_queries_never_raise(retriever: TantivyRetriever) -> None:
    for q in ADVERSARIAL:
        hits = retriever.search_sync(q, 3)
        assert isinstance(hits, list) and len(hits) <= 3, q[:40]
        assert all(isinstance(h, Hit) for h in hits)
    assert ids(retriever.search_sync("Kelmar^10", 1)) == ["d3"]  # operators are punctuation, the words still count


async def test_adversarial_queries_async(retriever: TantivyRetriever) -> None:
    results = await retriever.search(ADVERSARIAL, 2)
    assert len(results) == len(ADVERSARIAL)
    assert all(len(r) <= 2 for r in results)


@pytest.mark.parametrize("query", ["", " ", "\n\t  ", "!!!", "()", "😀"])
def test_blank_or_wordless_query_returns_empty(retriever: TantivyRetriever, query: str) -> None:
    assert retriever.search_sync(query, 3) == []


def test_query_is_capped(index_dir: Path) -> None:
    r = TantivyRetriever(index_dir, max_query_chars=20, max_query_terms=3)
    assert len(r.query_terms("one two three four five six seven eight")) == 3
    assert r.query_terms("x" * 20 + " Kelmar") == [("xxxxxxxxxxxxxxxxxxxx", "xxxxxxxxxxxxxxxxxxxx")]
    assert r.query_terms("the of Kelmar") == [("kelmar", "kelmar")]  # stopwords dropped ...
    assert r.query_terms("the of") == [("the", "the"), ("of", "of")]  # ... unless nothing else is left


def test_topk_respected(retriever: TantivyRetriever) -> None:
    assert len(retriever.search_sync("Kelmar Tessin Orlan", 1)) == 1
    assert len(retriever.search_sync("Kelmar Tessin Orlan", 2)) == 2
    assert len(retriever.search_sync("city", 100)) <= len(CORPUS)
    assert len(retriever.search_sync("city", 10**12)) <= len(CORPUS)  # not a 10^12-slot heap
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="topk"):
            retriever.search_sync("Kelmar", bad)  # type: ignore[arg-type]


async def test_async_batch_equals_sync(retriever: TantivyRetriever) -> None:
    queries = ["Varo Tessin", "Kelmar", "", "Orlan city", "painter born in Kelmar", "Kelmar"]
    batched = await retriever.search(queries, 3)
    assert batched == [retriever.search_sync(q, 3) for q in queries]
    assert await retriever.search([], 3) == []


async def test_search_runs_off_the_event_loop(index_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    threads: list[str] = []
    with ThreadPoolExecutor(2, thread_name_prefix="probe") as pool:
        r = TantivyRetriever(index_dir, executor=pool)
        search_sync = r.search_sync

        def spy(q: str, k: int) -> list[Hit]:
            import threading

            threads.append(threading.current_thread().name)
            return search_sync(q, k)

        r.search_sync = spy  # type: ignore[method-assign]
        await r.search(["Kelmar", "Orlan"], 1)
        await r.aclose()  # a passed-in executor is not shut down by the retriever
        assert pool.submit(lambda: 1).result() == 1
    assert threads and all(t.startswith("probe") for t in threads)


async def test_closed_retriever_raises(index_dir: Path) -> None:
    r = TantivyRetriever(index_dir)
    await r.aclose()
    await r.aclose()  # idempotent
    with pytest.raises(RetrieverError, match="closed"):
        await r.search(["Kelmar"], 1)


def test_corpus_id_and_meta(tmp_path: Path, index_dir: Path) -> None:
    first = TantivyRetriever(index_dir)
    again = build_index(CORPUS, tmp_path / "again")
    assert again == first.corpus_id and again.startswith("tantivy:") and len(again) == len("tantivy:") + 16
    changed = [*CORPUS[:-1], ("d8", CORPUS[-1][1] + ".")]
    assert build_index(changed, tmp_path / "changed") != again
    assert build_index(CORPUS[::-1], tmp_path / "reordered") != again
    meta = json.loads((index_dir / INDEX_META).read_text())
    assert meta["corpus_id"] == again and meta["num_docs"] == len(CORPUS) == first.num_docs
    assert {"format", "built_at", "analyzer"} <= meta.keys()
    # rebuilding in place replaces the old index
    assert build_index(changed, tmp_path / "again") == TantivyRetriever(tmp_path / "again").corpus_id != again


def test_build_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notanindex").mkdir()
    (tmp_path / "notanindex" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_index(CORPUS, tmp_path / "notanindex")
    assert (tmp_path / "notanindex" / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no documents"):
        build_index([], tmp_path / "empty")
    with pytest.raises(ValueError, match="document 1"):
        build_index([("a", "x"), ("b", None)], tmp_path / "bad")  # type: ignore[list-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notanindex"], "a failed build must leave nothing behind"
    with pytest.raises(RetrieverError, match=INDEX_META):
        TantivyRetriever(tmp_path / "notanindex")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_open_or_build_reuses_an_existing_index(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": i, "contents": c} for i, c in CORPUS])
    index = tmp_path / "corpus.index"
    r1 = TantivyRetriever.open_or_build(corpus, index)
    assert r1.num_docs == len(CORPUS) and r1.corpus_id == TantivyRetriever.open_or_build(corpus, index).corpus_id
    built_at = (index / INDEX_META).stat().st_mtime_ns
    r2 = TantivyRetriever.open_or_build(corpus, index)
    assert (index / INDEX_META).stat().st_mtime_ns == built_at, "an up-to-date index must not be rebuilt"
    assert r2.search_sync("Kelmar Press", 1)[0].id == "d4"
    # a changed corpus (other size) is rebuilt and gets another corpus_id
    write_jsonl(corpus, [{"id": i, "contents": c} for i, c in CORPUS[:3]])
    r3 = TantivyRetriever.open_or_build(corpus, index)
    assert r3.num_docs == 3 and r3.corpus_id != r1.corpus_id
    # r1 opened the replaced index and still reads it (memory-mapped, unlinked files stay readable)
    assert r1.search_sync("Orlan", 1)[0].id == "d7"


def test_read_corpus_jsonl(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"id": "a", "contents": "\\"T\\"\\nx"}\n\n{"id": 7, "title": "Paris", "text": "capital", "extra": 1}\n'
    )
    assert list(read_corpus_jsonl(good)) == [("a", '"T"\nx'), ("7", '"Paris"\ncapital')]
    cases = {
        '{"id": "b", "contents": "ok"}\n{"id": "c", "contents": "broken\n': r":2: not valid JSON",
        '{"id": "b", "contents": "ok"}\n\n["a list"]\n': r":3: expected a JSON object",
        '{"contents": "no id"}\n': r":1: 'id' must be",
        '{"id": "x", "title": "T"}\n': r":1: needs a string 'contents'.*\['id', 'title'\]",
        '{"id": "x", "contents": 5}\n': r":1: 'contents' must be a string",
    }
    for text, pattern in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            list(read_corpus_jsonl(bad))


def test_split_contents() -> None:
    assert split_contents('"Paris"\nParis is\na city') == ("Paris", "Paris is\na city")
    assert split_contents("no newline") == ("", "no newline")
    assert split_contents('"Q" "uote"\ntext') == ('Q" "uote', "text")


def test_format_observation_matches_search_r1() -> None:
    hits = [
        Hit("1", '"Paris"\nParis is the capital of France.', 3.0),
        Hit("2", '"Seine"\nThe Seine flows.\nIt is long.', 2.0),
        Hit("3", "no title line", 1.0),
    ]
    assert format_observation(hits) == (
        'Doc 1(Title: "Paris") Paris is the capital of France.\n'
        'Doc 2(Title: "Seine") The Seine flows.\nIt is long.\n'
        "Doc 3(Title: no title line) \n"
    )
    assert format_observation([]) == ""


# --------------------------------------------------------------------------------------------------------------
# remote: a loopback aiohttp server in Search-R1's shape


class FakeSearchR1:
    """Answers /retrieve like Search-R1's server, from the tantivy index; `mode` makes it misbehave."""

    def __init__(self, index_dir: Path) -> None:
        self.index = TantivyRetriever(index_dir)
        self.mode = "ok"
        self.fail_first = 0
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def retrieve(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)
            return await self._answer(body)
        finally:
            self.in_flight -= 1

    async def _answer(self, body: dict) -> web.Response:
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "not_json":
            return web.Response(text="<html>oops</html>")
        if self.mode == "wrong_count":
            return web.json_response({"result": []})
        if self.mode == "bad_score":
            doc = {"document": {"id": "1", "contents": "x"}, "score": "high"}
            return web.json_response({"result": [[doc] for _ in body["queries"]]})
        if self.mode == "bad_request":
            return web.Response(status=422, text="queries must be a list")
        hits = await self.index.search(body["queries"], body["topk"])
        result = [
            [{"document": {"id": h.id, "contents": h.contents, "extra": 1}, "score": h.score} for h in hs]
            for hs in hits
        ]
        if self.mode == "no_ids":  # Search-R1's own BM25 server: title/text/contents, no id
            result = [[{"document": {"title": "T", "text": "x"}, "score": 1}] for _ in body["queries"]]
        return web.json_response({"result": result})


@pytest.fixture
async def fake_server(index_dir: Path):
    fake = FakeSearchR1(index_dir)
    app = web.Application()
    app.router.add_post("/retrieve", fake.retrieve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()
    await fake.index.aclose()


async def test_remote_matches_local(fake_server, index_dir: Path) -> None:
    fake, url = fake_server
    remote = RemoteRetriever(url + "/retrieve/")  # a full endpoint URL, as Search-R1 configs have it
    try:
        assert remote.corpus_id == RemoteRetriever(url).corpus_id == f"remote:{url}/retrieve"
        assert remote.num_docs is None
        queries = ["Kelmar Press", "", "Varo Tessin", "   "]
        got = await remote.search(queries, 2)
        local = TantivyRetriever(index_dir)
        assert got == [local.search_sync(q, 2) for q in queries]
        assert fake.requests == [{"queries": ["Kelmar Press", "Varo Tessin"], "topk": 2, "return_scores": True}]
        assert await remote.search(["", " "], 2) == [[], []] and len(fake.requests) == 1  # blanks never sent
        with pytest.raises(NotImplementedError):
            remote.search_sync("Kelmar", 1)
        fake.mode = "no_ids"
        assert await remote.search(["Kelmar"], 1) == [[Hit("", '"T"\nx', 1.0)]]
    finally:
        await remote.aclose()


async def test_remote_retries_a_500_then_succeeds(fake_server) -> None:
    fake, url = fake_server
    fake.fail_first = 2
    remote = RemoteRetriever(url, retries=2, backoff_s=0.01)
    try:
        assert (await remote.search(["Orlan"], 1))[0][0].id == "d7"
        assert len(fake.requests) == 3
        fake.fail_first = 3
        with pytest.raises(RetrieverError, match=r"after 3 attempts.*HTTP 500"):
            await remote.search(["Orlan"], 1)
    finally:
        await remote.aclose()


@pytest.mark.parametrize(
    ("mode", "pattern"),
    [
        ("not_json", "not JSON"),
        ("wrong_count", '"result" has 0 lists for 1 queries'),
        ("bad_score", r"result\[0\]\[0\]\.score is 'high'"),
        ("bad_request", "HTTP 422"),
    ],
)
async def test_remote_garbage_raises_named_error(fake_server, mode: str, pattern: str) -> None:
    fake, url = fake_server
    fake.mode = mode
    remote = RemoteRetriever(url, retries=2, backoff_s=0.01)
    try:
        with pytest.raises(RetrieverError, match=pattern):
            await remote.search(["Kelmar"], 1)
        assert len(fake.requests) == 1, "a malformed answer or a 4xx is not retried"
    finally:
        await remote.aclose()


async def test_remote_down_raises_after_retries() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = RemoteRetriever(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=2)
    try:
        with pytest.raises(RetrieverError, match=f"127.0.0.1:{port}/retrieve failed after 2 attempts"):
            await remote.search(["Kelmar"], 1)
    finally:
        await remote.aclose()
    with pytest.raises(RetrieverError, match="closed"):
        await remote.search(["Kelmar"], 1)


async def test_remote_bounds_concurrency(fake_server) -> None:
    fake, url = fake_server
    remote = RemoteRetriever(url, max_concurrency=2)
    try:
        results = await asyncio.gather(*(remote.search([f"Kelmar {i}"], 1) for i in range(10)))
        assert all(r[0][0].id == "d3" for r in results) and len(fake.requests) == 10
        assert fake.max_in_flight == 2
    finally:
        await remote.aclose()


def test_remote_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="http"):
        RemoteRetriever("localhost:8000")
    with pytest.raises(ValueError, match="max_concurrency=0"):
        RemoteRetriever("http://x", max_concurrency=0)
