"""Env server behaviour through its HTTP API: bad model actions, fork independence, portable snapshots,
determinism, truncation, reward metrics, TTL reaping, concurrency without cross-talk, and the oracle agent.

Real servers on loopback over the real synthetic world and search index (conftest.py); a slow Search-R1-style
retriever on loopback where a step must stay in flight.
"""

from __future__ import annotations

import asyncio
import random
import socket
import string
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import LiveServer, RawHTTP, SlowRetriever, metric_value

from env_server.config import BUILTIN_WORLD
from env_server.datasets import read_questions
from env_server.retrieval import Hit, format_observation
from env_server.tools import INVALID_ACTION
from shared.client import EnvClient, SyncEnvClient
from shared.wire import EnvError, SnapshotBlob, StepResult

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]


def world_dir(cache: Path) -> Path:
    """The world the default server serves: the built-in one (the cache holds only its index)."""
    return BUILTIN_WORLD


def oracle_action(st: dict[str, str]) -> str:
    tag = "search" if st["kind"] == "search" else "answer"
    return f"<think>next</think><{tag}> {st['text']} </{tag}>"


def same_result(a: StepResult, b: StepResult) -> bool:
    """Equal up to the ids (episode and snapshot ids are fresh per call)."""
    return (a.observation, a.reward, a.done, a.truncated, a.turn, a.info) == (
        b.observation,
        b.reward,
        b.done,
        b.truncated,
        b.turn,
        b.info,
    )


# ---------------------------------------------------------------------------------------------- bad model actions
_rng = random.Random(0)
JUNK_10K = "".join(_rng.choice(string.printable) for _ in range(10_000))

SEARCHES_THAT_ARE_VALID = [
    'Fozan "Editions',
    'title:"Fozan Editions"',
    "Fozan AND OR NOT Editions",
    "field:value",
    "*",
    "Foz*",
    "((Fozan]] {Editions",
    "[1900 TO 2000]",
    "+Fozan -Editions ~2 ^10",
    "Zürich 東京 ٱلْعَرَبِيَّة",
    "😀🔥💯",
    "\\ ' \" ` ; --",
    JUNK_10K,
    "!?.,;:-_/|@#$%&=",  # no words: a valid search with no results
    "\x00\x01\u200b\ufeff",
]


@pytest.mark.parametrize("query", SEARCHES_THAT_ARE_VALID, ids=lambda q: repr(q[:20]))
async def test_odd_search_queries_are_searched_not_crashed(env_client: EnvClient, query: str) -> None:
    ep = await env_client.create(question="q?", answers=["a"])
    r = await env_client.step(ep.episode_id, action=f"<think>hm</think><search>{query}</search>")
    assert r.turn == 1 and not r.done and r.info["tool"] == "search" and r.info["valid"] is True
    assert r.observation.startswith("\n\n<information>") and r.observation.endswith("</information>\n\n")
    assert r.info["num_hits"] == 0 or r.observation.count("Doc ") >= 1
    tc = await env_client.step(ep.episode_id, tool_call={"name": "search", "arguments": {"query": query}})
    assert tc.turn == 2 and tc.info["valid"] is True


INVALID_ACTIONS = [
    ("<search></search>", "empty"),
    ("<search>   </search>", "empty"),
    ("I think the answer is Paris.", INVALID_ACTION),
    ("", INVALID_ACTION),
    ("<search> Fozan Editions", INVALID_ACTION),  # unclosed
    ("<answer> Paris", INVALID_ACTION),
    ("<search> a </answer>", INVALID_ACTION),  # mismatched
    ("<SEARCH> Fozan </SEARCH>", INVALID_ACTION),
    ("<tool_call>{}</tool_call>", INVALID_ACTION),
    (JUNK_10K, INVALID_ACTION),
]


