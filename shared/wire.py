"""Wire structs of the env server's HTTP contract, version 1 (DESIGN §2).

Every request body is decoded into one of these structs by `shared.codec.decode`, which validates
types and rejects unknown fields with a message naming the field; every answer is one of these
structs, encoded as JSON or MessagePack. Clients (ours: `shared.client`; anyone's: plain HTTP)
and the server agree through this module alone.

Shapes, in brief:
- an episode is a mutable handle on an immutable state node; `snapshot_id` names a state node;
- `create`/`step` answers carry the `snapshot_id` of the state they produced, so a trainer
  records every turn's branch point without an extra call;
- errors are `{"error": {"code": "<snake_case>", "message": "<what and how to fix>"}}`.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec


class ErrorCode(enum.StrEnum):
    """Error codes and the HTTP status each answers with."""

    MALFORMED = "malformed_request"  # 400: body is not valid JSON/MessagePack or has the wrong shape
    UNSUPPORTED_MEDIA = "unsupported_media_type"  # 415
    UNAUTHORIZED = "unauthorized"  # 401
    NOT_FOUND = "not_found"  # 404: unknown episode, snapshot or route
    EPISODE_DONE = "episode_done"  # 409: step on a finished episode
    TOO_LARGE = "request_too_large"  # 413
    INVALID_VALUE = "invalid_value"  # 422: well-formed but out of range / inconsistent / unknown dataset / bad blob
    CAPACITY = "capacity_exceeded"  # 429: live episodes or batch size over the limit
    SHUTTING_DOWN = "shutting_down"  # 503
    UPSTREAM = "upstream_error"  # 502: the external retriever failed
    INTERNAL = "internal_error"  # 500: a bug; never for anything a client sent


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.EPISODE_DONE: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA: 415,
    ErrorCode.INVALID_VALUE: 422,
    ErrorCode.CAPACITY: 429,
    ErrorCode.UPSTREAM: 502,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
}


class EnvError(Exception):
    """An error with a wire code. Raised by the server's handlers; raised by the client on an error answer."""

    def __init__(self, code: ErrorCode | str, message: str, status: int | None = None) -> None:
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.status = status if status is not None else HTTP_STATUS.get(self.code, 500)  # type: ignore[arg-type]
        self.message = message
        super().__init__(f"{self.status} {getattr(self.code, 'value', self.code)}: {message}")

    def to_body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(code=getattr(self.code, "value", str(self.code)), message=self.message))


class _Req(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base for request bodies: unknown fields are an error (a typo should not be silently ignored)."""


class _Ans(msgspec.Struct, omit_defaults=False):
    """Base for answers: clients must ignore fields they do not know (forward compatibility)."""


# ---------------------------------------------------------------------------------------------- errors
class ErrorDetail(_Ans):
    code: str
    message: str


class ErrorBody(_Ans):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------- requests
class CreateEpisode(_Req):
    """`POST /v1/episodes`: either (dataset, split, index) or (question, answers)."""

    dataset: str | None = None
    split: str | None = None
    index: int | None = None
    question: str | None = None
    answers: list[str] | None = None
    max_turns: int | None = None  # default: the server's --max-turns; above it: 422
    seed: int | None = None  # recorded in the episode; the built-in tools are deterministic without it
    include_oracle: bool = False  # ask for the dataset's oracle trajectory in `metadata` (synthetic data only)


class ToolCall(_Req):
    """An OpenAI-style tool call. `arguments` is an object or a JSON string of one (as chat APIs return it); any other
    JSON value (null, an array, a number, a boolean) is the agent's mistake, not the request's: the step spends the
    turn and its observation says what the arguments should be, as it does for a JSON string that holds no object.
    From MessagePack, arguments with non-string keys, bytes or an extension type in their place, and an extension
    type JSON cannot carry anywhere inside them, are a 400; values nested inside that JSON can carry otherwise
    (bytes as base64 text, a timestamp as a date) reach the tool, whose own checks make them an invalid turn."""

    name: str
    arguments: dict[str, Any] | str | list[Any] | int | float | bool | None = msgspec.field(default_factory=dict)


class StepRequest(_Req):
    """`POST /v1/episodes/{id}/step`: exactly one of `action` (model text) or `tool_call`."""

    action: str | None = None
    tool_call: ToolCall | None = None


class ForkRequest(_Req):
    """`POST /v1/episodes/{id}/fork` and `POST /v1/snapshots/{sid}/episodes`."""

    n: int = 1


class RetrieveRequest(_Req):
    """`POST /retrieve`, Search-R1 compatible (`search_r1/search/retrieval_server.py`, the same defaults): topk
    None = the server's --topk; without return_scores each hit is the bare document."""

    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


# Batch ops: a tagged union on "op"; each carries the fields of its call.
class CreateOp(CreateEpisode, tag_field="op", tag="create"):
    pass


class StepOp(StepRequest, tag_field="op", tag="step"):
    episode_id: str = ""


class ForkOp(ForkRequest, tag_field="op", tag="fork"):
    episode_id: str = ""


class SnapshotOp(_Req, tag_field="op", tag="snapshot"):
    episode_id: str = ""


class DeleteOp(_Req, tag_field="op", tag="delete"):
    episode_id: str = ""


class SpawnOp(ForkRequest, tag_field="op", tag="spawn"):
    """`POST /v1/snapshots/{snapshot_id}/episodes` as a batch op: n new episodes starting at a snapshot."""

    snapshot_id: str = ""


class DeleteSnapshotOp(_Req, tag_field="op", tag="delete_snapshot"):
    """`DELETE /v1/snapshots/{snapshot_id}` as a batch op."""

    snapshot_id: str = ""


BatchOp = CreateOp | StepOp | ForkOp | SnapshotOp | DeleteOp | SpawnOp | DeleteSnapshotOp


class BatchRequest(_Req):
    """`POST /v1/batch`: ops run concurrently where independent, answered in order."""

    ops: list[BatchOp]


# ---------------------------------------------------------------------------------------------- answers
class Message(_Ans):
    role: str
    content: str


class EpisodeCreated(_Ans):
    episode_id: str
    snapshot_id: str  # the initial state: fork it to start several rollouts of one prompt
    prompt: str  # the user message: instructions + question
    messages: list[Message]  # chat form of the prompt (one user message holding it); apply your chat template
    turn: int
    done: bool
    max_turns: int
    question_id: str | None = None
    dataset: str | None = None
    split: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)  # hops, kind; oracle when asked


