"""aiohttp app of the CPU development engine: SGLang's native HTTP subset (`shared/engine_protocol.py`) over `Engine`.

Routes (SGLang 0.5.x names and shapes): `POST /generate`, `GET /health`, `GET /health_generate`,
`POST /flush_cache`, `POST /update_weights_from_disk`, `GET /get_server_info`, `GET /get_model_info`,
`POST /abort_request`, `POST /pause_generation`, `POST /continue_generation`, and the process-group weight routes
`POST /init_weights_update_group`, `/begin_weight_update`, `/update_weights_from_distributed`, `/end_weight_update`,
`/destroy_weights_update_group` (SGLang 0.5.23's JSON: `{"success", "message"}`, 200 or 400).
Errors are SGLang's shape, `{"error": {"message": ...}}`, status 400 for a bad request; nothing a client sends
crashes the server (one middleware turns every exception into a JSON answer).

Tasks and threads (who owns what):
- The event loop only parses, validates, queues and answers. `EngineService` owns a bounded `asyncio.Queue` of
  pending requests (`/generate` waits when it is full: backpressure, not unbounded memory) and ONE scheduler task.
- The scheduler task moves queued requests into the engine while it has free slots (after a `batch_window_ms`
  pause when the engine was idle, so that concurrent arrivals share their first step) and runs `Engine.step` in a
  single-thread executor, one decode step per call, then resolves the finished requests' futures on the loop.
- The executor's one thread is the only thread that touches the model, the prefix cache or the running batch.
  Control calls (flush, weight load, retract) are submitted to the same executor, so they run between steps.
- Shutdown (cleanup_ctx): the scheduler task is cancelled and awaited, every unfinished request is answered with
  finish type "abort", and the executor is shut down.

Weight updates (`/update_weights_from_disk`): new `/generate` calls wait; with `abort_all_requests` the in-flight
ones are aborted, otherwise they finish on the old weights; then the weights are loaded between steps, the prefix
cache is flushed (`flush_cache`, default true), `weight_version` is set if given, and waiting calls proceed. While
generation is paused (`/pause_generation`), the update happens at once, as in SGLang; a flush then needs no request
running (`retract` or `abort` mode), else the answer is 400 "weights updated, cache not flushed".

Weight updates over a process group (gloo; `engine.weight_group` says how the group is joined): joining and each
bucket's receive run on threads of their own (they block until the trainer, rank 0, takes part), never on the loop
or the model's thread; loading a received bucket then goes exactly like a disk update (lock, wait or pause, copy on
the model thread, `weight_version`, flush). As in SGLang 0.5.23, `/update_weights_from_distributed` outside
`/begin_weight_update` ... `/end_weight_update` answers 400 with SGLang's message and receives nothing; the bracket
is a flag here (SGLang uses it to repack quantized weights). Stricter than SGLang: a name the model does not have
is a 400 (SGLang logs a warning and skips it), and nothing of a refused bucket is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from engine.engine import ENGINE_NAME, BadRequest, Engine, EngineConfig, EngineRequest
from engine.weight_group import BACKENDS as WEIGHT_GROUP_BACKENDS
from engine.weight_group import WeightGroup
from shared.daemon import start_daemon
from shared.engine_protocol import (
    OUTSIDE_BRACKET,
    AbortRequest,
    BeginWeightUpdate,
    DestroyWeightsUpdateGroup,
    EndWeightUpdate,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    InitWeightsUpdateGroup,
    MetaInfo,
    PauseGeneration,
    SamplingParams,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsResult,
)
from shared.version import __version__

log = structlog.get_logger(__name__)

# Largest request body: a batch of 32 prompts x 4k token ids as JSON is ~1 MB; leave room for bigger batches.
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class ServerConfig:
    """The engine plus how the HTTP layer schedules it."""

    engine: EngineConfig
    queue_size: int = 1024
    """Bound of the pending-request queue; `/generate` waits (backpressure) when it is full."""
    batch_window_ms: float = 3.0
    """When the engine is idle, how long the first request waits for others to share its first step."""
    group_timeout_s: float = 1800.0
    """Weight-update groups: how long joining, and each receive, waits for the other ranks (torch's default
    process-group timeout, the one SGLang's groups get)."""


def _make_body_type() -> type:
    """/generate's body as decoded on the server. msgspec cannot decode `GenerateRequest.input_ids`'s declared
    type (`list[int] | list[list[int]]`: a union of two array types), so that field is taken as `list[Any]` and its
    shape is checked in `parse_generate`; every other field is GenerateRequest's own, so fields added there are
    picked up here. `sampling_params` is taken raw too, so that keys this engine would ignore are refused
    (`sampling_params_of`) rather than silently dropped."""
    fields: list[Any] = []
    raw = {"input_ids": list[Any], "sampling_params": dict[str, Any] | list[dict[str, Any]] | None}
    for f in msgspec.structs.fields(GenerateRequest):
        typ = raw.get(f.name, f.type)
        if f.required:
            fields.append((f.name, typ))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, typ, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, typ, f.default))
    return msgspec.defstruct("GenerateBody", fields, forbid_unknown_fields=False)


