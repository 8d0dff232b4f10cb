"""The env server's HTTP layer: `init_app(cfg) -> web.Application` (aiohttp), and nothing but HTTP.

Contract: DESIGN §2 (routes, bodies, error shape and status codes). Who owns what:
- `env_server.service.EnvService` implements every call once (and decides each step's reward); the handlers
  here only decode the request body, call the service and encode its answer in the request's format
  (JSON or MessagePack; `Accept` may ask otherwise). `/v1/batch` is `EnvService.batch`, so a batched op
  answers exactly what the single call would.
- App state lives under typed `web.AppKey`s: `CONFIG`, `METRICS`, `SHUTTING_DOWN`, `SERVICE` (set at
  start-up) and `RESOURCES` (only when the caller passed its own `Resources`, which it then closes).
- One middleware checks the bearer token and the shutdown state, and turns every error into
  `{"error": {code, message}}` in the request's format; nothing a client sends produces a 500 (a 500 is a
  bug, logged with its traceback).
- `cleanup_ctx` builds the resources off the event loop (unless given), starts the reaper task and cancels
  and awaits it on shutdown; on shutdown new work gets 503 while in-flight requests finish (aiohttp waits
  `shutdown_timeout_s` for them).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
        if RESOURCES not in app:  # resources we opened, we close
            await res.aclose()


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