class StepResult(_Ans):
    episode_id: str
    snapshot_id: str  # the state this step produced (the branch point after this turn)
    observation: str  # text to append after the action, exactly as the model should see it
    reward: float
    done: bool
    truncated: bool
    turn: int
    info: dict[str, Any] = msgspec.field(default_factory=dict)  # tool, valid, em, f1, cover_em, prediction ...


class ForkResult(_Ans):
    episode_ids: list[str]


class SnapshotCreated(_Ans):
    snapshot_id: str


class Deleted(_Ans):
    deleted: str


class BatchResult(_Ans):
    results: list[dict[str, Any]]  # each {"ok": true, ...answer} or {"ok": false, "error": {code, message}}


class RetrievedDoc(_Ans):
    id: str
    contents: str


class RetrievedHit(_Ans):
    document: RetrievedDoc
    score: float


class RetrieveResult(_Ans):
    result: list[list[RetrievedHit]]


# ---------------------------------------------------------------------------------------------- snapshots
class TurnRecord(msgspec.Struct, array_like=True, frozen=True):
    """One finished turn as stored in a snapshot blob (array-like: compact)."""

    action: str
    observation: str
    reward: float
    done: bool
    truncated: bool
    info: dict[str, Any]


class TaskRecord(msgspec.Struct, frozen=True):
    """What an episode is about; everything the judge needs to score it."""

    question: str
    golden_answers: list[str]
    max_turns: int
    question_id: str | None = None
    dataset: str | None = None
    split: str | None = None
    seed: int | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class SnapshotBlob(msgspec.Struct, frozen=True):
    """`GET /v1/snapshots/{sid}`: a self-contained, portable episode state (MessagePack; `?view=json` the same as JSON,
    which `POST /v1/snapshots` imports too: a turn is an array, [action, observation, reward, done, truncated, info];
    `?turns=k`: the state after its first k turns).

    Another server imports it and continues with the same observations and rewards, provided it
    serves the same corpus (`corpus_id` is checked) and judge (`reward_metric`)."""

    format: Literal["trace-snapshot"]
    version: int
    task: TaskRecord
    turns: list[TurnRecord]
    corpus_id: str
    reward_metric: str
    server_version: str


# ---------------------------------------------------------------------------------------------- info
class DatasetInfo(_Ans):
    name: str
    splits: dict[str, int]


class Limits(_Ans):
    max_episodes: int
    max_snapshots: int
    max_action_chars: int
    max_batch_ops: int
    max_body_bytes: int
    max_turns: int
    max_topk: int
    max_fork_n: int
    episode_ttl_s: float


class Info(_Ans):
    version: str
    api_version: int
    tools: list[dict[str, Any]]  # OpenAI function-calling schemas
    datasets: list[DatasetInfo]
    action_format: dict[str, Any]
    limits: Limits
    corpus_id: str
    reward_metric: str
