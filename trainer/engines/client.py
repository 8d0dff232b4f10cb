"""Async client for SGLang's native HTTP API, and for the CPU engine that mirrors it (DESIGN §3).

One `EngineClient` per trainer process talks to N engine servers (real SGLang, or
`engine`) through one aiohttp `ClientSession`, with msgspec JSON against
`shared.engine_protocol`. It speaks token ids only: `input_ids` in, `output_ids` and per-token
sampling logprobs out; it never sends or reads text.

What always holds
- **Routing.** Every request carries a `route_key` (one prompt's tree). The first request of a key
  goes to the server with the fewest sequences in flight (ties: fewest keys pinned, then list
  order) and the key stays pinned there, so branches re-sending a shared prefix hit that server's
  radix cache. The pin map is an LRU bounded by `max_route_keys`; `release(key)` drops a pin
  when its tree is done. An evicted or released key is routed afresh (correct, only colder).
- **Router.** Every `/generate` carries the header `X-SMG-Routing-Key: <route_key>` (`ROUTING_HEADER`), so
  one sglang-router URL in front of several servers (policy `consistent_hashing` or `manual`) also keeps a tree on
  one server's radix cache; a key that is not printable ASCII is sent percent-encoded.
- **Concurrency.** At most `max_concurrency` HTTP calls to engines at once over all servers, and
  at most `max_concurrency_per_server` to one server; callers beyond that wait on semaphores
  (a `generate_many` batch is one call). The per-attempt `timeout_s` starts once a slot is held.
- **Retries** (`shared.retry`). Connection errors and 5xx answers are retried `retries` times (so
  `retries + 1` attempts) with exponential backoff from `backoff_s` (each wait capped at 30 s, +-25%
  jitter), then `EngineUnavailable` names the URL and the last error. A 4xx is never retried:
  `EngineRequestError` carries the server's message. A timed-out `/generate` is not retried either
  (the server may still be generating): the client sends `/abort_request` for its rid and raises
  `EngineTimeout`.
- **Answers are checked.** Each item must be finished (`finish_reason.type` in stop/length/abort),
  `output_token_logprobs` must have one `[logprob, token_id, _]` per output id with
  `token_id == output_ids[i]` and a finite logprob <= 0, `prompt_tokens` (when reported) must
  equal the ids sent and `cached_tokens` must not exceed it, a batch must answer one item per
  prompt with the rids sent. Anything else raises `EngineProtocolError` naming the mismatch.
- **Aborts are results.** An item that finished with type "abort" (`/abort_request`,
  `/pause_generation {"mode": "abort"}` during a weight update) comes back as a `Generation`
  with `aborted=True` and whatever tokens it had; it is counted in `stats.aborts`, never dropped.
  (SGLang turns aborts that carry an HTTP status >= 400, e.g. a prompt over the context length,
  into that HTTP error, so those arrive as `EngineRequestError`.)
- **Sampling parameters are always sent in full** (every field of `SamplingParams` that is not
  None, defaults included): server-side defaults may come from generation_config.json
  (`--sampling-defaults model`, SGLang's default, on its OpenAI routes) or from
  `--preferred-sampling-params` (merged under the request's values on `/generate`). `n` must
  be 1 (repeat the prompt instead). Stop *strings* need the server's tokenizer: a server launched
  with `--skip-tokenizer-init` answers 400 (-> `EngineRequestError`); `stop_token_ids` work on
  any server. `output_ids` include the matched stop token.
- **Weight sync** (`update_weights_from_disk`), on every server at once: `/pause_generation`
  (mode "abort" by default) -> `/update_weights_from_disk {flush_cache: true, weight_version}`
  -> `/continue_generation`, the last one even when the update failed. A server without the
  pause routes (404) is updated without pausing. `/flush_cache` answers 400 while requests are
  in flight; `flush_cache()` asks the server to wait for idle (`?timeout=`, SGLang >= 0.5.23)
  and retries until its deadline.
- **Weight sync over a process group**: one method per SGLang 0.5.23 route and server, `server_info`,
  `init_weights_update_group`, `begin_weight_update`, `update_weights_from_distributed`, `end_weight_update`,
  `destroy_weights_update_group`, plus `pause_generation`/`continue_generation`; none is retried (see the section
  below). `trainer.engines.weight_sync.WeightSync` drives them together with the trainer's side of the group.

Cancelling a `generate` closes its connection; SGLang aborts requests whose client disconnected.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import structlog

from shared.engine_protocol import (
    BeginWeightUpdate,
    DestroyWeightsUpdateGroup,
    EndWeightUpdate,
    GenerateResponse,
    InitWeightsUpdateGroup,
    SamplingParams,
    UpdateWeightsFromDistributed,
    UpdateWeightsResult,
)
from shared.retry import SERVER_ERRORS, RetryPolicy, StatusError, with_retries

log = structlog.get_logger(__name__)

FINISH_TYPES = ("stop", "length", "abort")
PAUSE_MODES = ("abort", "retract", "in_place")
# Status codes with which a server refuses /flush_cache because requests are in flight
# (SGLang: 400 with a text body; 409/503 accepted from other implementations).
_FLUSH_BUSY = (400, 409, 503)
_MAX_BACKOFF_S = 30.0
WAIT_SAY_S = 15.0
"""`wait_ready` logs the servers it still waits for this often."""
_BODY_IN_ERRORS = 500  # characters of an answer quoted in an error message

# sglang-router (SGLang's gateway) hashes this header to pick a worker (its consistent_hashing and manual
# policies), so one router URL in front of several servers keeps a tree's branches on one radix cache.
ROUTING_HEADER = "X-SMG-Routing-Key"

_json_encoder = msgspec.json.Encoder()
_one_decoder = msgspec.json.Decoder(GenerateResponse)
_batch_decoder = msgspec.json.Decoder(list[GenerateResponse])
_update_decoder = msgspec.json.Decoder(UpdateWeightsResult)


class EngineError(Exception):
    """Base class of every error this client raises about an engine."""


class EngineUnavailable(EngineError):
    """A server could not be reached, or kept failing (5xx), through every retry."""

    def __init__(self, url: str, attempts: int, last_error: str) -> None:
        self.url = url
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(f"engine {url} unavailable after {attempts} attempt(s): {last_error}")


class EngineTimeout(EngineUnavailable):
    """A call ran past the client's timeout (not retried: the server may still be working on it)."""