@pytest.mark.parametrize(("action", "expect"), INVALID_ACTIONS, ids=lambda x: repr(x[:16]))
async def test_invalid_text_actions_get_an_observation_and_count(
    env_client: EnvClient, action: str, expect: str
) -> None:
    ep = await env_client.create(question="q?", answers=["a"], max_turns=2)
    r = await env_client.step(ep.episode_id, action=action)
    assert r.turn == 1 and not r.done and r.reward == 0.0
    assert r.info["valid"] is False and r.info["tool"] in ("invalid", "search")
    if expect == INVALID_ACTION:
        assert r.observation == INVALID_ACTION and r.info["tool"] == "invalid"
    else:
        assert expect in r.observation.lower() and r.observation.startswith("\n\n<information>")
    r2 = await env_client.step(ep.episode_id, action=action)  # the turn counted: the second one truncates
    assert r2.turn == 2 and r2.done and r2.truncated and r2.reward == 0.0


BAD_TOOL_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"name": "browse", "arguments": {"url": "x"}}, "unknown tool"),
    ({"name": "", "arguments": {}}, "unknown tool"),
    ({"name": "search", "arguments": {}}, "query"),
    ({"name": "search", "arguments": {"q": "Fozan"}}, "unknown arguments"),
    ({"name": "search", "arguments": {"query": 5}}, "query must be a string"),
    ({"name": "search", "arguments": {"query": None}}, "query must be a string"),
    ({"name": "search", "arguments": {"query": "Fozan", "topk": 0}}, "topk"),
    ({"name": "search", "arguments": {"query": "Fozan", "topk": "3"}}, "topk"),
    ({"name": "search", "arguments": {"query": "Fozan", "topk": 10**6}}, "topk"),
    ({"name": "search", "arguments": {"query": "Fozan", "topk": True}}, "topk"),
    ({"name": "search", "arguments": '{"query": '}, "not valid json"),
    ({"name": "search", "arguments": "[1, 2]"}, "json object"),
    ({"name": "search", "arguments": '"Fozan"'}, "json object"),
    ({"name": "answer", "arguments": {"answer": ["a"]}}, "answer must be a string"),
    ({"name": "answer", "arguments": {"answer": 42}}, "answer must be a string"),
    ({"name": "answer", "arguments": {}}, "answer"),
]


@pytest.mark.parametrize(("call", "needle"), BAD_TOOL_CALLS, ids=lambda x: str(x)[:30])
async def test_bad_tool_calls_get_a_clear_observation(env_client: EnvClient, call: dict[str, Any], needle: str) -> None:
    ep = await env_client.create(question="q?", answers=["a"])
    r = await env_client.step(ep.episode_id, tool_call=call)
    assert r.turn == 1 and not r.done and r.reward == 0.0 and r.info["valid"] is False
    assert needle in r.observation.lower() and needle in r.info["error"].lower()
    assert r.info["tool"] in ("search", "answer", "invalid")


async def test_first_complete_tag_wins(env_client: EnvClient) -> None:
    ep = await env_client.create(question="q?", answers=["Paris"])
    a, b = (await env_client.fork(ep.episode_id, 2)).episode_ids
    r = await env_client.step(a, action="<think>sure</think> <answer> Paris </answer> <search> y </search>")
    assert r.done and r.reward == 1.0 and r.info["prediction"] == "Paris"
    r = await env_client.step(b, action="<search> Fozan Editions </search><answer> Paris </answer>")
    assert not r.done and r.info["tool"] == "search" and r.info["query"] == "Fozan Editions"
    # As Search-R1's regex: the first opening tag with its own closing tag, whatever lies between.
    r = await env_client.step(b, action="<search> x <answer> Paris </answer> </search>")
    assert not r.done and r.info["query"] == "x <answer> Paris </answer>"


async def test_empty_answer_is_a_wrong_answer(env_client: EnvClient) -> None:
    ep = await env_client.create(question="q?", answers=["Paris"])
    r = await env_client.step(ep.episode_id, action="<answer></answer>")
    assert r.done and not r.truncated and r.reward == 0.0 and r.info["em"] == 0.0


