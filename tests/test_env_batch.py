"""`POST /v1/batch` against the single calls it stands for: each op answers what its call answers.

The `spawn` op (`POST /v1/snapshots/{snapshot_id}/episodes`, what a tree-rollout trainer calls to branch from a node)
and the `delete_snapshot` op (`DELETE /v1/snapshots/{snapshot_id}`), and batched search steps (answered through one
search of the whole batch) against the same steps made one call at a time. A real server on loopback over the
synthetic world (conftest.py); plain HTTP, both encodings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from conftest import FORMATS, JSON, MSGPACK, LiveServer, RawHTTP

from env_server.service import _batch_result
from shared import codec
from shared.wire import Deleted, EnvError, EpisodeCreated, ErrorCode, ForkResult, Message, SnapshotCreated, StepResult

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]

SEARCHES = ["Fozan Editions", "Kelmar Press", "Bagor Embers", "publishing house founded", "Redo Hezan", "😀"]


async def ok(http: RawHTTP, method: str, path: str, body: Any = None, fmt: str = JSON) -> dict[str, Any]:
    r = await http.call(method, path, body, fmt=fmt)
    assert r.status == 200, (method, path, r.status, r.body)
    return r.body


async def searched_snapshot(http: RawHTTP, fmt: str = JSON) -> str:
    """The snapshot after one search turn of a fresh episode."""
    ep = await ok(http, "POST", "/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": 0}, fmt)
    res = await ok(http, "POST", f"/v1/episodes/{ep['episode_id']}/step", {"action": "<search> Sosgu </search>"}, fmt)
    return res["snapshot_id"]


def without_ids(res: dict[str, Any]) -> dict[str, Any]:
    """A step answer up to its ids (fresh per call)."""
    return {k: v for k, v in res.items() if k not in ("episode_id", "snapshot_id", "ok")}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_spawn_op_answers_what_the_single_call_answers(http: RawHTTP, fmt: str) -> None:
    sid = await searched_snapshot(http, fmt)
    single = await ok(http, "POST", f"/v1/snapshots/{sid}/episodes", {"n": 2}, fmt)
    single_default = await ok(http, "POST", f"/v1/snapshots/{sid}/episodes", None, fmt)
    r = await http.call(
        "POST", "/v1/batch", {"ops": [{"op": "spawn", "snapshot_id": sid, "n": 2}, {"op": "spawn", "snapshot_id": sid}]}
    )
    assert r.status == 200, r.body
    batched, batched_default = r.body["results"]
    assert batched["ok"] is True and batched_default["ok"] is True
    assert set(batched) - {"ok"} == set(single) == {"episode_ids"}
    assert len(batched["episode_ids"]) == len(single["episode_ids"]) == 2
    assert len(batched_default["episode_ids"]) == len(single_default["episode_ids"]) == 1
    fresh = batched["episode_ids"] + batched_default["episode_ids"] + single["episode_ids"]
    assert len(set(fresh)) == 5, "every spawned episode is a new one"

    # Episodes spawned either way continue from the snapshot's state: turn 2, same observation, same reward.
    answers = []
    for eid in (single["episode_ids"][0], batched["episode_ids"][0], batched_default["episode_ids"][0]):
        answers.append(
            without_ids(
                await ok(http, "POST", f"/v1/episodes/{eid}/step", {"action": "<answer> Sosgu Press </answer>"}, fmt)
            )
        )
    assert answers[0] == answers[1] == answers[2] and answers[0]["turn"] == 2 and answers[0]["reward"] == 1.0


@pytest.mark.parametrize("fmt", FORMATS)
async def test_delete_snapshot_op_answers_what_the_single_call_answers(http: RawHTTP, fmt: str) -> None:
    sid_a, sid_b = await searched_snapshot(http, fmt), await searched_snapshot(http, fmt)
    single = await ok(http, "DELETE", f"/v1/snapshots/{sid_a}", None, fmt)
    r = await http.call("POST", "/v1/batch", {"ops": [{"op": "delete_snapshot", "snapshot_id": sid_b}]}, fmt=fmt)
    assert r.status == 200 and r.body["results"] == [{"ok": True, **{"deleted": sid_b}}]
    assert single == {"deleted": sid_a}
    for sid in (sid_a, sid_b):  # gone either way
        assert (await http.call("GET", f"/v1/snapshots/{sid}", fmt=fmt)).status == 404
        assert (await http.call("POST", f"/v1/snapshots/{sid}/episodes", {"n": 1}, fmt=fmt)).status == 404


@pytest.mark.parametrize("fmt", FORMATS)
async def test_snapshot_ops_fail_alone_with_the_single_calls_error(http: RawHTTP, fmt: str) -> None:
    """An unknown snapshot is that op's 404 body (the same code and message as the single call's), a bad n that op's
    422, and every other op of the batch applies."""
    sid = await searched_snapshot(http, fmt)
    missing = "snp_doesnotexist"
    single_spawn = await http.call("POST", f"/v1/snapshots/{missing}/episodes", {"n": 1}, fmt=fmt)
    single_delete = await http.call("DELETE", f"/v1/snapshots/{missing}", fmt=fmt)
    single_bad_n = await http.call("POST", f"/v1/snapshots/{sid}/episodes", {"n": 0}, fmt=fmt)
    assert (single_spawn.status, single_delete.status, single_bad_n.status) == (404, 404, 422)
    ops = [
        {"op": "create", "question": "Who?", "answers": ["Nobody"]},
        {"op": "spawn", "snapshot_id": missing, "n": 1},
        {"op": "spawn", "snapshot_id": sid, "n": 3},
        {"op": "delete_snapshot", "snapshot_id": missing},
        {"op": "spawn", "snapshot_id": sid, "n": 0},
        {"op": "spawn", "snapshot_id": sid},  # before the delete below: applies
        {"op": "delete_snapshot", "snapshot_id": sid},
        {"op": "spawn", "snapshot_id": sid},  # after it: 404
    ]
    r = await http.call("POST", "/v1/batch", {"ops": ops}, fmt=fmt)
    assert r.status == 200 and r.content_type == fmt
    res = r.body["results"]
    assert [x["ok"] for x in res] == [True, False, True, False, False, True, True, False]
    assert res[1] == {"ok": False, **single_spawn.body}
    assert res[3] == {"ok": False, **single_delete.body}
    assert res[4] == {"ok": False, **single_bad_n.body}
    assert res[7]["error"]["code"] == "not_found"
    assert (
        len(res[2]["episode_ids"]) == 3 and len(res[5]["episode_ids"]) == 1 and res[6] == {"ok": True, "deleted": sid}
    )
    for eid in [res[0]["episode_id"], *res[2]["episode_ids"], *res[5]["episode_ids"]]:  # the applied ops' episodes
        assert (await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 1}, fmt=fmt)).status == 200


@pytest.mark.parametrize(
    ("fmt", "inline"), [(JSON, "always"), (MSGPACK, "always"), (JSON, "never"), (MSGPACK, "never")]
)
async def test_batched_search_steps_answer_what_single_steps_answer(
    make_env_server: Make, fmt: str, inline: str
) -> None:
    """A batch of search steps (several episodes, several turns of one episode, text actions and tool calls, a blank
    query, a bad topk) answers, op by op, what the same steps made one call at a time answer: with searches inline
    (the batch runs its ops one after another) and in threads (the ops overlap). The search cache is off, so that the
    batch's searches run rather than answer from the single steps' entries."""
    srv = await make_env_server(search_inline=inline, search_cache=0)
    http = RawHTTP(srv.url)
    try:
        await _batched_vs_single(http, fmt)
    finally:
        await http.aclose()
    counters = srv.service.search.counters
    assert (counters.inline > 0) == (inline == "always") and (counters.thread > 0) == (inline == "never"), counters


async def _batched_vs_single(http: RawHTTP, fmt: str) -> None:
    actions: list[dict[str, Any]] = []
    for i, q in enumerate(SEARCHES):
        actions.append({"action": f"<think>t</think><search> {q} </search>"})
        actions.append({"tool_call": {"name": "search", "arguments": {"query": q, "topk": 1 + i % 4}}})
    actions += [
        {"action": "<search>   </search>"},
        {"tool_call": {"name": "search", "arguments": {"query": "Kelmar", "topk": 99}}},
        {"action": "<answer> Sosgu Press </answer>"},
        {"action": "no tags at all"},
    ]
    body = {"question": "Which company published Bagor Embers?", "answers": ["Sosgu Press"], "max_turns": 3}

    async def fresh(n: int) -> list[str]:
        return [(await ok(http, "POST", "/v1/episodes", body, fmt))["episode_id"] for _ in range(n)]

    # Each action on its own episode, then on one episode twice in a row (turns 1 and 2 of the same episode).
    singles_eps, batch_eps = await fresh(len(actions)), await fresh(len(actions))
    single = [
        await ok(http, "POST", f"/v1/episodes/{e}/step", a, fmt) for e, a in zip(singles_eps, actions, strict=True)
    ]
    single += [await ok(http, "POST", f"/v1/episodes/{singles_eps[0]}/step", a, fmt) for a in actions[1:3]]
    ops = [{"op": "step", "episode_id": e, **a} for e, a in zip(batch_eps, actions, strict=True)]
    ops += [{"op": "step", "episode_id": batch_eps[0], **a} for a in actions[1:3]]
    r = await http.call("POST", "/v1/batch", {"ops": ops}, fmt=fmt)
    assert r.status == 200, r.body
    batched = r.body["results"]
    assert all(x["ok"] for x in batched), [x for x in batched if not x["ok"]]
    assert [without_ids(x) for x in batched] == [without_ids(x) for x in single]
    assert [x["turn"] for x in batched[-2:]] == [2, 3] and batched[-1]["truncated"] is True
    assert [x["episode_id"] for x in batched] == [op["episode_id"] for op in ops]


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_results_encode_as_the_ok_dicts_byte_for_byte(fmt: str) -> None:
    """Regression guard for `/v1/batch` answering each op with a struct (`service._batch_result`) instead of the dict
    `{"ok": ok, **msgspec.to_builtins(answer)}` it built before: for every kind of op answer and an error, the bytes
    on the wire are those of that dict (`ok` first, every field, nested structs as maps), in JSON and MessagePack."""
    answers: list[tuple[bool, msgspec.Struct]] = [
        (True, EpisodeCreated("ep_1", "snp_1", "p", [Message("user", "p")], 0, False, 8, None, None, None, {"a": 1})),
        (True, StepResult("ep_1", "snp_2", "obs", 0.5, True, False, 1, {"tool": "answer", "em": 1.0, "x": [1, 2]})),
        (True, StepResult("ep_1", "snp_2", "obs", 0.0, False, True, 8)),
        (True, ForkResult(["ep_2", "ep_3"])),
        (True, SnapshotCreated("snp_3")),
        (True, Deleted("ep_1")),
        (False, EnvError(ErrorCode.NOT_FOUND, "no episode 'x'").to_body()),
    ]
    for ok_, ans in answers:
        want = codec.encode({"ok": ok_, **msgspec.to_builtins(ans)}, fmt)
        assert codec.encode(_batch_result(ok_, ans), fmt) == want, ans
    as_list = [_batch_result(ok_, ans) for ok_, ans in answers]
    assert codec.encode({"results": as_list}, fmt) == codec.encode(
        {"results": [{"ok": ok_, **msgspec.to_builtins(ans)} for ok_, ans in answers]}, fmt
    )