GenerateBody = _make_body_type()

# Sampling parameters SGLang accepts that this engine does not implement, with the value that means "off": any
# other value is refused (400) instead of being ignored. Keys SGLang does not know are refused as SGLang does.
_NEUTRAL_SAMPLING = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "sampling_seed": None,
}
_TEXT_ONLY_SAMPLING = {"spaces_between_special_tokens", "stream_interval"}  # affect streaming/text only
_SAMPLING_FIELDS = {f.name for f in msgspec.structs.fields(SamplingParams)}


def sampling_params_of(raw: Any) -> SamplingParams:
    """One request's `sampling_params` dict -> SamplingParams; refuses what this engine would not honour."""
    if raw is None:
        return SamplingParams()
    if isinstance(raw, SamplingParams):  # the field's default when the body has no sampling_params
        return raw
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(raw).__name__}")
    for key, value in raw.items():
        if key in _SAMPLING_FIELDS or key in _TEXT_ONLY_SAMPLING:
            continue
        if key not in _NEUTRAL_SAMPLING:
            raise BadRequest(f"unknown sampling parameter {key!r}")
        if value not in (_NEUTRAL_SAMPLING[key], None, [], {}):
            raise BadRequest(f"sampling parameter {key}={value!r} is not supported by {ENGINE_NAME}")
    try:
        return msgspec.convert({k: v for k, v in raw.items() if k in _SAMPLING_FIELDS}, SamplingParams)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid sampling_params: {e}") from e


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(body: bytes, typ: type) -> Any:
    """Decode a JSON body into `typ`; any mismatch is a BadRequest naming the field (msgspec's message)."""
    dec = _decoders.get(typ) or _decoders.setdefault(typ, msgspec.json.Decoder(typ))
    try:
        return dec.decode(body or b"{}")
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise BadRequest(f"invalid {typ.__name__} body: {e}") from e


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {n} prompts")
        return value
    return [value] * n


def parse_generate(body: Any) -> tuple[list[EngineRequest], bool]:
    """Split a decoded /generate body into engine requests; returns (requests, is_batch)."""
    ids = body.input_ids
    if not ids:
        raise BadRequest("input_ids is empty: send a list of token ids or a list of such lists")
    if all(isinstance(x, list) for x in ids):
        batch, prompts = True, ids
    elif any(isinstance(x, list) for x in ids):
        raise BadRequest("input_ids mixes ints and lists: send list[int] or list[list[int]]")
    else:
        batch, prompts = False, [ids]
    for p in prompts:
        bad = next((t for t in p if type(t) is not int), None)
        if bad is not None:
            raise BadRequest(f"input_ids contains {bad!r} ({type(bad).__name__}): token ids must be ints")
    if body.stream:
        raise BadRequest(f"stream=true is not supported by {ENGINE_NAME}")
    n = len(prompts)
    params = [sampling_params_of(sp) for sp in _per_item(body.sampling_params, n, "sampling_params")]
    want_lp = _per_item(body.return_logprob, n, "return_logprob")
    tops = _per_item(body.top_logprobs_num if body.top_logprobs_num is not None else 0, n, "top_logprobs_num")
    starts = _per_item(body.logprob_start_len, n, "logprob_start_len")
    if any(s != -1 for s in starts if s is not None):
        raise BadRequest(f"logprob_start_len={starts}: only -1 (output tokens) is supported by {ENGINE_NAME}")
    rids = _per_item(body.rid, n, "rid") if body.rid is not None else [None] * n
    reqs = []
    for p, sp, lp, top, rid in zip(prompts, params, want_lp, tops, rids, strict=True):
        req = EngineRequest(input_ids=p, params=sp, return_logprob=bool(lp), top_logprobs_num=top)
        if rid is not None:
            req.rid = rid
        reqs.append(req)
    return reqs, batch