# ---------------------------------------------------------------------------------------------- forks
async def test_fork_branches_are_independent(env_client: EnvClient, env_server: LiveServer) -> None:
    ep = await env_client.create(dataset="synthetic", split="dev", index=0, include_oracle=True)
    oracle = ep.metadata["oracle"]
    first = await env_client.step(ep.episode_id, action=oracle_action(oracle[0]))
    a, b, c = (await env_client.fork(ep.episode_id, 3)).episode_ids
    store = env_server.service.store
    turn1 = store.episodes[ep.episode_id].node
    assert all(store.episodes[x].node is turn1 for x in (a, b, c))

    ra = await env_client.step(a, action="<search> Fozan Editions </search>")
    rb = await env_client.step(b, action="<answer> certainly not this </answer>")
    assert ra.turn == rb.turn == 2 and rb.done and rb.reward == 0.0 and not ra.done
    assert store.episodes[a].node.parent is turn1 and store.episodes[b].node.parent is turn1
    # The parent and the untouched sibling still sit at turn 1, on the very same node.
    assert store.episodes[ep.episode_id].node is turn1 and store.episodes[c].node is turn1
    assert turn1.turn == 1 and turn1.record is not None and turn1.record.observation == first.observation
    # Each continues on its own: the parent repeats a's step and gets a's observation; c answers differently.
    rp = await env_client.step(ep.episode_id, action="<search> Fozan Editions </search>")
    assert same_result(rp, ra)
    rc = await env_client.step(c, action="<answer> still wrong </answer>")
    assert rc.turn == 2 and rc.info["prediction"] == "still wrong"
    with pytest.raises(EnvError) as e:
        await env_client.step(b, action="<answer> again </answer>")
    assert e.value.status == 409
    # The snapshot of turn 1 still holds exactly one turn.
    blob = await env_client.export_snapshot(first.snapshot_id)
    again = (await env_client.episodes_from_snapshot((await env_client.import_snapshot(blob)).snapshot_id)).episode_ids
    assert same_result(await env_client.step(again[0], action="<search> Fozan Editions </search>"), ra)
    # and a's branch still finishes with the oracle's answer
    assert (await env_client.step(a, action=oracle_action(oracle[-1]))).reward == 1.0


async def test_client_reads_a_state_as_a_struct_and_imports_an_edited_one(env_client: EnvClient) -> None:
    """`read_snapshot`: a state's task and turns as a `SnapshotBlob` (its blob, decoded), or an earlier state of it
    (`turns=k`); `import_snapshot` takes the struct back, edited: the first turn of a two-turn state continues
    exactly as the state after turn 1 does."""
    ep = await env_client.create(dataset="synthetic", split="dev", index=0)
    r1 = await env_client.step(ep.episode_id, action="<search> Fozan Editions </search>")
    r2 = await env_client.step(ep.episode_id, action="<search> Kelmar </search>")
    state = await env_client.read_snapshot(r2.snapshot_id)
    assert isinstance(state, SnapshotBlob) and [t.action for t in state.turns] == [
        "<search> Fozan Editions </search>",
        "<search> Kelmar </search>",
    ]
    assert state.turns[1].observation == r2.observation and state.task.dataset == "synthetic"
    assert (await env_client.read_snapshot(r2.snapshot_id, turns=1)) == msgspec.structs.replace(
        state, turns=state.turns[:1]
    )
    assert (await env_client.export_snapshot(r2.snapshot_id, turns=1)) == await env_client.export_snapshot(
        r1.snapshot_id
    )
    made = await env_client.import_snapshot(msgspec.structs.replace(state, turns=state.turns[:1]))
    (mine,) = (await env_client.episodes_from_snapshot(made.snapshot_id)).episode_ids
    assert (await env_client.step(mine, action="<search> Kelmar </search>")).observation == r2.observation
    with pytest.raises(EnvError) as e:  # an edit the server could not have made is refused, as a blob's would be
        await env_client.import_snapshot(msgspec.structs.replace(state, corpus_id="tantivy:0"))
    assert e.value.status == 422


