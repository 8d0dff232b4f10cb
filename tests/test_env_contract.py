"""The env server's HTTP contract (DESIGN §2), endpoint by endpoint, in both encodings, plus every error status.

A real server on loopback over the synthetic world (fixtures in conftest.py); calls go through plain HTTP so the
status codes, content types and body shapes are what is checked, not what our client makes of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jsonschema
import msgpack
import pytest
from conftest import FORMATS, JSON, MSGPACK, LiveServer, RawHTTP, metric_value

from shared.version import SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSION

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]


async def create(http: RawHTTP, fmt: str = JSON, **body: Any) -> dict[str, Any]:
    body = body or {"dataset": "synthetic", "split": "dev", "index": 0}
    r = await http.call("POST", "/v1/episodes", body, fmt=fmt)
    assert r.status == 200, r.body
    return r.body


async def step(http: RawHTTP, eid: str, body: dict[str, Any], fmt: str = JSON) -> dict[str, Any]:
    r = await http.call("POST", f"/v1/episodes/{eid}/step", body, fmt=fmt)
    assert r.status == 200, r.body
    return r.body


# ---------------------------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize("fmt", FORMATS)
async def test_health(http: RawHTTP, fmt: str) -> None:
    r = await http.call("GET", "/health", fmt=fmt)
    assert r.status == 200 and r.content_type == fmt
    assert r.body["status"] == "ok" and r.body["version"] and r.body["episodes"] == 0
    assert r.body["num_docs"] > 100 and r.body["corpus_id"].startswith("tantivy:")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_info_tools_are_openai_function_schemas(http: RawHTTP, env_server: LiveServer, fmt: str) -> None:
    r = await http.call("GET", "/v1/info", fmt=fmt)
    assert r.status == 200 and r.content_type == fmt
    info = r.body
    names = []
    for tool in info["tools"]:
        assert tool["type"] == "function" and set(tool) == {"type", "function"}
        fn = tool["function"]
        assert isinstance(fn["name"], str) and fn["name"].isidentifier()
        assert isinstance(fn["description"], str) and len(fn["description"]) > 10
        params = fn["parameters"]
        assert params["type"] == "object" and isinstance(params["properties"], dict)
        assert set(params["required"]) <= set(params["properties"])
        jsonschema.Draft202012Validator.check_schema(params)
        for prop in params["properties"].values():
            assert prop["type"] in ("string", "integer", "number", "boolean") and prop["description"]
        names.append(fn["name"])
    assert sorted(names) == ["answer", "search"]
    search = next(t["function"] for t in info["tools"] if t["function"]["name"] == "search")
    jsonschema.validate({"query": "Kelmar", "topk": 2}, search["parameters"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"query": "Kelmar", "topk": 10_000}, search["parameters"])
    assert info["datasets"] == [{"name": "synthetic", "splits": {"train": 1500, "dev": 200, "test": 200}}]
    assert info["action_format"]["stop"] == ["</search>", "</answer>"]
    cfg = env_server.cfg
    assert info["limits"]["max_turns"] == cfg.max_turns and info["limits"]["max_episodes"] == cfg.max_episodes
    assert info["reward_metric"] == "em" and info["corpus_id"].startswith("tantivy:")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_create_by_dataset_ref_and_by_question(http: RawHTTP, fmt: str) -> None:
    ep = await create(http, fmt, dataset="synthetic", split="dev", index=3)
    assert ep["episode_id"].startswith("ep_") and ep["snapshot_id"].startswith("snp_")
    assert ep["turn"] == 0 and ep["done"] is False and ep["max_turns"] == 8
    assert ep["dataset"] == "synthetic" and ep["split"] == "dev" and ep["question_id"]
    assert ep["messages"] == [{"role": "user", "content": ep["prompt"]}]
    assert ep["metadata"]["hops"] >= 1
    assert "oracle" not in ep["metadata"] and "supporting_ids" not in ep["metadata"]  # privileged: only when asked
    with_oracle = await create(http, fmt, dataset="synthetic", split="dev", index=3, include_oracle=True)
    assert with_oracle["metadata"]["oracle"][-1]["kind"] == "answer" and with_oracle["metadata"]["supporting_ids"]

    ep2 = await create(http, fmt, question="Who founded Kelmar Press?", answers=["Varo Tessin"], max_turns=2, seed=7)
    assert "Question: Who founded Kelmar Press?" in ep2["prompt"] and ep2["max_turns"] == 2
    assert ep2["question_id"] is None and ep2["dataset"] is None


@pytest.mark.parametrize("fmt", FORMATS)
async def test_step_text_action_and_tool_calls_agree(http: RawHTTP, fmt: str) -> None:
    ep = await create(http, fmt)
    eid = ep["episode_id"]
    [a, b, c] = (await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 3}, fmt=fmt)).body["episode_ids"]
    text = await step(http, a, {"action": "<think>look up</think><search> Fozan Editions </search> trailing"}, fmt)
    obj = await step(http, b, {"tool_call": {"name": "search", "arguments": {"query": "Fozan Editions"}}}, fmt)
    js = await step(http, c, {"tool_call": {"name": "search", "arguments": '{"query": "Fozan Editions"}'}}, fmt)
    assert text["observation"].startswith("\n\n<information>Doc 1(Title: ")
    assert text["observation"].endswith("</information>\n\n")
    assert obj["observation"] == js["observation"] and obj["observation"].startswith("Doc 1(Title: ")
    assert text["observation"] == f"\n\n<information>{obj['observation'].strip()}</information>\n\n"
    for r in (text, obj, js):
        assert r["turn"] == 1 and r["reward"] == 0.0 and r["done"] is False and r["truncated"] is False
        assert r["info"]["tool"] == "search" and r["info"]["valid"] is True and r["info"]["num_hits"] == 3
        assert r["snapshot_id"].startswith("snp_")
    gold = (await create(http, fmt, question="Capital of Norvia?", answers=["Kelmar"]))["episode_id"]
    ans = await step(http, gold, {"tool_call": {"name": "answer", "arguments": {"answer": "kelmar."}}}, fmt)
    assert ans["done"] is True and ans["reward"] == 1.0 and ans["observation"] == ""
    assert ans["info"]["em"] == 1.0 and ans["info"]["golden_answers"] == ["Kelmar"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_fork_snapshot_export_import_delete(http: RawHTTP, fmt: str) -> None:
    eid = (await create(http, fmt))["episode_id"]
    s1 = await step(http, eid, {"action": "<search> Fozan Editions </search>"}, fmt)
    snap = await http.call("POST", f"/v1/episodes/{eid}/snapshot", fmt=fmt)
    assert snap.status == 200 and snap.content_type == fmt
    sid = snap.body["snapshot_id"]

    blob = await http.call("GET", f"/v1/snapshots/{sid}", fmt=fmt)
    assert blob.status == 200 and blob.content_type == "application/octet-stream"
    decoded = msgpack.unpackb(blob.body)
    assert decoded["format"] == SNAPSHOT_FORMAT and decoded["version"] == SNAPSHOT_FORMAT_VERSION
    assert len(decoded["turns"]) == 1
    assert decoded["turns"][0][1] == s1["observation"]  # a turn is array-like: action, observation, ...

    imp = await http.call(
        "POST", "/v1/snapshots", raw=blob.body, fmt=fmt, headers={"Content-Type": "application/octet-stream"}
    )
    assert imp.status == 200 and imp.content_type == fmt
    sid2 = imp.body["snapshot_id"]
    assert sid2 != sid
    eps = await http.call("POST", f"/v1/snapshots/{sid2}/episodes", {"n": 2}, fmt=fmt)
    assert eps.status == 200 and len(set(eps.body["episode_ids"])) == 2
    cont = await step(http, eps.body["episode_ids"][0], {"action": "<answer> x </answer>"}, fmt)
    assert cont["turn"] == 2 and cont["done"] is True

    for path, key in ((f"/v1/episodes/{eid}", eid), (f"/v1/snapshots/{sid}", sid)):
        d = await http.call("DELETE", path, fmt=fmt)
        assert d.status == 200 and d.body == {"deleted": key}
        again = await http.call("DELETE", path, fmt=fmt)
        assert again.status == 404 and again.error_code() == "not_found"
    assert (await http.call("GET", f"/v1/snapshots/{sid}", fmt=fmt)).status == 404
    assert (await http.call("POST", f"/v1/episodes/{eid}/step", {"action": "x"}, fmt=fmt)).status == 404


async def test_snapshot_json_view_reads_edits_and_imports(http: RawHTTP) -> None:
    """`GET /v1/snapshots/{id}?view=json` is the blob's own content as JSON (the MessagePack blob stays the default,
    whatever `Accept` asks); `POST /v1/snapshots` takes that JSON back, edited or not, through the same checks: a
    prefix of the turns imports as the state after them and continues exactly as the original state did."""
    eid = (await create(http))["episode_id"]
    s1 = await step(http, eid, {"action": "<search> Fozan Editions </search>"})
    sid1 = s1["snapshot_id"]
    s2 = await step(http, eid, {"action": "<search> Kelmar </search>"})
    blob = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}", headers={"Accept": JSON})
    assert blob.status == 200 and blob.content_type == "application/octet-stream"
    view = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}?view=json", fmt=MSGPACK)
    assert view.status == 200 and view.content_type == JSON
    assert view.body == msgpack.unpackb(blob.body)
    assert [t[0] for t in view.body["turns"]] == ["<search> Fozan Editions </search>", "<search> Kelmar </search>"]
    assert view.body["turns"][1][1] == s2["observation"]

    json_ct = {"Content-Type": JSON}
    whole = await http.call("POST", "/v1/snapshots", raw=json.dumps(view.body).encode(), headers=json_ct)
    assert whole.status == 200 and whole.body["snapshot_id"].startswith("snp_")
    again = await http.call("GET", f"/v1/snapshots/{whole.body['snapshot_id']}")
    assert again.body == blob.body, "imported from JSON, exported as MessagePack: the same blob"

    prefix = {**view.body, "turns": view.body["turns"][:1]}  # the state after turn 1, made from the JSON
    made = await http.call("POST", "/v1/snapshots", raw=json.dumps(prefix).encode(), headers=json_ct)
    assert made.status == 200
    same = {"action": "<search> Kelmar </search>"}
    ours = (await http.call("POST", f"/v1/snapshots/{made.body['snapshot_id']}/episodes", {"n": 1})).body
    theirs = (await http.call("POST", f"/v1/snapshots/{sid1}/episodes", {"n": 1})).body
    a = await step(http, ours["episode_ids"][0], same)
    b = await step(http, theirs["episode_ids"][0], same)
    assert a["turn"] == b["turn"] == 2 and a["observation"] == b["observation"] == s2["observation"]

    # ?turns=k: an earlier state of the same episode, in either view
    for k, expect in ((1, sid1), (0, None), (2, s2["snapshot_id"])):
        earlier = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}?turns={k}")
        assert earlier.status == 200 and msgpack.unpackb(earlier.body)["turns"] == view.body["turns"][:k]
        if expect:
            assert earlier.body == (await http.call("GET", f"/v1/snapshots/{expect}")).body
    as_json = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}?turns=1&view=json")
    assert as_json.content_type == JSON and as_json.body == {**view.body, "turns": view.body["turns"][:1]}
    late = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}?turns=3")
    assert late.status == 422 and "is after turn 2" in late.body["error"]["message"]
    for bad_turns in ("-1", "one", "1.0", "", "9" * 40):
        r = await http.call("GET", f"/v1/snapshots/{s2['snapshot_id']}?turns={bad_turns}")
        assert r.status == 400 and r.error_code() == "malformed_request", (bad_turns, r.body)

    bad = {
        "garbage": b"{not json",
        "an integer MessagePack cannot carry": json.dumps(
            {**view.body, "task": {**view.body["task"], "metadata": {"x": 10**26}}}
        ).encode(),
        "a 5000-digit integer": json.dumps({**view.body, "task": {**view.body["task"], "metadata": {"x": 0}}})
        .replace('"x": 0', '"x": ' + "9" * 5000)
        .encode(),
        "msgpack sent as JSON": blob.body,
        "foreign corpus": json.dumps({**view.body, "corpus_id": "tantivy:0000000000000000"}).encode(),
        "done before the last turn": json.dumps(
            {
                **view.body,
                "turns": [[*view.body["turns"][0][:3], True, *view.body["turns"][0][4:]], view.body["turns"][1]],
            }
        ).encode(),
    }
    for name, data in bad.items():
        r = await http.call("POST", "/v1/snapshots", raw=data, headers=json_ct)
        assert r.status == 422 and r.error_code() == "invalid_value", (name, r.body)
    r = await http.call("GET", f"/v1/snapshots/{sid1}?view=xml")
    assert r.status == 400 and "view must be one of msgpack, json" in r.body["error"]["message"]
    assert (await http.call("GET", "/v1/snapshots/snp_nope?view=json")).status == 404


@pytest.mark.parametrize("fmt", FORMATS)
async def test_batch_mixed_ops_in_order(http: RawHTTP, fmt: str) -> None:
    eid = (await create(http, fmt))["episode_id"]
    ops = [
        {"op": "create", "question": "Who?", "answers": ["Nobody"]},
        {"op": "step", "episode_id": eid, "action": "<search> Fozan Editions </search>"},
        {"op": "fork", "episode_id": eid, "n": 2},
        {"op": "snapshot", "episode_id": eid},
        {"op": "step", "episode_id": "ep_missing", "action": "<answer> x </answer>"},
        {"op": "create", "dataset": "synthetic", "split": "dev", "index": 10**6},
        {"op": "step", "episode_id": eid, "tool_call": {"name": "answer", "arguments": {"answer": "x"}}},
        {"op": "step", "episode_id": eid, "action": "<answer> again </answer>"},
        {"op": "delete", "episode_id": eid},
    ]
    r = await http.call("POST", "/v1/batch", {"ops": ops}, fmt=fmt)
    assert r.status == 200 and r.content_type == fmt
    res = r.body["results"]
    assert [x["ok"] for x in res] == [True, True, True, True, False, False, True, False, True]
    assert res[0]["turn"] == 0 and res[0]["episode_id"].startswith("ep_")
    assert res[1]["turn"] == 1 and res[1]["info"]["tool"] == "search"
    assert len(res[2]["episode_ids"]) == 2 and res[3]["snapshot_id"].startswith("snp_")
    assert res[4]["error"]["code"] == "not_found" and res[5]["error"]["code"] == "invalid_value"
    assert res[6]["turn"] == 2 and res[6]["done"] is True
    assert res[7]["error"]["code"] == "episode_done" and res[8] == {"ok": True, "deleted": eid}
    for x in res:
        if not x["ok"]:
            assert set(x) == {"ok", "error"} and set(x["error"]) == {"code", "message"}


@pytest.mark.parametrize("inline", ["never", "always"])
async def test_batch_ops_on_one_episode_apply_in_the_given_order(make_env_server: Make, inline: str) -> None:
    """Regression: a fork/snapshot/delete op used to run while an earlier step op of the same batch on the same
    episode was still searching, so [step e, fork e] forked the state BEFORE the step and [step e, delete e,
    step e] deleted e under the first step (service.py EnvService.batch). Searches in threads (ops overlap) and
    inline (ops run one after another). The search cache is off: a step answered from it would not wait at all."""
    env_server = await make_env_server(search_inline=inline, search_cache=0)
    http = RawHTTP(env_server.url)
    try:
        await _ops_in_order(http, env_server)
    finally:
        await http.aclose()


async def _ops_in_order(http: RawHTTP, env_server: LiveServer) -> None:
    eid = (await create(http))["episode_id"]
    ops = [
        {"op": "step", "episode_id": eid, "action": "<search> Fozan Editions </search>"},
        {"op": "fork", "episode_id": eid, "n": 1},
        {"op": "snapshot", "episode_id": eid},
        {"op": "step", "episode_id": eid, "action": "<search> Redo Hezan </search>"},
        {"op": "fork", "episode_id": eid, "n": 1},
        {"op": "delete", "episode_id": eid},
        {"op": "step", "episode_id": eid, "action": "<search> too late </search>"},
    ]
    res = (await http.call("POST", "/v1/batch", {"ops": ops})).body["results"]
    assert [x["ok"] for x in res] == [True, True, True, True, True, True, False]
    store = env_server.service.store
    assert store.episodes[res[1]["episode_ids"][0]].node.turn == 1
    assert store.snapshots[res[2]["snapshot_id"]].node.turn == 1
    assert store.episodes[res[4]["episode_ids"][0]].node.turn == 2
    assert res[6]["error"]["code"] == "not_found" and eid not in store.episodes
    # The fork after turn 1 continues from turn 1 (its next step is turn 2, not 1).
    r = await step(http, res[1]["episode_ids"][0], {"action": "<answer> x </answer>"})
    assert r["turn"] == 2


@pytest.mark.parametrize("fmt", FORMATS)
async def test_retrieve_is_search_r1_shaped(http: RawHTTP, fmt: str) -> None:
    body = {"queries": ["Fozan Editions", "publishing house founded", "😀"], "topk": 2, "return_scores": True}
    r = await http.call("POST", "/retrieve", body, fmt=fmt)
    assert r.status == 200 and r.content_type == fmt
    result = r.body["result"]
    assert len(result) == 3 and len(result[0]) == 2 and len(result[1]) == 2 and result[2] == []
    for hit in result[0] + result[1]:
        assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
        assert hit["document"]["contents"].startswith('"') and isinstance(hit["score"], float)
    assert result[0][0]["document"]["contents"].startswith('"Fozan Editions"\n')
    assert result[0][0]["score"] >= result[0][1]["score"]
    no_scores = await http.call("POST", "/retrieve", {**body, "return_scores": False}, fmt=fmt)
    assert no_scores.body["result"][0] == [h["document"] for h in result[0]]


async def test_retrieve_defaults_are_search_r1s(make_env_server: Make) -> None:
    """Search-R1's retrieval server answers a body of queries alone with its own --topk hits a query, each the bare
    document: so does ours (it answered 3 scored hits whatever the server's --topk)."""
    server = await make_env_server(topk=2)
    http = RawHTTP(server.url)
    try:
        bare = await http.call("POST", "/retrieve", {"queries": ["Fozan Editions"]})
        assert bare.status == 200 and len(bare.body["result"][0]) == 2
        assert all(set(hit) == {"id", "contents"} for hit in bare.body["result"][0]), bare.body
        scored = await http.call(
            "POST", "/retrieve", {"queries": ["Fozan Editions"], "topk": None, "return_scores": True}
        )
        assert [h["document"] for h in scored.body["result"][0]] == bare.body["result"][0]
    finally:
        await http.aclose()


async def test_metrics_prometheus_text(http: RawHTTP) -> None:
    before = await http.call("GET", "/metrics")
    assert before.status == 200 and before.content_type == "text/plain"
    text0 = before.body.decode()
    for series in (
        "trace_env_episodes_live",
        "trace_env_snapshots_live",
        "trace_env_episodes_created_total",
        "trace_env_forks_total",
        "trace_env_search_seconds_bucket",
    ):
        assert series in text0, series
    eid = (await create(http))["episode_id"]
    await step(http, eid, {"action": "<search> Fozan Editions </search>"})
    await step(http, eid, {"action": "no tags at all"})
    await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 4})
    await http.call("POST", "/v1/episodes/ep_nope/fork", {"n": 1})
    text = (await http.call("GET", "/metrics")).body.decode()
    search_count = metric_value(text, "trace_env_search_seconds_count")
    assert search_count == metric_value(text0, "trace_env_search_seconds_count") + 1
    assert metric_value(text, "trace_env_search_seconds_bucket", {"le": "+Inf"}) == search_count
    assert metric_value(text, "trace_env_steps_total", {"tool": "search"}) == 1
    assert metric_value(text, "trace_env_steps_total", {"tool": "invalid"}) == 1
    assert metric_value(text, "trace_env_forks_total") == 4
    assert metric_value(text, "trace_env_episodes_live") == 5
    assert metric_value(text, "trace_env_episodes_created_total") == 1
    assert metric_value(text, "trace_env_errors_total", {"code": "not_found"}) == 1
    assert "trace_env_request_seconds_bucket" in text
    step_route = {"route": "/v1/episodes/{episode_id}/step"}
    assert metric_value(text, "trace_env_request_seconds_count", step_route) == 2


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fmt", FORMATS)
async def test_400_malformed_bodies(http: RawHTTP, fmt: str) -> None:
    eid = (await create(http, fmt))["episode_id"]
    bad_raw = b'{"n": ' if fmt == JSON else b"\xc1\x00"
    r = await http.call("POST", f"/v1/episodes/{eid}/fork", raw=bad_raw, fmt=fmt)
    assert r.status == 400 and r.error_code() == "malformed_request" and r.content_type == fmt
    cases = [
        (f"/v1/episodes/{eid}/fork", {"n": "2"}, "$.n"),  # wrong type
        (f"/v1/episodes/{eid}/fork", {"n": True}, "$.n"),
        (f"/v1/episodes/{eid}/fork", {"n": 2, "bogus": 1}, "bogus"),  # unknown field
        (f"/v1/episodes/{eid}/step", {"action": 5}, "$.action"),
        (f"/v1/episodes/{eid}/step", {"tool_call": {"name": "search", "args": {}}}, "args"),
        (f"/v1/episodes/{eid}/step", [1, 2], "object"),
        ("/v1/episodes", {"question": "q", "answers": "a"}, "$.answers"),
        ("/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": 1.5}, "$.index"),
        ("/v1/batch", {"ops": [{"op": "explode", "episode_id": eid}]}, "explode"),
        ("/v1/batch", {"ops": [{"episode_id": eid}]}, "op"),
        ("/v1/batch", {}, "ops"),
        ("/retrieve", {"queries": "one string"}, "$.queries"),
        (f"/v1/episodes/{eid}/snapshot", {"n": 1}, "n"),
    ]
    for path, body, needle in cases:
        r = await http.call("POST", path, body, fmt=fmt)
        assert r.status == 400, (path, body, r.body)
        assert r.error_code() == "malformed_request" and needle in r.body["error"]["message"], (body, r.body)
    r = await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 2**70}, fmt=fmt) if fmt == JSON else None
    if r is not None:
        assert r.status in (400, 422) and r.error_code() in ("malformed_request", "invalid_value")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_deep_nesting_and_huge_ints_are_client_errors(http: RawHTTP, fmt: str) -> None:
    """Regression: 50k nested arrays in tool_call.arguments made the decoder raise RecursionError (500, codec.py);
    a seed past int64 (JSON ints are unbounded) was accepted and then GET /v1/snapshots/{sid} failed with 500
    because the blob is MessagePack (service.py EnvService.create)."""
    eid = (await create(http, fmt))["episode_id"]
    depth = 50_000
    if fmt == JSON:
        raw = b'{"tool_call": {"name": "search", "arguments": {"query": ' + b"[" * depth + b"]" * depth + b"}}}"
    else:
        head = b"\x81" + msgpack.packb("tool_call") + b"\x82" + msgpack.packb("name") + msgpack.packb("search")
        raw = head + msgpack.packb("arguments") + b"\x81" + msgpack.packb("query") + b"\x91" * depth + b"\x90"
    r = await http.call("POST", f"/v1/episodes/{eid}/step", raw=raw, fmt=fmt)
    assert r.status == 400 and r.error_code() == "malformed_request"
    for seed in (2**63, -(2**63) - 1, 10**30):
        if fmt == MSGPACK and not -(2**63) <= seed < 2**64:
            continue  # not representable in MessagePack at all
        r = await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"], "seed": seed}, fmt=fmt)
        assert r.status == 422 and "seed" in r.body["error"]["message"], (seed, r.body)
    ok = await create(http, fmt, question="q", answers=["a"], seed=2**63 - 1)
    assert (await http.call("GET", f"/v1/snapshots/{ok['snapshot_id']}", fmt=fmt)).status == 200
    assert (await step(http, eid, {"action": "<answer> a </answer>"}, fmt))["turn"] == 1