T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T], *, name: str) -> T:
    """Run a blocking collective (`WeightGroup.join`/`receive`) on a new daemon thread and await its result
    (`shared.daemon`: a collective stuck until torch's timeout must not hold up the loop's or the interpreter's
    shutdown)."""
    return await start_daemon(fn, name)[0]


def _abort_response(req: EngineRequest) -> GenerateResponse:
    meta = MetaInfo(
        id=req.rid,
        prompt_tokens=len(req.input_ids),
        finish_reason=FinishReason(type="abort", message=req.abort_message),
        output_token_logprobs=[] if req.return_logprob else None,
        e2e_latency=time.perf_counter() - req.t_submit,
    )
    return GenerateResponse(output_ids=[], meta_info=meta)


class EngineService:
    """The async face of one `Engine`: queue, scheduler task, executor, pause and weight-update control."""

    def __init__(self, engine: Engine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.queue: asyncio.Queue[EngineRequest] = asyncio.Queue(maxsize=cfg.queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.inflight: dict[str, EngineRequest] = {}  # rid -> request, queued or in the engine
        self.resumed = asyncio.Event()  # clear while paused or updating weights: /generate waits
        self.resumed.set()
        self.paused = False
        self.idle = asyncio.Event()  # set when nothing is in flight
        self.idle.set()
        self.wake = asyncio.Event()  # the scheduler waits on it while paused
        self.update_lock = asyncio.Lock()
        self.weight_groups: dict[str, WeightGroup] = {}  # group_name -> this engine's membership
        self.update_session = False  # between /begin_weight_update and /end_weight_update
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._schedule(), name="engine-scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._run(self.engine.reset)  # the engine may outlive this app (tests share one)
        for req in list(self.inflight.values()):
            req.abort_message = "server shutting down"
            self._resolve(req, _abort_response(req))
        self.executor.shutdown(wait=True, cancel_futures=True)
        for group in self.weight_groups.values():
            group.close()
        self.weight_groups.clear()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------------------------------ requests

    async def generate(self, reqs: list[EngineRequest]) -> list[GenerateResponse]:
        for r in reqs:
            self.engine.validate(r)
        await self.resumed.wait()
        rids = [r.rid for r in reqs]
        dup = next((rid for rid in rids if rid in self.inflight or rids.count(rid) > 1), None)
        if dup is not None:
            raise BadRequest(f"rid {dup!r} is already in flight: rids must be unique among running requests")
        loop = asyncio.get_running_loop()
        for r in reqs:  # no await between the checks above and registering: a weight update sees all of them
            r.future = loop.create_future()
            self.inflight[r.rid] = r
        self.idle.clear()
        try:
            for r in reqs:
                await self.queue.put(r)
            return list(await asyncio.gather(*(r.future for r in reqs)))
        finally:
            for r in reqs:  # a cancelled handler aborts its requests and stops counting them as in flight
                if not r.future.done():
                    r.aborted = True
                    self._resolve(r, _abort_response(r))

    def _resolve(self, req: EngineRequest, resp: GenerateResponse) -> None:
        if self.inflight.get(req.rid) is req:
            del self.inflight[req.rid]
        if not self.inflight:
            self.idle.set()
        if req.future is not None and not req.future.done():
            req.future.set_result(resp)

    def _fail(self, req: EngineRequest, exc: BaseException) -> None:
        if self.inflight.get(req.rid) is req:
            del self.inflight[req.rid]
        if not self.inflight:
            self.idle.set()
        if req.future is not None and not req.future.done():
            req.future.set_exception(exc)

    async def _schedule(self) -> None:
        """The one scheduler task: feed the engine, run a step in the executor, deliver results. Never exits on
        an engine error: the requests of the failed step get a 500 and the batch is reset."""
        eng = self.engine
        while True:
            if self.paused:
                self.wake.clear()
                await self.wake.wait()
                continue
            new: list[EngineRequest] = []
            if not eng.has_work:
                new.append(await self.queue.get())
                if self.cfg.batch_window_ms > 0:
                    await asyncio.sleep(self.cfg.batch_window_ms / 1000)
                if self.paused:  # paused while we waited: answer it if aborted, else park it in the engine
                    if new[0].aborted:
                        self._resolve(new[0], _abort_response(new[0]))
                    else:
                        await self._run(eng.add, new[0])
                    continue
            free = eng.free_slots() - len(new)
            while free > 0 and not self.queue.empty():
                new.append(self.queue.get_nowait())
                free -= 1
            try:
                finished = await self._run(eng.step, new)
            except Exception as e:  # engine bug or OOM: fail this batch loudly, keep serving
                log.exception("engine step failed", error=repr(e))
                victims = await self._run(eng.reset)
                for req in {id(r): r for r in [*new, *victims]}.values():
                    self._fail(req, RuntimeError(f"engine step failed: {e!r}"))
                continue
            for req, resp in finished:
                self._resolve(req, resp)

    async def abort(self, rid: str = "", abort_all: bool = False, message: str = "aborted by request") -> int:
        """Flag requests for abort (one rid, or all). Running, the engine answers them at its next step; paused,
        they are answered here. Returns how many were flagged."""
        targets = list(self.inflight.values()) if abort_all else [r for r in self.inflight.values() if r.rid == rid]
        for r in targets:
            r.abort_message = message
            r.aborted = True
        if self.paused and targets:
            keep = []
            while not self.queue.empty():
                r = self.queue.get_nowait()
                if r.aborted:
                    self._resolve(r, _abort_response(r))
                else:
                    keep.append(r)
            for r in keep:
                self.queue.put_nowait(r)
            for req, resp in await self._run(self.engine.collect_aborted):
                self._resolve(req, resp)
        return len(targets)

    # ------------------------------------------------------------------------------------------ control

    async def pause(self, mode: str) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"mode={mode!r}: use abort, retract or in_place")
        self.paused = True
        self.resumed.clear()
        if mode == "abort":
            await self.abort(abort_all=True, message="aborted by pause_generation")
        elif mode == "retract":
            await self._run(self.engine.retract_all)

    async def resume(self) -> None:
        self.paused = False
        self.resumed.set()
        self.wake.set()

    async def flush_cache(self) -> tuple[bool, str]:
        running = await self._run(lambda: len(self.engine.running))
        if running or (self.inflight and not self.paused):
            return False, (
                f"Cache not flushed because there are pending requests. #queue-req: {self.queue.qsize()}, "
                f"#running-req: {running}, #in-flight: {len(self.inflight)}"
            )
        await self._run(self.engine.flush_cache)
        return True, "Cache flushed."

    async def update_weights(self, body: UpdateWeightsFromDisk) -> UpdateWeightsResult:
        if body.load_format not in (None, "auto", "safetensors"):
            raise BadRequest(f"load_format={body.load_format!r}: {ENGINE_NAME} loads safetensors only")

        def load() -> None:
            try:
                self.engine.load_weights(body.model_path)
            except (OSError, RuntimeError) as e:
                raise BadRequest(f"failed to load {body.model_path!r}: {e}") from e

        return await self._apply_update(
            load,
            abort_all=body.abort_all_requests,
            flush=body.flush_cache,
            weight_version=body.weight_version,
            done="Succeeded to update model weights.",
            failed="",
        )

    async def _apply_update(
        self,
        load: Callable[[], None],
        *,
        abort_all: bool,
        flush: bool,
        weight_version: str | None,
        done: str,
        failed: str,
    ) -> UpdateWeightsResult:
        """Run `load` on the model thread between steps (after in-flight requests finish, unless paused), then set
        `weight_version` and flush the prefix cache. A BadRequest from `load` is the answer's message after
        `failed`; the model is then as it was (every load checks before it copies)."""
        async with self.update_lock:
            was_paused = self.paused
            self.resumed.clear()
            try:
                if abort_all:
                    await self.abort(abort_all=True, message="aborted for a weight update")
                if not was_paused:
                    await self.idle.wait()  # in-flight requests finish on the old weights (or abort)
                try:
                    await self._run(load)
                except BadRequest as e:
                    return UpdateWeightsResult(success=False, message=f"{failed}{e}")
                if weight_version is not None:
                    self.engine.weight_version = weight_version
                if flush:
                    ok, why = await self.flush_cache()
                    if not ok:
                        return UpdateWeightsResult(success=False, message=f"Weights updated, but {why}")
                return UpdateWeightsResult(success=True, message=done)
            finally:
                if not self.paused:
                    self.resumed.set()

    # ------------------------------------------------------------------------------------------ group updates

    async def init_weights_update_group(self, body: InitWeightsUpdateGroup) -> UpdateWeightsResult:
        """Join the trainer's group as rank `rank_offset` (tp size 1) on a thread of its own: generation goes on
        while the other ranks join. A group of the same name replaces the old one, as in SGLang."""
        fail = "Failed to initialize custom process group: "
        if body.backend not in WEIGHT_GROUP_BACKENDS:
            return UpdateWeightsResult(
                success=False, message=f"{fail}backend {body.backend!r}: {ENGINE_NAME} joins over gloo only."
            )
        if not body.group_name:
            return UpdateWeightsResult(success=False, message=f"{fail}group_name is empty.")
        if not 1 <= body.rank_offset < body.world_size:
            return UpdateWeightsResult(
                success=False,
                message=f"{fail}rank_offset {body.rank_offset} must be in [1, world_size={body.world_size}) "
                "(rank 0 is the trainer).",
            )
        try:
            group = await in_daemon_thread(
                partial(
                    WeightGroup.join,
                    master_address=body.master_address,
                    master_port=body.master_port,
                    rank=body.rank_offset,
                    world_size=body.world_size,
                    group_name=body.group_name,
                    backend=body.backend,
                    timeout_s=self.cfg.group_timeout_s,
                ),
                name=f"weight-group-join-{body.group_name}",
            )
        except Exception as e:
            log.error("weight group join failed", group=body.group_name, error=repr(e))
            return UpdateWeightsResult(success=False, message=f"{fail}{e}.")
        old = self.weight_groups.pop(body.group_name, None)
        if old is not None:
            old.close()
        self.weight_groups[body.group_name] = group
        log.info("weight group joined", group=body.group_name, rank=group.rank, world_size=group.world_size)
        return UpdateWeightsResult(success=True, message="Succeeded to initialize custom process group.")

    def begin_weight_update(self) -> UpdateWeightsResult:
        if self.update_session:
            return UpdateWeightsResult(
                success=False, message="a weight-update session is already open; call end_weight_update() first"
            )
        self.update_session = True
        return UpdateWeightsResult(success=True, message="Success")

    def end_weight_update(self) -> UpdateWeightsResult:
        if not self.update_session:
            return UpdateWeightsResult(
                success=False, message="no weight-update session is open; call begin_weight_update() first"
            )
        self.update_session = False
        return UpdateWeightsResult(success=True, message="Success")

    async def update_weights_from_distributed(self, body: UpdateWeightsFromDistributed) -> UpdateWeightsResult:
        """Receive one bucket (on a thread of its own: it blocks until rank 0 broadcasts), then load it like a disk
        update. Everything is received before anything is checked against the model, so a bucket the model refuses
        leaves the group in step with the trainer. Refused before receiving (the trainer's broadcast then waits
        for torch's timeout): outside the begin/end bracket, an unknown group, a load_format other than the
        default, malformed dtypes or shapes."""
        if not self.update_session:
            return UpdateWeightsResult(success=False, message=OUTSIDE_BRACKET)
        fail = "Failed to receive weights: "
        group = self.weight_groups.get(body.group_name)
        if group is None:
            return UpdateWeightsResult(
                success=False,
                message=f"{fail}Group {body.group_name} not in {list(self.weight_groups)}. "
                "Please call `init_weights_update_group` first.",
            )
        if body.load_format not in (None, "auto"):
            return UpdateWeightsResult(success=False, message=f"{fail}load_format={body.load_format!r} unsupported.")
        try:
            named = await in_daemon_thread(
                partial(group.receive, body.names, body.dtypes, body.shapes), name=f"weight-group-recv-{group.name}"
            )
        except Exception as e:
            log.error("weight group receive failed", group=group.name, error=repr(e))
            return UpdateWeightsResult(success=False, message=f"{fail}{e}")
        source = f"group {group.name} ({len(named)} tensors)"
        done = "Succeeded to update parameter online."
        if body.weight_version is not None:
            done += f" Weight version updated to {body.weight_version}."
        return await self._apply_update(
            partial(self.engine.load_named_tensors, named, source),
            abort_all=body.abort_all_requests,
            flush=body.flush_cache,
            weight_version=body.weight_version,
            done=done,
            failed="Failed to update parameter online: ",
        )

    def destroy_weights_update_group(self, body: DestroyWeightsUpdateGroup) -> UpdateWeightsResult:
        group = self.weight_groups.pop(body.group_name, None)
        if group is None:
            return UpdateWeightsResult(success=False, message="The group to be destroyed does not exist.")
        group.close()
        return UpdateWeightsResult(success=True, message="Succeeded to destroy custom process group.")

    async def health_generate(self) -> GenerateResponse:
        req = EngineRequest(
            input_ids=[0], params=SamplingParams(max_new_tokens=1, temperature=0.0), rid=f"health-{time.time_ns()}"
        )
        return (await self.generate([req]))[0]


# ---------------------------------------------------------------------------------------------- HTTP layer

SERVICE = web.AppKey("service", EngineService)
SERVER_CONFIG = web.AppKey("server_config", ServerConfig)
ENGINE = web.AppKey("engine", Engine)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": {"message": message}}, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One place where exceptions become answers: BadRequest -> 400, HTTP errors keep their code, the rest 500."""
    try:
        return await handler(request)
    except BadRequest as e:
        return _error(str(e), 400)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.reason or str(e), e.status)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("unhandled error", path=request.path, error=repr(e))
        return _error(f"internal error: {e!r}", 500)


