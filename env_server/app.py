"""The env server's aiohttp application: `init_app(cfg) -> web.Application`.

Contract: DESIGN §2 (routes, bodies, error shape and status codes). Who owns what:
- `EnvService` holds the episode store, the retriever and the datasets, and implements each call
  once; the route handlers and `/v1/batch` both call it, so a batched op answers exactly what the
  single call would.
- One middleware turns every error into `{"error": {code, message}}` in the request's format;
  nothing a client sends produces a 500 (a 500 is a bug, logged with its traceback).
- Search is CPU work: the retriever runs it off the event loop (its own thread pool).
- A reaper task expires idle episodes/snapshots; on shutdown new work gets 503 while in-flight
  requests finish (aiohttp waits `shutdown_timeout_s` for them).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from env_server.config import BUILTIN_WORLD, ServerConfig
from env_server.datasets import DatasetRegistry, read_questions
from env_server.episodes import EpisodeStore, export_blob, import_blob
from env_server.metrics import ServerMetrics
from env_server.retrieval import RemoteRetriever, Retriever, RetrieverError, TantivyRetriever
from env_server.tools import (
    DEFAULT_PROMPT,
    INVALID_ACTION,
    TOOLS,
    ToolContext,
    ToolError,
    ToolResult,
    call_tool,
    coerce_arguments,
    function_schema,
    parse_action,
    wrap_information,
)
from shared import codec
from shared.version import API_VERSION, __version__
from shared.wire import (
    BatchRequest,
    BatchResult,
    CreateEpisode,
    CreateOp,
    DatasetInfo,
    Deleted,
    DeleteOp,
    EnvError,
    EpisodeCreated,
    ErrorCode,
    ForkOp,
    ForkRequest,
    ForkResult,
    Info,
    Limits,
    Message,
    RetrieveRequest,
    SnapshotCreated,
    SnapshotOp,
    StepOp,
    StepRequest,
    StepResult,
    TaskRecord,
    TurnRecord,
)

log = structlog.get_logger("env_server")

_ORACLE_KEYS = ("oracle", "supporting_ids")


# ---------------------------------------------------------------------------------------------- resources
@dataclass
class Resources:
    retriever: Retriever
    datasets: DatasetRegistry
    executor: ThreadPoolExecutor | None = None  # the local index's `search_threads` pool; shut down by aclose()

    async def aclose(self) -> None:
        """Close the retriever, then its thread pool."""
        await self.retriever.aclose()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.shutdown, wait=True)


def build_resources(cfg: ServerConfig) -> Resources:
    """Open (building if needed) the search backend and load the question sets. Blocking: run in an executor."""
    datasets = DatasetRegistry()
    retriever: Retriever
    executor = None if cfg.retriever_url else ThreadPoolExecutor(cfg.search_threads, thread_name_prefix="search")
    if cfg.uses_synthetic:
        for split in ("train", "dev", "test"):
            datasets.add("synthetic", split, read_questions(BUILTIN_WORLD / f"{split}.jsonl"))
        index_dir = cfg.resolved_cache_dir() / "synthetic-builtin.index"  # the package folder may be read-only
        retriever = TantivyRetriever.open_or_build(BUILTIN_WORLD / "corpus.jsonl", index_dir, executor=executor)
    elif cfg.retriever_url:
        retriever = RemoteRetriever(cfg.retriever_url)
    elif cfg.corpus:
        index_dir = Path(cfg.index_dir) if cfg.index_dir else Path(cfg.corpus + ".index")
        retriever = TantivyRetriever.open_or_build(Path(cfg.corpus), index_dir, executor=executor)
    else:
        assert cfg.index_dir is not None, "validate() guarantees a search backend"
        retriever = TantivyRetriever(Path(cfg.index_dir), executor=executor)
    for key, path in cfg.data.items():
        datasets.add_spec(key, path)
    return Resources(retriever, datasets, executor)


# ---------------------------------------------------------------------------------------------- the service
class EnvService:
    """Every call of the contract, implemented once (handlers and /v1/batch share it)."""

    def __init__(self, cfg: ServerConfig, res: Resources, metrics: ServerMetrics) -> None:
        self.cfg = cfg
        self.retriever = res.retriever
        self.datasets = res.datasets
        self.metrics = metrics
        self.store = EpisodeStore(
            max_episodes=cfg.max_episodes, max_snapshots=cfg.max_snapshots, ttl_s=cfg.episode_ttl_s
        )
        self.prompt_template = cfg.prompt_template or DEFAULT_PROMPT
        self.corpus_id = res.retriever.corpus_id
        self.started = time.monotonic()
        timed = _TimedRetriever(res.retriever, metrics)
        self._tool_ctx_base = dict(retriever=timed, topk=cfg.topk, max_topk=cfg.max_topk)

    # ------------------------------------------------------------------ calls
    def create(self, req: CreateEpisode) -> EpisodeCreated:
        max_turns = self.cfg.max_turns if req.max_turns is None else req.max_turns
        if not 1 <= max_turns <= self.cfg.max_turns:
            raise EnvError(ErrorCode.INVALID_VALUE, f"max_turns must be in [1, {self.cfg.max_turns}], got {max_turns}")
        if req.seed is not None and not -(2**63) <= req.seed < 2**63:  # JSON ints are unbounded; blobs are msgpack
            raise EnvError(ErrorCode.INVALID_VALUE, f"seed must fit in a signed 64-bit integer, got {req.seed}")
        by_ref = req.dataset is not None or req.split is not None or req.index is not None
        by_text = req.question is not None or req.answers is not None
        if by_ref == by_text:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                "give either {dataset, split, index} or {question, answers}, not both and not neither",
            )
        metadata: dict[str, Any] = {}
        if by_ref:
            if req.dataset is None or req.split is None or req.index is None:
                raise EnvError(ErrorCode.INVALID_VALUE, "dataset, split and index must all be given")
            row = self.datasets.get(req.dataset, req.split, req.index)
            question, golds, qid = row.question, row.golden_answers, row.id
            # What would give the answer away (the oracle trajectory, the gold passage ids) only on request.
            metadata = {k: v for k, v in row.metadata.items() if k not in _ORACLE_KEYS or req.include_oracle}
        else:
            if not req.question or not req.question.strip():
                raise EnvError(ErrorCode.INVALID_VALUE, "question must be a non-empty string")
            if not req.answers or not all(a.strip() for a in req.answers):
                raise EnvError(ErrorCode.INVALID_VALUE, "answers must be a non-empty list of non-empty strings")
            question, golds, qid = req.question, list(req.answers), None
        task = TaskRecord(
            question=question,
            golden_answers=golds,
            max_turns=max_turns,
            question_id=qid,
            dataset=req.dataset,
            split=req.split,
            seed=req.seed,
            metadata=metadata,
        )
        eid, sid, _ = self.store.create(task)
        self.metrics.episodes_created.inc()
        prompt = self.prompt_template.format(question=question)
        return EpisodeCreated(
            episode_id=eid,
            snapshot_id=sid,
            prompt=prompt,
            messages=[Message(role="user", content=prompt)],
            turn=0,
            done=False,
            max_turns=max_turns,
            question_id=qid,
            dataset=req.dataset,
            split=req.split,
            metadata=metadata,
        )

    async def step(self, episode_id: str, req: StepRequest) -> StepResult:
        if (req.action is None) == (req.tool_call is None):
            raise EnvError(ErrorCode.INVALID_VALUE, "give exactly one of `action` (model text) or `tool_call`")
        if req.action is not None and len(req.action) > self.cfg.max_action_chars:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                f"action is {len(req.action)} characters; the limit is {self.cfg.max_action_chars}",
            )
        h = self.store.episode(episode_id)
        async with h.lock:
            if self.store.episodes.get(episode_id) is not h:  # deleted (or reaped) while this step waited
                raise EnvError(ErrorCode.NOT_FOUND, f"episode {episode_id!r} was deleted before this step ran")
            node = h.node
            if node.done:
                raise EnvError(
                    ErrorCode.EPISODE_DONE, f"episode {episode_id} is done (turn {node.turn}); fork a snapshot"
                )
            task = node.task
            text_mode = req.action is not None
            ctx = ToolContext(golden_answers=task.golden_answers, **self._tool_ctx_base)
            name = "invalid"
            try:
                if req.action is not None:
                    parsed = parse_action(req.action)
                    if parsed is None:
                        raise ToolError(INVALID_ACTION)
                    name, args = parsed
                else:
                    assert req.tool_call is not None
                    name = req.tool_call.name
                    args = coerce_arguments(name, req.tool_call.arguments)
                result = await call_tool(ctx, name, args)
                valid = True
            except ToolError as e:
                msg = str(e)
                result = ToolResult(msg if msg == INVALID_ACTION or not text_mode else wrap_information(msg))
                result.info["error"] = msg.strip()
                valid = False
            except RetrieverError as e:
                raise EnvError(
                    ErrorCode.UPSTREAM, f"search backend failed; the step was not applied, retry it: {e}"
                ) from None
            if valid and text_mode and name == "search":
                result.observation = wrap_information(result.observation)
            turn = node.turn + 1
            truncated = not result.done and turn >= task.max_turns
            done = result.done or truncated
            reward = float(result.info[self.cfg.reward_metric]) if result.done else 0.0
            info: dict[str, Any] = {"tool": name if name in TOOLS else "invalid", "valid": valid, **result.info}
            if done:
                info["golden_answers"] = task.golden_answers
            action = req.action if req.action is not None else msgspec.json.encode(req.tool_call).decode()
            record = TurnRecord(action, result.observation, reward, done, truncated, info)
            new, sid = self.store.advance(h, record)
        self.metrics.steps.labels(info["tool"]).inc()
        return StepResult(episode_id, sid, result.observation, reward, done, truncated, new.turn, info)

    def fork(self, episode_id: str, n: int) -> ForkResult:
        self._check_n(n)
        h = self.store.episode(episode_id)
        ids = self.store.spawn(h.node, n)
        self.metrics.forks.inc(n)
        return ForkResult(ids)

    def snapshot(self, episode_id: str) -> SnapshotCreated:
        h = self.store.episode(episode_id)
        self.store.check_capacity(0, 1)
        return SnapshotCreated(self.store.add_snapshot(h.node))

    def from_snapshot(self, snapshot_id: str, n: int) -> ForkResult:
        self._check_n(n)
        ids = self.store.spawn(self.store.snapshot(snapshot_id).node, n)
        self.metrics.forks.inc(n)
        return ForkResult(ids)

    def delete(self, episode_id: str) -> Deleted:
        self.store.delete_episode(episode_id)
        return Deleted(episode_id)

    def export_snapshot(self, snapshot_id: str) -> bytes:
        node = self.store.snapshot(snapshot_id).node
        return export_blob(node, corpus_id=self.corpus_id, reward_metric=self.cfg.reward_metric)

    def import_snapshot(self, data: bytes) -> SnapshotCreated:
        node = import_blob(data, corpus_id=self.corpus_id, reward_metric=self.cfg.reward_metric)
        if node.task.max_turns > self.cfg.max_turns:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                f"snapshot allows {node.task.max_turns} turns; this server caps max_turns at {self.cfg.max_turns}",
            )
        self.store.check_capacity(0, 1)
        return SnapshotCreated(self.store.add_snapshot(node))

    async def batch(self, req: BatchRequest) -> BatchResult:
        if len(req.ops) > self.cfg.max_batch_ops:
            raise EnvError(ErrorCode.CAPACITY, f"batch has {len(req.ops)} ops; the limit is {self.cfg.max_batch_ops}")

        async def run(op: Any) -> dict[str, Any]:
            try:
                if isinstance(op, CreateOp):
                    ans: Any = self.create(op)
                elif isinstance(op, StepOp):
                    ans = await self.step(op.episode_id, op)
                else:
                    assert isinstance(op, ForkOp | SnapshotOp | DeleteOp), op
                    # Wait behind any earlier op of this batch on the same episode (a step in flight holds
                    # the lock): [step e, fork e] must fork the state after the step, as the order says.
                    async with self.store.episode(op.episode_id).lock:
                        if isinstance(op, ForkOp):
                            ans = self.fork(op.episode_id, op.n)
                        elif isinstance(op, SnapshotOp):
                            ans = self.snapshot(op.episode_id)
                        else:
                            ans = self.delete(op.episode_id)
            except EnvError as e:
                self.metrics.errors.labels(e.code.value if isinstance(e.code, ErrorCode) else str(e.code)).inc()
                return {"ok": False, **msgspec.to_builtins(e.to_body())}
            return {"ok": True, **msgspec.to_builtins(ans)}

        # Tasks start in order and every op on an existing episode takes its lock (FIFO) before its first real
        # await, so ops on one episode apply in the order given while independent ops (searches) overlap.
        return BatchResult(list(await asyncio.gather(*(run(op) for op in req.ops))))

    async def retrieve(self, req: RetrieveRequest) -> dict[str, Any]:
        if not 1 <= req.topk <= self.cfg.max_topk:
            raise EnvError(ErrorCode.INVALID_VALUE, f"topk must be in [1, {self.cfg.max_topk}], got {req.topk}")
        if len(req.queries) > self.cfg.max_batch_ops:
            raise EnvError(
                ErrorCode.CAPACITY, f"{len(req.queries)} queries in one call; the limit is {self.cfg.max_batch_ops}"
            )
        try:
            results = await self._tool_ctx_base["retriever"].search(req.queries, req.topk)
        except RetrieverError as e:
            raise EnvError(ErrorCode.UPSTREAM, f"search backend failed: {e}") from None
        if req.return_scores:
            out = [
                [{"document": {"id": h.id, "contents": h.contents}, "score": h.score} for h in hits] for hits in results
            ]
        else:
            out = [[{"id": h.id, "contents": h.contents} for h in hits] for hits in results]
        return {"result": out}

    def info(self) -> Info:
        c = self.cfg
        return Info(
            version=__version__,
            api_version=API_VERSION,
            tools=[function_schema(fn, c.max_topk) for fn in TOOLS.values()],
            datasets=[DatasetInfo(**d) for d in self.datasets.describe()],
            action_format={
                "type": "search-r1-tags",
                "description": "Write <think>..</think>, then <search> query </search> or <answer> text </answer>. "
                "Or send a tool_call with one of `tools`.",
                "stop": ["</search>", "</answer>"],
                "observation_wrapper": ["\n\n<information>", "</information>\n\n"],
                "invalid_action_observation": INVALID_ACTION,
                "reward": c.reward_metric,
            },
            limits=Limits(
                max_episodes=c.max_episodes,
                max_snapshots=c.max_snapshots,
                max_action_chars=c.max_action_chars,
                max_batch_ops=c.max_batch_ops,
                max_body_bytes=c.max_body_bytes,
                max_turns=c.max_turns,
                max_topk=c.max_topk,
                max_fork_n=c.max_fork_n,
                episode_ttl_s=c.episode_ttl_s,
            ),
            corpus_id=self.corpus_id,
            reward_metric=c.reward_metric,
        )

    def health(self, shutting_down: bool) -> dict[str, Any]:
        return {
            "status": "shutting_down" if shutting_down else "ok",
            "version": __version__,
            "api_version": API_VERSION,
            "episodes": len(self.store.episodes),
            "snapshots": len(self.store.snapshots),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "corpus_id": self.corpus_id,
            "num_docs": self.retriever.num_docs,
        }

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.cfg.max_fork_n:
            raise EnvError(ErrorCode.INVALID_VALUE, f"n must be in [1, {self.cfg.max_fork_n}], got {n}")

    def refresh_gauges(self) -> None:
        self.metrics.episodes_live.set(len(self.store.episodes))
        self.metrics.snapshots_live.set(len(self.store.snapshots))
        self.metrics.snapshots_evicted.set(self.store.evicted)


class _TimedRetriever:
    """Forwards `search` to the real retriever and records its latency."""

    def __init__(self, inner: Retriever, metrics: ServerMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def search(self, queries: list[str], topk: int) -> list[list[Any]]:
        t0 = time.perf_counter()
        try:
            return await self.inner.search(queries, topk)
        finally:
            self.metrics.search_latency.observe(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- HTTP layer
CONFIG = web.AppKey("config", ServerConfig)
SERVICE = web.AppKey("service", EnvService)
METRICS = web.AppKey("metrics", ServerMetrics)
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
RESOURCES = web.AppKey("resources", Resources)

_OPEN_ROUTES = ("/health", "/openapi.json")  # liveness and API discovery need no token
_BLOB_TYPES = (  # a snapshot blob is MessagePack
    "",
    "application/octet-stream",
    "application/msgpack",
    "application/x-msgpack",
    "application/vnd.msgpack",
)


def _fmt(request: web.Request) -> str:
    return codec.response_format(request.headers.get("Content-Type"), request.headers.get("Accept"))


def _answer(request: web.Request, obj: Any, status: int = 200) -> web.Response:
    fmt = _fmt(request)
    return web.Response(body=codec.encode(obj, fmt), status=status, content_type=fmt)


def _error(request: web.Request, err: EnvError) -> web.Response:
    request.app[METRICS].errors.labels(getattr(err.code, "value", str(err.code))).inc()
    resp = _answer(request, err.to_body(), status=err.status)
    if err.code == ErrorCode.TOO_LARGE:
        # The rest of the body is never read into memory (aiohttp discards it for at most its 10 s lingering
        # time, as nginx does); `Connection: close` tells the client to stop sending and not reuse the socket.
        resp.force_close()
    return resp


async def _body(request: web.Request, typ: type[Any]) -> Any:
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise EnvError(ErrorCode.TOO_LARGE, f"body is {request.content_length} bytes; the limit is {limit}")
    fmt = codec.media_type(request.headers.get("Content-Type"))  # 415 before reading a body we cannot decode
    data = await request.read()  # aiohttp stops at client_max_size (= limit) and raises 413
    return codec.decode(data, typ, fmt)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    t0 = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        if request.app[SHUTTING_DOWN].is_set() and request.path not in _OPEN_ROUTES:
            raise EnvError(ErrorCode.SHUTTING_DOWN, "server is shutting down; send new work to another replica")
        token = request.app[CONFIG].auth_token
        if token and request.path not in _OPEN_ROUTES:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise EnvError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return await handler(request)
    except EnvError as e:
        return _error(request, e)
    except web.HTTPRequestEntityTooLarge as e:
        return _error(request, EnvError(ErrorCode.TOO_LARGE, f"body is larger than the limit: {e.text}"))
    except web.HTTPNotFound:
        return _error(request, EnvError(ErrorCode.NOT_FOUND, f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as e:
        err = EnvError("method_not_allowed", f"{request.method} not allowed on {request.path}", status=405)
        resp = _error(request, err)
        resp.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
        return resp
    except web.HTTPException as e:
        return _error(request, EnvError(e.reason.lower().replace(" ", "_"), e.text or e.reason, status=e.status))
    except Exception:
        log.exception("unhandled error", method=request.method, path=request.path)
        return _error(request, EnvError(ErrorCode.INTERNAL, "internal error; see the server log"))
    finally:
        request.app[METRICS].requests.labels(route).observe(time.perf_counter() - t0)


def _svc(request: web.Request) -> EnvService:
    return request.app[SERVICE]


async def health(request: web.Request) -> web.Response:
    svc = request.app.get(SERVICE)
    if svc is None:
        return web.json_response({"status": "starting", "version": __version__}, status=503)
    shutting_down = request.app[SHUTTING_DOWN].is_set()
    # 503 while draining, so load balancers and container health checks stop sending new work here.
    return _answer(request, svc.health(shutting_down), status=503 if shutting_down else 200)


async def info(request: web.Request) -> web.Response:
    return _answer(request, _svc(request).info())


async def create_episode(request: web.Request) -> web.Response:
    return _answer(request, _svc(request).create(await _body(request, CreateEpisode)))


async def step_episode(request: web.Request) -> web.Response:
    req = await _body(request, StepRequest)
    return _answer(request, await _svc(request).step(request.match_info["episode_id"], req))


async def fork_episode(request: web.Request) -> web.Response:
    req = await _body(request, ForkRequest)
    return _answer(request, _svc(request).fork(request.match_info["episode_id"], req.n))


async def snapshot_episode(request: web.Request) -> web.Response:
    await _body(request, _Empty)
    return _answer(request, _svc(request).snapshot(request.match_info["episode_id"]))


async def delete_episode(request: web.Request) -> web.Response:
    return _answer(request, _svc(request).delete(request.match_info["episode_id"]))


async def get_snapshot(request: web.Request) -> web.Response:
    blob = _svc(request).export_snapshot(request.match_info["snapshot_id"])
    return web.Response(body=blob, content_type="application/octet-stream")


async def import_snapshot(request: web.Request) -> web.Response:
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise EnvError(ErrorCode.TOO_LARGE, f"body is {request.content_length} bytes; the limit is {limit}")
    ct = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ct not in _BLOB_TYPES:
        raise EnvError(ErrorCode.UNSUPPORTED_MEDIA, f"send the blob as application/octet-stream, got {ct!r}")
    return _answer(request, _svc(request).import_snapshot(await request.read()))


async def snapshot_episodes(request: web.Request) -> web.Response:
    req = await _body(request, ForkRequest)
    return _answer(request, _svc(request).from_snapshot(request.match_info["snapshot_id"], req.n))


async def delete_snapshot(request: web.Request) -> web.Response:
    sid = request.match_info["snapshot_id"]
    _svc(request).store.delete_snapshot(sid)
    return _answer(request, Deleted(sid))


async def batch(request: web.Request) -> web.Response:
    return _answer(request, await _svc(request).batch(await _body(request, BatchRequest)))


async def retrieve(request: web.Request) -> web.Response:
    return _answer(request, await _svc(request).retrieve(await _body(request, RetrieveRequest)))


async def metrics(request: web.Request) -> web.Response:
    _svc(request).refresh_gauges()
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    """A body that must be empty or `{}`."""


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health)
    r.add_get("/v1/info", info)
    r.add_post("/v1/episodes", create_episode)
    r.add_post("/v1/episodes/{episode_id}/step", step_episode)
    r.add_post("/v1/episodes/{episode_id}/fork", fork_episode)
    r.add_post("/v1/episodes/{episode_id}/snapshot", snapshot_episode)
    r.add_delete("/v1/episodes/{episode_id}", delete_episode)
    r.add_get("/v1/snapshots/{snapshot_id}", get_snapshot)
    r.add_post("/v1/snapshots", import_snapshot)
    r.add_post("/v1/snapshots/{snapshot_id}/episodes", snapshot_episodes)
    r.add_delete("/v1/snapshots/{snapshot_id}", delete_snapshot)
    r.add_post("/v1/batch", batch)
    r.add_post("/retrieve", retrieve)
    r.add_get("/metrics", metrics)
    from env_server.openapi import openapi_json  # imported here: env_server.openapi imports this module

    r.add_get("/openapi.json", openapi_json)


# ---------------------------------------------------------------------------------------------- lifecycle
async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    res = app.get(RESOURCES)
    if res is None:
        t0 = time.perf_counter()
        res = await asyncio.get_running_loop().run_in_executor(None, build_resources, cfg)
        log.info("resources ready", seconds=round(time.perf_counter() - t0, 2), corpus_id=res.retriever.corpus_id)
    svc = EnvService(cfg, res, app[METRICS])
    app[SERVICE] = svc
    reaper = asyncio.create_task(_reap_forever(svc), name="reaper")
    try:
        yield
    finally:
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
        if RESOURCES not in app:  # resources we opened, we close
            await res.aclose()


async def _reap_forever(svc: EnvService) -> None:
    period = min(svc.cfg.episode_ttl_s / 4, 30.0)
    while True:
        await asyncio.sleep(period)
        eps, snaps = svc.store.reap()
        if eps or snaps:
            svc.metrics.reaped.labels("episode").inc(eps)
            svc.metrics.reaped.labels("snapshot").inc(snaps)
            log.info("reaped idle state", episodes=eps, snapshots=snaps)
        svc.refresh_gauges()


async def _on_shutdown(app: web.Application) -> None:
    app[SHUTTING_DOWN].set()
    log.info("shutting down: new work gets 503, in-flight requests finish")


def init_app(cfg: ServerConfig, resources: Resources | None = None) -> web.Application:
    """Build the app. `resources` lets a caller (tests, the trainer) share an already-open retriever;
    by default they are built from `cfg` at start-up, off the event loop."""
    cfg.validate()
    app = web.Application(middlewares=[error_middleware], client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[METRICS] = ServerMetrics()
    app[SHUTTING_DOWN] = asyncio.Event()
    if resources is not None:
        app[RESOURCES] = resources
    setup_routes(app)
    app.cleanup_ctx.append(_service_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app