async def test_401_auth(make_env_server: Make) -> None:
    srv = await make_env_server(auth_token="s3cret")
    anon, wrong, right = RawHTTP(srv.url), RawHTTP(srv.url, token="nope"), RawHTTP(srv.url, token="s3cret")
    try:
        assert (await anon.call("GET", "/health")).status == 200  # open for load balancers
        for client in (anon, wrong):
            for method, path, body in (
                ("GET", "/v1/info", None),
                ("POST", "/v1/episodes", {"question": "q", "answers": ["a"]}),
                ("GET", "/metrics", None),
                ("POST", "/retrieve", {"queries": ["x"]}),
                ("GET", "/v1/snapshots/snp_x", None),
            ):
                r = await client.call(method, path, body)
                assert r.status == 401 and r.error_code() == "unauthorized", (path, r.body)
        r = await anon.call("GET", "/v1/info", headers={"Authorization": "Basic s3cret"})
        assert r.status == 401
        r = await right.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})
        assert r.status == 200
        assert (await right.call("GET", "/v1/info")).status == 200
    finally:
        for c in (anon, wrong, right):
            await c.aclose()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_404_unknown_ids_and_routes(http: RawHTTP, fmt: str) -> None:
    cases = [
        ("POST", "/v1/episodes/ep_nope/step", {"action": "<search> x </search>"}),
        ("POST", "/v1/episodes/ep_nope/fork", {"n": 1}),
        ("POST", "/v1/episodes/ep_nope/snapshot", None),
        ("DELETE", "/v1/episodes/ep_nope", None),
        ("GET", "/v1/snapshots/snp_nope", None),
        ("POST", "/v1/snapshots/snp_nope/episodes", {"n": 1}),
        ("DELETE", "/v1/snapshots/snp_nope", None),
        ("GET", "/v2/everything", None),
        ("POST", "/v1/episodes/ep_nope/rewind", {}),
    ]
    for method, path, body in cases:
        r = await http.call(method, path, body, fmt=fmt)
        assert r.status == 404 and r.error_code() == "not_found", (path, r.body)
        assert r.content_type == fmt
    r = await http.call("PUT", "/v1/episodes", {}, fmt=fmt)
    assert r.status == 405 and r.error_code() == "method_not_allowed" and "POST" in r.headers["Allow"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_409_step_after_done(http: RawHTTP, fmt: str) -> None:
    eid = (await create(http, fmt, question="q", answers=["a"]))["episode_id"]
    done = await step(http, eid, {"action": "<answer> a </answer>"}, fmt)
    assert done["done"] and done["reward"] == 1.0
    for body in ({"action": "<answer> a </answer>"}, {"tool_call": {"name": "search", "arguments": {"query": "x"}}}):
        r = await http.call("POST", f"/v1/episodes/{eid}/step", body, fmt=fmt)
        assert r.status == 409 and r.error_code() == "episode_done" and r.content_type == fmt
    # A finished episode can still be forked and snapshotted (its branches are done too).
    fork = await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 1}, fmt=fmt)
    r = await http.call("POST", f"/v1/episodes/{fork.body['episode_ids'][0]}/step", {"action": "x"}, fmt=fmt)
    assert r.status == 409