def _answer_item(resp: GenerateResponse) -> dict[str, Any]:
    """SGLang always sends these keys; the wire structs omit defaults, so put them back for raw-JSON readers."""
    item = msgspec.to_builtins(resp)
    item.setdefault("text", "")
    meta = item["meta_info"]
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        meta.setdefault(key, 0)
    return item


async def generate(request: web.Request) -> web.Response:
    body = decode(await request.read(), GenerateBody)
    reqs, batch = parse_generate(body)
    out = [_answer_item(r) for r in await request.app[SERVICE].generate(reqs)]
    return _json(out if batch else out[0])


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return _json(
        {
            "status": "ok",
            "engine": ENGINE_NAME,
            "note": "development engine, not SGLang",
            "version": __version__,
            "model_path": svc.engine.model_path,
            "weight_version": svc.engine.weight_version,
            "paused": svc.paused,
        }
    )


async def health_generate(request: web.Request) -> web.Response:
    if request.app[SERVICE].paused:
        return _error("generation is paused (/continue_generation resumes it)", 503)
    resp = await request.app[SERVICE].health_generate()
    if resp.meta_info.finish_reason is None or resp.meta_info.finish_reason.type == "abort":
        return _error("health generation did not complete", 503)
    return web.Response(text="")


async def flush_cache(request: web.Request) -> web.Response:
    ok, msg = await request.app[SERVICE].flush_cache()
    return web.Response(text=msg, status=200 if ok else 400)


