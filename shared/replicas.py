"""Several env server replicas behind one client, with episode affinity.

One env server holds its episodes in memory, so a trainer that outgrows it runs several replicas side by side
(`compose.yaml`) and points an `EnvPool` at all of them:

    async with EnvPool(["http://env-0:8000", "http://env-1:8000"]) as env:
        ep = await env.create(dataset="synthetic", split="dev", index=0)     # on the least-loaded replica
        res = await env.step(ep.episode_id, action="<search> Kelmar </search>")  # on the replica that holds it

`EnvPool` has `EnvClient`'s calls and answers the same wire structs. How it routes:
- **New state** (`create`, `import_snapshot`) goes to the replica that is up and has the fewest of this pool's live
  episodes plus calls in flight (ties: the fewest creates so far, so a burst of concurrent creates spreads evenly).
- **Existing state** goes where it lives, read off its id: every id the pool hands out is the server's id with a
  `r{replica}.{generation}:` prefix (`r1.0:ep_3f2a...`), so an episode, its forks, its snapshots and the episodes
  spawned from them all stay on one replica with no table to keep. The prefix is stripped before the call.
- **A replica that goes away** (connections refused or dropped after the client's retries, or 503 while draining):
  the pool marks it down, raises `ReplicaLost` naming the replica and every live episode of this pool it held
  (also logged as one warning), and bumps the replica's generation, so any later call with an id from before fails
  at once with `ReplicaLost` (its state is gone even if the replica comes back), and so does a call that was in
  flight when it went down. New state goes to the others. (One reset connection is enough: a step or a batch is
  not re-sent, so the pool cannot tell a blip from a death and writes the replica's episodes off.)
- **Coming back**: a down replica is probed (`GET /health`, at most every `probe_s`) when new state needs a home
  (in the background while another replica is up); it takes new episodes again once it answers 200 with the same
  corpus as the rest.
- **Every replica down**: `create` / `import_snapshot` wait up to `patience_s` for one to come back, logging a
  warning every `log_every_s` while they wait, then raise `EnvUnavailable`.
- `batch` splits its ops by replica, sends the parts concurrently and answers in the given order; an op whose
  replica went away answers `{"ok": false, "error": {"code": "replica_lost", ...}}` (`unavailable` for a part
  that timed out; the server's code for a part it refused) while the other parts' answers (the ids of created
  episodes among them) still come back.

With one URL the pool behaves as one `EnvClient` plus the waiting: the trainer always uses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog

from shared.client import EnvClient
from shared.wire import (
    Deleted,
    EnvError,
    EpisodeCreated,
    ErrorCode,
    ForkResult,
    Info,
    SnapshotBlob,
    SnapshotCreated,
    StepResult,
    ToolCall,
)

log = structlog.get_logger("env_pool")

T = TypeVar("T")

REPLICA_LOST = "replica_lost"
"""The error code of a batch op whose replica went away (not a server code: the pool writes it)."""
UNAVAILABLE = "unavailable"
"""The error code of a batch op whose request failed otherwise (a timeout; the pool writes it)."""


class ReplicaLost(ConnectionError):
    """A replica went away: `episodes` are the live episodes of this pool it held (or the one id a call named)."""

    def __init__(self, url: str, replica: int, episodes: list[str], reason: str) -> None:
        self.url, self.replica, self.episodes, self.reason = url, replica, list(episodes), reason
        shown = ", ".join(episodes[:8]) + (f" and {len(episodes) - 8} more" if len(episodes) > 8 else "")
        super().__init__(
            f"env replica {replica} ({url}) went away ({reason}); lost {len(episodes)} episode(s)"
            + (f": {shown}" if episodes else "")
            + " and every snapshot taken there"
        )


class ReplicasDiffer(ValueError):
    """Replicas that do not serve the same corpus, reward and datasets (so a tree could not move between them)."""


class EnvUnavailable(ConnectionError):
    """No replica was up for new state within `patience_s`."""


@dataclass
class _Replica:
    index: int
    url: str
    client: EnvClient
    probe: EnvClient
    gen: int = 0
    up: bool = True
    reason: str = ""
    down_since: float = 0.0
    last_probe: float = 0.0
    probing: asyncio.Task[None] | None = None
    live: set[str] = field(default_factory=set)  # pool ids of live episodes made through this pool
    inflight: int = 0
    creates: int = 0

    def prefix(self) -> str:
        return f"r{self.index}.{self.gen}:"

    @property
    def load(self) -> tuple[int, int]:
        return (len(self.live) + self.inflight, self.creates)


class EnvPool:
    """`EnvClient`'s calls over one or more replicas (module docstring)."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        token: str | None = None,
        patience_s: float = 300.0,
        probe_s: float = 2.0,
        log_every_s: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("EnvPool needs at least one env server URL")
        if len(set(u.rstrip("/") for u in urls)) != len(urls):
            raise ValueError(f"env server URLs repeat: {urls}; give each replica once")
        if patience_s < 0 or probe_s <= 0:
            raise ValueError(f"patience_s must be >= 0 and probe_s > 0, got {patience_s}, {probe_s}")
        self.patience_s, self.probe_s, self.log_every_s = patience_s, probe_s, log_every_s
        self.replicas = [
            _Replica(
                i,
                u.rstrip("/"),
                EnvClient(u, token=token, **client_kwargs),
                EnvClient(u, token=token, retries=0, timeout_s=max(1.0, min(probe_s * 2, 10.0))),
            )
            for i, u in enumerate(urls)
        ]
        self.lost_episodes = 0  # all episodes reported lost so far
        self.failures = 0  # replica losses seen so far (a replica that goes away twice counts twice)
        self._corpus_id: str | None = None

    @property
    def http_requests(self) -> int:
        """Requests sent to the replicas so far (a coalesced batch counts once; health probes do not count)."""
        return sum(r.client.http_requests for r in self.replicas)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    async def __aenter__(self) -> EnvPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for r in self.replicas:
            if r.probing is not None:
                r.probing.cancel()
            await r.client.aclose()
            await r.probe.aclose()

    # ------------------------------------------------------------------ routing
    def _route(self, pool_id: str) -> tuple[_Replica, str]:
        """The replica holding `pool_id` and the server's own id; ReplicaLost when that replica has gone since."""
        head, sep, server_id = pool_id.partition(":")
        try:
            assert sep and head.startswith("r")
            idx, gen = (int(x) for x in head[1:].split("."))
            r = self.replicas[idx]
        except (AssertionError, ValueError, IndexError):
            raise EnvError(
                ErrorCode.NOT_FOUND,
                f"{pool_id!r} is not an id this client handed out (ids look like 'r0.0:ep_...': replica.generation:id)",
                status=404,
            ) from None
        if gen != r.gen or not r.up:
            raise ReplicaLost(r.url, r.index, [pool_id], r.reason or "it went away and came back")
        return r, server_id

    async def _call(self, r: _Replica, call: Awaitable[T]) -> T:
        """Await a call to replica `r`; turn its going away into ReplicaLost (and mark it down)."""
        gen = r.gen
        r.inflight += 1
        try:
            ans = await call
            if gen != r.gen:  # marked down while this call was in flight: what it made went with the replica
                raise ReplicaLost(r.url, r.index, [], r.reason)
            return ans
        except ReplicaLost:
            raise
        except ConnectionError as e:
            raise self._lost(r, gen, str(e)) from e
        except EnvError as e:
            if e.code == ErrorCode.SHUTTING_DOWN:
                raise self._lost(r, gen, f"draining: {e.message}") from e
            raise
        finally:
            r.inflight -= 1

    def _lost(self, r: _Replica, gen: int, reason: str) -> ReplicaLost:
        """Mark `r` down (once per generation) and say which episodes went with it."""
        if gen != r.gen or not r.up:  # already marked by a concurrent call: this call's state went with it
            return ReplicaLost(r.url, r.index, [], r.reason)
        lost = sorted(r.live)
        r.up, r.reason, r.down_since, r.gen = False, reason, time.monotonic(), r.gen + 1
        r.live.clear()
        r.last_probe = 0.0
        self.failures += 1
        self.lost_episodes += len(lost)
        log.warning(
            "env replica went away; its episodes are lost",
            replica=r.index,
            url=r.url,
            reason=reason,
            lost_episodes=len(lost),
            episode_ids=lost[:20],
            replicas_up=sum(x.up for x in self.replicas),
        )
        return ReplicaLost(r.url, r.index, lost, reason)

    async def _probe(self, r: _Replica) -> None:
        r.last_probe = time.monotonic()
        try:
            h = await r.probe.health()
        except (ConnectionError, TimeoutError, EnvError) as e:
            r.reason = r.reason or str(e)
            return
        if h.get("status") != "ok":
            return
        if self._corpus_id is not None and h.get("corpus_id") != self._corpus_id:
            r.reason = f"came back searching corpus {h.get('corpus_id')!r}, the others {self._corpus_id!r}"
            log.error("env replica came back with another corpus; not used", replica=r.index, url=r.url)
            return
        r.up = True
        log.warning(
            "env replica is back; it takes new episodes",
            replica=r.index,
            url=r.url,
            down_s=round(time.monotonic() - r.down_since, 1),
        )

    async def _probe_down(self, wait: bool) -> None:
        """Probe the down replicas not probed for probe_s; `wait`: until the probes end (when none is up), else they
        run in the background (new state does not wait on a replica that hangs while another is up)."""
        now = time.monotonic()
        for r in self.replicas:
            if not r.up and r.probing is None and now - r.last_probe >= self.probe_s:
                r.probing = asyncio.create_task(self._probe(r))
                r.probing.add_done_callback(lambda _t, r=r: setattr(r, "probing", None))
        waiting = [r.probing for r in self.replicas if r.probing is not None]
        if wait and waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    async def _pick(self) -> _Replica:
        """The up replica with the least load; waits up to patience_s when every replica is down."""
        t0 = time.monotonic()
        last_log: float | None = None  # the first wait is logged at once, then every log_every_s
        while True:
            if any(not r.up for r in self.replicas):
                await self._probe_down(wait=not any(r.up for r in self.replicas))
            ups = [r for r in self.replicas if r.up]
            if ups:
                return min(ups, key=lambda r: r.load)
            waited = time.monotonic() - t0
            down = {r.url: r.reason for r in self.replicas}
            if waited >= self.patience_s:
                raise EnvUnavailable(f"no env server came back within env patience {self.patience_s:g}s; down: {down}")
            if last_log is None or time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                log.warning(
                    "waiting for an env server to come back",
                    waited_s=round(waited, 1),
                    patience_s=self.patience_s,
                    down=down,
                )
            await asyncio.sleep(min(self.probe_s, max(self.patience_s - waited, 0.0)))

    def _own(self, r: _Replica, server_ids: list[str]) -> list[str]:
        ids = [r.prefix() + s for s in server_ids]
        r.live.update(ids)
        return ids

    # ------------------------------------------------------------------ calls
    async def health(self) -> dict[str, Any]:
        """Every replica's /health (or its error), and which are up as the pool sees them."""

        async def one(r: _Replica) -> dict[str, Any]:
            try:
                return {"url": r.url, "up": r.up, **(await r.probe.health())}
            except (ConnectionError, TimeoutError, EnvError) as e:
                return {"url": r.url, "up": False, "error": str(e)}

        return {"replicas": list(await asyncio.gather(*(one(r) for r in self.replicas)))}

    async def info(self) -> Info:
        """The first replica's /v1/info, after checking that every replica up serves the same corpus, reward and
        datasets (replicas must be interchangeable: a tree may be redone on another one), with the per-call limits
        (turns, topk, fork n, action length, batch ops, body size) the smallest of the replicas' (what every one
        accepts, since any call may land on any of them) and the live-episode and snapshot caps the smallest times the
        replicas up: new episodes go to the least loaded replica whatever its cap, so an even split is what the pool
        can be sure to hold."""
        ups = [r for r in self.replicas if r.up] or [await self._pick()]
        infos = await asyncio.gather(*(self._call(r, r.client.info()) for r in ups))
        first = infos[0]
        for r, inf in zip(ups[1:], infos[1:], strict=True):
            same = (inf.corpus_id, inf.reward_metric, inf.datasets) == (
                first.corpus_id,
                first.reward_metric,
                first.datasets,
            )
            if not same:
                raise ReplicasDiffer(
                    f"env replicas differ: {ups[0].url} serves corpus {first.corpus_id!r} ({first.reward_metric}, "
                    f"{[(d.name, d.splits) for d in first.datasets]}) but {r.url} serves {inf.corpus_id!r} "
                    f"({inf.reward_metric}, {[(d.name, d.splits) for d in inf.datasets]}); give replicas of one server"
                )
        self._corpus_id = first.corpus_id
        for r, inf in zip(ups, infos, strict=True):  # coalesced batches stay within each server's own limit
            r.client.max_batch_ops = min(r.client.max_batch_ops, inf.limits.max_batch_ops)
        per_call = ("max_turns", "max_topk", "max_fork_n", "max_action_chars", "max_batch_ops", "max_body_bytes")
        least = {k: min(getattr(inf.limits, k) for inf in infos) for k in per_call}
        total = {
            k: len(infos) * min(getattr(inf.limits, k) for inf in infos) for k in ("max_episodes", "max_snapshots")
        }
        return msgspec.structs.replace(first, limits=msgspec.structs.replace(first.limits, **least, **total))

    async def create(self, **fields: Any) -> EpisodeCreated:
        r = await self._pick()
        r.creates += 1
        ans = await self._call(r, r.client.create(**fields))
        ans.episode_id = self._own(r, [ans.episode_id])[0]
        ans.snapshot_id = r.prefix() + ans.snapshot_id
        return ans

    async def step(
        self, episode_id: str, action: str | None = None, tool_call: dict[str, Any] | ToolCall | None = None
    ) -> StepResult:
        r, sid = self._route(episode_id)
        res = await self._call(r, r.client.step(sid, action=action, tool_call=tool_call))
        res.episode_id, res.snapshot_id = episode_id, r.prefix() + res.snapshot_id
        return res

    async def fork(self, episode_id: str, n: int = 1) -> ForkResult:
        r, sid = self._route(episode_id)
        return ForkResult(self._own(r, (await self._call(r, r.client.fork(sid, n))).episode_ids))

    async def snapshot(self, episode_id: str) -> SnapshotCreated:
        r, sid = self._route(episode_id)
        return SnapshotCreated(r.prefix() + (await self._call(r, r.client.snapshot(sid))).snapshot_id)

    async def episodes_from_snapshot(self, snapshot_id: str, n: int = 1) -> ForkResult:
        r, sid = self._route(snapshot_id)
        return ForkResult(self._own(r, (await self._call(r, r.client.episodes_from_snapshot(sid, n))).episode_ids))

    async def export_snapshot(self, snapshot_id: str, turns: int | None = None) -> bytes:
        r, sid = self._route(snapshot_id)
        return await self._call(r, r.client.export_snapshot(sid, turns))

    async def read_snapshot(self, snapshot_id: str, turns: int | None = None) -> SnapshotBlob:
        r, sid = self._route(snapshot_id)
        return await self._call(r, r.client.read_snapshot(sid, turns))

    async def import_snapshot(self, blob: bytes | SnapshotBlob) -> SnapshotCreated:
        """Import a blob (from any replica, or another server on the same corpus) on the least-loaded replica."""
        r = await self._pick()
        return SnapshotCreated(r.prefix() + (await self._call(r, r.client.import_snapshot(blob))).snapshot_id)

    async def delete(self, episode_id: str) -> Deleted:
        r, sid = self._route(episode_id)
        r.live.discard(episode_id)
        await self._call(r, r.client.delete(sid))
        return Deleted(episode_id)

    async def delete_snapshot(self, snapshot_id: str) -> Deleted:
        r, sid = self._route(snapshot_id)
        await self._call(r, r.client.delete_snapshot(sid))
        return Deleted(snapshot_id)

    async def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict[str, Any]]]:
        r = await self._pick()
        return await self._call(r, r.client.retrieve(queries, topk))

    async def batch(self, ops: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """`EnvClient.batch` over the replicas: ops split by replica, parts sent concurrently, answers in order."""
        results: list[dict[str, Any] | None] = [None] * len(ops)
        parts: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for i, op in enumerate(ops):
            key = "snapshot_id" if op.get("op") in ("spawn", "delete_snapshot") else "episode_id"
            if op.get("op") == "create":
                continue
            try:
                r, sid = self._route(str(op.get(key, "")))
            except (EnvError, ReplicaLost) as e:
                results[i] = _error_result(e)
                continue
            if op.get("op") == "delete":
                r.live.discard(op[key])
            parts.setdefault(r.index, []).append((i, {**op, key: sid}))
        picked: list[_Replica] = []  # creates count as in flight on their replica until the batch ends

        async def send(r: _Replica, part: list[tuple[int, dict[str, Any]]]) -> None:
            try:
                answers = await self._call(r, r.client.batch([op for _, op in part]))
            except (ConnectionError, TimeoutError, EnvError) as e:  # this part failed; the others' answers stand
                for i, _ in part:
                    results[i] = _error_result(e)
                return
            for (i, op), ans in zip(part, answers, strict=True):
                results[i] = self._rewrite(r, op, ans)

        try:
            for i, op in enumerate(ops):  # one at a time, so each sees the load the earlier ones added
                if op.get("op") == "create":
                    r = await self._pick()
                    r.creates += 1
                    r.inflight += 1
                    picked.append(r)
                    parts.setdefault(r.index, []).append((i, dict(op)))
            await asyncio.gather(*(send(self.replicas[idx], sorted(part)) for idx, part in sorted(parts.items())))
        finally:
            for r in picked:
                r.inflight -= 1
        assert all(x is not None for x in results)
        return results  # type: ignore[return-value]

    def _rewrite(self, r: _Replica, op: dict[str, Any], ans: dict[str, Any]) -> dict[str, Any]:
        """A batch answer with the pool's ids in place of the server's."""
        if not ans.get("ok"):
            return ans
        p = r.prefix()
        out = dict(ans)
        kind = op.get("op")
        if kind in ("create", "step", "snapshot") and "snapshot_id" in out:
            out["snapshot_id"] = p + out["snapshot_id"]
        if kind == "create":
            out["episode_id"] = self._own(r, [out["episode_id"]])[0]
        elif kind == "step":
            out["episode_id"] = p + out["episode_id"]
        if kind in ("fork", "spawn"):
            out["episode_ids"] = self._own(r, out["episode_ids"])
        if kind in ("delete", "delete_snapshot") and "deleted" in out:
            out["deleted"] = p + out["deleted"]
        return out


def _error_result(e: Exception) -> dict[str, Any]:
    """A batch op's error answer for an error the pool met: the server's code for an EnvError, `replica_lost` when
    the replica went away, `unavailable` for a request that failed otherwise (a timeout)."""
    if isinstance(e, EnvError):
        code = e.code.value if isinstance(e.code, ErrorCode) else str(e.code)
        return {"ok": False, "error": {"code": code, "message": e.message}}
    code = REPLICA_LOST if isinstance(e, ReplicaLost) else UNAVAILABLE
    return {"ok": False, "error": {"code": code, "message": f"{type(e).__name__}: {e}"}}
