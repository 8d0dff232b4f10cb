"""`shared.replicas.EnvPool`: several real env servers on loopback behind one client (issue 14, "Replicas with
episode affinity"): new episodes go to the least-loaded replica, a fork tree stays on the replica that holds it,
killing one replica mid-run loses only its episodes and says which, and new work waits for a replica to come back.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable

import pytest
from conftest import PYTHON, LiveServer, start_server_process, stop_process
from structlog.testing import capture_logs

from shared.replicas import REPLICA_LOST, EnvPool, EnvUnavailable, ReplicaLost
from shared.wire import EnvError
from trainer.engines.launcher import free_port

pytestmark = pytest.mark.timeout(120)

Make = Callable[..., Awaitable[LiveServer]]
SEARCH = "<search> Kelmar Works </search>"
DEV = {"dataset": "synthetic", "split": "dev"}


def replica_of(pool_id: str) -> int:
    return int(pool_id.split(":")[0][1:].split(".")[0])


async def test_least_loaded_create_and_a_fork_tree_stays_on_its_replica(make_env_server: Make) -> None:
    a, b = await make_env_server(), await make_env_server()
    async with EnvPool([a.url, b.url]) as env:
        eps = await asyncio.gather(*(env.create(dataset="synthetic", split="dev", index=i) for i in range(6)))
        assert sorted(replica_of(e.episode_id) for e in eps) == [0, 0, 0, 1, 1, 1], "a burst of creates spreads evenly"
        assert len(a.service.store.episodes) == len(b.service.store.episodes) == 3
        # A tree on the first episode: a step, a fork of the stepped episode, episodes spawned from its snapshot,
        # a step on each branch. Every id stays on the root's replica, and only that server saw the calls.
        root = eps[0]
        home = replica_of(root.episode_id)
        server = (a, b)[home].service.store
        other = (b, a)[home].service.store
        other_before = (len(other.episodes), len(other.snapshots))
        res = await env.step(root.episode_id, action=SEARCH)
        forks = (await env.fork(root.episode_id, 2)).episode_ids
        spawned = (await env.episodes_from_snapshot(res.snapshot_id, 2)).episode_ids
        steps = await asyncio.gather(*(env.step(e, action=SEARCH) for e in forks + spawned))
        snap = await env.snapshot(forks[0])
        ids = [res.snapshot_id, *forks, *spawned, snap.snapshot_id] + [s.snapshot_id for s in steps]
        assert {replica_of(i) for i in ids} == {home}
        assert all(s.turn == 2 for s in steps), "forks and spawned episodes continue from the stepped state"
        assert all(i.split(":", 1)[1] in server.episodes for i in forks + spawned)
        assert (len(other.episodes), len(other.snapshots)) == other_before, "the other replica saw none of it"
        # A blob exported from one replica continues on whichever replica imports it.
        blob = await env.export_snapshot(res.snapshot_id)
        imported = await env.import_snapshot(blob)
        again = (await env.episodes_from_snapshot(imported.snapshot_id, 1)).episode_ids[0]
        assert (await env.step(again, action=SEARCH)).turn == 2
        state = await env.read_snapshot(res.snapshot_id)  # routed to its replica; a struct imports anywhere
        assert [t.action for t in state.turns] == [SEARCH] and (await env.read_snapshot(res.snapshot_id, 0)).turns == []
        from_struct = (await env.episodes_from_snapshot((await env.import_snapshot(state)).snapshot_id)).episode_ids
        assert (await env.step(from_struct[0], action=SEARCH)).turn == 2
        await env.delete(forks[1])
        assert forks[1].split(":", 1)[1] not in server.episodes


async def test_an_id_the_pool_did_not_make_is_a_clear_404(make_env_server: Make) -> None:
    a = await make_env_server()
    async with EnvPool([a.url]) as env:
        for bad in ("ep_123", "r7.0:ep_1", "rx:ep_1"):
            with pytest.raises(EnvError) as e:
                await env.step(bad, action=SEARCH)
            assert e.value.status == 404 and "not an id this client handed out" in e.value.message


async def test_batch_splits_by_replica_and_answers_in_order(make_env_server: Make) -> None:
    a, b = await make_env_server(), await make_env_server()
    async with EnvPool([a.url, b.url]) as env:
        made = await env.batch([{"op": "create", "dataset": "synthetic", "split": "dev", "index": i} for i in range(4)])
        assert all(m["ok"] for m in made) and sorted(replica_of(m["episode_id"]) for m in made) == [0, 0, 1, 1]
        e0, e1 = made[0]["episode_id"], made[1]["episode_id"]
        assert replica_of(e0) != replica_of(e1)
        ops = [
            {"op": "step", "episode_id": e0, "action": SEARCH},
            {"op": "step", "episode_id": e1, "action": SEARCH},
            {"op": "fork", "episode_id": e0, "n": 2},
            {"op": "spawn", "snapshot_id": made[1]["snapshot_id"], "n": 1},
            {"op": "step", "episode_id": "r0.0:ep_nosuch", "action": SEARCH},
            {"op": "delete", "episode_id": e1},
        ]
        res = await env.batch(ops)
        assert [r["ok"] for r in res] == [True, True, True, True, False, True]
        assert res[0]["episode_id"] == e0 and replica_of(res[0]["snapshot_id"]) == replica_of(e0)
        assert res[1]["turn"] == 1 and replica_of(res[1]["snapshot_id"]) == replica_of(e1)
        assert {replica_of(x) for x in res[2]["episode_ids"]} == {replica_of(e0)}
        assert replica_of(res[3]["episode_ids"][0]) == replica_of(e1)
        assert res[4]["error"]["code"] == "not_found"
        assert res[5]["deleted"] == e1
        # The forked episodes continue from the state after the step that came before them in the batch.
        assert (await env.step(res[2]["episode_ids"][0], action=SEARCH)).turn == 2


async def test_replicas_that_differ_are_refused(make_env_server: Make) -> None:
    a, b = await make_env_server(), await make_env_server(reward_metric="f1")
    async with EnvPool([a.url, b.url]) as env:
        with pytest.raises(ValueError, match="env replicas differ"):
            await env.info()
    with pytest.raises(ValueError, match="repeat"):
        EnvPool([a.url, a.url + "/"])


async def test_the_pool_reports_the_limits_every_replica_accepts(make_env_server: Make) -> None:
    """Replicas of one corpus may be started with different caps; any call may land on any of them, so the pool's
    /v1/info gives the smallest per-call limits (a trainer checks its env.max_turns against it before it starts), and
    for the live-episode cap what an even split is sure to fit (trace-eval checks its concurrency against it)."""
    a = await make_env_server(max_turns=8, max_topk=20, max_episodes=100)
    b = await make_env_server(max_turns=3, max_topk=5, max_episodes=50)
    async with EnvPool([a.url, b.url]) as env:
        limits = (await env.info()).limits
    assert (limits.max_turns, limits.max_topk) == (3, 5)
    assert limits.max_episodes == 100, "an even split (the least-loaded routing) fits the smaller cap twice"


async def test_killing_one_replica_loses_only_its_episodes_and_says_which() -> None:
    """Two real `trace-env serve` processes; one is SIGKILLed with trees live on both."""
    procs = [start_server_process([]) for _ in range(2)]
    try:
        async with EnvPool([url for _, url in procs], retries=1, backoff_s=0.05, patience_s=5) as env:
            eps = await asyncio.gather(*(env.create(dataset="synthetic", split="dev", index=i) for i in range(4)))
            on = {k: [e.episode_id for e in eps if replica_of(e.episode_id) == k] for k in (0, 1)}
            steps = {e.episode_id: await env.step(e.episode_id, action=SEARCH) for e in eps}
            forks = (await env.fork(on[1][0], 2)).episode_ids
            snap1 = steps[on[1][0]].snapshot_id
            procs[1][0].send_signal(signal.SIGKILL)
            procs[1][0].wait(10)
            with capture_logs() as logs, pytest.raises(ReplicaLost) as lost:
                await env.step(forks[0], action=SEARCH)
            said = [x for x in logs if x["event"] == "env replica went away; its episodes are lost"]
            assert len(said) == 1 and sorted(said[0]["episode_ids"]) == sorted(on[1] + forks)
            assert lost.value.replica == 1 and lost.value.url == procs[1][1]
            assert sorted(lost.value.episodes) == sorted(on[1] + forks), "every live episode of the dead replica"
            assert str(len(on[1] + forks)) in str(lost.value)
            assert env.failures == 1 and env.lost_episodes == len(on[1] + forks)
            # Its other ids now fail at once, without a network call; the other replica is untouched.
            with pytest.raises(ReplicaLost):
                await env.step(on[1][1], action=SEARCH)
            with pytest.raises(ReplicaLost):
                await env.episodes_from_snapshot(snap1)
            assert [(await env.step(e, action=SEARCH)).turn for e in on[0]] == [2] * len(on[0])
            fresh = await asyncio.gather(*(env.create(dataset="synthetic", split="dev", index=i) for i in range(3)))
            assert {replica_of(e.episode_id) for e in fresh} == {0}, "new work goes to the replica still up"
            # A batch touching both replicas: the dead one's ops say so, the live one's answers come back.
            res = await env.batch(
                [
                    {"op": "step", "episode_id": fresh[0].episode_id, "action": SEARCH},
                    {"op": "delete", "episode_id": forks[1]},
                ]
            )
            assert res[0]["ok"] and res[0]["turn"] == 1
            assert not res[1]["ok"] and res[1]["error"]["code"] == REPLICA_LOST
    finally:
        for p, _ in procs:
            stop_process(p, signal.SIGKILL)


async def test_new_work_waits_for_a_replica_to_come_back() -> None:
    """The only replica dies; a create waits (with a warning) and succeeds once it is back on the same port; with
    no replica back within the patience, EnvUnavailable says which are down."""
    port = free_port()
    proc, url = start_port(port)
    async with EnvPool([url], retries=0, patience_s=60, probe_s=0.2, log_every_s=0.5) as env:
        ep = await env.create(dataset="synthetic", split="dev", index=0)
        stop_process(proc, signal.SIGKILL)
        with pytest.raises(ReplicaLost):
            await env.step(ep.episode_id, action=SEARCH)

        async def restart() -> None:
            await asyncio.sleep(1.5)
            procs.append(await asyncio.to_thread(start_port, port))

        procs: list[tuple[subprocess.Popen[str], str]] = []
        try:
            with capture_logs() as logs:
                again, _ = await asyncio.gather(env.create(dataset="synthetic", split="dev", index=0), restart())
            assert replica_of(again.episode_id) == 0 and again.episode_id.startswith("r0.1:")
            events = [x["event"] for x in logs]
            assert (
                "waiting for an env server to come back" in events
                and "env replica is back; it takes new episodes" in events
            )
            with pytest.raises(ReplicaLost):  # the old generation's episodes died with the old process
                await env.step(ep.episode_id, action=SEARCH)
            assert (await env.step(again.episode_id, action=SEARCH)).turn == 1
        finally:
            for p, _ in procs:
                stop_process(p, signal.SIGKILL)
    async with EnvPool([url], retries=0, patience_s=0.5, probe_s=0.1) as env:
        env.replicas[0].up = False
        with pytest.raises(EnvUnavailable, match=r"no env server came back within env patience 0\.5s"):
            await env.create(dataset="synthetic", split="dev", index=0)


def start_port(port: int) -> tuple[subprocess.Popen[str], str]:
    """`python -m env_server serve` on a fixed port (to restart a replica where it was)."""
    return start_server_process(["--port", str(port)], exe=[PYTHON, "-m", "env_server", "serve"])


async def test_new_work_does_not_wait_on_a_hung_replica_and_counts_stay_right(make_env_server: Make) -> None:
    """A down replica that accepts connections and never answers is probed in the background while another is up
    (creates do not wait for its probe); a batch whose create finds no replica leaves no load counted."""
    a = await make_env_server()
    hung = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    hung_url = f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    try:
        async with EnvPool([a.url, hung_url], probe_s=1.0) as env:
            env.replicas[1].up = False
            t0 = asyncio.get_running_loop().time()
            for i in range(4):
                assert replica_of((await env.create(**DEV, index=i)).episode_id) == 0
            assert asyncio.get_running_loop().time() - t0 < 1.5, "no create waited for the hung replica's probe"
        async with EnvPool([hung_url], patience_s=0, probe_s=0.2) as env:
            env.replicas[0].up = False
            with pytest.raises(EnvUnavailable):
                await env.batch([{"op": "create", **DEV, "index": 0}])
            assert env.replicas[0].inflight == 0
    finally:
        hung.close()