class EngineRequestError(EngineError):
    """The server refused the request (4xx, or a failed weight update): its message says why."""

    def __init__(self, url: str, path: str, status: int, message: str) -> None:
        self.url = url
        self.path = path
        self.status = status
        self.message = message
        super().__init__(f"engine {url}{path} answered {status}: {message}")


class EngineProtocolError(EngineError):
    """The server's answer does not match the contract in `shared.engine_protocol`."""


@dataclass(frozen=True)
class Generation:
    """One finished (or aborted) generation, validated against the ids that were sent."""

    output_ids: list[int]  # generated token ids, the matched stop token included
    logprobs: list[float]  # sampling logprob of output_ids[i]; [] when return_logprob was False
    finish_type: str  # "stop" | "length" | "abort"
    finish_matched: int | str | list[int] | None  # stop: the token id / stop string that matched
    finish_message: str | None  # abort: the server's reason
    prompt_tokens: int  # == len(input_ids)
    cached_tokens: int  # prompt tokens served from the server's prefix cache
    completion_tokens: int
    weight_version: str | None  # the server's weight version when it answered
    server: str  # base URL of the server that generated it
    rid: str  # request id sent (and echoed by the server)
    latency_s: float  # client wall time of the HTTP call (a batch: the whole call)
    # with top_logprobs = n > 0: per output token, the n largest logprobs of its distribution, largest first ([] for a
    # token the engine sent none for)
    top_logprobs: list[list[float]] = field(default_factory=list)

    @property
    def aborted(self) -> bool:
        return self.finish_type == "abort"