async def test_413_body_over_the_limit(make_env_server: Make) -> None:
    srv = await make_env_server(max_body_bytes=2048)
    http = RawHTTP(srv.url)
    try:
        eid = (await create(http, question="q", answers=["a"]))["episode_id"]
        big = {"action": "<search> " + "x" * 3000 + " </search>"}
        r = await http.call("POST", f"/v1/episodes/{eid}/step", big)
        assert r.status == 413 and r.error_code() == "request_too_large"
        assert r.headers.get("Connection") == "close"
        r = await http.call("POST", "/v1/snapshots", raw=b"\x00" * 4096, headers={"Content-Type": None})
        assert r.status == 413 and r.error_code() == "request_too_large"
        r = await http.call("POST", "/v1/batch", {"ops": [{"op": "delete", "episode_id": "x" * 3000}]}, fmt=MSGPACK)
        assert r.status == 413 and r.content_type == MSGPACK
        # The episode was not touched and the server is fine.
        ok = await step(http, eid, {"action": "<search> Fozan Editions </search>"})
        assert ok["turn"] == 1
    finally:
        await http.aclose()


async def test_413_chunked_stream_is_cut_off_at_the_limit(make_env_server: Make) -> None:
    """A chunked body with no Content-Length that would be 512 MB: the server answers 413 after reading about
    the limit (plus socket buffers), long before the client has sent it all, and never buffers it."""
    srv = await make_env_server(max_body_bytes=2048)
    sent = 0
    total = 512 * 1024 * 1024
    chunk = b"x" * 65536

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < total:
            sent += len(chunk)
            yield chunk

    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        try:
            async with s.post(
                srv.url + "/v1/episodes", data=body(), headers={"Content-Type": JSON}, chunked=True
            ) as resp:
                status, payload, sent_at_answer = resp.status, await resp.read(), sent
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as e:  # reset while still sending
            pytest.fail(f"no 413 answer before the connection closed: {e!r} after {sent} bytes")
        elapsed = time.perf_counter() - t0
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"
    assert sent_at_answer < 64 * 1024 * 1024, f"server read {sent_at_answer} bytes before answering"
    assert elapsed < 10, elapsed


