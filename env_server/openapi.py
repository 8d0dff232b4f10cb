"""`GET /openapi.json`: an OpenAPI 3.1 description of the env server, generated from the wire structs.

What always holds (`tests/test_openapi.py` checks it against the live app):
- Every route `setup_routes` registers has exactly one entry in `OPERATIONS`, and every entry is a route (HEAD,
  which aiohttp adds to every GET, is implied and not listed).
- Request and answer schemas are `msgspec.json.schema_components` of the structs in `shared.wire`, the same
  structs the server decodes and encodes with, so the description cannot drift from the code. Only shapes the
  handlers build by hand (`/health`, `/retrieve` without scores, the empty snapshot body, a batch result item)
  are written out here, and real answers are validated against them.
- Each operation lists the error statuses it can answer, each with the one error shape
  `{"error": {"code", "message"}}` (`ErrorBody`). JSON and MessagePack carry the same schema; the answer uses
  the request's format unless `Accept` says otherwise (DESIGN §2).
- `/openapi.json` and `/health` need no token (a client must be able to discover the API and probe liveness);
  the document says whether this server requires the bearer token on the other routes.
- The request schemas say what the server enforces, with this server's limits (`_constrain`): `n` of a fork in
  [1, max_fork_n], `topk` in [1, max_topk], `max_turns` in [1, max_turns], a 64-bit `seed`, `action` at most
  max_action_chars long, a non-blank question and gold answers (`env_server.episodes.NON_BLANK`), and `oneOf` for
  the two either/or bodies (create: the dataset trio or question + answers; step: action or tool_call). A body the
  schema refuses is refused by the server (4xx), and a 422 for a body the schema allows comes only from what the
  schema does not say (a dataset, split or index this server does not serve; an imported blob whose turns no server
  could have made, or whose values nest too deep). Counts over the server's capacity (queries or ops per call,
  live episodes) are 429, with `Retry-After`, as every 503 is. Batch ops are checked one by one, each answering
  its own result, so their schemas stay loose.
- Links from each answer that carries an `episode_id`/`snapshot_id` to the operations that take it, so a client or
  a test generator (schemathesis' stateful phase) can follow an episode's life.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from env_server.app import CONFIG, SERVICE, SNAPSHOT_VIEWS
from env_server.config import ServerConfig
from env_server.episodes import INT64, MAX_BLOB_DEPTH, NON_BLANK
from shared.version import API_VERSION, SNAPSHOT_FORMAT_VERSION, __version__
from shared.wire import (
    BatchRequest,
    BatchResult,
    CreateEpisode,
    Deleted,
    EpisodeCreated,
    ErrorBody,
    ForkRequest,
    ForkResult,
    Info,
    RetrieveRequest,
    RetrieveResult,
    SnapshotBlob,
    SnapshotCreated,
    StepRequest,
    StepResult,
)

REF = "#/components/schemas/{name}"
JSON = "application/json"
MSGPACK = "application/msgpack"
BINARY = "binary"  # an application/octet-stream body (a snapshot blob)
TEXT = "text"  # Prometheus text exposition
HTML = "html"  # the server's own page (`env_server.ui`)

STRUCTS: tuple[type, ...] = (
    CreateEpisode,
    StepRequest,
    ForkRequest,
    BatchRequest,
    RetrieveRequest,
    EpisodeCreated,
    StepResult,
    ForkResult,
    SnapshotCreated,
    Deleted,
    BatchResult,
    RetrieveResult,
    Info,
    SnapshotBlob,
    ErrorBody,
)
"""Wire structs whose schemas become components (with everything they reference)."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


