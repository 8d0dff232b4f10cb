"""Weight sync from the trainer to the engines over a torch process group: SGLang's own RL path (DESIGN §3).

Public API
    async with WeightSync.open(engine, backend=None, master_address="127.0.0.1", master_port=0,
                               bucket_bytes=512 << 20) as sync:
        timings = await sync.push(model.state_dict(), version=str(step))   # -> PushTimings
    # or, held for a whole run: sync = await WeightSync.create(engine, ...); ...; await sync.close()

`engine` is the run's `trainer.engines.client.EngineClient`; the same calls drive real SGLang 0.5.23 (nccl between
GPUs, gloo on CPU) and our CPU engine (gloo), which implements the same five routes. Its URLs must be the engines
themselves, not a router in front of them: each engine joins the group with ranks of its own.

The group (`create`). The trainer is rank 0; engine i joins as ranks `rank_offset_i .. rank_offset_i + tp_i - 1`
with `rank_offset_0 = 1` (tp_i = `tp_size` from its `/get_server_info`, 1 when absent; dp or pp sizes above 1 are
refused, as SGLang refuses them for this route), so `world_size = 1 + sum(tp_i)`. `backend` None picks nccl when
every engine reports a cuda device and gloo when every one reports cpu. Rank 0 builds the group exactly as SGLang's
`init_custom_process_group` does on the engines (torch's `tcp://` rendezvous, a PrefixStore named after the group,
then torch's `_new_process_group_helper`) on a thread, while `/init_weights_update_group` is in flight to every
engine: each side blocks until all ranks have joined. The group's name is unique per `WeightSync` unless given.

One push (`push(named_tensors, version=...)`), on all engines at once:
`/pause_generation` (mode "abort": in-flight generations come back aborted, as with disk updates) ->
`/begin_weight_update` -> per bucket, `/update_weights_from_distributed {names, dtypes, shapes, group_name}` to
every engine while a thread broadcasts that bucket's tensors from rank 0 in the same order (the HTTP calls and the
broadcast run concurrently: each side waits for the other) -> `/end_weight_update` -> `/continue_generation`.
A bucket holds tensors in input order up to `bucket_bytes` (a bigger tensor goes alone). Only the last bucket
carries `weight_version` and `flush_cache: true`, so the version changes and the engines' prefix caches (KV of the
old weights) are flushed once every weight has arrived. The bracket is closed and generation resumed whatever
happened, except on an engine left blocked in a receive (below). Returns `PushTimings`.

Input: (Hugging Face parameter name, tensor) pairs (or a mapping), already in the engines' dtype; gloo sends them
from CPU, nccl copies each bucket to this process's current CUDA device first (which must not be an engine's GPU:
NCCL refuses two ranks of one group on the same device). Tied embeddings: a
"lm_head.weight" that is the same tensor as "model.embed_tokens.weight" (a tied model's state dict holds both) is
not sent. SGLang's loader sets the tied head from the embedding and skips a sent "lm_head.weight" (its Qwen3 model
has no such parameter when tied), and so does the CPU engine; a separate copy of it is sent like any tensor.

Failures raise `WeightSyncError` naming the step, the bucket and each engine's error. When an engine refuses a
bucket after receiving it (a name or shape its model does not have: the CPU engine loads nothing of that bucket,
SGLang may have loaded part of it), the group is still in step and the sync stays usable. When a collective cannot
finish (an engine refused before receiving, died, or the broadcast raised), the engines that answered are given
`FAILURE_GRACE_S`, then the sync is marked broken: every later push raises, and `close()` skips the engines still
blocked in a receive (they wait out the group timeout, torch's 30 min default on SGLang). Gloo cannot abort a
blocked collective, so rank 0's thread also waits out `timeout_s`; it is a daemon thread (named "weight-sync-..."),
but a process that exits while one is blocked may abort at exit ("terminate called without an active exception":
the thread leaves torch's C++ code after Python's finalisation), so after a failure let `timeout_s` pass first.
A failed `create` leaves the same kind of thread in the rendezvous, and an SGLang engine that did join it blocked
in `/init_weights_update_group` until its own timeout.

Threads: every blocking collective (rendezvous, broadcast) runs on a daemon thread of its own, never on the event
loop; one push at a time (a lock); `close()` destroys the group on the engines, then on this side.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import torch
import torch.distributed as dist

from shared.daemon import start_daemon
from shared.engine_protocol import InitWeightsUpdateGroup, UpdateWeightsFromDistributed
from trainer.engines.client import PAUSE_MODES, EngineClient, EngineError
from trainer.engines.launcher import free_port

log = structlog.get_logger(__name__)

T = TypeVar("T")

BACKENDS = ("gloo", "nccl")
DEFAULT_BUCKET_BYTES = 512 << 20
# After the first engine error in a bucket, how long the broadcast and the other engines get to finish. An engine
# that refuses a bucket after receiving it has received everything, so the broadcast completes within the time the
# slowest engine needs for one bucket; 30 s covers 512 MB at 18 MB/s.
FAILURE_GRACE_S = 30.0
_TIED = ("lm_head.weight", "model.embed_tokens.weight")


class WeightSyncError(EngineError):
    """A weight-sync step failed; the message says which step, bucket and engines."""


class _CollectiveFailed(WeightSyncError):
    """A collective did not finish: the group is out of step, and `stuck` engines may still be blocked in it."""

    def __init__(self, message: str, stuck: set[str]) -> None:
        super().__init__(message)
        self.stuck = stuck


@dataclass(frozen=True)
class PushTimings:
    """What one `push` sent and where its time went (wall seconds on the trainer)."""

    version: str
    tensors: int  # tensors sent
    skipped: int  # tied "lm_head.weight" not sent
    bytes: int  # bytes sent (once, whatever the number of engines)
    buckets: int  # /update_weights_from_distributed calls per engine
    pause_s: float
    begin_s: float
    transfer_s: float  # every bucket: HTTP calls and broadcasts, the engines' loads and the final flush
    end_s: float
    resume_s: float
    total_s: float

    @property
    def seconds_per_gb(self) -> float:
        return self.total_s / (self.bytes / 1e9) if self.bytes else float("nan")


@dataclass
class _Bucket:
    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )


def named_for_push(named_tensors: Iterable[tuple[str, torch.Tensor]], skipped: list[str]) -> Iterator[tuple[str, Any]]:
    """The pairs to send, in input order, except that "lm_head.weight" is held to the end and dropped (appended to
    `skipped`) when it is the same tensor as "model.embed_tokens.weight" (see the module docstring)."""
    head: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    for name, t in named_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if name == _TIED[0]:
            head = t
            continue
        if name == _TIED[1]:
            embed = t
        yield name, t
    if head is not None:
        if embed is not None and _same_tensor(head, embed):
            skipped.append(_TIED[0])
        else:
            yield _TIED[0], head


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[_Bucket]:
    """Consecutive tensors in buckets of at most `bucket_bytes` (a tensor bigger than that forms its own bucket)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket = _Bucket()
    for name, t in named_tensors:
        size = t.numel() * t.element_size()
        if bucket.names and bucket.nbytes + size > bucket_bytes:
            yield bucket
            bucket = _Bucket()
        bucket.names.append(name)
        bucket.tensors.append(t)
        bucket.nbytes += size
    if bucket.names:
        yield bucket