async def test_fork_after_many_turns_shares_the_node(make_env_server: Make) -> None:
    """Fork is O(1) in history length: at turn 1 and at turn 50 the forks hold the very same state node as their
    parent (nothing copied, no new nodes or snapshots)."""
    srv = await make_env_server(max_turns=64)
    async with EnvClient(srv.url) as env:
        ep = await env.create(question="q?", answers=["a"])
        store = srv.service.store
        await env.step(ep.episode_id, action="<search> Fozan </search>")
        early = (await env.fork(ep.episode_id, 2)).episode_ids
        assert all(store.episodes[f].node is store.episodes[ep.episode_id].node for f in early)
        await env.batch([{"op": "step", "episode_id": ep.episode_id, "action": "x"} for _ in range(49)])
        node = store.episodes[ep.episode_id].node
        assert node.turn == 50
        forks = (await env.fork(ep.episode_id, 8)).episode_ids
        assert all(store.episodes[f].node is node for f in forks)
        # 8 forks added 8 handles and no state nodes or snapshots.
        assert len(store.snapshots) == 51 and len(store.episodes) == 11


# ---------------------------------------------------------------------------------------------- snapshots
async def play(env: EnvClient, eid: str, actions: list[str]) -> list[StepResult]:
    return [await env.step(eid, action=a) for a in actions]


async def test_snapshot_moves_to_a_second_server_and_continues_identically(
    env_client: EnvClient, make_env_server: Make
) -> None:
    """Export on server A, import on server B (its own app, retriever and datasets over the same corpus): the
    same actions give the same observations, rewards and infos on both."""
    other = await make_env_server(resources=None)
    async with EnvClient(other.url, msgpack=False) as env_b:
        assert (await env_b.info()).corpus_id == (await env_client.info()).corpus_id
        for index in (0, 1, 2, 5):
            ep = await env_client.create(dataset="synthetic", split="dev", index=index, include_oracle=True)
            oracle = ep.metadata["oracle"]
            first = await env_client.step(ep.episode_id, action=oracle_action(oracle[0]))
            blob = await env_client.export_snapshot(first.snapshot_id)
            sid_b = (await env_b.import_snapshot(blob)).snapshot_id
            rest = [oracle_action(s) for s in oracle[1:]]
            wrong = ["<search> Fozan Editions </search>", "nonsense", "<answer> wrong </answer>"]
            for actions in (rest, wrong):
                [eid_a] = (await env_client.episodes_from_snapshot(first.snapshot_id, 1)).episode_ids
                [eid_b] = (await env_b.episodes_from_snapshot(sid_b, 1)).episode_ids
                ra, rb = await play(env_client, eid_a, actions), await play(env_b, eid_b, actions)
                assert all(same_result(x, y) for x, y in zip(ra, rb, strict=True)), (ra, rb)
                assert ra[-1].done and ra[-1].reward == (1.0 if actions is rest else 0.0)
            # The blob re-exported from B is the same state (same task and turns).
            again = await env_b.export_snapshot(sid_b)
            assert len(again) == len(blob)


