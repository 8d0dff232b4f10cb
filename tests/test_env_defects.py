"""Regression tests for the env server defects an outside tester found (issue 14, "Defects" 1-5; item 6, the
OpenAPI document and the schemathesis run, is in tests/test_openapi.py and tests/test_schemathesis.py).

Real servers on loopback (conftest.py): in-process ones over the synthetic world, a real `python -m env_server serve`
process where a signal is involved, and loopback stand-ins for a retriever that stalls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
from conftest import JSON, LiveServer, RawHTTP, metric_value

from env_server.episodes import MAX_BLOB_DEPTH
from shared.wire import TaskRecord

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]
OCTET = {"Content-Type": "application/octet-stream"}


async def create(http: RawHTTP, **body: Any) -> dict[str, Any]:
    r = await http.call("POST", "/v1/episodes", body or {"question": "Who?", "answers": ["Nobody"]})
    assert r.status == 200, r.body
    return r.body


async def a_blob(http: RawHTTP, *, search: bool = True) -> dict[str, Any]:
    """A real blob of this server (one search turn unless `search` is False), decoded to plain data."""
    ep = await create(http)
    sid = ep["snapshot_id"]
    if search:
        r = await http.call("POST", f"/v1/episodes/{ep['episode_id']}/step", {"action": "<search> Kelmar </search>"})
        assert r.status == 200, r.body
        sid = r.body["snapshot_id"]
    r = await http.call("GET", f"/v1/snapshots/{sid}")
    assert r.status == 200 and r.content_type == "application/octet-stream"
    return msgpack.unpackb(r.body)


def nested(depth: int) -> dict[str, Any]:
    """A dict nested `depth` levels deep: {"x": {"x": ... {}}}."""
    out: dict[str, Any] = {}
    for _ in range(depth - 1):
        out = {"x": out}
    return out


# ---------------------------------------------------------------------------------------------- defect 1
async def test_deeply_nested_snapshot_blob_is_422_not_500(http: RawHTTP, env_server: LiveServer) -> None:
    """Issue 14 defect 1: a valid MessagePack blob whose task metadata or a turn's info nested ~1,000 levels deep made
    `POST /v1/snapshots` answer 500 (RecursionError in the decoder). Imported blobs are untrusted: past
    MAX_BLOB_DEPTH levels they are refused with 422, and within it they import, export and continue."""
    good = await a_blob(http)
    turn = list(good["turns"][0])

    def with_info(info: Any) -> dict[str, Any]:
        t = list(turn)
        t[5] = info
        return {**good, "turns": [t]}

    bad = {
        "metadata 1000 deep (past the interpreter's limit)": {
            **good,
            "task": {**good["task"], "metadata": nested(1000)},
        },
        "metadata just past the bound": {**good, "task": {**good["task"], "metadata": nested(MAX_BLOB_DEPTH + 1)}},
        "turn info 1000 deep": with_info(nested(1000)),
        "turn info in lists just past the bound": with_info({"a": _lists(MAX_BLOB_DEPTH)}),
    }
    for name, blob in bad.items():
        r = await http.call("POST", "/v1/snapshots", raw=msgpack.packb(blob), headers=OCTET)
        assert r.status == 422 and r.error_code() == "invalid_value", (name, r.status, r.body)
        assert "nests" in r.body["error"]["message"] and str(MAX_BLOB_DEPTH) in r.body["error"]["message"], r.body
    assert (
        metric_value(
            (await http.call("GET", "/metrics")).body.decode(), "trace_env_errors_total", {"code": "internal_error"}
        )
        == 0
    )

    deep_ok = {**good, "task": {**good["task"], "metadata": nested(MAX_BLOB_DEPTH)}}
    r = await http.call("POST", "/v1/snapshots", raw=msgpack.packb(deep_ok), headers=OCTET)
    assert r.status == 200, r.body
    again = await http.call("GET", f"/v1/snapshots/{r.body['snapshot_id']}")
    assert again.status == 200 and msgpack.unpackb(again.body)["task"]["metadata"] == nested(MAX_BLOB_DEPTH)
    eid = (await http.call("POST", f"/v1/snapshots/{r.body['snapshot_id']}/episodes", {"n": 1})).body["episode_ids"][0]
    r = await http.call("POST", f"/v1/episodes/{eid}/step", {"action": "<answer> Nobody </answer>"})
    assert r.status == 200 and r.body["reward"] == 1.0 and r.body["turn"] == 2


def _lists(depth: int) -> list[Any]:
    """A list nested so that, as a value of a turn's info dict, the info nests `depth + 1` levels."""
    out: list[Any] = []
    for _ in range(depth - 1):
        out = [out]
    return out


async def test_snapshot_blob_over_the_body_cap_is_413(make_env_server: Make) -> None:
    """Issue 14 defect 1 (size): an imported blob is bounded by the body cap, refused with 413 before it is decoded."""
    srv = await make_env_server(max_body_bytes=4096)
    http = RawHTTP(srv.url)
    try:
        good = await a_blob(http, search=False)
        big = {**good, "task": {**good["task"], "metadata": {"pad": "x" * 8000}}}
        r = await http.call("POST", "/v1/snapshots", raw=msgpack.packb(big), headers=OCTET)
        assert r.status == 413 and r.error_code() == "request_too_large", r.body
    finally:
        await http.aclose()


