"""BM25 search over an on-disk tantivy index: the env server's built-in search backend.

Why tantivy, not bm25s (measured by `bench/bench_search.py`; full table in its docstring; 2 shared cores): per
query tantivy costs 4-13x less CPU (50k synthetic-world passages: 0.37 vs 1.65 ms; 200k wiki-like passages: 0.65
vs 8.4 ms, the gap widening with the corpus), indexes 3-4x faster in 2-6x less memory (bm25s's build peak: 773 MB
at 200k passages, growing with the corpus) and opens in ~1 ms at any size (bm25s: 37-175 ms, growing), because the
index is memory-mapped and costs RAM only for the pages queries touch. bm25s scores each query into a dense array
of one float per document (an O(N) pass on top of the posting lists); tantivy walks only the query terms' posting
lists with block-max WAND. Its searcher releases the GIL, so searches run in a bounded thread pool beside the event
loop.

Index layout (`index_dir/`): tantivy's files plus `trace_index.json` = {format, corpus_id, num_docs, built_at,
analyzer, tantivy, source}. Fields: `id` (stored; raw-indexed, so a document can be found by id), `title` and `body` (analysed, not
stored), `contents` (stored bytes, exactly the corpus text), `ord` (fast u64: the document's position in the corpus,
the tie-break between equal scores). `title` is the first line of `contents` with the
FlashRAG quotes stripped, `body` the rest (a one-line `contents` is all body).

Queries are never parsed as query syntax: the text is cut to `max_query_chars`, analysed with the index's own
analyzers (tantivy's simple tokenizer, tokens of 40 bytes or more dropped, lowercase, ASCII folding; stemmed for the
body), English stopwords dropped unless that leaves nothing (they cost long posting lists and add little to BM25),
duplicates dropped, capped at `max_query_terms`, and searched as a disjunction of term queries over title
(unstemmed, weight TITLE_BOOST) and body (stemmed), scored with BM25 and summed. So any string is safe: operators,
quotes and brackets are punctuation the tokenizer skips. Blank (or wordless) queries return [].

`corpus_id` = "tantivy:" + the first 16 hex digits of sha256 over the (id, contents) pairs in order, computed at
build time: the same corpus rebuilt gives the same id; any changed id, text or order gives another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import hashlib
import heapq
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tantivy

from env_server.jsonl import iter_objects
from env_server.retrieval.base import Hit, Retriever, RetrieverError, check_topk

INDEX_META = "trace_index.json"
FORMAT_VERSION = 2
"""Bump when the schema or analyzer changes; open_or_build rebuilds older indexes, the retriever refuses them.
2: the `ord` fast field (deterministic tie-breaks)."""

TIE_FETCH_CAP = 4096
"""Most candidates one search fetches to order a tie at the k-th place (see `TantivyRetriever._top`). A tie group that runs
past it (thousands of documents with bit-identical scores at the cut) is ordered by tantivy's doc address, which is
not stable across rebuilds."""

TITLE_BOOST = 1.0
"""Weight of a title match relative to a body match. Entity names are titles: in the synthetic world the passage
about entity X mentions other entities, and other passages mention X, so a query naming X must rank X's own passage
first. Having a separate title field is what matters; its weight does not. Measured on the synthetic world (seed 0,
size 1000: 3,120 passages, 5,667 train+dev questions): with the title weighted 0 (body only), "title + extra words"
queries find the entity at rank 1 96.1% of the time and raw question texts have the first-hop passage in the top 3
98.3%; with weights 1, 1.5, 2 or 3: 100% and 99.95%, and raw question -> first-hop at rank 1 92.2-92.3% for all four.
So 1: the least departure from plain BM25 (Search-R1's pyserini index scores title+text as one field), and no
BoostQuery. A BoostQuery costs no measurable CPU (weight 2: 0.68 ms of CPU a query, weight 1: 0.84 ms, on 50k
wiki-like passages: noise), so raising it later is free."""

TITLE_ANALYZER = "trace_en_v1"
"""Title field: simple tokenizer, long tokens dropped, lowercase, ASCII folding; NOT stemmed. Stemmed titles
conflate names that differ by a suffix, and the synthetic world has such pairs ("Vulke"/"Vulkes", "Kruti Lanterns"/
"Krutis Lanterns"): with stemmed titles 3 of 3,120 title queries lost a tie (oracle queries at rank 1: 99.83%),
unstemmed none (100%). tests/test_retrieval.py guards it."""
BODY_ANALYZER = "trace_en_stem_v1"
"""Body field: the same plus English Snowball stemming, for morphological variants in real corpora ("founded" /
"founding", "rivers" / "river"), as Search-R1's pyserini BM25 (Porter) does. A query term is searched as itself
in the title and stemmed in the body."""
ANALYZER = f"title={TITLE_ANALYZER},body={BODY_ANALYZER}"
"""Recorded in trace_index.json; an index built with other analyzers is rebuilt/refused."""

SEARCH_CHUNK = 16
"""Most queries one executor job runs: batches amortise the hand-off, single queries are not held back long."""

DOC_CACHE_SIZE = 8192
"""Stored documents (id, contents) kept per retriever, least recently used out: materialising one from the index
(`Searcher.doc` + its fields) cost ~3-8 us, a third of the ~20 us it took to turn a search's 3 addresses into hits.
A wiki passage is ~0.7 KB, so the cache holds ~6 MB at most; the index never changes under an open retriever (its
searcher is fixed at open), so a cached document is never stale. The retriever never caches whole answers; the env
server does, before it routes a search (`cache.SearchCache`, keyed by `query_terms`)."""

_MAX_TOKEN_BYTES = 40  # tantivy's default: longer tokens (URLs, base64 junk) are dropped, at index and query time


def _analyzer(*, stem: bool, stopwords: bool = False) -> tantivy.TextAnalyzer:
    builder = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(_MAX_TOKEN_BYTES))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
    )
    if stopwords:
        builder = builder.filter(tantivy.Filter.stopword("english"))
    if stem:
        builder = builder.filter(tantivy.Filter.stemmer("english"))
    return builder.build()


def _register_analyzers(index: tantivy.Index) -> None:
    index.register_tokenizer(TITLE_ANALYZER, _analyzer(stem=False))
    index.register_tokenizer(BODY_ANALYZER, _analyzer(stem=True))


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_text_field("title", tokenizer_name=TITLE_ANALYZER, index_option="freq")
    builder.add_text_field("body", tokenizer_name=BODY_ANALYZER, index_option="freq")
    builder.add_bytes_field("contents", stored=True)
    builder.add_unsigned_field("ord", fast=True)  # position in the corpus: the tie-break
    return builder.build()


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG '"Title"\\ntext' -> ("Title", "text"); a one-line contents is ("", contents)."""
    first, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents
    title = first.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, rest


def _read_meta(index_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((index_dir / INDEX_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def build_index(
    docs: Iterable[tuple[str, str]],
    index_dir: Path,
    *,
    progress: bool = False,
    total: int | None = None,
    heap_mb: int = 256,
    source: dict[str, Any] | None = None,
) -> str:
    """Builds an on-disk BM25 index from (id, contents) pairs; returns corpus_id.

    Writes `index_dir/trace_index.json` (format, corpus_id, num_docs, built_at, analyzer, source). Atomic: builds in
    a sibling temporary directory and renames it into place, so a crash leaves the previous index (or none), never a
    half-built one. Replaces an existing index; refuses to replace a non-empty directory that is not one. `source`
    is recorded for `TantivyRetriever.open_or_build` (the corpus file's path, size and mtime). Ids are not checked
    for uniqueness (a set of 21M ids costs gigabytes); an empty corpus, a non-str id or contents raise ValueError.
    """
    index_dir = Path(index_dir)
    if heap_mb < 16:
        raise ValueError(f"heap_mb must be >= 16 (tantivy needs 15 MB per indexing thread), got {heap_mb}")
    if index_dir.exists() and not (index_dir / INDEX_META).exists() and any(index_dir.iterdir()):
        raise FileExistsError(f"{index_dir} exists, is not empty and holds no {INDEX_META}: refusing to replace it")
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.building-", dir=index_dir.parent))
    try:
        corpus_id, num_docs = _write_index(docs, tmp, heap_mb=heap_mb, progress=progress, total=total)
        meta = {
            "format": FORMAT_VERSION,
            "corpus_id": corpus_id,
            "num_docs": num_docs,
            "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "analyzer": ANALYZER,
            "tantivy": getattr(tantivy, "__version__", "unknown"),
            "source": source,
        }
        (tmp / INDEX_META).write_text(json.dumps(meta, indent=1) + "\n")
        _swap_into_place(tmp, index_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return corpus_id


def _write_index(
    docs: Iterable[tuple[str, str]], path: Path, *, heap_mb: int, progress: bool, total: int | None
) -> tuple[str, int]:
    """Indexes `docs` into the empty directory `path`; returns (corpus_id, num_docs). On error, rolls the writer
    back and joins its threads before raising, so no indexing thread writes into `path` after we return."""
    index = tantivy.Index(_schema(), path=str(path))
    _register_analyzers(index)
    threads = max(1, min(8, os.cpu_count() or 1, heap_mb // 32))
    writer = index.writer(heap_size=heap_mb * 1_000_000, num_threads=threads)
    digest = hashlib.sha256()
    num_docs = 0
    try:
        it: Iterable[tuple[str, str]] = docs
        if progress:
            from tqdm import tqdm

            it = tqdm(docs, total=total, desc=f"indexing {path.name}", unit="doc", mininterval=2.0)
        for doc_id, contents in it:
            if not isinstance(doc_id, str) or not isinstance(contents, str):
                raise ValueError(
                    f"document {num_docs}: id and contents must be str, got {type(doc_id).__name__} "
                    f"{doc_id!r:.80} and {type(contents).__name__}"
                )
            id_b, contents_b = doc_id.encode(), contents.encode()
            digest.update(len(id_b).to_bytes(8, "little") + id_b + len(contents_b).to_bytes(8, "little") + contents_b)
            title, body = split_contents(contents)
            doc = tantivy.Document()
            doc.add_text("id", doc_id)
            doc.add_text("title", title)
            doc.add_text("body", body)
            doc.add_bytes("contents", contents_b)
            doc.add_unsigned("ord", num_docs)
            writer.add_document(doc)
            num_docs += 1
        if num_docs == 0:
            raise ValueError("no documents to index")
        writer.commit()
    except BaseException:
        writer.rollback()
        writer.wait_merging_threads()
        raise
    writer.wait_merging_threads()
    return f"tantivy:{digest.hexdigest()[:16]}", num_docs


def _swap_into_place(tmp: Path, index_dir: Path) -> None:
    """Renames `tmp` to `index_dir`, moving an old index aside first (POSIX cannot swap non-empty dirs in one step).
    Processes that have the old index open keep reading it: its files are memory-mapped and unlinked, not gone."""
    if not index_dir.exists():
        os.rename(tmp, index_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.old-", dir=index_dir.parent))
    os.rename(index_dir, old / "index")
    os.rename(tmp, index_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_corpus_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """Streams (id, contents) from a FlashRAG corpus jsonl: one {"id", "contents"} object per line, or {"id",
    "title", "text"} (then contents = '"title"\\ntext'). An int id becomes its str. Blank lines are skipped. A bad line
    raises ValueError naming the file, the line number and what is wrong."""
    for where, obj in iter_objects(path):
        doc_id = obj.get("id")
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError(f"{where}: 'id' must be a non-empty string or int, got {doc_id!r:.80}")
        contents = obj.get("contents")
        if contents is None:
            title, text = obj.get("title"), obj.get("text")
            if not isinstance(title, str) or not isinstance(text, str):
                raise ValueError(
                    f"{where}: needs a string 'contents', or string 'title' and 'text'; has keys {sorted(obj)}"
                )
            contents = f'"{title}"\n{text}'
        elif not isinstance(contents, str):
            raise ValueError(f"{where}: 'contents' must be a string, got {type(contents).__name__}")
        yield doc_id, contents


class TantivyRetriever(Retriever):
    """BM25 over an index built by `build_index`. Opens memory-mapped (milliseconds, RAM only for touched pages).

    Searches run in `executor`; without one the retriever owns a bounded pool (min(4, cpus) threads) and shuts it
    down in `aclose`. A passed-in executor is the caller's to shut down.
    """

    def __init__(
        self,
        index_dir: Path,
        *,
        executor: concurrent.futures.Executor | None = None,
        max_query_chars: int = 1000,
        max_query_terms: int = 64,
    ) -> None:
        if max_query_chars < 1 or max_query_terms < 1:
            raise ValueError(
                f"max_query_chars and max_query_terms must be >= 1, got {max_query_chars}, {max_query_terms}"
            )
        self.index_dir = Path(index_dir)
        meta = _read_meta(self.index_dir)
        if meta is None:
            raise RetrieverError(f"{self.index_dir} holds no readable {INDEX_META}: build it with build_index()")
        if meta.get("format") != FORMAT_VERSION or meta.get("analyzer") != ANALYZER:
            raise RetrieverError(
                f"{self.index_dir} has index format {meta.get('format')!r} / analyzer {meta.get('analyzer')!r}; "
                f"this code reads format {FORMAT_VERSION} / {ANALYZER}: rebuild it (open_or_build does so)"
            )
        try:
            self._index = tantivy.Index.open(str(self.index_dir))
            _register_analyzers(self._index)
            self._searcher = self._index.searcher()
        except ValueError as e:
            raise RetrieverError(f"cannot open tantivy index {self.index_dir}: {e}") from e
        self._schema = self._index.schema
        self.corpus_id: str = meta["corpus_id"]
        self.meta = meta
        self._num_docs: int = self._searcher.num_docs
        if self._num_docs != meta["num_docs"]:
            raise RetrieverError(
                f"{self.index_dir}: index has {self._num_docs} docs, {INDEX_META} says {meta['num_docs']}"
            )
        self._analyzers = {
            (stem, stop): _analyzer(stem=stem, stopwords=stop).analyze
            for stem in (False, True)
            for stop in (False, True)
        }
        self.max_query_chars = max_query_chars
        self.max_query_terms = max_query_terms
        self._stored = functools.lru_cache(maxsize=DOC_CACHE_SIZE)(self._load_stored)  # thread-safe, bounded
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tantivy-search"
        )
        self._closed = False

    @classmethod
    def open_or_build(
        cls, corpus: Path, index_dir: Path, *, progress: bool = False, heap_mb: int = 256, **kwargs: Any
    ) -> TantivyRetriever:
        """Opens `index_dir` if it was built from `corpus` as it is now (same size and mtime, current format);
        otherwise (re)builds it from the corpus jsonl first. `kwargs` go to `__init__`."""
        corpus, index_dir = Path(corpus), Path(index_dir)
        st = corpus.stat()
        source = {"path": str(corpus.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        meta = _read_meta(index_dir)
        fresh = (
            meta is not None
            and meta.get("format") == FORMAT_VERSION
            and meta.get("analyzer") == ANALYZER
            and isinstance(meta.get("source"), dict)
            and meta["source"].get("size") == source["size"]
            and meta["source"].get("mtime_ns") == source["mtime_ns"]
        )
        if not fresh:
            build_index(read_corpus_jsonl(corpus), index_dir, progress=progress, heap_mb=heap_mb, source=source)
        return cls(index_dir, **kwargs)

    @property
    def num_docs(self) -> int:
        return self._num_docs

    def query_terms(self, query: str) -> list[tuple[str, str]]:
        """The (title term, body term) pairs `query` is searched as: analysed (the body term is the title term
        stemmed), stopwords dropped unless that leaves nothing, duplicates dropped in order, at most
        `max_query_terms`. [] for a blank or all-punctuation query."""
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}: {query!r:.80}")
        text = query[: self.max_query_chars]
        if not text or text.isspace():
            return []
        without_stopwords = self._analyzers[False, True](text)
        stop = bool(without_stopwords)
        exact = without_stopwords if stop else self._analyzers[False, False](text)
        stemmed = self._analyzers[True, stop](text)
        if len(stemmed) != len(exact):  # the stemmer maps token to token; never seen, but do not trust a zip
            stemmed = [next(iter(self._analyzers[True, False](t)), t) for t in exact]
        return list(dict.fromkeys(zip(exact, stemmed, strict=True)))[: self.max_query_terms]

    def _query(self, terms: list[tuple[str, str]]) -> tantivy.Query:
        should = tantivy.Occur.Should
        clauses = []
        for title_term, body_term in terms:
            title = tantivy.Query.term_query(self._schema, "title", title_term, index_option="freq")
            if TITLE_BOOST != 1.0:
                title = tantivy.Query.boost_query(title, TITLE_BOOST)
            clauses.append((should, title))
            clauses.append((should, tantivy.Query.term_query(self._schema, "body", body_term, index_option="freq")))
        return tantivy.Query.boolean_query(clauses)

    def search_sync(self, query: str, topk: int) -> list[Hit]:
        """Top-`topk` hits for one query, best first; [] for a blank (or all-punctuation) query. Blocks."""
        check_topk(topk)
        terms = self.query_terms(query)
        if not terms:
            return []
        try:
            top = self._top(self._query(terms), topk)
            stored = self._stored
            hits = []
            for score, address in top:
                doc_id, contents = stored(address.segment_ord, address.doc)
                hits.append(Hit(id=doc_id, contents=contents, score=score))
        except ValueError as e:
            raise RetrieverError(f"tantivy search failed for terms {terms[:8]}: {e}") from e
        return hits

    def _load_stored(self, segment_ord: int, doc: int) -> tuple[str, str]:
        """(id, contents) of the document at this address, read from the index (`_stored` caches it)."""
        stored = self._searcher.doc(tantivy.DocAddress(segment_ord, doc))
        return stored.get_first("id"), stored.get_first("contents").decode()

    def _top(self, query: tantivy.Query, topk: int) -> list[tuple[float, tantivy.DocAddress]]:
        """The best `topk` (score, address) pairs, ties broken by corpus position, so the answer depends only on the
        corpus, never on how the indexer split it into segments (tantivy breaks ties by doc address). Fetches past
        the k-th place until a strictly lower score shows the tie group at the cut is complete (or TIE_FETCH_CAP)."""
        n = self._num_docs
        # min(): tantivy sizes its top-k heap by the limit, so an absurd topk must not become an allocation.
        limit = min(topk + 16, n)  # a wider first fetch costs nothing measurable and catches most ties
        while True:
            # count=False: counting every match would disable block-max WAND pruning.
            hits = self._searcher.search(query, limit, count=False).hits
            if len(hits) <= topk or len(hits) < limit or limit >= min(n, TIE_FETCH_CAP):
                break
            if hits[-1][0] < hits[topk - 1][0]:
                break
            limit = min(8 * limit, n, TIE_FETCH_CAP)  # few, wide refetches: each one re-runs the whole search
        if len(hits) > topk and all(hits[i][0] > hits[i + 1][0] for i in range(topk)):
            return hits[:topk]  # no two of the best topk + 1 scores are equal: no tie to break
        if len(hits) <= topk:
            ords = self._searcher.fast_field_values("ord", [address for _, address in hits])
            return [h for h, _ in sorted(zip(hits, ords, strict=True), key=lambda h: (-h[0][0], h[1]))]
        # Keep the hits above the k-th score, plus the earliest of those tied with it (one fast-field read for both).
        cut = hits[topk - 1][0]
        above = [h for h in hits if h[0] > cut]
        tied = [h for h in hits[len(above) :] if h[0] == cut]
        ords = self._searcher.fast_field_values("ord", [address for _, address in above + tied])
        ranked = sorted(zip(above, ords, strict=False), key=lambda h: (-h[0][0], h[1]))
        earliest = heapq.nsmallest(topk - len(above), zip(ords[len(above) :], range(len(tied)), strict=True))
        return [h for h, _ in ranked] + [tied[i] for _, i in earliest]

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Runs the queries in the executor, in chunks of up to SEARCH_CHUNK (a thread hand-off costs about as much
        as a small search); results in query order."""
        check_topk(topk)
        if self._closed:
            raise RetrieverError(f"TantivyRetriever({self.index_dir}) is closed")
        if not queries:
            return []
        loop = asyncio.get_running_loop()
        size = min(SEARCH_CHUNK, -(-len(queries) // 4))  # a batch spreads over >= 4 jobs (threads)
        chunks = [queries[s : s + size] for s in range(0, len(queries), size)]
        answers = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._search_many, c, topk) for c in chunks)
        )
        return [hits for answer in answers for hits in answer]

    def _search_many(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [self.search_sync(q, topk) for q in queries]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    def __repr__(self) -> str:
        return f"TantivyRetriever({str(self.index_dir)!r}, corpus_id={self.corpus_id!r}, num_docs={self._num_docs})"