async def test_snapshot_continues_identically_on_a_server_with_a_rebuilt_index(
    env_client: EnvClient, make_env_server: Make, env_cache_dir: Path, tmp_path: Path
) -> None:
    """Regression: an index rebuilt from the same corpus has the same corpus_id, so snapshots import, but hits with
    tied BM25 scores came back in another order (tantivy breaks ties by doc address, which depends on how the
    parallel indexer split the corpus into segments): about 1 search in 3 differed. Ties now break by corpus
    position (env_server/retrieval/tantivy_index.py)."""
    wd = world_dir(env_cache_dir)
    other = await make_env_server(
        resources=None, corpus=str(wd / "corpus.jsonl"), index_dir=str(tmp_path / "index2"), data={}
    )
    rows = read_questions(wd / "dev.jsonl")
    queries = [s["text"] for r in rows for s in r.metadata["oracle"] if s["kind"] == "search"][:120]
    async with EnvClient(other.url) as env_b:
        assert (await env_b.info()).corpus_id == (await env_client.info()).corpus_id
        ep = await env_client.create(question="q?", answers=["a"])
        blob = await env_client.export_snapshot(ep.snapshot_id)
        sid_b = (await env_b.import_snapshot(blob)).snapshot_id
        forks_a = (await env_client.fork(ep.episode_id, len(queries))).episode_ids
        forks_b = (await env_b.episodes_from_snapshot(sid_b, len(queries))).episode_ids
        ops = [
            {"op": "step", "episode_id": e, "action": f"<search> {q} </search>"}
            for e, q in zip(forks_a, queries, strict=True)
        ]
        res_a = await env_client.batch(ops)
        ops = [
            {"op": "step", "episode_id": e, "action": f"<search> {q} </search>"}
            for e, q in zip(forks_b, queries, strict=True)
        ]
        res_b = await env_b.batch(ops)
        differ = [q for q, x, y in zip(queries, res_a, res_b, strict=True) if x["observation"] != y["observation"]]
        assert not differ, f"{len(differ)} of {len(queries)} searches differ, e.g. {differ[:3]}"


async def test_same_actions_from_the_same_state_are_deterministic(env_client: EnvClient) -> None:
    ep = await env_client.create(dataset="synthetic", split="dev", index=7, include_oracle=True)
    actions = [oracle_action(s) for s in ep.metadata["oracle"]]
    runs = []
    for _ in range(3):
        [eid] = (await env_client.episodes_from_snapshot(ep.snapshot_id, 1)).episode_ids
        runs.append(await play(env_client, eid, actions))
    runs.append(await play(env_client, ep.episode_id, actions))
    for run in runs[1:]:
        assert all(same_result(x, y) for x, y in zip(runs[0], run, strict=True))
    assert runs[0][-1].reward == 1.0


# ---------------------------------------------------------------------------------------------- turns and rewards
async def test_max_turns_truncates(env_client: EnvClient) -> None:
    ep = await env_client.create(question="q?", answers=["a"], max_turns=3)
    rs = await play(env_client, ep.episode_id, ["<search> Fozan </search>", "junk", "<search> Redo </search>"])
    assert [(r.turn, r.done, r.truncated) for r in rs] == [(1, False, False), (2, False, False), (3, True, True)]
    assert rs[-1].reward == 0.0 and rs[-1].info["golden_answers"] == ["a"]
    with pytest.raises(EnvError) as e:
        await env_client.step(ep.episode_id, action="<answer> a </answer>")
    assert e.value.status == 409 and e.value.code == "episode_done"
    assert "POST /v1/snapshots/{id}/episodes" in e.value.message  # where to go on: a fork of it is done too
    # Answering on the last allowed turn ends the episode answered, not truncated.
    ep2 = await env_client.create(question="q?", answers=["a"], max_turns=2)
    rs = await play(env_client, ep2.episode_id, ["junk", "<answer> a </answer>"])
    assert rs[-1].done and not rs[-1].truncated and rs[-1].reward == 1.0


@pytest.mark.parametrize(
    ("metric", "expected"), [("em", 0.0), ("f1", 0.8), ("cover_em", 1.0)], ids=["em", "f1", "cover_em"]
)
async def test_reward_follows_reward_metric(make_env_server: Make, metric: str, expected: float) -> None:
    srv = await make_env_server(reward_metric=metric)
    async with EnvClient(srv.url) as env:
        assert (await env.info()).reward_metric == metric
        ep = await env.create(question="Who founded it?", answers=["Varo Tessin", "V. Tessin"])
        r = await env.step(ep.episode_id, action="<answer> Varo Tessin the painter </answer>")
        assert r.done and r.reward == pytest.approx(expected)
        assert r.info["em"] == 0.0 and r.info["f1"] == pytest.approx(0.8) and r.info["cover_em"] == 1.0
        exact = await env.create(question="Who founded it?", answers=["Varo Tessin"])
        r = await env.step(exact.episode_id, action="<answer> the VARO tessin! </answer>")
        assert r.reward == 1.0