# ---------------------------------------------------------------------------------------------- defect 2
async def test_imported_task_is_checked_exactly_as_create_checks_it(http: RawHTTP, env_server: LiveServer) -> None:
    """Issue 14 defect 2: a blob with `golden_answers: []` imported (200), then answering it crashed with 500 ("cannot
    judge an answer without gold answers"); max_turns 0 and a seed past int64 imported too. An imported task now
    passes the checks `create` applies, and each value `create` refuses, import refuses with 422 naming the field."""
    good = await a_blob(http, search=False)
    cap = env_server.cfg.max_turns
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        # (field named in the error, change to the blob's task, the same value in a create body)
        ("golden_answers", {"golden_answers": []}, {"answers": []}),
        ("golden_answers", {"golden_answers": ["a", " \t"]}, {"answers": ["a", " \t"]}),
        ("golden_answers", {"golden_answers": ["\ufeff"]}, {"answers": ["\ufeff"]}),
        ("question", {"question": ""}, {"question": ""}),
        ("question", {"question": "\u3000\x1c"}, {"question": "\u3000\x1c"}),
        ("max_turns", {"max_turns": 0}, {"max_turns": 0}),
        ("max_turns", {"max_turns": cap + 1}, {"max_turns": cap + 1}),
        ("seed", {"seed": 2**63}, {"seed": 2**63}),
        ("seed", {"seed": 2**64 - 1}, {"seed": 2**64 - 1}),
    ]
    for field, change, create_body in cases:
        blob = msgpack.packb({**good, "task": {**good["task"], **change}})
        r = await http.call("POST", "/v1/snapshots", raw=blob, headers=OCTET)
        assert r.status == 422 and r.error_code() == "invalid_value", (change, r.status, r.body)
        assert field in r.body["error"]["message"], (change, r.body)
        body = {"question": "q", "answers": ["a"], **create_body}
        c = await http.call("POST", "/v1/episodes", body, fmt=JSON)
        assert c.status == 422 and c.error_code() == "invalid_value", (create_body, c.status, c.body)
    # A task at the edges create accepts imports too.
    edge = {"max_turns": cap, "seed": -(2**63), "golden_answers": ["x"], "question": "\u200bq"}
    r = await http.call(
        "POST", "/v1/snapshots", raw=msgpack.packb({**good, "task": {**good["task"], **edge}}), headers=OCTET
    )
    assert r.status == 200, r.body


async def test_imported_turns_must_be_consistent(http: RawHTTP) -> None:
    """Issue 14 defect 2 (turns): a blob whose turns no server could have produced is refused with 422: a turn at
    max_turns that does not end the episode, a truncated turn that is not done, a reward that is not finite."""
    good = await a_blob(http)
    turn = good["turns"][0]  # [action, observation, reward, done, truncated, info] of a search turn
    cases = {
        "reaches max_turns": {**good, "task": {**good["task"], "max_turns": 1}},
        "truncated, not done": {**good, "turns": [[*turn[:4], True, turn[5]]]},
        "nan reward": {**good, "turns": [[*turn[:2], float("nan"), *turn[3:]]]},
    }
    for name, blob in cases.items():
        r = await http.call("POST", "/v1/snapshots", raw=msgpack.packb(blob), headers=OCTET)
        assert r.status == 422 and r.error_code() == "invalid_value", (name, r.status, r.body)
    assert (await http.call("POST", "/v1/snapshots", raw=msgpack.packb(good), headers=OCTET)).status == 200


async def test_batch_answers_per_op_when_one_op_hits_a_bug(make_env_server: Make) -> None:
    """Issue 14 defect 2 (batch): when one op of `/v1/batch` raised something other than an EnvError, the whole batch
    answered 500 although its other ops had been applied (two creates left live episodes whose ids never reached the
    client). Now that op's result is `internal_error` and every other op keeps its own answer.

    The bug is planted white-box: the episode store gets the task the old import let in (no gold answers), since no
    request can make one any more; answering it reaches the judge's assertion, a real bug path of the server."""
    srv = await make_env_server()
    http = RawHTTP(srv.url)
    try:
        bad_eid, _, _ = srv.service.store.create(TaskRecord(question="q", golden_answers=[], max_turns=4))
        ok = await create(http)
        r = await http.call(
            "POST",
            "/v1/batch",
            {
                "ops": [
                    {"op": "create", "question": "q1", "answers": ["a"]},
                    {"op": "step", "episode_id": bad_eid, "action": "<answer> a </answer>"},
                    {"op": "create", "question": "q2", "answers": ["b"]},
                    {"op": "step", "episode_id": ok["episode_id"], "action": "<answer> Nobody </answer>"},
                    {"op": "step", "episode_id": "ep_nope", "action": "x"},
                ]
            },
        )
        assert r.status == 200, r.body
        res = r.body["results"]
        assert [x["ok"] for x in res] == [True, False, True, True, False]
        assert res[1]["error"]["code"] == "internal_error" and res[4]["error"]["code"] == "not_found"
        assert res[3]["reward"] == 1.0 and res[3]["done"]
        for created in (res[0], res[2]):  # the created episodes are live and usable by the ids returned
            s = await http.call(
                "POST", f"/v1/episodes/{created['episode_id']}/step", {"action": "<answer> a </answer>"}
            )
            assert s.status == 200 and s.body["turn"] == 1, s.body
        assert len(srv.service.store.episodes) == 4
        # The single call on the same episode is the 500 of the contract; the server goes on working.
        single = await http.call("POST", f"/v1/episodes/{bad_eid}/step", {"action": "<answer> a </answer>"})
        assert single.status == 500 and single.error_code() == "internal_error"
        text = (await http.call("GET", "/metrics")).body.decode()
        assert metric_value(text, "trace_env_errors_total", {"code": "internal_error"}) == 2
        assert (await http.call("GET", "/health")).status == 200
    finally:
        await http.aclose()