@pytest.mark.parametrize("path", ["/v1/episodes", "/v1/batch", "/retrieve", "/v1/snapshots"])
async def test_415_unsupported_content_type(http: RawHTTP, path: str) -> None:
    r = await http.call("POST", path, raw=b"<xml/>", headers={"Content-Type": "application/xml"})
    assert r.status == 415 and r.error_code() == "unsupported_media_type"
    assert r.content_type == JSON


@pytest.mark.parametrize("fmt", FORMATS)
async def test_accept_overrides_the_request_format(http: RawHTTP, fmt: str) -> None:
    other = MSGPACK if fmt == JSON else JSON
    r = await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]}, fmt=fmt, headers={"Accept": other})
    assert r.status == 200 and r.content_type == other and r.body["turn"] == 0
    r = await http.call("POST", "/v1/episodes", {"question": ""}, fmt=fmt, headers={"Accept": other})
    assert r.status == 422 and r.content_type == other and r.error_code() == "invalid_value"
    r = await http.call("GET", "/v1/info", fmt=fmt, headers={"Accept": "*/*", "Content-Type": None})
    assert r.status == 200 and r.content_type == JSON


@pytest.mark.parametrize("fmt", FORMATS)
async def test_422_invalid_values(http: RawHTTP, env_server: LiveServer, fmt: str) -> None:
    eid = (await create(http, fmt))["episode_id"]
    sid = (await http.call("POST", f"/v1/episodes/{eid}/snapshot", fmt=fmt)).body["snapshot_id"]
    max_n = env_server.cfg.max_fork_n
    cases: list[tuple[str, Any]] = [
        (f"/v1/episodes/{eid}/fork", {"n": 0}),
        (f"/v1/episodes/{eid}/fork", {"n": -3}),
        (f"/v1/episodes/{eid}/fork", {"n": max_n + 1}),
        (f"/v1/episodes/{eid}/fork", {"n": 10**9}),
        (f"/v1/snapshots/{sid}/episodes", {"n": 0}),
        (f"/v1/snapshots/{sid}/episodes", {"n": 10**9}),
        ("/v1/episodes", {"question": "q", "answers": ["a"], "max_turns": 0}),
        ("/v1/episodes", {"question": "q", "answers": ["a"], "max_turns": -1}),
        ("/v1/episodes", {"question": "q", "answers": ["a"], "max_turns": 10**6}),
        ("/v1/episodes", {"question": "q", "answers": ["a"], "dataset": "synthetic", "split": "dev", "index": 0}),
        ("/v1/episodes", {}),
        ("/v1/episodes", {"question": "  ", "answers": ["a"]}),
        ("/v1/episodes", {"question": "q", "answers": []}),
        ("/v1/episodes", {"question": "q", "answers": [" "]}),
        ("/v1/episodes", {"question": "q"}),
        ("/v1/episodes", {"dataset": "synthetic", "split": "dev"}),
        ("/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": 200}),
        ("/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": -1}),
        ("/v1/episodes", {"dataset": "nq", "split": "dev", "index": 0}),
        ("/v1/episodes", {"dataset": "synthetic", "split": "nope", "index": 0}),
        (f"/v1/episodes/{eid}/step", {}),
        (f"/v1/episodes/{eid}/step", {"action": "x", "tool_call": {"name": "search", "arguments": {"query": "x"}}}),
        (f"/v1/episodes/{eid}/step", {"action": "x" * (env_server.cfg.max_action_chars + 1)}),
        ("/retrieve", {"queries": ["x"], "topk": 0}),
        ("/retrieve", {"queries": ["x"], "topk": 10**4}),
    ]
    for path, body in cases:
        r = await http.call("POST", path, body, fmt=fmt)
        assert r.status == 422 and r.error_code() == "invalid_value", (path, body, r.status, r.body)
    # Nothing above changed the episode.
    assert (await step(http, eid, {"action": "<answer> x </answer>"}, fmt))["turn"] == 1


