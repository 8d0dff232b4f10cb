"""`GET /openapi.json` against the live app: the document lists exactly the app's routes, its schemas are valid
JSON Schema, REAL answers of a running server (successes and every error status we can provoke, JSON and
MessagePack) validate against the schema and headers documented for their operation and status, and the request
schemas refuse exactly what the server refuses. (tests/test_schemathesis.py runs a schema-driven fuzzer on top.)

Guards against drift: a route added to `setup_routes` without an `OPERATIONS` entry, an answer whose shape or
status the document does not describe.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import msgpack
import pytest
from conftest import JSON, MSGPACK, LiveServer, RawHTTP, Reply

from env_server.openapi import OPERATIONS

pytestmark = pytest.mark.timeout(60)

Make = Callable[..., Awaitable[LiveServer]]


class Spec:
    """The served document plus a checker of real answers against it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: set[tuple[str, str, int]] = set()

    def validate(self, body: Any, schema: dict[str, Any]) -> None:
        # Refs are "#/components/schemas/X": validate with the components at the schema's root.
        jsonschema.Draft202012Validator({**schema, "components": self.doc["components"]}).validate(body)

    def component(self, name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    async def call(
        self, http: RawHTTP, method: str, template: str, path: str | None = None, body: Any = None, **kw: Any
    ) -> Reply:
        """Make the call and check its status, content type and body against the operation's documentation."""
        r = await http.call(method, path or template, body, **kw)
        op = self.doc["paths"][template][method.lower()]
        assert str(r.status) in op["responses"], f"{method} {template} answered undocumented {r.status}: {r.body}"
        content = op["responses"][str(r.status)]["content"]
        assert r.content_type in content, f"{method} {template} {r.status}: {r.content_type} not in {list(content)}"
        for name, header in op["responses"][str(r.status)].get("headers", {}).items():  # e.g. Retry-After on 429/503
            value = {k.lower(): v for k, v in r.headers.items()}.get(name.lower())
            assert value is not None or not header["required"], f"{method} {template} {r.status}: no {name} header"
            if value is not None:
                jsonschema.validate(int(value) if header["schema"]["type"] == "integer" else value, header["schema"])
        if r.content_type in (JSON, MSGPACK):
            self.validate(r.body, content[r.content_type]["schema"])
        self.checked.add((method, template, r.status))
        return r


async def _spec(http: RawHTTP) -> Spec:
    r = await http.call("GET", "/openapi.json")
    assert r.status == 200 and r.content_type == JSON
    return Spec(r.body)


async def test_every_route_is_documented_and_vice_versa(env_server: LiveServer, http: RawHTTP) -> None:
    spec = await _spec(http)
    doc = spec.doc
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"]
    # HEAD is added by aiohttp to every GET route and is implied by it.
    routes = {(r.method, r.resource.canonical) for r in env_server.app.router.routes() if r.method != "HEAD"}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented, f"undocumented: {routes - documented}; not routes: {documented - routes}"
    assert len(OPERATIONS) == len(documented)
    assert len({op["operationId"] for ops in doc["paths"].values() for op in ops.values()}) == len(documented)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # every $ref resolves
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split('"#/components/schemas/')[1:]}:
        assert name in doc["components"]["schemas"], name
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400 and path != "/health":
                    assert resp["content"][JSON]["schema"] == spec.component("ErrorBody"), (method, path, status)