@dataclass
class EngineStats:
    """Counters since the client was created; read them, don't write them."""

    calls: int = 0  # /generate HTTP calls that returned an answer
    sequences: int = 0  # generations returned (a batch counts each item)
    retries: int = 0  # re-sent attempts after a connection error or 5xx (all routes)
    aborts: int = 0  # generations that came back with finish type "abort"
    timeouts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class _Server:
    __slots__ = ("in_flight", "keys", "sem", "url")

    def __init__(self, url: str, limit: int) -> None:
        self.url = url
        self.sem = asyncio.Semaphore(limit)
        self.in_flight = 0  # sequences sent and not yet answered (queued on the semaphore included)
        self.keys = 0  # route keys pinned here


def routing_header_value(route_key: str) -> str:
    """The `X-SMG-Routing-Key` value for `route_key`: the key itself when it is printable ASCII (what HTTP headers
    carry), else its percent-encoding (the same key always gives the same value, which is all the router needs)."""
    if route_key.isascii() and route_key.isprintable():
        return route_key
    return quote(route_key, safe="")


def _encode(struct: msgspec.Struct) -> bytes:
    return _json_encoder.encode(struct)


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """Every field of `params` that is not None, defaults included (see the module docstring)."""
    if params.n != 1:
        raise ValueError(f"SamplingParams.n must be 1, got {params.n}: send the prompt several times instead")
    return {k: v for k, v in msgspec.structs.asdict(params).items() if v is not None}