HAND_WRITTEN: dict[str, dict[str, Any]] = {
    "Health": {
        "title": "Health",
        "description": "Liveness and load. 200 `ok`; 503 `starting` (resources still loading: only status and "
        "version) or `shutting_down` (draining: send new work elsewhere).",
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "starting", "shutting_down"]},
            "version": {"type": "string"},
            "api_version": {"type": "integer"},
            "episodes": {"type": "integer", "description": "live episodes"},
            "snapshots": {"type": "integer", "description": "live snapshots"},
            "uptime_s": {"type": "number"},
            "corpus_id": {"type": "string"},
            "num_docs": {"type": "integer"},
        },
        "required": ["status", "version"],
    },
    "RetrieveAnswer": {
        "title": "RetrieveAnswer",
        "description": "Search-R1's retriever answer: per query, hits with scores (`return_scores: true`, the "
        "default) or bare documents (`return_scores: false`).",
        "anyOf": [
            _ref("RetrieveResult"),
            {
                "type": "object",
                "properties": {"result": {"type": "array", "items": {"type": "array", "items": _ref("RetrievedDoc")}}},
                "required": ["result"],
            },
        ],
    },
    "EmptyBody": {
        "title": "EmptyBody",
        "description": "No fields: send no body or `{}`.",
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    },
    "BatchOpResult": {
        "title": "BatchOpResult",
        "description": "One op's outcome, in the order of `ops`: `ok: true` plus the fields of that call's answer, "
        "or `ok: false` plus `error` (the error that call alone would have answered).",
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "if": {"properties": {"ok": {"const": False}}},
        "then": {"properties": {"error": _ref("ErrorDetail")}, "required": ["error"]},
        "else": {
            "anyOf": [_ref(n) for n in ("EpisodeCreated", "StepResult", "ForkResult", "SnapshotCreated", "Deleted")]
        },
    },
}
"""Shapes built by handlers rather than wire structs (see the module docstring)."""

ERROR_MEANING: dict[int, str] = {
    400: "malformed request: a body not JSON/MessagePack or with a field of the wrong type or unknown, or a bad query "
    "parameter (the message names it)",
    401: "missing or wrong bearer token (only when the server runs with --auth-token)",
    408: "the request body did not arrive within the server's body_timeout_s; the connection is closed",
    404: "unknown (deleted, expired) episode or snapshot",
    409: "the episode is done; fork one of its snapshots to continue from an earlier turn",
    413: "body over the server's limit (`limits.max_body_bytes`)",
    415: "unsupported Content-Type: send application/json or application/msgpack",
    422: "well-formed but invalid value (out of range, inconsistent, unknown dataset or split, foreign blob)",
    429: "capacity: live episodes/snapshots or ops per call over the limits in `/v1/info`",
    500: "a server bug (logged with its traceback); never caused by what a client sent",
    502: "the external search backend failed; nothing was applied, retry",
    503: "the server is shutting down; send new work to another replica",
}

_BODY_ERRORS = (400, 408, 413, 415)
_ALWAYS = (401, 500, 503)


@dataclass(frozen=True)
class Operation:
    """One route of the contract."""

    method: str
    path: str  # aiohttp's canonical path = OpenAPI path template
    op_id: str
    summary: str
    request: type | str | None  # a wire struct, a HAND_WRITTEN name, BINARY, or None (no body)
    response: type | str  # a wire struct, a HAND_WRITTEN name, BINARY or TEXT
    errors: tuple[int, ...] = ()  # besides 401/500/503 (and 400/413/415 with a decoded body)
    body_required: bool = True
    open: bool = False  # no token needed, and never 503 for shutting down
    tag: str = "episodes"


OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/health", "health", "Liveness, version and load", None, "Health", open=True, tag="server"),
    Operation("GET", "/openapi.json", "openapi", "This document", None, "OpenAPI", open=True, tag="server"),
    Operation(
        "GET",
        "/v1/info",
        "info",
        "Tools (OpenAI function schemas), datasets, action format, limits",
        None,
        Info,
        tag="server",
    ),
    Operation(
        "POST",
        "/v1/episodes",
        "create_episode",
        "Create an episode from {dataset, split, index} or {question, answers}",
        CreateEpisode,
        EpisodeCreated,
        (404, 422, 429),
    ),
    Operation(
        "POST",
        "/v1/episodes/{episode_id}/step",
        "step_episode",
        "Take one turn: a text `action` (Search-R1 tags) or an OpenAI-style `tool_call`",
        StepRequest,
        StepResult,
        (404, 409, 422, 429, 502),
    ),
    Operation(
        "POST",
        "/v1/episodes/{episode_id}/fork",
        "fork_episode",
        "n new episodes continuing from this episode's exact state (O(1))",
        ForkRequest,
        ForkResult,
        (404, 422, 429),
        body_required=False,
    ),
    Operation(
        "POST",
        "/v1/episodes/{episode_id}/snapshot",
        "snapshot_episode",
        "Name the episode's current state (immutable)",
        "EmptyBody",
        SnapshotCreated,
        (404, 429),
        body_required=False,
    ),
    Operation("DELETE", "/v1/episodes/{episode_id}", "delete_episode", "Release an episode", None, Deleted, (404,)),
    Operation(
        "GET",
        "/v1/snapshots/{snapshot_id}",
        "export_snapshot",
        "Export a snapshot as a self-contained MessagePack blob (`SnapshotBlob`), or as JSON with `?view=json`",
        None,
        BINARY,
        (400, 404, 422),
        tag="snapshots",
    ),
    Operation(
        "POST",
        "/v1/snapshots",
        "import_snapshot",
        "Import a blob from GET /v1/snapshots/{snapshot_id} (any server with the same corpus)",
        BINARY,
        SnapshotCreated,
        (400, 408, 413, 415, 422, 429),
        tag="snapshots",
    ),
    Operation(
        "POST",
        "/v1/snapshots/{snapshot_id}/episodes",
        "episodes_from_snapshot",
        "n new episodes starting at a snapshot",
        ForkRequest,
        ForkResult,
        (404, 422, 429),
        body_required=False,
        tag="snapshots",
    ),
    Operation(
        "DELETE",
        "/v1/snapshots/{snapshot_id}",
        "delete_snapshot",
        "Release a snapshot",
        None,
        Deleted,
        (404,),
        tag="snapshots",
    ),
    Operation(
        "POST",
        "/v1/batch",
        "batch",
        "Several create/step/fork/snapshot/delete/spawn/delete_snapshot ops in one call, answered in order",
        BatchRequest,
        BatchResult,
        (429,),
    ),
    Operation(
        "POST",
        "/retrieve",
        "retrieve",
        "Search-R1-compatible retrieval",
        RetrieveRequest,
        "RetrieveAnswer",
        (422, 429, 502),
        tag="search",
    ),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics", None, TEXT, tag="server"),
    Operation(
        "GET",
        "/",
        "ui",
        "The server's own page: datasets and tools, play an episode by hand, fork it, export a snapshot "
        "(absent with --no-ui)",
        None,
        HTML,
        open=True,
        tag="server",
    ),
)


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again (429: capacity; 503: until the drain ends at the latest)",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
"""The header every 429 and 503 answer carries."""

_EPISODE_OPS = ("step_episode", "fork_episode", "snapshot_episode", "delete_episode")
_SNAPSHOT_OPS = ("export_snapshot", "episodes_from_snapshot", "delete_snapshot")
LINKS: dict[str, dict[str, str]] = {
    # operationId whose 200 answer carries ids -> {id parameter: runtime expression}
    "create_episode": {"episode_id": "$response.body#/episode_id", "snapshot_id": "$response.body#/snapshot_id"},
    "step_episode": {"episode_id": "$response.body#/episode_id", "snapshot_id": "$response.body#/snapshot_id"},
    "fork_episode": {"episode_id": "$response.body#/episode_ids/0"},
    "episodes_from_snapshot": {"episode_id": "$response.body#/episode_ids/0"},
    "snapshot_episode": {"snapshot_id": "$response.body#/snapshot_id"},
    "import_snapshot": {"snapshot_id": "$response.body#/snapshot_id"},
}
"""OpenAPI links: which answers name an episode or snapshot that later operations take."""


