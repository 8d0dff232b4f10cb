"""`EnvClient(coalesce=True)`: the calls made in one turn of the event loop leave as one `/v1/batch` request, and
each call still gets exactly the answer or the error the single call gets. Real env server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from conftest import LiveServer

from shared.client import EnvClient
from shared.wire import EnvError

Make = Callable[..., Awaitable[LiveServer]]
SEARCH = "<search> Kelmar Works </search>"
DEV = {"dataset": "synthetic", "split": "dev"}


async def test_one_turn_of_calls_is_one_request_with_the_single_calls_answers(env_server: LiveServer) -> None:
    async with EnvClient(env_server.url, coalesce=True) as env, EnvClient(env_server.url) as plain:
        eps = await asyncio.gather(*(env.create(**DEV, index=i) for i in range(20)))
        assert env.http_requests == 1 and len({e.episode_id for e in eps}) == 20
        ref = await plain.create(**DEV, index=3)
        assert (eps[3].prompt, eps[3].question_id, eps[3].metadata) == (ref.prompt, ref.question_id, ref.metadata)
        steps = await asyncio.gather(*(env.step(e.episode_id, action=SEARCH) for e in eps))
        assert env.http_requests == 2
        single = await plain.step(ref.episode_id, action=SEARCH)
        assert (steps[3].observation, steps[3].reward, steps[3].turn) == (single.observation, single.reward, 1)
        # Forks, spawns, snapshots and deletes coalesce too; a fork made in the same turn as a step of the same
        # episode forks the state after that step (the batch keeps the order the calls were made in).
        e0 = eps[0].episode_id
        stepped, forked, spawned, snap = await asyncio.gather(
            env.step(e0, action=SEARCH),
            env.fork(e0, 2),
            env.episodes_from_snapshot(steps[1].snapshot_id, 2),
            env.snapshot(eps[2].episode_id),
        )
        assert env.http_requests == 3 and stepped.turn == 2
        turns = await asyncio.gather(*(env.step(e, action=SEARCH) for e in forked.episode_ids + spawned.episode_ids))
        assert [t.turn for t in turns] == [3, 3, 2, 2]
        gone = await asyncio.gather(*(env.delete(e.episode_id) for e in eps), env.delete_snapshot(snap.snapshot_id))
        assert [g.deleted for g in gone[:-1]] == [e.episode_id for e in eps] and gone[-1].deleted == snap.snapshot_id


async def test_each_call_gets_its_own_error(env_server: LiveServer) -> None:
    async with EnvClient(env_server.url, coalesce=True) as env, EnvClient(env_server.url) as plain:
        ep = await env.create(**DEV, index=0)
        good, bad, bad_create = await asyncio.gather(
            env.step(ep.episode_id, action=SEARCH),
            env.step("ep_nosuch", action=SEARCH),
            env.create(**DEV, index=10**6),
            return_exceptions=True,
        )
        assert not isinstance(good, BaseException) and good.turn == 1
        with pytest.raises(EnvError) as single:
            await plain.step("ep_nosuch", action=SEARCH)
        assert isinstance(bad, EnvError) and (bad.code, bad.status, bad.message) == (
            single.value.code,
            single.value.status,
            single.value.message,
        )
        assert isinstance(bad_create, EnvError) and bad_create.status == 422
        # A call that is not a valid op (a tool_call with OpenAI's extra "id") fails alone, before anything is sent;
        # the calls made with it are answered.
        n = env.http_requests
        odd = {"name": "search", "arguments": {"query": "Kelmar"}, "id": "call_1"}
        fine, malformed = await asyncio.gather(
            env.step(ep.episode_id, action=SEARCH), env.step(ep.episode_id, tool_call=odd), return_exceptions=True
        )
        assert not isinstance(fine, BaseException) and fine.turn == 2
        assert isinstance(malformed, EnvError) and malformed.status == 400 and "id" in malformed.message
        n = env.http_requests
        with pytest.raises(EnvError) as lone:  # a lone call is its own request, with the single call's error
            await env.step("ep_nosuch", action=SEARCH)
        assert env.http_requests == n + 1 and lone.value.message == single.value.message


async def test_batches_are_capped_and_a_dead_server_fails_every_call(make_env_server: Make) -> None:
    srv = await make_env_server()
    async with EnvClient(srv.url, coalesce=True, max_batch_ops=8, retries=0) as env:
        await asyncio.gather(*(env.create(**DEV, index=i) for i in range(20)))
        assert env.http_requests == 3, "20 calls in batches of at most 8"
    async with EnvClient("http://127.0.0.1:9", coalesce=True, retries=0) as dead:
        out = await asyncio.gather(*(dead.create(**DEV, index=i) for i in range(5)), return_exceptions=True)
        assert all(isinstance(e, ConnectionError) for e in out), out
