"""The async Python client of the env server (and a sync wrapper), for the trainer, `trace-eval` and
anyone else's framework.

    async with EnvClient("http://127.0.0.1:8000") as env:
        ep = await env.create(dataset="synthetic", split="dev", index=0)
        res = await env.step(ep.episode_id, action="<search> Kelmar Works </search>")
        a, b = (await env.fork(ep.episode_id, 2)).episode_ids      # two branches from this state
        blob = await env.export_snapshot(res.snapshot_id)          # move the state to another server

Every call answers a wire struct from `shared.wire`; an error answer raises `EnvError` with the
server's code, status and message.

`coalesce=True` batches what crosses the wire: the create/step/fork/snapshot/spawn/delete calls made in the same
turn of the event loop (the branches of a tree whose generations came back together, a round's forks, a
step's creates) leave as ONE `POST /v1/batch` (up to `max_batch_ops` ops a request; a lone call goes as its own
request; more go as several, one after the other), sent on the next turn of the loop, so nothing waits longer than
it takes the loop to come round. Each call still gets its own answer or its own `EnvError` (the batch answers per
op; a call that is not a valid op fails alone with 400 malformed_request before anything is sent; a request that
fails, a refused connection or a timeout, fails every call in it with that error). `http_requests` counts the
requests sent. Connection failures are retried (`shared.retry`, waits of
`backoff_s * 2**n`) only for calls that change nothing or that failed before the request was sent; a
step is never sent twice. Error answers and timeouts are never retried.
MessagePack is the default encoding (smaller and faster than JSON for the same structs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

import aiohttp
import msgspec
import structlog

from shared import codec
from shared.retry import RetryPolicy, with_retries
from shared.wire import (
    BatchOp,
    BatchRequest,
    BatchResult,
    CreateEpisode,
    Deleted,
    EnvError,
    EpisodeCreated,
    ErrorBody,
    ErrorCode,
    ForkResult,
    Info,
    SnapshotBlob,
    SnapshotCreated,
    StepResult,
    ToolCall,
)

T = TypeVar("T")
_Queued = tuple[
    dict[str, Any], Any, Any, "asyncio.Future[Any]"
]  # (op, the op checked as a BatchOp, answer type, future)
log = structlog.get_logger("env_client")


class EnvClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        msgpack: bool = True,
        timeout_s: float = 60.0,
        max_connections: int = 256,
        retries: int = 3,
        backoff_s: float = 0.2,
        coalesce: bool = False,
        max_batch_ops: int = 256,
    ) -> None:
        if max_batch_ops < 1:
            raise ValueError(f"max_batch_ops must be >= 1, got {max_batch_ops}")
        self.base_url = base_url.rstrip("/")
        self.fmt = codec.MSGPACK if msgpack else codec.JSON
        self.retries = retries
        self.backoff_s = backoff_s
        # A refused connection never reached the server: always retried. A dropped connection or a cut answer
        # may have reached it: retried only for calls that change nothing (`safe`). Error answers never.
        self._retry_unsafe = RetryPolicy(retries + 1, backoff_s, errors=(aiohttp.ClientConnectorError,))
        self._retry_safe = replace(
            self._retry_unsafe,
            errors=(aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError),
        )
        self._headers = {"Content-Type": self.fmt, "Accept": self.fmt}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.coalesce = coalesce
        self.max_batch_ops = max_batch_ops
        self.http_requests = 0  # requests sent (a batch counts once)
        self._queue: list[_Queued] = []

    async def __aenter__(self) -> EnvClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=self._max_connections)
            )
        return self._session

    async def _call(
        self, method: str, path: str, typ: type[T] | None, body: Any = None, *, raw: bytes | None = None, safe: bool
    ) -> Any:
        data = raw if raw is not None else (codec.encode(body, self.fmt) if body is not None else None)
        headers = dict(self._headers)
        if raw is not None:
            headers["Content-Type"] = "application/octet-stream"

        async def once() -> Any:
            self.http_requests += 1
            async with self._sess().request(method, self.base_url + path, data=data, headers=headers) as resp:
                payload = await resp.read()
                if resp.status >= 400:
                    raise _error_from(resp.status, payload, resp.headers.get("Content-Type"))
                if typ is None:
                    return payload
                return codec.decode(payload, typ, codec.media_type(resp.headers.get("Content-Type")))

        policy = self._retry_safe if safe else self._retry_unsafe
        try:
            return await with_retries(policy, once, event="env_client_retry", url=self.base_url, path=path)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
            # The retries ran out, or a disconnect (a reset, a cut answer) of a call that is not safe to re-send.
            # ClientOSError covers a refused connection (ClientConnectorError) and one reset mid-request.
            raise ConnectionError(f"env server {self.base_url} unreachable ({method} {path}): {e}") from e
        except TimeoutError as e:  # not retried: the server may still be working on it
            raise TimeoutError(
                f"env server {self.base_url} did not answer {method} {path} within {self._timeout.total}s"
            ) from e

    # ------------------------------------------------------------------ coalescing
    async def _op(self, op: dict[str, Any], typ: type[T]) -> T:
        """`op` as its own request or, when coalescing, in the next batch."""
        if not self.coalesce:
            return await self._single(op, typ)
        try:  # checked alone, so that a bad call fails by itself (as its own request would) and not its batch
            checked = msgspec.convert(op, BatchOp)
        except msgspec.ValidationError as e:
            raise EnvError(ErrorCode.MALFORMED, f"{op['op']}: {e}") from None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((op, checked, typ, fut))
        return await fut

    def _flush(self) -> None:
        queued, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send_all(queued))
        task.add_done_callback(_task_done)

    async def _send_all(self, queued: list[_Queued]) -> None:
        """Send the queued calls in batches of max_batch_ops, one batch after the other (so that calls on one episode
        apply in the order they were made even across batches); every call gets an answer or an error."""
        try:
            for s in range(0, len(queued), self.max_batch_ops):
                await self._send(queued[s : s + self.max_batch_ops])
        finally:
            for *_, fut in queued:  # whatever went wrong, nobody waits forever
                if not fut.done():
                    fut.set_exception(RuntimeError("env client: this call's batch was not sent (see the error before)"))

    async def _send(self, part: list[_Queued]) -> None:
        try:
            if len(part) == 1:  # a lone call: its own request, so its status and errors are exactly the single call's
                op, _, typ, fut = part[0]
                answers: list[Any] = [await self._single(op, typ)]
            else:
                req = BatchRequest(ops=[checked for _, checked, _, _ in part])
                res: BatchResult = await self._call("POST", "/v1/batch", BatchResult, req, safe=False)
                answers = res.results
                if len(answers) != len(part):
                    raise EnvError(
                        ErrorCode.INTERNAL, f"the env server answered {len(answers)} results to a batch of {len(part)}"
                    )
        except Exception as e:  # the request failed: every call in it fails with that error
            for *_, fut in part:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, _, typ, fut), ans in zip(part, answers, strict=True):
            if fut.done():  # its caller was cancelled
                continue
            try:
                if len(part) == 1:
                    fut.set_result(ans)
                elif ans.get("ok"):
                    fut.set_result(msgspec.convert({k: v for k, v in ans.items() if k != "ok"}, typ))
                else:
                    err = ans.get("error") or {}
                    fut.set_exception(EnvError(str(err.get("code", "internal_error")), str(err.get("message", ans))))
            except Exception as e:  # an answer this client cannot read fails its own call only
                fut.set_exception(e)

    def _single(self, op: dict[str, Any], typ: Any) -> Any:
        """The single-call request of a batch op."""
        kind, body = op["op"], {k: v for k, v in op.items() if k != "op"}
        if kind == "create":
            return self._call("POST", "/v1/episodes", typ, CreateEpisode(**body), safe=False)
        if kind == "spawn":
            sid = body.pop("snapshot_id")
            return self._call("POST", f"/v1/snapshots/{sid}/episodes", typ, body, safe=False)
        if kind == "delete_snapshot":
            return self._call("DELETE", f"/v1/snapshots/{body['snapshot_id']}", typ, safe=False)
        eid = body.pop("episode_id")
        if kind == "delete":
            return self._call("DELETE", f"/v1/episodes/{eid}", typ, safe=False)
        return self._call("POST", f"/v1/episodes/{eid}/{kind}", typ, body, safe=False)  # step, fork, snapshot

    # ------------------------------------------------------------------ calls
    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health", dict, safe=True)

    async def info(self) -> Info:
        return await self._call("GET", "/v1/info", Info, safe=True)

    async def create(self, **fields: Any) -> EpisodeCreated:
        """`dataset, split, index` or `question, answers`; optional `max_turns`, `seed`, `include_oracle`."""
        op = {"op": "create", **{k: v for k, v in fields.items() if v is not None}}
        return await self._op(op, EpisodeCreated)

    async def step(
        self, episode_id: str, action: str | None = None, tool_call: dict[str, Any] | ToolCall | None = None
    ) -> StepResult:
        if isinstance(tool_call, ToolCall):
            tool_call = msgspec.to_builtins(tool_call)
        # both or neither go as given: the server answers 422 "give exactly one", as it does over HTTP (a client that
        # picked one would spend the episode's turn on what the caller did not mean)
        body = {k: v for k, v in (("action", action), ("tool_call", tool_call)) if v is not None}
        op = {"op": "step", "episode_id": episode_id, **body}
        return await self._op(op, StepResult)

    async def fork(self, episode_id: str, n: int = 1) -> ForkResult:
        op = {"op": "fork", "episode_id": episode_id, "n": n}
        return await self._op(op, ForkResult)

    async def snapshot(self, episode_id: str) -> SnapshotCreated:
        op = {"op": "snapshot", "episode_id": episode_id}
        return await self._op(op, SnapshotCreated)

    async def episodes_from_snapshot(self, snapshot_id: str, n: int = 1) -> ForkResult:
        op = {"op": "spawn", "snapshot_id": snapshot_id, "n": n}
        return await self._op(op, ForkResult)

    async def export_snapshot(self, snapshot_id: str, turns: int | None = None) -> bytes:
        """The state's portable blob (MessagePack); with `turns`, the state after its first `turns` turns."""
        query = "" if turns is None else f"?turns={int(turns)}"
        return await self._call("GET", f"/v1/snapshots/{snapshot_id}{query}", None, safe=True)

    async def read_snapshot(self, snapshot_id: str, turns: int | None = None) -> SnapshotBlob:
        """The state as a struct (its task and turns: what the agent did and saw), decoded from its blob; edit it
        (`msgspec.structs.replace`) and `import_snapshot` it to make a state by hand."""
        return codec.decode(await self.export_snapshot(snapshot_id, turns), SnapshotBlob, codec.MSGPACK)

    async def import_snapshot(self, blob: bytes | SnapshotBlob) -> SnapshotCreated:
        """A blob (from `export_snapshot`, any server with the same corpus) or a `SnapshotBlob` struct, imported
        through the server's checks; its snapshot id."""
        raw = blob if isinstance(blob, bytes) else codec.encode(blob, codec.MSGPACK)
        return await self._call("POST", "/v1/snapshots", SnapshotCreated, raw=raw, safe=False)

    # Deletes are not re-sent after a dropped connection: one that already succeeded would answer 404.
    async def delete(self, episode_id: str) -> Deleted:
        op = {"op": "delete", "episode_id": episode_id}
        return await self._op(op, Deleted)

    async def delete_snapshot(self, snapshot_id: str) -> Deleted:
        op = {"op": "delete_snapshot", "snapshot_id": snapshot_id}
        return await self._op(op, Deleted)

    async def batch(self, ops: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Ops as dicts (`{"op": "step", "episode_id": ..., "action": ...}`); answers `{"ok": ...}` dicts in order."""
        req = msgspec.convert({"ops": list(ops)}, BatchRequest)
        res: BatchResult = await self._call("POST", "/v1/batch", BatchResult, req, safe=False)
        return res.results

    async def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict[str, Any]]]:
        body = {"queries": queries, "topk": topk, "return_scores": True}
        return (await self._call("POST", "/retrieve", dict, body, safe=True))["result"]


def _task_done(task: asyncio.Task[None]) -> None:
    """Log a send task's unexpected error (its calls already got one), so that it is neither lost nor logged by
    asyncio as never retrieved."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.error("env client: sending a batch failed", error=f"{type(err).__name__}: {err}")


def _error_from(status: int, payload: bytes, content_type: str | None) -> EnvError:
    try:
        body = codec.decode(payload, ErrorBody, codec.media_type(content_type))
        return EnvError(body.error.code, body.error.message, status=status)
    except EnvError:
        return EnvError("http_error", f"HTTP {status}: {payload[:300]!r}", status=status)


class SyncEnvClient:
    """Blocking wrapper for scripts and notebooks: the same methods, run on a private event loop."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = EnvClient(base_url, **kwargs)

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(fn):
            return fn
        return lambda *a, **k: self._loop.run_until_complete(fn(*a, **k))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> SyncEnvClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