def _links(op_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for param, expr in LINKS.get(op_id, {}).items():
        for target in _EPISODE_OPS if param == "episode_id" else _SNAPSHOT_OPS:
            out[target] = {"operationId": target, "parameters": {param: expr}}
    return out


def _name(t: type | str) -> str:
    return t if isinstance(t, str) else t.__name__


def _media(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}, MSGPACK: {"schema": schema}}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.op_id, "summary": op.summary, "tags": [op.tag]}
    params = [seg[1:-1] for seg in op.path.split("/") if seg.startswith("{")]
    if params:
        out["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    if op.request == BINARY:
        out["requestBody"] = {
            "required": True,
            "description": "The blob exactly as exported: MessagePack bytes of `SnapshotBlob`, sent as "
            "application/octet-stream or as application/msgpack (whose schema says what the server checks); or its "
            "JSON view (`GET /v1/snapshots/{snapshot_id}?view=json`, edited or not) as application/json.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "contentMediaType": MSGPACK}},
                MSGPACK: {"schema": _ref("SnapshotBlob")},
                JSON: {"schema": _ref("SnapshotBlob")},
            },
        }
    elif op.request is not None:
        out["requestBody"] = {"required": op.body_required, "content": _media(_ref(_name(op.request)))}
    responses: dict[str, Any] = {}
    if op.response == BINARY:
        out.setdefault("parameters", []).append(
            {
                "name": "view",
                "in": "query",
                "required": False,
                "description": "msgpack (default): the blob's bytes, whatever `Accept` says; json: the same "
                "`SnapshotBlob` as JSON, which POST /v1/snapshots imports too",
                "schema": {"type": "string", "enum": list(SNAPSHOT_VIEWS), "default": SNAPSHOT_VIEWS[0]},
            }
        )
        out["parameters"].append(
            {
                "name": "turns",
                "in": "query",
                "required": False,
                "description": "the state after the snapshot's first `turns` turns instead (an earlier state of its "
                "episode; 422 past the snapshot's own turn)",
                "schema": {"type": "integer", "minimum": 0, "maximum": 999_999},
            }
        )
        responses["200"] = {
            "description": "MessagePack encoding of `SnapshotBlob` (components), sent as application/octet-stream; "
            "with `view=json`, the same struct as application/json",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "contentMediaType": MSGPACK}},
                JSON: {"schema": _ref("SnapshotBlob")},
            },
        }
    elif op.response == TEXT:
        responses["200"] = {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    elif op.response == HTML:
        responses["200"] = {
            "description": "An HTML page with its script and style inline; it calls the routes above",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    elif op.response == "OpenAPI":
        responses["200"] = {"description": "OpenAPI 3.1 document", "content": {JSON: {"schema": {"type": "object"}}}}
    else:
        responses["200"] = {"description": _name(op.response), "content": _media(_ref(_name(op.response)))}
    if links := _links(op.op_id):
        responses["200"]["links"] = links
    if op.op_id == "health":
        responses["503"] = {
            "description": "starting or shutting down",
            "headers": RETRY_AFTER,
            "content": _media(_ref("Health")),
        }
    errors: set[int] = set(op.errors)
    if not op.open:
        errors |= set(_ALWAYS)
        if op.request is not None and op.request != BINARY:
            errors |= set(_BODY_ERRORS)
    for status in sorted(errors):
        responses[str(status)] = {"description": ERROR_MEANING[status], "content": _media(_ref("ErrorBody"))}
        if status in (429, 503):
            responses[str(status)]["headers"] = RETRY_AFTER
    out["responses"] = responses
    if op.open:
        out["security"] = []
    return out


def _constrain(components: dict[str, Any], cfg: ServerConfig, corpus_id: str | None) -> None:
    """Write the server's checks into the request schemas (module docstring), with `cfg`'s limits; `corpus_id` (when
    known) is the one an imported blob must carry."""

    def nullable(schema: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [schema, {"type": "null"}], "default": None}

    non_blank = {"type": "string", "minLength": 1, "pattern": NON_BLANK}
    null = {"type": "null"}  # in a oneOf branch: this field absent or null

    fork = components["ForkRequest"]["properties"]
    fork["n"] = {"type": "integer", "minimum": 1, "maximum": cfg.max_fork_n, "default": 1}
    retrieve = components["RetrieveRequest"]["properties"]
    retrieve["topk"] = nullable({"type": "integer", "minimum": 1, "maximum": cfg.max_topk})
    retrieve["topk"]["description"] = f"Passages per query; null or absent: the server's --topk ({cfg.topk})."
    retrieve["queries"]["description"] = "More than `limits.max_batch_ops` queries answer 429."
    components["BatchRequest"]["properties"]["ops"]["description"] = (
        "More than `limits.max_batch_ops` ops answer 429. Each op is checked as its call is: a bad op gets its own "
        "`ok: false` result, so ops are not constrained here."
    )

    create = components["CreateEpisode"]
    props = create["properties"]
    props["index"] = nullable({"type": "integer", "minimum": 0})
    props["max_turns"] = nullable({"type": "integer", "minimum": 1, "maximum": cfg.max_turns})
    props["max_turns"]["description"] = "Default and cap: the server's max_turns (`limits.max_turns`)."
    props["seed"] = nullable({"type": "integer", "minimum": INT64[0], "maximum": INT64[1]})
    create["oneOf"] = [
        {
            "title": "by dataset",
            "required": ["dataset", "split", "index"],
            "properties": {
                "dataset": {"type": "string"},
                "split": {"type": "string"},
                "index": {"type": "integer"},
                "question": null,
                "answers": null,
            },
        },
        {
            "title": "by question",
            "required": ["question", "answers"],
            "properties": {
                "question": non_blank,
                "answers": {"type": "array", "minItems": 1, "items": non_blank},
                "dataset": null,
                "split": null,
                "index": null,
            },
        },
    ]

    # An imported blob (POST /v1/snapshots as application/msgpack): what `import_blob` checks, where a schema can.
    blob = components["SnapshotBlob"]["properties"]
    blob["version"] = {"const": SNAPSHOT_FORMAT_VERSION}
    blob["reward_metric"] = {"const": cfg.reward_metric}
    if corpus_id is not None:
        blob["corpus_id"] = {"const": corpus_id}
    blob["turns"]["maxItems"] = cfg.max_turns
    blob["turns"]["description"] = (
        "At most `task.max_turns`; only the last may be done, a turn at max_turns must be, truncated implies done."
    )
    task = components["TaskRecord"]["properties"]
    task["question"] = non_blank
    task["golden_answers"] = {"type": "array", "minItems": 1, "items": non_blank}
    task["max_turns"] = {"type": "integer", "minimum": 1, "maximum": cfg.max_turns}
    task["seed"] = nullable({"type": "integer", "minimum": INT64[0], "maximum": INT64[1]})
    task["metadata"]["description"] = (
        f"JSON data (string keys, finite numbers, integers within [-2**63, 2**64 - 1]) nested at most {MAX_BLOB_DEPTH} "
        "levels, as each turn's `info` is."
    )
    components["TurnRecord"]["maxItems"] = 6

    step = components["StepRequest"]
    step["properties"]["action"] = nullable({"type": "string", "maxLength": cfg.max_action_chars})
    step["oneOf"] = [
        {
            "title": "model text",
            "required": ["action"],
            "properties": {"action": {"type": "string"}, "tool_call": null},
        },
        {
            "title": "tool call",
            "required": ["tool_call"],
            "properties": {"tool_call": _ref("ToolCall"), "action": null},
        },
    ]


@dataclass(frozen=True)
class _Served:
    """What the served document depends on: the token requirement, the limits and the corpus."""

    auth_required: bool
    max_fork_n: int
    max_topk: int
    topk: int
    max_turns: int
    max_action_chars: int
    reward_metric: str
    corpus_id: str | None
    ui: bool = True


@functools.lru_cache(maxsize=8)
def _document_bytes(served: _Served) -> bytes:
    cfg = ServerConfig(
        max_fork_n=served.max_fork_n,
        max_topk=served.max_topk,
        topk=served.topk,
        max_turns=served.max_turns,
        max_action_chars=served.max_action_chars,
        reward_metric=served.reward_metric,
        ui=served.ui,
    )
    return json.dumps(build_openapi(auth_required=served.auth_required, cfg=cfg, corpus_id=served.corpus_id)).encode()


def build_openapi(
    *, auth_required: bool = False, cfg: ServerConfig | None = None, corpus_id: str | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `auth_required` = the server runs with a bearer token; `cfg` gives the limits the
    request schemas state and whether `GET /` (the page, `cfg.ui`) is served (default: the default config's); `corpus_id`
    = the corpus an imported blob must name."""
    _, components = msgspec.json.schema_components(STRUCTS, ref_template=REF)
    clash = sorted(set(components) & set(HAND_WRITTEN))
    assert not clash, f"hand-written schema names clash with wire structs: {clash}"
    components.update(HAND_WRITTEN)
    components["BatchResult"]["properties"]["results"]["items"] = _ref("BatchOpResult")
    _constrain(components, cfg or ServerConfig(), corpus_id)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if op.response == HTML and not (cfg or ServerConfig()).ui:
            continue  # --no-ui: no page, so no route to document
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "TRACE env server",
            "version": __version__,
            "summary": "Forkable ReAct search/answer episodes for agentic RL and agent evaluation",
            "description": (
                f"HTTP contract version {API_VERSION}. Bodies are JSON (application/json) or MessagePack "
                "(application/msgpack), same schemas; the answer uses the request's format unless `Accept` says "
                "otherwise. Every error is `ErrorBody` with the status listed on its operation; 404 (no such "
                "route) and 405 (wrong method, with `Allow`) come in the same shape. Episode state is immutable: "
                "a step makes a new state, create/step answers carry its `snapshot_id`, fork is O(1)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}] if auth_required else [{}],
    }
    return doc


async def openapi_json(request: web.Request) -> web.Response:
    """`GET /openapi.json` handler."""
    c = request.app[CONFIG]
    svc = request.app.get(SERVICE)
    served = _Served(
        bool(c.auth_token),
        c.max_fork_n,
        c.max_topk,
        c.topk,
        c.max_turns,
        c.max_action_chars,
        c.reward_metric,
        svc.corpus_id if svc is not None else None,
        c.ui,
    )
    return web.Response(body=_document_bytes(served), content_type=JSON)
