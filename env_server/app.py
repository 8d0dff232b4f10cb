"""The env server's HTTP layer: `init_app(cfg) -> web.Application` (aiohttp), and nothing but HTTP.

Contract: DESIGN §2 (routes, bodies, error shape and status codes). Who owns what:
- `env_server.service.EnvService` implements every call once (and decides each step's reward); the handlers
  here only decode the request body, call the service and encode its answer in the request's format
  (JSON or MessagePack; `Accept` may ask otherwise). `/v1/batch` is `EnvService.batch`, so a batched op
  answers exactly what the single call would.
- App state lives under typed `web.AppKey`s: `CONFIG`, `METRICS`, `SHUTTING_DOWN`, `DRAIN` (requests in flight),
  `SERVICE` (set at start-up) and `RESOURCES` (only when the caller passed its own `Resources`, which it then
  closes).
- One middleware checks the bearer token (`Authorization: Bearer <token>`, the scheme in any case, RFC 7235) and
  the shutdown state, and turns every error into `{"error": {code, message}}` in the request's format; nothing a
  client sends produces a 500 (a 500 is a bug, logged with its traceback). 429 and 503 carry `Retry-After`.
- Bodies are read through `_read`: over `max_body_bytes` is 413, and a body that has not fully arrived within
  `body_timeout_s` is 408, so a stalled upload holds neither a handler nor a drain for long; both answer with
  `Connection: close` (aiohttp discards what still comes for at most its 10 s lingering time, then closes). A request with no body at all is an empty object whatever its Content-Type (aiohttp's client sends
  `application/octet-stream` when it has no data).
- `cleanup_ctx` builds the resources off the event loop (unless given), starts the reaper task and cancels
  and awaits it on shutdown.
- Draining (`drain`, which `trace-env serve` runs on SIGTERM/SIGINT before closing anything): the listening socket
  stays open and kept-alive connections keep being read; new work answers 503 `shutting_down` and `/health` answers
  503, both with `Retry-After` (seconds until the drain window ends at the latest) and `Connection: close`; requests
  already in flight (counted by the middleware, `DRAIN`) run to the end. The window closes when none is left, or
  after `shutdown_timeout_s`; only then does the runner stop listening. An app shut down by its own runner (tests,
  embedding) sets the same state in `on_shutdown`, after aiohttp has closed the socket.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from env_server.config import ServerConfig
from env_server.metrics import ServerMetrics
from env_server.service import EnvService, Resources, build_resources
from shared import codec
from shared.version import __version__
from shared.wire import (
    BatchRequest,
    CreateEpisode,
    EnvError,
    ErrorCode,
    ForkRequest,
    RetrieveRequest,
    StepRequest,
)

log = structlog.get_logger("env_server")


# ---------------------------------------------------------------------------------------------- HTTP layer
@dataclass
class Drain:
    """Requests in flight, so that a drain can wait for them; and when the drain window ends at the latest."""

    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever in_flight == 0
    deadline: float | None = None  # time.monotonic() at which the window closes at the latest; None = not draining

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0, f"in_flight went negative: {self.in_flight}"
        if self.in_flight == 0:
            self.idle.set()

    def retry_after_s(self) -> int:
        """Seconds until the window closes at the latest (>= 1): when to try this address again."""
        left = 0.0 if self.deadline is None else self.deadline - time.monotonic()
        return max(1, math.ceil(left))


CONFIG = web.AppKey("config", ServerConfig)
SERVICE = web.AppKey("service", EnvService)
METRICS = web.AppKey("metrics", ServerMetrics)
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
RESOURCES = web.AppKey("resources", Resources)
DRAIN = web.AppKey("drain", Drain)

_OPEN_ROUTES = ("/health", "/openapi.json", "/")  # liveness, API discovery and the page (no data) need no token
CAPACITY_RETRY_AFTER_S = 1
"""`Retry-After` of a 429: capacity comes back as clients delete finished episodes, which a trainer does all the time;
idle ones expire on the TTL. A second is a hint, not a promise (a batch over `max_batch_ops` must be split)."""
SNAPSHOT_VIEWS = ("msgpack", "json")
"""`GET /v1/snapshots/{id}?view=`: the blob's MessagePack bytes (the default) or the same struct as JSON."""
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
    if err.code == ErrorCode.SHUTTING_DOWN:  # `Connection: close` too (error_middleware): reconnect, maybe elsewhere
        resp.headers["Retry-After"] = str(request.app[DRAIN].retry_after_s())
    if err.code == ErrorCode.CAPACITY:
        resp.headers["Retry-After"] = str(CAPACITY_RETRY_AFTER_S)
    if err.code == ErrorCode.TOO_LARGE or err.status == 408:
        # The rest of the body is never read into memory (aiohttp discards it for at most its 10 s lingering
        # time, as nginx does); `Connection: close` tells the client to stop sending and not reuse the socket.
        resp.force_close()
    return resp


async def _read(request: web.Request) -> bytes:
    """The whole body: 413 past `max_body_bytes`, 408 when it has not arrived within `body_timeout_s`."""
    cfg = request.app[CONFIG]
    if request.content_length is not None and request.content_length > cfg.max_body_bytes:
        raise EnvError(
            ErrorCode.TOO_LARGE, f"body is {request.content_length} bytes; the limit is {cfg.max_body_bytes}"
        )
    if request.content.is_eof():  # the whole body has arrived (a small body comes with its headers): no wait, no timer
        return await request.read()  # aiohttp stops at client_max_size (= max_body_bytes) and raises 413
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise EnvError(
            "request_timeout",
            f"the request body did not arrive within {cfg.body_timeout_s:g} s (the server's body_timeout_s); "
            "send the whole body at once",
            status=408,
        ) from None