async def update_weights_from_disk(request: web.Request) -> web.Response:
    body = decode(await request.read(), UpdateWeightsFromDisk)
    result = await request.app[SERVICE].update_weights(body)
    return _json(result, status=200 if result.success else 400)


def _weights_answer(result: UpdateWeightsResult) -> web.Response:
    """SGLang's weight routes answer `{"success", "message"}`: 200 on success, 400 with the same body otherwise."""
    return _json({"success": result.success, "message": result.message}, status=200 if result.success else 400)


async def init_weights_update_group(request: web.Request) -> web.Response:
    body = decode(await request.read(), InitWeightsUpdateGroup)
    return _weights_answer(await request.app[SERVICE].init_weights_update_group(body))


async def begin_weight_update(request: web.Request) -> web.Response:
    decode(await request.read(), BeginWeightUpdate)
    return _weights_answer(request.app[SERVICE].begin_weight_update())


async def end_weight_update(request: web.Request) -> web.Response:
    decode(await request.read(), EndWeightUpdate)
    return _weights_answer(request.app[SERVICE].end_weight_update())


async def update_weights_from_distributed(request: web.Request) -> web.Response:
    body = decode(await request.read(), UpdateWeightsFromDistributed)
    return _weights_answer(await request.app[SERVICE].update_weights_from_distributed(body))