class EngineClient:
    """Client for one or more engine servers; use as `async with EngineClient(urls) as engine:`."""

    def __init__(
        self,
        urls: list[str],
        *,
        max_concurrency: int = 64,
        max_concurrency_per_server: int | None = None,
        timeout_s: float = 600,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_route_keys: int = 100_000,
        api_key: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("EngineClient needs at least one server URL")
        clean = [u.rstrip("/") for u in urls]
        for u in clean:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"engine URL {u!r} must start with http:// or https://")
        if len(set(clean)) != len(clean):
            raise ValueError(f"engine URLs must be distinct, got {urls}")
        if max_concurrency < 1 or (max_concurrency_per_server is not None and max_concurrency_per_server < 1):
            raise ValueError(f"concurrency limits must be >= 1, got {max_concurrency}, {max_concurrency_per_server}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_route_keys < 1:
            raise ValueError(
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0, max_route_keys >= 1; got "
                f"{timeout_s}, {retries}, {backoff_s}, {max_route_keys}"
            )
        per_server = max_concurrency_per_server or max_concurrency
        self._servers = [_Server(u, per_server) for u in clean]
        self._by_url = {s.url: s for s in self._servers}
        self._global = asyncio.Semaphore(max_concurrency)
        self._routes: OrderedDict[str, _Server] = OrderedDict()
        self._max_route_keys = max_route_keys
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._retry = RetryPolicy(
            attempts=retries + 1,
            backoff_s=backoff_s,
            max_backoff_s=_MAX_BACKOFF_S,
            jitter=0.25,
            errors=(aiohttp.ClientConnectionError, aiohttp.ClientPayloadError),
            statuses=SERVER_ERRORS,
        )
        self._no_retry = replace(self._retry, attempts=1)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.stats = EngineStats()

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> EngineClient:
        self._get_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session. Idempotent; the client cannot be used afterwards."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise EngineError("EngineClient is closed")
        if self._session is None:
            # limit=0: the semaphores bound the calls; a pool limit would only add a hidden queue.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self._headers)
        return self._session

    # ---- routing ---------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def load(self) -> dict[str, int]:
        """Sequences in flight per server URL."""
        return {s.url: s.in_flight for s in self._servers}

    def route_of(self, route_key: str) -> str | None:
        """The server URL `route_key` is pinned to, or None."""
        server = self._routes.get(route_key)
        return server.url if server is not None else None

    def release(self, route_key: str) -> None:
        """Forget `route_key`'s pin (its tree is done). Unknown keys are fine."""
        server = self._routes.pop(route_key, None)
        if server is not None:
            server.keys -= 1

    def _route(self, route_key: str) -> _Server:
        server = self._routes.get(route_key)
        if server is not None:
            self._routes.move_to_end(route_key)
            return server
        if len(self._routes) >= self._max_route_keys:  # evict first, so the choice below sees the freed slot
            _, evicted = self._routes.popitem(last=False)
            evicted.keys -= 1
        server = min(self._servers, key=lambda s: (s.in_flight, s.keys))
        self._routes[route_key] = server
        server.keys += 1
        return server

    # ---- generation ------------------------------------------------------------------------

    async def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        *,
        route_key: str,
        return_logprob: bool = True,
        rid: str | None = None,
        top_logprobs: int = 0,
    ) -> Generation:
        """Generate one continuation of `input_ids` on `route_key`'s server; `top_logprobs` > 0 asks for that many
        top logprobs per output token (SGLang's `top_logprobs_num`; needs return_logprob)."""
        rids = [rid] if rid is not None else None
        [gen] = await self._generate(
            [input_ids], params, route_key, return_logprob, rids, single=True, top_logprobs=top_logprobs
        )
        return gen

    async def generate_many(
        self,
        input_ids: Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        route_key: str,
        return_logprob: bool = True,
        rids: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Generate one continuation per prompt, as one batched `/generate` call to one server.

        `params` is shared by every prompt or given per prompt; answers come back in prompt order.
        """
        if not input_ids:
            raise ValueError("generate_many needs at least one prompt")
        return await self._generate(list(input_ids), params, route_key, return_logprob, rids, single=False)

    async def _generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        route_key: str,
        return_logprob: bool,
        rids: Sequence[str] | None,
        *,
        single: bool,
        top_logprobs: int = 0,
    ) -> list[Generation]:
        n = len(prompts)
        if top_logprobs < 0 or (top_logprobs and not return_logprob):
            raise ValueError(f"top_logprobs={top_logprobs}: must be >= 0, and > 0 only with return_logprob")
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {i} has no input_ids")
        if isinstance(params, SamplingParams):
            sampling: Any = sampling_dict(params)
        else:
            if len(params) != n:
                raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
            sampling = [sampling_dict(p) for p in params]
        rid_list = list(rids) if rids is not None else [uuid.uuid4().hex for _ in range(n)]
        if len(rid_list) != n or len(set(rid_list)) != n:
            raise ValueError(f"need {n} distinct rids, got {rid_list}")
        body = _json_encoder.encode(
            {
                "input_ids": prompts[0] if single else prompts,
                "sampling_params": sampling,
                "return_logprob": return_logprob,
                "logprob_start_len": -1,
                "top_logprobs_num": top_logprobs,
                "rid": rid_list[0] if single else rid_list,
                "stream": False,
            }
        )

        server = self._route(route_key)
        server.in_flight += n
        headers = {ROUTING_HEADER: routing_header_value(route_key)}
        try:
            async with self._global, server.sem:
                t0 = time.perf_counter()
                try:
                    status, data = await self._call(
                        server.url, "POST", "/generate", body, timeout_s=self.timeout_s, headers=headers
                    )
                except EngineTimeout:
                    self.stats.timeouts += 1
                    await self._abort_rids(server.url, rid_list)
                    raise
                latency = time.perf_counter() - t0
        finally:
            server.in_flight -= n
        if status != 200:
            raise EngineRequestError(server.url, "/generate", status, _error_message(data))

        try:
            items = [_one_decoder.decode(data)] if single else _batch_decoder.decode(data)
        except msgspec.DecodeError as e:
            raise EngineProtocolError(
                f"{server.url}/generate: answer does not match GenerateResponse ({e}): {_quote(data)}"
            ) from None
        if len(items) != n:
            raise EngineProtocolError(f"{server.url}/generate: {len(items)} answers for {n} prompts")
        gens = [
            _to_generation(
                item,
                url=server.url,
                rid=r,
                prompt_len=len(p),
                return_logprob=return_logprob,
                latency=latency,
                top_logprobs=top_logprobs,
            )
            for item, r, p in zip(items, rid_list, prompts, strict=True)
        ]
        st = self.stats
        st.calls += 1
        for g in gens:
            st.sequences += 1
            st.aborts += g.aborted
            st.prompt_tokens += g.prompt_tokens
            st.cached_tokens += g.cached_tokens
            st.completion_tokens += g.completion_tokens
        return gens

    async def _abort_rids(self, url: str, rids: list[str]) -> None:
        """Best effort after a timeout: ask the server to stop working on `rids`; failures are logged."""
        for r in rids:
            try:
                await self._call(
                    url, "POST", "/abort_request", _json_encoder.encode({"rid": r}), timeout_s=10, retry=False
                )
            except EngineError as e:
                log.warning("engine_abort_failed", url=url, rid=r, error=str(e))

    # ---- control ---------------------------------------------------------------------------

    async def health(self, timeout_s: float = 30.0) -> dict[str, bool]:
        """`GET /health_generate` on every server (SGLang runs a 1-token generation): URL -> 200 or not."""

        async def one(url: str) -> bool:
            try:
                status, _ = await self._call(url, "GET", "/health_generate", None, timeout_s=timeout_s, retry=False)
            except EngineError as e:
                log.debug("engine_health_failed", url=url, error=str(e))
                return False
            return status == 200

        results = await asyncio.gather(*(one(s.url) for s in self._servers))
        return dict(zip(self.urls, results, strict=True))

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        """Wait until every server passes `/health_generate`; raise `EngineUnavailable` naming the others. Says every
        ~15 s which servers it still waits for (an attached engine at a wrong URL is otherwise a silent wait)."""
        start = time.monotonic()
        deadline = start + timeout_s
        polls = 0
        said = start
        while True:
            polls += 1
            remaining = deadline - time.monotonic()
            status = await self.health(timeout_s=max(1.0, min(30.0, remaining)))
            down = [u for u, ok in status.items() if not ok]
            if not down:
                return
            if time.monotonic() - said >= WAIT_SAY_S:
                said = time.monotonic()
                waited = said - start
                log.warning("engine_not_ready", waiting_for=down, waited_s=round(waited), timeout_s=timeout_s)
            if time.monotonic() + poll_s > deadline:
                raise EngineUnavailable(", ".join(down), polls, f"/health_generate not OK within {timeout_s:g}s")
            await asyncio.sleep(poll_s)

    async def flush_cache(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
        """Flush every server's prefix cache, retrying while it refuses because requests are in flight."""
        await self._on_all(lambda url: self._flush_one(url, timeout_s, poll_s), "flush_cache")

    async def _flush_one(self, url: str, timeout_s: float, poll_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        tries = 0
        while True:
            tries += 1
            wait_s = max(0.0, min(10.0, deadline - time.monotonic()))
            status, data = await self._call(
                url, "POST", f"/flush_cache?timeout={wait_s:.3f}", None, timeout_s=wait_s + self._control_timeout()
            )
            if status == 200:
                return
            if status not in _FLUSH_BUSY:
                raise EngineRequestError(url, "/flush_cache", status, _error_message(data))
            if time.monotonic() + poll_s > deadline:
                raise EngineRequestError(
                    url,
                    "/flush_cache",
                    status,
                    f"still refused after {tries} tries over {timeout_s:g}s (requests in flight?): {_error_message(data)}",
                )
            await asyncio.sleep(poll_s)

    async def update_weights_from_disk(
        self, path: str, weight_version: str, *, pause_mode: str = "abort", flush_cache: bool = True
    ) -> dict[str, UpdateWeightsResult]:
        """Load new weights from `path` on every server: pause -> update (+ flush) -> continue.

        `pause_mode` "abort" returns in-flight generations with finish type "abort" (re-send them);
        "retract" re-queues them to finish on the new weights (their logprobs then mix versions);
        "in_place" keeps them running, so the cache flush fails while any are.
        """
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        body = _json_encoder.encode(
            {
                "model_path": path,
                "flush_cache": flush_cache,
                "abort_all_requests": False,
                "weight_version": weight_version,
            }
        )

        async def one(url: str) -> UpdateWeightsResult:
            paused = await self._pause(url, pause_mode)
            try:
                result = await self._update_one(url, body)
            except BaseException:
                if paused:
                    try:
                        await self._continue(url)
                    except EngineError as e:  # the update's own error is the one to report
                        log.error("engine_continue_failed", url=url, error=str(e))
                raise
            if paused:
                await self._continue(url)
            return result

        results = await self._on_all(one, "update_weights_from_disk")
        log.info("engine_weights_updated", path=path, weight_version=weight_version, servers=len(results))
        return results

    async def _update_one(self, url: str, body: bytes) -> UpdateWeightsResult:
        return await self._weights_call(url, "/update_weights_from_disk", body, retry=True)

    async def _weights_call(self, url: str, path: str, body: bytes, *, retry: bool) -> UpdateWeightsResult:
        """POST to a weight route; anything but 200 with `success: true` raises `EngineRequestError`."""
        status, data = await self._call(url, "POST", path, body, timeout_s=self.timeout_s, retry=retry)
        if status != 200:
            raise EngineRequestError(url, path, status, _error_message(data))
        try:
            result = _update_decoder.decode(data)
        except msgspec.DecodeError as e:
            raise EngineProtocolError(
                f"{url}{path}: answer does not match UpdateWeightsResult ({e}): {_quote(data)}"
            ) from None
        if not result.success:
            raise EngineRequestError(url, path, status, result.message or "success=false")
        return result

    # ---- weights over a process group (driven by `trainer.engines.weight_sync.WeightSync`) ---------
    # One server per call: each joins the group with its own rank. None of these is retried: a second
    # /init_weights_update_group or /update_weights_from_distributed would wait for a collective that rank 0 is
    # not running, and /begin_weight_update is not idempotent (a second one answers 400).

    async def server_info(self) -> dict[str, dict[str, Any]]:
        """`GET /get_server_info` on every server: URL -> its JSON object (SGLang: its server arguments, e.g.
        `tp_size`, `dp_size`, `device`, plus scheduler info; the CPU engine: `tp_size` 1, `device`, ...)."""

        async def one(url: str) -> dict[str, Any]:
            status, data = await self._call(url, "GET", "/get_server_info", None, timeout_s=self._control_timeout())
            if status != 200:
                raise EngineRequestError(url, "/get_server_info", status, _error_message(data))
            info = msgspec.json.decode(data)
            if not isinstance(info, dict):
                raise EngineProtocolError(f"{url}/get_server_info: expected a JSON object, got {_quote(data)}")
            return info

        return await self._on_all(one, "get_server_info")

    async def pause_generation(self, url: str, mode: str = "abort") -> bool:
        """`/pause_generation` on one server; False when it has no such route (404). See `update_weights_from_disk`
        for the modes."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        return await self._pause(self._known(url), mode)

    async def continue_generation(self, url: str) -> None:
        """`/continue_generation` on one server (a server without the route is fine)."""
        await self._continue(self._known(url))

    async def init_weights_update_group(self, url: str, req: InitWeightsUpdateGroup) -> UpdateWeightsResult:
        """Ask one server to join the weight-update group; answers once the group formed, so rank 0 must be joining
        at the same time (another thread)."""
        return await self._weights_call(self._known(url), "/init_weights_update_group", _encode(req), retry=False)

    async def begin_weight_update(self, url: str, selector: str = "all") -> UpdateWeightsResult:
        """Open the update bracket on one server (SGLang 0.5.23 refuses group and tensor updates outside it)."""
        body = _encode(BeginWeightUpdate(selector=selector))
        return await self._weights_call(self._known(url), "/begin_weight_update", body, retry=False)

    async def update_weights_from_distributed(self, url: str, req: UpdateWeightsFromDistributed) -> UpdateWeightsResult:
        """One bucket: the server receives `req.names` by broadcast from rank 0, which must be broadcasting the same
        tensors in the same order meanwhile (another thread), then loads them."""
        return await self._weights_call(self._known(url), "/update_weights_from_distributed", _encode(req), retry=False)

    async def end_weight_update(self, url: str) -> UpdateWeightsResult:
        """Close the update bracket on one server."""
        return await self._weights_call(self._known(url), "/end_weight_update", _encode(EndWeightUpdate()), retry=False)

    async def destroy_weights_update_group(self, url: str, group_name: str) -> UpdateWeightsResult:
        """Ask one server to leave and destroy the weight-update group `group_name`."""
        body = _encode(DestroyWeightsUpdateGroup(group_name=group_name))
        return await self._weights_call(self._known(url), "/destroy_weights_update_group", body, retry=False)

    def _known(self, url: str) -> str:
        clean = url.rstrip("/")
        if clean not in self._by_url:
            raise ValueError(f"{url!r} is not one of this client's servers {self.urls}")
        return clean

    async def _pause(self, url: str, mode: str) -> bool:
        """`/pause_generation`; False when the server has no such route (404)."""
        status, data = await self._call(
            url, "POST", "/pause_generation", _json_encoder.encode({"mode": mode}), timeout_s=self._control_timeout()
        )
        if status == 404:
            log.info("engine_pause_unsupported", url=url)
            return False
        if status != 200:
            raise EngineRequestError(url, "/pause_generation", status, _error_message(data))
        return True

    async def _continue(self, url: str) -> None:
        status, data = await self._call(url, "POST", "/continue_generation", b"{}", timeout_s=self._control_timeout())
        if status not in (200, 404):
            raise EngineRequestError(url, "/continue_generation", status, _error_message(data))

    def _control_timeout(self) -> float:
        return min(self.timeout_s, 60.0)

    async def _on_all(self, fn: Callable[[str], Awaitable[Any]], what: str) -> dict[str, Any]:
        """Run `fn(url)` on every server concurrently; all finish before any error is raised."""
        results = await asyncio.gather(*(fn(s.url) for s in self._servers), return_exceptions=True)
        errors = [(u, r) for u, r in zip(self.urls, results, strict=True) if isinstance(r, BaseException)]
        for _, r in errors:
            if not isinstance(r, Exception):  # CancelledError, KeyboardInterrupt: propagate as is
                raise r
        if len(errors) == 1:
            raise errors[0][1]
        if errors:
            detail = "; ".join(f"{u}: {r}" for u, r in errors)
            raise EngineError(f"{what} failed on {len(errors)} of {len(results)} servers: {detail}") from errors[0][1]
        return dict(zip(self.urls, results, strict=True))

    # ---- transport -------------------------------------------------------------------------

    async def _call(
        self,
        url: str,
        method: str,
        path: str,
        body: bytes | None,
        *,
        timeout_s: float,
        retry: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One HTTP exchange, retried on connection errors and 5xx. Returns (status, body) for < 500.
        `headers` are sent on top of the session's (Content-Type, Authorization)."""
        session = self._get_session()
        tries = 0

        async def once() -> tuple[int, bytes]:
            nonlocal tries
            tries += 1
            if tries > 1:
                self.stats.retries += 1
            try:
                async with session.request(
                    method, url + path, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
                ) as resp:
                    data = await resp.read()
            except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (distinct classes on Python 3.10)
                raise EngineTimeout(url, tries, f"{method} {path} timed out after {timeout_s:g}s") from None
            if resp.status >= 500:
                raise StatusError(resp.status, _error_message(data))
            return resp.status, data

        try:
            return await with_retries(
                self._retry if retry else self._no_retry, once, event="engine_retry", url=url, path=path
            )
        except StatusError as e:  # transient errors only reach here once the attempts ran out
            raise EngineUnavailable(url, tries, f"{method} {path} answered {e.status}: {e.detail}") from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise EngineUnavailable(url, tries, f"{method} {path}: {type(e).__name__}: {e}") from e


def _to_generation(
    item: GenerateResponse,
    *,
    url: str,
    rid: str,
    prompt_len: int,
    return_logprob: bool,
    latency: float,
    top_logprobs: int = 0,
) -> Generation:
    """Check one answer item against what was sent and turn it into a `Generation`."""
    mi = item.meta_info
    where = f"{url}/generate rid={rid}"
    if mi.id and mi.id != rid:
        raise EngineProtocolError(f"{where}: answer is for rid {mi.id!r}")
    fr = mi.finish_reason
    if fr is None:
        raise EngineProtocolError(f"{where}: meta_info.finish_reason is missing (a non-streaming answer is finished)")
    if fr.type not in FINISH_TYPES:
        raise EngineProtocolError(f"{where}: finish_reason.type {fr.type!r} is not one of {FINISH_TYPES}")
    ids = item.output_ids
    logprobs: list[float] = []
    if return_logprob:
        entries = mi.output_token_logprobs
        if entries is None and ids:
            raise EngineProtocolError(f"{where}: return_logprob was set but meta_info.output_token_logprobs is missing")
        entries = entries or []
        if len(entries) != len(ids):
            raise EngineProtocolError(
                f"{where}: output_token_logprobs has {len(entries)} entries for {len(ids)} output_ids"
            )
        for i, (entry, tok) in enumerate(zip(entries, ids, strict=True)):
            if len(entry) < 2:
                raise EngineProtocolError(
                    f"{where}: output_token_logprobs[{i}] = {entry!r} is not [logprob, token_id, ...]"
                )
            lp, tid = entry[0], entry[1]
            if tid != tok:
                raise EngineProtocolError(
                    f"{where}: output_token_logprobs[{i}] is for token {tid!r} but output_ids[{i}] = {tok}"
                )
            if not _is_logprob(lp):
                raise EngineProtocolError(f"{where}: output_token_logprobs[{i}] has logprob {lp!r} (need a float <= 0)")
            logprobs.append(float(lp))
    tops = _top_logprobs(mi.output_top_logprobs, len(ids), top_logprobs, where) if top_logprobs else []
    if mi.prompt_tokens and mi.prompt_tokens != prompt_len:
        raise EngineProtocolError(
            f"{where}: prompt_tokens={mi.prompt_tokens} but {prompt_len} input_ids were sent (truncated by the server?)"
        )
    if not 0 <= mi.cached_tokens <= prompt_len:
        raise EngineProtocolError(f"{where}: cached_tokens={mi.cached_tokens} outside [0, {prompt_len}]")
    return Generation(
        output_ids=ids,
        logprobs=logprobs,
        finish_type=fr.type,
        finish_matched=fr.matched,
        finish_message=fr.message,
        prompt_tokens=prompt_len,
        cached_tokens=mi.cached_tokens,
        completion_tokens=mi.completion_tokens or len(ids),
        weight_version=mi.weight_version,
        server=url,
        rid=rid,
        latency_s=latency,
        top_logprobs=tops,
    )


def _top_logprobs(rows: list[list[list[Any]] | None] | None, n_ids: int, n: int, where: str) -> list[list[float]]:
    """meta_info.output_top_logprobs checked (one row per output token, n [logprob, token_id, ...] entries, largest
    first) and reduced to the logprobs; a null row (SGLang's for a token without them) is an empty list."""
    if rows is None and n_ids:
        raise EngineProtocolError(
            f"{where}: top_logprobs_num={n} was sent but meta_info.output_top_logprobs is missing"
        )
    rows = rows or []
    if len(rows) != n_ids:
        raise EngineProtocolError(f"{where}: output_top_logprobs has {len(rows)} rows for {n_ids} output_ids")
    out = []
    for i, row in enumerate(rows):
        if row is None:
            out.append([])
            continue
        lps = [e[0] if isinstance(e, list) and len(e) >= 2 else None for e in row]
        if len(lps) != n or not all(map(_is_logprob, lps)) or any(a < b for a, b in pairwise(lps)):
            raise EngineProtocolError(
                f"{where}: output_top_logprobs[{i}] = {row!r}: need {n} [logprob <= 0, token_id, ...], largest first"
            )
        out.append([float(x) for x in lps])
    return out


def _is_logprob(x: Any) -> bool:
    """A log-probability as an engine sends it: a number <= 0 (1e-6 of rounding above it allowed), not NaN."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and not math.isnan(x) and x <= 1e-6


def _quote(data: bytes) -> str:
    text = data[:_BODY_IN_ERRORS].decode("utf-8", "replace")
    return text + ("…" if len(data) > _BODY_IN_ERRORS else "")


def _error_message(data: bytes) -> str:
    """The message in an error body: SGLang's `{"error": {"message"}}`, `{"error": "..."}`,
    `{"message"}` (its ErrorResponse), FastAPI's `{"detail"}`, our `{"error": {"code", "message"}}`, or text."""
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return _quote(data).strip() or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            code = err.get("code")
            return f"{code}: {err['message']}" if isinstance(code, str) else str(err["message"])
        if err is not None:
            return str(err)
        for key in ("message", "detail"):
            if key in obj:
                return str(obj[key])
    return _quote(data)