async def test_real_answers_validate_against_the_document(http: RawHTTP) -> None:
    spec = await _spec(http)
    c = spec.call
    await c(http, "GET", "/health")
    info = (await c(http, "GET", "/v1/info")).body
    assert {t["function"]["name"] for t in info["tools"]} == {"search", "answer"}
    await c(http, "GET", "/v1/info", fmt=MSGPACK)
    await c(http, "GET", "/openapi.json")
    await c(http, "GET", "/metrics")
    await c(http, "GET", "/")  # the page (issue 26)

    ep = (await c(http, "POST", "/v1/episodes", body={"dataset": "synthetic", "split": "dev", "index": 3})).body
    eid, step = ep["episode_id"], "/v1/episodes/{episode_id}/step"
    await c(http, "POST", "/v1/episodes", body={"question": "Who?", "answers": ["Nobody"], "include_oracle": True})
    s1 = (await c(http, "POST", step, f"/v1/episodes/{eid}/step", {"action": "<search> Kelmar </search>"})).body
    await c(http, "POST", step, f"/v1/episodes/{eid}/step", {"tool_call": {"name": "search", "arguments": "{}"}})
    await c(http, "POST", step, f"/v1/episodes/{eid}/step", {"action": "no tags"}, fmt=MSGPACK)
    forks = (await c(http, "POST", "/v1/episodes/{episode_id}/fork", f"/v1/episodes/{eid}/fork", {"n": 2})).body
    await c(http, "POST", "/v1/episodes/{episode_id}/fork", f"/v1/episodes/{eid}/fork")  # no body: n = 1
    snap = (await c(http, "POST", "/v1/episodes/{episode_id}/snapshot", f"/v1/episodes/{eid}/snapshot")).body
    blob = await c(http, "GET", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{s1['snapshot_id']}")
    assert blob.content_type == "application/octet-stream"
    spec.validate(msgpack.unpackb(blob.body), spec.component("SnapshotBlob"))
    octet = {"Content-Type": "application/octet-stream"}
    imported = (await c(http, "POST", "/v1/snapshots", raw=blob.body, headers=octet)).body
    await c(http, "GET", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{s1['snapshot_id']}?turns=0")
    view = await c(http, "GET", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{s1['snapshot_id']}?view=json")
    assert view.content_type == JSON and view.body == msgpack.unpackb(blob.body)
    await c(http, "POST", "/v1/snapshots", raw=json.dumps(view.body).encode(), headers={"Content-Type": JSON})
    sid_path = f"/v1/snapshots/{imported['snapshot_id']}/episodes"
    await c(http, "POST", "/v1/snapshots/{snapshot_id}/episodes", sid_path, {"n": 3})
    done = await c(
        http,
        "POST",
        step,
        f"/v1/episodes/{forks['episode_ids'][0]}/step",
        {"tool_call": {"name": "answer", "arguments": {"answer": "x"}}},
    )
    assert done.body["done"]
    batch_body = {
        "ops": [
            {"op": "create", "question": "q", "answers": ["a"]},
            {"op": "step", "episode_id": eid, "action": "<answer> a </answer>"},
            {"op": "fork", "episode_id": eid, "n": 1},
            {"op": "snapshot", "episode_id": eid},
            {"op": "step", "episode_id": "ep_nope", "action": "x"},
            {"op": "delete", "episode_id": forks["episode_ids"][1]},
            {"op": "spawn", "snapshot_id": imported["snapshot_id"], "n": 2},
            {"op": "spawn", "snapshot_id": "snp_nope"},
            {"op": "delete_snapshot", "snapshot_id": imported["snapshot_id"]},
        ]
    }
    spec.validate(batch_body, spec.component("BatchRequest"))  # every op, spawn and delete_snapshot too, is described
    batch = await c(http, "POST", "/v1/batch", body=batch_body)
    assert [r["ok"] for r in batch.body["results"]] == [True, True, True, True, False, True, True, False, True]
    await c(http, "POST", "/retrieve", body={"queries": ["Kelmar", "Orlan"], "topk": 2})
    await c(http, "POST", "/retrieve", body={"queries": ["Kelmar"], "return_scores": False})
    await c(http, "DELETE", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{snap['snapshot_id']}")
    await c(http, "DELETE", "/v1/episodes/{episode_id}", f"/v1/episodes/{eid}")

    # errors
    def expect(r: Reply, status: int) -> None:
        assert r.status == status, r.body

    expect(await c(http, "POST", "/v1/episodes", raw=b"{not json"), 400)
    expect(await c(http, "POST", "/v1/episodes", body={"dataset": "synthetic", "bogus": 1}), 400)
    expect(await c(http, "POST", "/v1/episodes", body={"dataset": "synthetic", "split": "dev", "index": 10**6}), 422)
    expect(await c(http, "POST", "/v1/episodes", body={}, headers={"Content-Type": "text/xml"}), 415)
    expect(await c(http, "POST", step, f"/v1/episodes/{eid}/step", {"action": "x"}), 404)
    finished = forks["episode_ids"][0]
    expect(await c(http, "POST", step, f"/v1/episodes/{finished}/step", {"action": "x"}), 409)
    expect(await c(http, "POST", step, f"/v1/episodes/{finished}/step", {"action": "x"}, fmt=MSGPACK), 409)
    fork = "/v1/episodes/{episode_id}/fork"
    expect(await c(http, "POST", fork, f"/v1/episodes/{eid}/fork", {"n": 1}), 404)
    expect(await c(http, "POST", fork, f"/v1/episodes/{finished}/fork", {"n": 0}), 422)
    expect(await c(http, "GET", "/v1/snapshots/{snapshot_id}", "/v1/snapshots/snp_nope"), 404)
    expect(await c(http, "GET", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{s1['snapshot_id']}?view=yaml"), 400)
    expect(await c(http, "GET", "/v1/snapshots/{snapshot_id}", f"/v1/snapshots/{s1['snapshot_id']}?turns=5"), 422)
    expect(await c(http, "POST", "/v1/snapshots", raw=b"\x93garbage", headers=octet), 422)
    expect(await c(http, "POST", "/retrieve", body={"queries": ["x"], "topk": 0}), 422)
    expect(await c(http, "DELETE", "/v1/snapshots/{snapshot_id}", "/v1/snapshots/snp_nope"), 404)
    # No route / wrong method: not operations, but the same documented error shape.
    for method, path in (("GET", "/v2/nothing"), ("PUT", "/v1/episodes")):
        r = await http.call(method, path, {})
        assert r.status in (404, 405)
        spec.validate(r.body, spec.component("ErrorBody"))
    answered = {(m, p) for m, p, status in spec.checked if status == 200}
    assert answered == {(op.method, op.path) for op in OPERATIONS}, "every operation's success answer was checked"


async def test_auth_capacity_size_upstream_and_shutdown_errors_are_documented(make_env_server: Make) -> None:
    """401, 413, 429, 502 and 503 need servers configured for them; /openapi.json itself stays open."""
    srv = await make_env_server(auth_token="s3cret", max_episodes=1, max_body_bytes=1024)
    anon, http = RawHTTP(srv.url), RawHTTP(srv.url, token="s3cret")
    broken = await make_env_server(resources=None, retriever_url="http://127.0.0.1:9")  # discard port: refused
    to_broken = RawHTTP(broken.url)
    try:
        spec = await _spec(anon)  # no token needed
        assert spec.doc["security"] == [{"bearer": []}]
        assert spec.doc["paths"]["/openapi.json"]["get"]["security"] == []
        assert (await spec.call(anon, "GET", "/v1/info")).status == 401
        assert (await spec.call(anon, "POST", "/v1/episodes", body={"question": "q", "answers": ["a"]})).status == 401
        assert (await spec.call(http, "POST", "/v1/episodes", body={"question": "q", "answers": ["a"]})).status == 200
        assert (await spec.call(http, "POST", "/v1/episodes", body={"question": "q", "answers": ["a"]})).status == 429
        big = {"question": "q" * 4000, "answers": ["a"]}
        assert (await spec.call(http, "POST", "/v1/episodes", body=big)).status == 413

        ep = (await to_broken.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})).body
        tmpl = "/v1/episodes/{episode_id}/step"
        r = await spec.call(
            to_broken, "POST", tmpl, f"/v1/episodes/{ep['episode_id']}/step", {"action": "<search> x </search>"}
        )
        assert r.status == 502
        assert (await spec.call(to_broken, "POST", "/retrieve", body={"queries": ["x"]})).status == 502

        await srv.app.shutdown()
        assert (await spec.call(http, "GET", "/health")).status == 503
        assert (await spec.call(http, "POST", "/v1/episodes", body={"question": "q", "answers": ["a"]})).status == 503
        assert (await spec.call(anon, "GET", "/openapi.json")).status == 200
    finally:
        for client in (anon, http, to_broken):
            await client.aclose()


async def test_request_schemas_state_what_the_server_enforces(make_env_server: Make) -> None:
    """Issue 14 item 6: the document was looser than the server (no bounds on `n` or `topk`, no `oneOf` for the
    two either/or bodies). Now, with this server's own limits, a body the request schema refuses is refused by the
    server (400/422), and a body it allows is accepted."""
    srv = await make_env_server(max_fork_n=5, max_topk=7, max_turns=4, max_action_chars=50)
    http = RawHTTP(srv.url)
    try:
        spec = await _spec(http)
        schemas = spec.doc["components"]["schemas"]
        assert schemas["ForkRequest"]["properties"]["n"] == {
            "type": "integer",
            "minimum": 1,
            "maximum": 5,
            "default": 1,
        }
        assert schemas["RetrieveRequest"]["properties"]["topk"]["anyOf"][0]["maximum"] == 7
        assert [b["title"] for b in schemas["CreateEpisode"]["oneOf"]] == ["by dataset", "by question"]
        assert [b["title"] for b in schemas["StepRequest"]["oneOf"]] == ["model text", "tool call"]
        info = (await http.call("GET", "/v1/info")).body
        assert schemas["SnapshotBlob"]["properties"]["corpus_id"] == {"const": info["corpus_id"]}

        def body_schema(template: str) -> dict[str, Any]:
            return spec.doc["paths"][template]["post"]["requestBody"]["content"][JSON]["schema"]

        async def fresh() -> str:
            return (await http.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})).body["episode_id"]

        call = {"name": "search", "arguments": {"query": "Kelmar"}}
        cases: list[tuple[str, dict[str, Any]]] = [
            ("/v1/episodes", {"question": "q", "answers": ["a"]}),
            ("/v1/episodes", {"question": "q", "answers": ["a"], "dataset": None, "max_turns": 4, "seed": -(2**63)}),
            ("/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": 0}),
            ("/v1/episodes", {}),
            ("/v1/episodes", {"question": " \t", "answers": ["a"]}),
            ("/v1/episodes", {"question": "\ufeff", "answers": ["a"]}),
            ("/v1/episodes", {"question": "q", "answers": []}),
            ("/v1/episodes", {"question": "q", "answers": ["\u3000"]}),
            ("/v1/episodes", {"question": "q", "answers": ["a"], "dataset": "synthetic"}),
            ("/v1/episodes", {"dataset": "synthetic", "split": "dev"}),
            ("/v1/episodes", {"dataset": "synthetic", "split": "dev", "index": -1}),
            ("/v1/episodes", {"question": "q", "answers": ["a"], "max_turns": 0}),
            ("/v1/episodes", {"question": "q", "answers": ["a"], "max_turns": 5}),
            ("/v1/episodes", {"question": "q", "answers": ["a"], "seed": 2**63}),
            ("/v1/episodes/{episode_id}/step", {"action": "<search> Kelmar </search>"}),
            ("/v1/episodes/{episode_id}/step", {"tool_call": call}),
            ("/v1/episodes/{episode_id}/step", {"tool_call": call, "action": None}),
            ("/v1/episodes/{episode_id}/step", {"tool_call": {"name": "search", "arguments": None}}),  # a turn
            ("/v1/episodes/{episode_id}/step", {"tool_call": {"name": "search", "arguments": [1, 2.5, True]}}),
            ("/v1/episodes/{episode_id}/step", {}),
            ("/v1/episodes/{episode_id}/step", {"action": None}),
            ("/v1/episodes/{episode_id}/step", {"action": "x", "tool_call": call}),
            ("/v1/episodes/{episode_id}/step", {"action": "x" * 51}),
            ("/v1/episodes/{episode_id}/fork", {}),
            ("/v1/episodes/{episode_id}/fork", {"n": 5}),
            ("/v1/episodes/{episode_id}/fork", {"n": 0}),
            ("/v1/episodes/{episode_id}/fork", {"n": 6}),
            ("/retrieve", {"queries": ["Kelmar"], "topk": 7}),
            ("/retrieve", {"queries": ["Kelmar"], "topk": 0}),
            ("/retrieve", {"queries": ["Kelmar"], "topk": 8}),
        ]
        for template, body in cases:
            allowed = jsonschema.Draft202012Validator(
                {**body_schema(template), "components": spec.doc["components"]}
            ).is_valid(body)
            path = template.replace("{episode_id}", await fresh()) if "{" in template else template
            for fmt in (JSON, MSGPACK):
                r = await spec.call(http, "POST", template, path, body, fmt=fmt)
                if allowed:
                    assert r.status == 200, (template, body, fmt, r.body)
                else:
                    assert r.status in (400, 422), (template, body, fmt, r.status, r.body)
    finally:
        await http.aclose()