async def destroy_weights_update_group(request: web.Request) -> web.Response:
    body = decode(await request.read(), DestroyWeightsUpdateGroup)
    return _weights_answer(request.app[SERVICE].destroy_weights_update_group(body))


async def get_server_info(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    info = await svc._run(svc.engine.server_info)
    info.update(paused=svc.paused, queued=svc.queue.qsize(), inflight=len(svc.inflight))
    return _json(info)


async def get_model_info(request: web.Request) -> web.Response:
    eng = request.app[SERVICE].engine
    return _json({"model_path": eng.model_path, "tokenizer_path": eng.model_path, "is_generation": True})


async def abort_request(request: web.Request) -> web.Response:
    body = decode(await request.read(), AbortRequest)
    await request.app[SERVICE].abort(body.rid, body.abort_all)
    return web.Response(text="")


async def pause_generation(request: web.Request) -> web.Response:
    body = decode(await request.read(), PauseGeneration)
    await request.app[SERVICE].pause(body.mode)
    return _json({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    await request.app[SERVICE].resume()
    return _json({"message": "Generation continued successfully.", "status": "ok"})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/begin_weight_update", begin_weight_update)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    app.router.add_post("/end_weight_update", end_weight_update)
    app.router.add_post("/destroy_weights_update_group", destroy_weights_update_group)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/pause_generation", pause_generation)
    app.router.add_post("/continue_generation", continue_generation)


def init_app(cfg: ServerConfig, engine: Engine | None = None) -> web.Application:
    """The engine server app. Pass a built `engine` to share one model between apps (tests); otherwise the
    engine is loaded from `cfg.engine` at startup."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVER_CONFIG] = cfg
    setup_routes(app)

    async def service_ctx(app: web.Application) -> AsyncIterator[None]:
        eng = engine
        if eng is None:
            eng = await asyncio.get_running_loop().run_in_executor(None, Engine, cfg.engine)
        app[ENGINE] = eng
        svc = EngineService(eng, cfg)
        app[SERVICE] = svc
        await svc.start()
        log.info("engine ready", engine=ENGINE_NAME, model=eng.model_path, device=str(eng.device))
        yield
        await svc.close()

    app.cleanup_ctx.append(service_ctx)
    return app