# ---------------------------------------------------------------------------------------------- TTL
async def test_idle_state_is_reaped_busy_state_kept(
    make_env_server: Make, make_slow_retriever: Callable[[float], Awaitable[SlowRetriever]]
) -> None:
    slow = await make_slow_retriever(1.0)
    srv = await make_env_server(resources=None, retriever_url=slow.url, episode_ttl_s=0.25)
    http = RawHTTP(srv.url)
    try:
        idle = (await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})).body
        busy = (await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})).body
        in_flight = asyncio.create_task(
            http.call("POST", f"/v1/episodes/{busy['episode_id']}/step", {"action": "<search> slow one </search>"})
        )
        await asyncio.sleep(0.7)  # nobody calls reap(): the server's own reaper must do it
        assert not in_flight.done()
        assert busy["episode_id"] in srv.service.store.episodes  # in use (its step holds the lock): kept
        r = await http.call("POST", f"/v1/episodes/{idle['episode_id']}/step", {"action": "<answer> a </answer>"})
        assert r.status == 404 and r.error_code() == "not_found"
        assert (await http.call("GET", f"/v1/snapshots/{idle['snapshot_id']}")).status == 404
        assert (await http.call("POST", f"/v1/snapshots/{busy['snapshot_id']}/episodes", {"n": 1})).status == 404
        done = await in_flight
        assert done.status == 200 and done.body["turn"] == 1 and "slow one" in done.body["observation"]
        text = (await http.call("GET", "/metrics")).body.decode()
        assert metric_value(text, "trace_env_reaped_total", {"kind": "episode"}) >= 1
        assert metric_value(text, "trace_env_reaped_total", {"kind": "snapshot"}) >= 2
    finally:
        await http.aclose()


async def test_step_waiting_behind_a_delete_is_refused(
    make_env_server: Make, make_slow_retriever: Callable[[float], Awaitable[SlowRetriever]]
) -> None:
    """Regression: a step queued on an episode's lock ran after the episode was deleted and answered 200 on a
    deleted episode (service.py EnvService.step re-checks the episode after taking the lock)."""
    slow = await make_slow_retriever(0.6)
    srv = await make_env_server(resources=None, retriever_url=slow.url)
    async with EnvClient(srv.url) as env:
        ep = await env.create(question="q", answers=["a"])
        first = asyncio.create_task(env.step(ep.episode_id, action="<search> one </search>"))
        for _ in range(300):  # until the first step holds the lock and waits on the retriever
            if slow.calls:
                break
            await asyncio.sleep(0.01)
        second = asyncio.create_task(env.step(ep.episode_id, action="<search> two </search>"))
        await asyncio.sleep(0.15)  # the second step is now queued on the episode's lock
        await env.delete(ep.episode_id)
        assert (await first).turn == 1
        with pytest.raises(EnvError) as e:
            await second
        assert e.value.status == 404