async def _body(request: web.Request, typ: type[Any]) -> Any:
    if not request.body_exists:  # no body: all defaults, whatever the Content-Type says
        return codec.decode(b"", typ)
    fmt = codec.media_type(request.headers.get("Content-Type"))  # 415 before reading a body we cannot decode
    return codec.decode(await _read(request), typ, fmt)


def _authorized(request: web.Request, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235 §2.1), the token exact."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogates (aiohttp decodes with surrogateescape): compare bytes.
    given = credentials.strip(" ").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, token.encode()) and scheme.lower() == "bearer"


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    t0 = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        resp = await _handle(request, handler)
    finally:
        request.app[METRICS].route_latency(route).observe(time.perf_counter() - t0)
    if request.app[SHUTTING_DOWN].is_set():
        resp.force_close()  # answered, but no connection is kept to a server that is about to close
    return resp


async def _handle(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The shutdown gate, the token check and the handler, with every error turned into the contract's shape."""
    try:
        if request.app[SHUTTING_DOWN].is_set() and request.path not in _OPEN_ROUTES:
            raise EnvError(ErrorCode.SHUTTING_DOWN, "server is shutting down; send new work to another replica")
        token = request.app[CONFIG].auth_token
        if token and request.path not in _OPEN_ROUTES and not _authorized(request, token):
            raise EnvError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <token>)")
        drain = request.app[DRAIN]
        drain.enter()
        try:
            return await handler(request)
        finally:
            drain.leave()
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


def _svc(request: web.Request) -> EnvService:
    return request.app[SERVICE]


async def health(request: web.Request) -> web.Response:
    svc = request.app.get(SERVICE)
    if svc is None:
        return web.json_response(
            {"status": "starting", "version": __version__}, status=503, headers={"Retry-After": "1"}
        )
    shutting_down = request.app[SHUTTING_DOWN].is_set()
    # 503 while draining, so load balancers and container health checks stop sending new work here.
    resp = _answer(request, svc.health(shutting_down), status=503 if shutting_down else 200)
    if shutting_down:
        resp.headers["Retry-After"] = str(request.app[DRAIN].retry_after_s())
    return resp


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
    """The blob (MessagePack, whatever `Accept` says: clients that ask every answer as JSON still get the bytes they
    can import anywhere); `?view=json`: the same `SnapshotBlob` as JSON, to read or to edit and import; `?turns=k`:
    the state after the snapshot's first k turns (an earlier state of the same episode)."""
    view = request.query.get("view", "msgpack")
    if view not in SNAPSHOT_VIEWS:
        raise EnvError(ErrorCode.MALFORMED, f"view must be one of {', '.join(SNAPSHOT_VIEWS)}, got {view!r}")
    turns_arg = request.query.get("turns")
    if turns_arg is not None and not (turns_arg.isascii() and turns_arg.isdigit() and len(turns_arg) <= 6):
        raise EnvError(ErrorCode.MALFORMED, f"turns must be a whole number of turns, got {turns_arg!r}")
    turns = None if turns_arg is None else int(turns_arg)
    blob = _svc(request).export_snapshot(request.match_info["snapshot_id"], as_json=view == "json", turns=turns)
    return web.Response(body=blob, content_type=codec.JSON if view == "json" else "application/octet-stream")


async def import_snapshot(request: web.Request) -> web.Response:
    ct = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    as_json = ct in (codec.JSON, "text/plain")  # text/plain is JSON here as on every JSON route (codec.media_type)
    if ct not in _BLOB_TYPES and not as_json:
        raise EnvError(
            ErrorCode.UNSUPPORTED_MEDIA,
            f"send the blob as application/octet-stream (or its JSON view as application/json), got {ct!r}",
        )
    return _answer(request, _svc(request).import_snapshot(await _read(request), as_json=as_json))


async def snapshot_episodes(request: web.Request) -> web.Response:
    req = await _body(request, ForkRequest)
    return _answer(request, _svc(request).from_snapshot(request.match_info["snapshot_id"], req.n))


async def delete_snapshot(request: web.Request) -> web.Response:
    return _answer(request, _svc(request).delete_snapshot(request.match_info["snapshot_id"]))


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
    if app[CONFIG].ui:
        from env_server.ui import page

        r.add_get("/", page)


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
    reaper = asyncio.create_task(svc.reap_forever(), name="reaper")
    try:
        yield
    finally:
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
        await svc.aclose()
        if RESOURCES not in app:  # resources we opened, we close
            await res.aclose()


async def drain(app: web.Application, timeout_s: float, hurry: asyncio.Event | None = None) -> int:
    """Start draining (module docstring): from now on new work and `/health` answer 503 while the socket stays open.
    Returns when no request is in flight, after `timeout_s`, or when `hurry` is set (a second signal), whichever
    comes first, with the number of requests still in flight. The caller then closes the runner."""
    d = app[DRAIN]
    d.deadline = time.monotonic() + timeout_s
    app[SHUTTING_DOWN].set()
    log.info("draining: new work gets 503, in-flight requests finish", in_flight=d.in_flight, timeout_s=timeout_s)
    waits = [asyncio.create_task(d.idle.wait())]
    if hurry is not None:
        waits.append(asyncio.create_task(hurry.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    if d.in_flight:
        log.warning("drain ended with requests in flight; they are cancelled", in_flight=d.in_flight)
    return d.in_flight


async def _on_shutdown(app: web.Application) -> None:
    if not app[SHUTTING_DOWN].is_set():  # not drained first (`drain`): the runner has already stopped listening
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
    app[DRAIN] = Drain()
    if resources is not None:
        app[RESOURCES] = resources
    setup_routes(app)
    app.cleanup_ctx.append(_service_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app