async def test_422_foreign_or_corrupt_snapshot_blobs(http: RawHTTP, make_env_server: Make) -> None:
    eid = (await create(http))["episode_id"]
    await step(http, eid, {"action": "<search> Fozan Editions </search>"})
    sid = (await http.call("POST", f"/v1/episodes/{eid}/snapshot")).body["snapshot_id"]
    blob = (await http.call("GET", f"/v1/snapshots/{sid}")).body
    good = msgpack.unpackb(blob)

    def tampered(**changes: Any) -> bytes:
        return msgpack.packb({**good, **changes})

    done_turn = list(good["turns"][0])
    done_turn[3] = True  # done
    bad_blobs = {
        "garbage": b"definitely not msgpack \xc1",
        "empty": b"",
        "json": json.dumps(good, default=str).encode(),
        "truncated": blob[: len(blob) // 2],
        "foreign corpus": tampered(corpus_id="tantivy:0000000000000000"),
        "other reward metric": tampered(reward_metric="f1"),
        "future version": tampered(version=SNAPSHOT_FORMAT_VERSION + 1),
        "wrong format": tampered(format="other-snapshot"),
        "more turns than max_turns": tampered(task={**good["task"], "max_turns": 0}),
        "done before the last turn": tampered(turns=[done_turn, good["turns"][0]]),
        "missing field": msgpack.packb({k: v for k, v in good.items() if k != "task"}),
        # free-form values are JSON data, so that the state's JSON view is the blob itself
        "bytes in metadata": tampered(task={**good["task"], "metadata": {"b": b"\x00\x01"}}),
        "an extension type in info": tampered(turns=[[*good["turns"][0][:5], {"e": msgpack.ExtType(5, b"x")}]]),
        "a non-string key": tampered(task={**good["task"], "metadata": {"m": {1: "one"}}}),
        "NaN in info": tampered(turns=[[*good["turns"][0][:5], {"x": float("nan")}]]),
    }
    for name, data in bad_blobs.items():
        r = await http.call("POST", "/v1/snapshots", raw=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status == 422 and r.error_code() == "invalid_value", (name, r.body)
    # A server with a smaller max_turns refuses a blob that allows more turns than it serves.
    small = await make_env_server(max_turns=2)
    http2 = RawHTTP(small.url)
    try:
        r = await http2.call("POST", "/v1/snapshots", raw=blob, headers={"Content-Type": "application/octet-stream"})
        assert r.status == 422 and "max_turns" in r.body["error"]["message"]
    finally:
        await http2.aclose()
    ok = await http.call("POST", "/v1/snapshots", raw=blob, headers={"Content-Type": "application/octet-stream"})
    assert ok.status == 200


async def test_429_capacity(make_env_server: Make) -> None:
    srv = await make_env_server(max_episodes=3, max_batch_ops=4, max_snapshots=50)
    http = RawHTTP(srv.url)
    try:
        eid = (await create(http, question="q", answers=["a"]))["episode_id"]
        fork = await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 3})
        assert fork.status == 429 and fork.error_code() == "capacity_exceeded"
        assert "3" in fork.body["error"]["message"]  # the cap is reported
        assert len((await http.call("POST", f"/v1/episodes/{eid}/fork", {"n": 2})).body["episode_ids"]) == 2
        r = await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})
        assert r.status == 429 and r.error_code() == "capacity_exceeded"
        sid = (await http.call("POST", f"/v1/episodes/{eid}/snapshot")).body["snapshot_id"]
        r = await http.call("POST", f"/v1/snapshots/{sid}/episodes", {"n": 1})
        assert r.status == 429
        r = await http.call("POST", "/v1/batch", {"ops": [{"op": "create", "question": "q", "answers": ["a"]}]})
        assert r.status == 200 and r.body["results"][0]["error"]["code"] == "capacity_exceeded"
        r = await http.call("POST", "/v1/batch", {"ops": [{"op": "snapshot", "episode_id": eid}] * 5})
        assert r.status == 429 and r.error_code() == "capacity_exceeded"
        r = await http.call("POST", "/retrieve", {"queries": ["x"] * 5})
        assert r.status == 429
        # Deleting frees a place.
        assert (await http.call("DELETE", f"/v1/episodes/{eid}")).status == 200
        assert (await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})).status == 200
    finally:
        await http.aclose()