# ---------------------------------------------------------------------------------------------- concurrency
async def test_300_concurrent_episodes_no_cross_talk(env_client: EnvClient, env_cache_dir: Path) -> None:
    rows = read_questions(world_dir(env_cache_dir) / "train.jsonl")[:300]
    queries = [next(s["text"] for s in r.metadata["oracle"] if s["kind"] == "search") for r in rows]
    n = len(rows)
    expected = await env_client.retrieve(queries, topk=3)

    async def one(i: int) -> None:
        ep = await env_client.create(question=f"[{i}] {rows[i].question}", answers=[f"code-{i}"])
        assert ep.prompt.endswith(f"Question: [{i}] {rows[i].question}")
        r = await env_client.step(ep.episode_id, action=f"<search> {queries[i]} </search>")
        hits = [Hit(h["document"]["id"], h["document"]["contents"], h["score"]) for h in expected[i]]
        assert r.observation == f"\n\n<information>{format_observation(hits).strip()}</information>\n\n"
        assert r.info["query"] == queries[i]
        [other] = (await env_client.fork(ep.episode_id, 1)).episode_ids
        wrong = await env_client.step(other, action=f"<answer> code-{(i + 1) % n} </answer>")
        right = await env_client.step(ep.episode_id, action=f"<answer> code-{i} </answer>")
        assert (wrong.reward, right.reward) == (0.0, 1.0), i
        assert wrong.info["golden_answers"] == right.info["golden_answers"] == [f"code-{i}"]
        assert wrong.turn == right.turn == 2

    await asyncio.gather(*(one(i) for i in range(n)))
    assert (await env_client.health())["episodes"] == 2 * n


async def test_oracle_agent_scores_em_1_on_the_dev_split(env_client: EnvClient) -> None:
    info = await env_client.info()
    n_dev = next(d.splits["dev"] for d in info.datasets if d.name == "synthetic")
    sem = asyncio.Semaphore(64)

    async def run(index: int) -> StepResult:
        async with sem:
            ep = await env_client.create(dataset="synthetic", split="dev", index=index, include_oracle=True)
            oracle = ep.metadata["oracle"]
            results = await play(env_client, ep.episode_id, [oracle_action(s) for s in oracle])
            assert [r.done for r in results] == [False] * (len(oracle) - 1) + [True]
            assert all(r.info["valid"] for r in results)
            await env_client.delete(ep.episode_id)
            return results[-1]

    finals = await asyncio.gather(*(run(i) for i in range(n_dev)))
    assert n_dev == 200
    assert [r.info["em"] for r in finals] == [1.0] * n_dev
    assert all(r.reward == 1.0 and not r.truncated for r in finals)


# ---------------------------------------------------------------------------------------------- clients
async def test_client_errors_and_sync_client(env_server: LiveServer) -> None:
    def sync_session(url: str) -> tuple[float, int]:
        with SyncEnvClient(url, msgpack=False) as env:
            ep = env.create(question="q", answers=["a"])
            r = env.step(ep.episode_id, action="<answer> a </answer>")
            try:
                env.step(ep.episode_id, action="<answer> a </answer>")
            except EnvError as e:
                return r.reward, e.status
        raise AssertionError("the second step should have raised")

    assert await asyncio.to_thread(sync_session, env_server.url) == (1.0, 409)
    async with EnvClient(env_server.url) as env:
        with pytest.raises(EnvError) as e:
            await env.fork("ep_missing", 2)
        assert e.value.status == 404 and e.value.code == "not_found" and "ep_missing" in e.value.message
        with pytest.raises(EnvError) as e:
            await env.create(dataset="synthetic", split="dev", index=999)
        assert e.value.status == 422
    async with EnvClient("http://127.0.0.1:9", retries=1, backoff_s=0.01) as dead:
        with pytest.raises(ConnectionError):
            await dead.health()


# ---------------------------------------------------------------------------------------------- failures that are not the model's
async def test_search_backend_down_is_a_502_and_the_step_is_not_applied(make_env_server: Make) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    srv = await make_env_server(resources=None, retriever_url=dead)
    async with EnvClient(srv.url) as env:
        ep = await env.create(question="q", answers=["a"])
        with pytest.raises(EnvError) as e:
            await env.step(ep.episode_id, action="<search> anything </search>")
        assert e.value.status == 502 and e.value.code == "upstream_error" and "retry" in e.value.message
        with pytest.raises(EnvError) as e:
            await env.retrieve(["anything"])
        assert e.value.status == 502
        r = await env.step(ep.episode_id, action="<answer> a </answer>")  # the failed search took no turn
        assert r.turn == 1 and r.reward == 1.0