class WeightSync:
    """Rank 0 of a weight-update group spanning the engines of one `EngineClient`. Make it with `create` or `open`."""

    def __init__(
        self,
        engine: EngineClient,
        *,
        pg: Any,
        backend: str,
        group_name: str,
        ranks: dict[str, int],
        world_size: int,
        bucket_bytes: int,
        timeout_s: float,
        pause_mode: str,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.group_name = group_name
        self.ranks = ranks  # engine URL -> its rank_offset
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self._pg = pg
        self._lock = asyncio.Lock()
        self._threads: list[threading.Thread] = []  # collectives started, to know whether one still runs
        self._broken: str | None = None  # why the group is out of step
        self._stuck: set[str] = set()  # engines left blocked in a receive
        self._closed = False
        self.pushes = 0

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, engine: EngineClient, **kwargs: Any) -> AsyncIterator[WeightSync]:
        """`async with WeightSync.open(engine, ...) as sync:` — `create(engine, **kwargs)`, then `close()`."""
        sync = await cls.create(engine, **kwargs)
        try:
            yield sync
        finally:
            await sync.close()

    @classmethod
    async def create(
        cls,
        engine: EngineClient,
        *,
        backend: str | None = None,
        master_address: str = "127.0.0.1",
        master_port: int = 0,
        group_name: str | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600.0,
        pause_mode: str = "abort",
    ) -> WeightSync:
        """Form the group with every engine of `engine` (see the module docstring).

        `master_address` must be an address of this machine that the engines can reach (they connect to it);
        `master_port` 0 takes a free port. `timeout_s` bounds the group's rendezvous and every broadcast (torch's
        process-group timeout on this side). `pause_mode` is the `/pause_generation` mode of every push.
        """
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        if bucket_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"need bucket_bytes >= 1 and timeout_s > 0, got {bucket_bytes}, {timeout_s}")
        infos = await engine.server_info()
        ranks: dict[str, int] = {}
        devices: dict[str, str] = {}
        next_rank = 1
        for url in engine.urls:
            info = infos[url]
            for key in ("dp_size", "pp_size"):
                if int(info.get(key) or 1) != 1:
                    raise WeightSyncError(
                        f"{url}: {key}={info[key]}; weight updates over a group need {key} 1 (SGLang refuses others)"
                    )
            ranks[url] = next_rank
            next_rank += int(info.get("tp_size") or 1)
            devices[url] = str(info.get("device", "?"))
        if backend is None:
            backend = _backend_for(devices)
        if backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("backend nccl needs CUDA on the trainer, and torch sees no CUDA device here")
        if backend == "nccl" and dist.is_initialized() and dist.distributed_c10d._get_default_group().bound_device_id:
            # torch's helper would then build the NCCL communicator by splitting the default group's, which the
            # engines are not part of
            raise WeightSyncError(
                "this process's default process group is bound to a device (init_process_group(device_id=...)), so "
                "torch would split the weight group's NCCL communicator from it; initialise it without device_id"
            )
        world_size = next_rank
        name = group_name or f"trace-weights-{uuid.uuid4().hex[:12]}"
        port = master_port or free_port(master_address)
        timeout = datetime.timedelta(seconds=timeout_s)

        def join() -> Any:
            return _join_as_rank0(master_address, port, world_size, name, backend, timeout)

        calls = {
            url: engine.init_weights_update_group(
                url,
                InitWeightsUpdateGroup(
                    master_address=master_address,
                    master_port=port,
                    rank_offset=ranks[url],
                    world_size=world_size,
                    group_name=name,
                    backend=backend,
                ),
            )
            for url in engine.urls
        }
        what = f"forming weight group {name!r} ({backend}, tcp://{master_address}:{port}, world_size {world_size})"
        t0 = time.perf_counter()
        threads: list[threading.Thread] = []
        try:
            # grace 0: an engine that refused to join can never complete the rendezvous
            pg, _ = await _together(what, join, calls, grace_s=0.0, threads=threads)
        except WeightSyncError:
            if not any(t.is_alive() for t in threads):  # formed here, refused by an engine: do not leak it
                _destroy_named_group(name)
            raise
        log.info(
            "weight_group_formed",
            group=name,
            backend=backend,
            world_size=world_size,
            ranks=ranks,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return cls(
            engine,
            pg=pg,
            backend=backend,
            group_name=name,
            ranks=ranks,
            world_size=world_size,
            bucket_bytes=bucket_bytes,
            timeout_s=timeout_s,
            pause_mode=pause_mode,
        )

    async def close(self) -> None:
        """Destroy the group on every engine (but those blocked in a receive), then on this side. Idempotent."""
        async with self._lock:  # after a running push
            if self._closed:
                return
            self._closed = True
            urls = [u for u in self.engine.urls if u not in self._stuck]
            _, errors = await _on_each(urls, lambda u: self.engine.destroy_weights_update_group(u, self.group_name))
            if any(t.is_alive() for t in self._threads):  # destroying a group under a running collective is unsafe
                log.warning("weight_group_left_running", group=self.group_name, why=self._broken)
            else:
                dist.destroy_process_group(self._pg)
            self._pg = None
        if errors:
            raise WeightSyncError(_describe(f"destroying weight group {self.group_name!r}", errors))

    # ---- push ------------------------------------------------------------------------------

    async def push(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *, version: str
    ) -> PushTimings:
        """Send every tensor to every engine and make `version` their weight version (see the module docstring)."""
        pairs = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        async with self._lock:  # _push checks the group under it
            skipped: list[str] = []
            return await self._push(
                lambda: self._send_buckets(named_for_push(pairs, skipped), version), skipped, version
            )

    async def push_stream(
        self, buckets: AsyncIterable[tuple[list[str], list[torch.Tensor]]], count: int, *, version: str
    ) -> PushTimings:
        """`push`, from buckets made while it sends (`trainer.learner.policy.Policy.weight_stream`: each tensor
        gathered and cast as its bucket's turn comes), so no whole-model copy exists on this side: each source
        bucket goes as one bucket, the `count`-th (the last) with the version and the flush. A tied LM head must be
        left out by the source. Raises if the source gives other than `count` buckets (after closing the bracket)."""
        if count < 1:
            raise ValueError(f"push {version}: no buckets to send (count {count})")
        async with self._lock:
            return await self._push(lambda: self._send_stream(buckets, count, version), [], version)

    def _send_device(self) -> torch.device:
        """Where a bucket is broadcast from: this process's CUDA device under nccl, the CPU under gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    async def _send_stream(
        self, buckets: AsyncIterable[tuple[list[str], list[torch.Tensor]]], count: int, version: str
    ) -> tuple[int, int, int]:
        device = self._send_device()
        tensors = nbytes = index = 0
        async for names, ts in buckets:
            if index == count:
                raise WeightSyncError(f"push {version}: the source gave more than the {count} buckets announced")
            index += 1
            bucket = _Bucket(list(names), list(ts), sum(t.numel() * t.element_size() for t in ts))
            last = index == count
            await self._send_bucket(bucket, index, device, version=version if last else None, flush=last)
            tensors += len(bucket.names)
            nbytes += bucket.nbytes
            del bucket, ts
        if index != count:  # the engines have the buckets sent, and no version or flush: say so
            raise WeightSyncError(f"push {version}: the source gave {index} buckets, {count} announced")
        return tensors, nbytes, index

    async def _push(
        self, send: Callable[[], Awaitable[tuple[int, int, int]]], skipped: list[str], version: str
    ) -> PushTimings:
        """One push, under the lock (`push`, `push_stream`): checked here, so a push waiting for the lock sees what the
        one before it did."""
        if self._closed:
            raise WeightSyncError(f"weight group {self.group_name!r} is closed")
        if self._broken is not None:
            raise WeightSyncError(
                f"weight group {self.group_name!r} is out of step ({self._broken}); close it and create a new one"
            )
        eng = self.engine
        urls = eng.urls
        t0 = time.perf_counter()
        ok, errors = await _on_each(urls, lambda u: eng.pause_generation(u, self.pause_mode))
        paused = [u for u, was in ok.items() if was]
        t_pause = time.perf_counter()
        t_begin = t_sent = t_end = t_pause
        sent = (0, 0, 0)
        primary: BaseException | None = None
        try:
            if errors:
                raise WeightSyncError(_describe(f"push {version}: pausing generation", errors))
            ok, errors = await _on_each(urls, eng.begin_weight_update)
            begun = list(ok)
            t_begin = time.perf_counter()
            try:
                if errors:
                    raise WeightSyncError(_describe(f"push {version}: /begin_weight_update", errors))
                sent = await send()
                t_sent = time.perf_counter()
            except BaseException as e:
                primary = e
                raise
            finally:
                ok, errors = await _on_each([u for u in begun if u not in self._stuck], eng.end_weight_update)
                t_end = time.perf_counter()
                if errors and primary is None:
                    primary = WeightSyncError(_describe(f"push {version}: /end_weight_update", errors))
                    raise primary
                if errors:
                    log.error("weight_sync_end_failed", errors={u: str(e) for u, e in errors.items()})
        except BaseException as e:
            primary = primary or e
            raise
        finally:
            ok, errors = await _on_each([u for u in paused if u not in self._stuck], eng.continue_generation)
            if errors and primary is None:
                raise WeightSyncError(_describe(f"push {version}: /continue_generation", errors))
            if errors:
                log.error("weight_sync_continue_failed", errors={u: str(e) for u, e in errors.items()})
        t_done = time.perf_counter()
        tensors, nbytes, buckets = sent
        self.pushes += 1
        timings = PushTimings(
            version=version,
            tensors=tensors,
            skipped=len(skipped),
            bytes=nbytes,
            buckets=buckets,
            pause_s=t_pause - t0,
            begin_s=t_begin - t_pause,
            transfer_s=t_sent - t_begin,
            end_s=t_end - t_sent,
            resume_s=t_done - t_end,
            total_s=t_done - t0,
        )
        log.info(
            "weights_pushed",
            group=self.group_name,
            version=version,
            tensors=tensors,
            mb=round(nbytes / 1e6, 1),
            buckets=buckets,
            engines=len(urls),
            seconds=round(timings.total_s, 3),
        )
        return timings

    async def _send_buckets(self, pairs: Iterable[tuple[str, torch.Tensor]], version: str) -> tuple[int, int, int]:
        """Send every bucket; returns (tensors, bytes, buckets). The last bucket carries the version and the flush."""
        device = self._send_device()
        buckets = plan_buckets(pairs, self.bucket_bytes)
        current = next(buckets, None)
        if current is None:
            raise ValueError(f"push {version}: no tensors to send")
        tensors = nbytes = index = 0
        while current is not None:
            upcoming = next(buckets, None)
            index += 1
            last = upcoming is None
            await self._send_bucket(current, index, device, version=version if last else None, flush=last)
            tensors += len(current.names)
            nbytes += current.nbytes
            current = upcoming
        return tensors, nbytes, index

    async def _send_bucket(
        self, bucket: _Bucket, index: int, device: torch.device, *, version: str | None, flush: bool
    ) -> None:
        ts = [t.detach().to(device).contiguous() for t in bucket.tensors]
        req = UpdateWeightsFromDistributed(
            names=bucket.names,
            dtypes=[_dtype_name(t) for t in ts],
            shapes=[list(t.shape) for t in ts],
            group_name=self.group_name,
            flush_cache=flush,
            weight_version=version,
        )
        pg, cuda = self._pg, device.type == "cuda"

        def broadcast() -> None:
            for t in ts:
                dist.broadcast(t, src=0, group=pg)
            if cuda:
                torch.cuda.synchronize(device)

        what = f"bucket {index} ({len(ts)} tensors, {bucket.nbytes / 1e6:.1f} MB, first {bucket.names[0]!r})"
        calls = {u: self.engine.update_weights_from_distributed(u, req) for u in self.engine.urls}
        self._threads = [t for t in self._threads if t.is_alive()]
        try:
            await _together(what, broadcast, calls, grace_s=FAILURE_GRACE_S, threads=self._threads)
        except _CollectiveFailed as e:
            self._broken = str(e)
            self._stuck |= e.stuck
            raise
        except asyncio.CancelledError:  # the engines may be blocked in this bucket's receive
            self._broken = f"push cancelled during {what}"
            self._stuck |= set(calls)
            raise


def _backend_for(devices: dict[str, str]) -> str:
    kinds = {u: d.split(":")[0] for u, d in devices.items()}
    if all(k == "cuda" for k in kinds.values()):
        return "nccl"
    if all(k == "cpu" for k in kinds.values()):
        return "gloo"
    raise WeightSyncError(f"cannot choose a backend for engines on devices {devices}: pass backend='gloo' or 'nccl'")


def _join_as_rank0(
    master_address: str, port: int, world_size: int, group_name: str, backend: str, timeout: datetime.timedelta
) -> Any:
    """Rank 0's side of SGLang's `init_custom_process_group` (sglang/srt/utils/common.py), step for step: the
    `tcp://` rendezvous (rank 0 serves the TCPStore and waits for every rank to connect), a PrefixStore named after
    the group, then torch's `_new_process_group_helper`, and the rank map that lets `dist.broadcast(src=0)` resolve
    ranks in a group outside the default world. The helper is private, but no public torch function builds a group
    outside the default world with the same store keys; calling what SGLang calls keeps the keys identical."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    # What `dist.rendezvous("tcp://...", rank=0)` builds outside torchrun: rank 0 serves a multi-tenant TCPStore the
    # others connect to. Built directly, because under torchrun / accelerate launch (TORCHELASTIC_USE_AGENT_STORE)
    # that rendezvous would instead connect as a client to a store it assumes the launcher's agent serves on this
    # port, and wait forever. The keys are the same either way (the engines connect as clients in both cases).
    store = dist.TCPStore(master_address, port, world_size, is_master=True, timeout=timeout, multi_tenant=True)
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        0,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
        device_id=None,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _destroy_named_group(name: str) -> None:
    from torch.distributed.distributed_c10d import _world

    for pg, pg_name in list(_world.pg_names.items()):
        if pg_name == name:
            dist.destroy_process_group(pg)


async def _together(
    what: str,
    work: Callable[[], T],
    calls: dict[str, Awaitable[Any]],
    *,
    grace_s: float,
    threads: list[threading.Thread],
) -> tuple[T, dict[str, Any]]:
    """Run the blocking collective `work` on a thread (appended to `threads`) while the engines' HTTP `calls` run;
    both sides wait for each other. Returns (work's result, each URL's answer). After the first failure the rest
    get `grace_s`; whatever still runs then is abandoned (HTTP calls cancelled, the thread left to its timeout).
    Raises `_CollectiveFailed` when the collective did not finish, else `WeightSyncError` when an engine failed."""
    collective, thread = start_daemon(work, name=f"weight-sync-{what[:40]}")
    threads.append(thread)
    tasks = {url: asyncio.ensure_future(c) for url, c in calls.items()}
    pending: set[asyncio.Future[Any]] = {collective, *tasks.values()}
    failed_at: float | None = None
    try:
        while pending:
            wait_s = None if failed_at is None else max(0.0, failed_at + grace_s - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            if failed_at is None and any(d.cancelled() or d.exception() is not None for d in done):
                failed_at = time.monotonic()
    finally:
        for p in pending:
            p.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    errors: dict[str, Any] = {}
    for url, t in tasks.items():
        if t.cancelled():
            errors[url] = f"no answer within {grace_s:g}s of the first failure (blocked in the collective?)"
        elif t.exception() is not None:
            errors[url] = t.exception()
    if collective.cancelled() or collective.exception() is not None:
        errors["rank 0 (this trainer)"] = (
            f"its side did not finish within {grace_s:g}s of the first failure"
            if collective.cancelled()
            else f"its side raised {collective.exception()!r}"
        )
        stuck = {u for u, t in tasks.items() if t.cancelled()}
        raise _CollectiveFailed(_describe(what, errors) + "; the group is out of step", stuck)
    if errors:
        raise WeightSyncError(_describe(what, errors))
    return collective.result(), {u: t.result() for u, t in tasks.items()}


async def _on_each(urls: list[str], fn: Callable[[str], Awaitable[T]]) -> tuple[dict[str, T], dict[str, BaseException]]:
    """`fn(url)` on every URL at once: (answers of those that succeeded, errors of the others)."""
    results = await asyncio.gather(*(fn(u) for u in urls), return_exceptions=True)
    ok: dict[str, T] = {}
    errors: dict[str, BaseException] = {}
    for u, r in zip(urls, results, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):  # CancelledError, KeyboardInterrupt: propagate as is
                raise r
            errors[u] = r
        else:
            ok[u] = r
    return ok, errors


def _describe(what: str, errors: dict[str, Any]) -> str:
    return f"{what} failed on {len(errors)} engine(s): " + "; ".join(f"{u}: {e}" for u, e in errors.items())