async def test_503_while_shutting_down(env_server: LiveServer, http: RawHTTP) -> None:
    eid = (await create(http))["episode_id"]
    await env_server.app.shutdown()  # what the runner does on SIGTERM before draining
    for method, path, body in (
        ("POST", f"/v1/episodes/{eid}/step", {"action": "<answer> x </answer>"}),
        ("POST", "/v1/episodes", {"question": "q", "answers": ["a"]}),
        ("GET", "/v1/info", None),
    ):
        r = await http.call(method, path, body)
        assert r.status == 503 and r.error_code() == "shutting_down", path
    health = await http.call("GET", "/health")
    assert health.status == 503 and health.body["status"] == "shutting_down"


async def test_no_client_input_yields_500(http: RawHTTP) -> None:
    """Odd but well-formed inputs in every field answer 2xx/4xx, never 500."""
    eid = (await create(http))["episode_id"]
    weird: list[tuple[str, str, Any]] = [
        ("POST", "/v1/episodes", {"question": "\x00\ud7ff😀", "answers": ["\u200b x"]}),
        ("POST", "/v1/episodes", {"question": "q", "answers": ["a"], "seed": -(2**63)}),
        ("POST", f"/v1/episodes/{eid}/step", {"tool_call": {"name": "", "arguments": ""}}),
        ("POST", f"/v1/episodes/{eid}/step", {"tool_call": {"name": "search", "arguments": "[1, 2]"}}),
        ("POST", f"/v1/episodes/{eid}/step", {"tool_call": {"name": "search", "arguments": "{not json"}}),
        ("POST", "/retrieve", {"queries": [], "topk": 1}),
        ("POST", "/retrieve", {"queries": ["", " ", "((", "x" * 20_000]}),
        ("POST", "/v1/batch", {"ops": []}),
        ("GET", "/v1/snapshots/" + "%2F" * 50, None),
        ("POST", "/v1/episodes/" + "x" * 2000 + "/step", {"action": "x"}),
    ]
    for method, path, body in weird:
        for fmt in FORMATS:
            r = await http.call(method, path, body, fmt=fmt)
            assert r.status < 500, (path, body, r.body)
    # MessagePack says what JSON cannot: non-string keys, bytes, extension types. In a tool call's arguments they
    # are the request's fault (400, nothing spent), wherever they sit; JSON's own odd values are the agent's (a turn).
    step = f"/v1/episodes/{(await create(http, question='q', answers=['a'], max_turns=4))['episode_id']}/step"
    for arguments in ({1: "a", "query": "b"}, {1: "a"}, {b"query": "a"}, b"query", msgpack.ExtType(5, b"x"),
                      {"query": msgpack.ExtType(5, b"x")}, {"query": "a", "topk": msgpack.ExtType(5, b"x")}):  # fmt: skip
        raw = msgpack.packb({"tool_call": {"name": "search", "arguments": arguments}})
        r = await http.call("POST", step, fmt=MSGPACK, raw=raw)
        assert r.status == 400 and r.body["error"]["code"] == "malformed_request", (arguments, r.body)
    for turn, fmt in enumerate(FORMATS, start=1):  # the refused steps spent nothing: this is turn 1
        r = await http.call("POST", step, {"tool_call": {"name": "search", "arguments": None}}, fmt=fmt)
        assert r.status == 200 and r.body["turn"] == turn and r.body["info"]["valid"] is False, r.body
        assert "must be a JSON object, got null" in r.body["observation"], r.body
    # and the server still works
    assert (await http.call("GET", "/health")).status == 200


async def test_concurrent_steps_on_one_episode_apply_one_after_another(http: RawHTTP) -> None:
    eid = (await create(http, question="q", answers=["a"], max_turns=8))["episode_id"]
    rs = await asyncio.gather(
        *(http.call("POST", f"/v1/episodes/{eid}/step", {"action": f"<search> q{i} </search>"}) for i in range(8))
    )
    assert sorted(r.body["turn"] for r in rs) == list(range(1, 9))
    assert sum(r.body["truncated"] for r in rs) == 1
    r = await http.call("POST", f"/v1/episodes/{eid}/step", {"action": "<answer> a </answer>"})
    assert r.status == 409