async def test_snapshot_cap_evicts_oldest_automatic_snapshots_first(make_env_server: Make) -> None:
    """At the cap, the least recently used automatic snapshots give way so steps keep working (a sustained
    stepping load once got 429 until the TTL passed); explicit snapshots are never evicted, and when they
    alone fill the cap a step is refused with 429 without being applied."""
    srv = await make_env_server(max_snapshots=3)
    async with EnvClient(srv.url) as env:
        ep = await env.create(question="q", answers=["a"])  # auto 1
        first = await env.step(ep.episode_id, action="junk")  # auto 2
        await env.episodes_from_snapshot(ep.snapshot_id, 1)  # touching auto 1 makes auto 2 the oldest
        await env.step(ep.episode_id, action="junk")  # auto 3
        third = await env.step(ep.episode_id, action="junk")  # auto 4 evicts auto 2
        with pytest.raises(EnvError) as e:
            await env.episodes_from_snapshot(first.snapshot_id, 1)
        assert e.value.status == 404
        assert (await env.episodes_from_snapshot(ep.snapshot_id, 1)).episode_ids  # still there
        assert srv.service.store.evicted == 1

        pinned = [(await env.snapshot(ep.episode_id)).snapshot_id for _ in range(3)]  # explicit: evict all autos
        with pytest.raises(EnvError) as e:
            await env.step(ep.episode_id, action="<answer> a </answer>")
        assert e.value.status == 429 and "explicit" in e.value.message
        await env.delete_snapshot(pinned[0])
        r = await env.step(ep.episode_id, action="<answer> a </answer>")
        assert r.turn == third.turn + 1 and r.reward == 1.0


async def test_the_client_sends_action_and_tool_call_as_given(env_client: EnvClient) -> None:
    """`step` with both `action` and `tool_call` (or neither) is the server's 422, as over HTTP; the client kept the
    action and dropped the tool call, spending the episode's turn on what the caller may not have meant."""
    ep = await env_client.create(question="q?", answers=["a"])
    call = {"name": "answer", "arguments": {"answer": "a"}}
    for kwargs in ({"action": "<search> Fozan </search>", "tool_call": call}, {}):
        with pytest.raises(EnvError) as e:
            await env_client.step(ep.episode_id, **kwargs)
        assert e.value.status == 422 and "exactly one" in e.value.message, e.value
    res = await env_client.step(ep.episode_id, tool_call=call)
    assert res.turn == 1 and res.reward == 1.0  # nothing was spent on the refused steps


async def test_tool_argument_errors_speak_json(env_client: EnvClient) -> None:
    """A bad tool argument's error (what the model reads next) names the value and its type as JSON does: `true`,
    `an array`, `null`, not Python's `True`, `list`, `NoneType`; the turn is spent, not valid, and the episode goes on."""
    cases = [
        ({"name": "search", "arguments": {"query": "Fozan", "topk": True}}, "got true"),
        ({"name": "search", "arguments": {"query": ["Fozan"]}}, "query must be a string, got an array"),
        ({"name": "answer", "arguments": {"answer": None}}, "answer must be a string, got null"),
        ({"name": "answer", "arguments": "[1]"}, "must be a JSON object, got an array"),
        # the same values as the arguments themselves, not in a string: the model's mistake too, not a 400
        ({"name": "answer", "arguments": None}, "must be a JSON object, got null"),
        ({"name": "search", "arguments": ["Fozan"]}, "must be a JSON object, got an array"),
        ({"name": "search", "arguments": 3}, "must be a JSON object, got an integer"),
    ]
    ep = await env_client.create(question="q?", answers=["a"], max_turns=8)
    for turn, (call, needle) in enumerate(cases, start=1):
        res = await env_client.step(ep.episode_id, tool_call=call)
        assert res.turn == turn and not res.done and res.info["valid"] is False, res
        assert needle in res.observation and needle in res.info["error"], (needle, res.observation)
