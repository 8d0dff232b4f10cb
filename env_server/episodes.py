"""Episode state: immutable nodes with parent pointers, and the store of live handles on them.

What always holds:
- A `StateNode` never changes once made. A step makes a new node whose parent is the old one; the
  task (question, gold answers) is shared by reference from the root. So fork = new handles on the
  same node and snapshot = a name for a node: both O(1) in history length, and no branch can see
  or disturb another.
- An episode (`Handle` in `episodes`) is the only mutable thing: it points at its current node.
  Steps on one episode are serialised by its lock, so concurrent calls apply in arrival order.
- Every node made by create/step is registered as a snapshot (its id goes back in the answer), so
  a client can branch at any turn later without an extra call. Episodes and snapshots unused for
  `ttl_s` are reaped; both are capped. At the snapshot cap the least recently used automatic
  snapshots give way (they are a cache of branch points: `POST .../snapshot` pins one); past the
  episode cap, or when explicit snapshots alone fill theirs, 429 before anything changes.
- Export walks the parent chain once (O(turns)) into a self-contained `SnapshotBlob`; import
  rebuilds the chain, so another server continues with the same observations and rewards.
- An imported blob is untrusted input: its size is the request body cap (`max_body_bytes`, 413 past it), its
  free-form values (`task.metadata`, each turn's `info`) nest at most `MAX_BLOB_DEPTH` levels, and its task
  passes `check_task`, the same checks `create` applies; anything else is 422 before the store changes.
- Ids are `ep_`/`snp_` + 12 hex digits drawn at random per store + a per-store counter (8 hex digits, more past 2**32):
  unique within a store, and across restarts and stores (tests run several in one process) by the random part. Ids
  name state; they are not secrets (the bearer token is the access control), so a counter is enough, and it costs
  half of `secrets.token_hex` (os.urandom, a system call), of which a step makes one and a create two.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from env_server.judge import judge
from shared.codec import JSON, MSGPACK, sniff_format
from shared.version import SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSION, __version__
from shared.wire import EnvError, ErrorCode, SnapshotBlob, TaskRecord, TurnRecord


@dataclass(frozen=True, slots=True)
class StateNode:
    """One state of an episode: the root (turn 0) or the state after a turn."""

    parent: StateNode | None
    task: TaskRecord
    turn: int  # turns taken so far
    record: TurnRecord | None  # the turn that produced this node; None at the root

    @property
    def done(self) -> bool:
        return self.record is not None and self.record.done


@dataclass(slots=True)
class Pin:
    """A snapshot: a name for a node (immutable, so nothing to lock)."""

    node: StateNode
    last_used: float  # time.monotonic() of the last look-up


@dataclass(slots=True)
class Handle:
    """An episode: the one mutable pointer at a node; steps on it hold `lock`."""

    node: StateNode
    last_used: float  # time.monotonic() of the last look-up or step
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EpisodeStore:
    """Live episodes and snapshots, with caps and idle expiry. All methods run on the event loop."""

    def __init__(self, *, max_episodes: int, max_snapshots: int, ttl_s: float) -> None:
        self.max_episodes = max_episodes
        self.max_snapshots = max_snapshots
        self.ttl_s = ttl_s
        self.episodes: dict[str, Handle] = {}
        self.snapshots: dict[str, Pin] = {}
        # Automatic snapshots (one per create/step), least recently used first: a cache of branch points that
        # gives way, oldest first, when the snapshot cap is reached. Explicit ones are never evicted.
        self.auto: OrderedDict[str, None] = OrderedDict()
        self.evicted = 0
        self._id_base = secrets.token_hex(6)  # module docstring: ids
        self._id_count = itertools.count()

    def _new_id(self, kind: str) -> str:
        return f"{kind}_{self._id_base}{next(self._id_count):08x}"

    # ------------------------------------------------------------------ lookup
    def episode(self, episode_id: str) -> Handle:
        h = self.episodes.get(episode_id)
        if h is None:
            raise EnvError(ErrorCode.NOT_FOUND, f"no episode {episode_id!r}: it never existed, was deleted or expired")
        h.last_used = time.monotonic()
        return h

    def snapshot(self, snapshot_id: str) -> Pin:
        h = self.snapshots.get(snapshot_id)
        if h is None:
            raise EnvError(
                ErrorCode.NOT_FOUND, f"no snapshot {snapshot_id!r}: it never existed, was deleted or expired"
            )
        h.last_used = time.monotonic()
        if snapshot_id in self.auto:
            self.auto.move_to_end(snapshot_id)
        return h

    # ------------------------------------------------------------------ capacity
    def check_capacity(self, new_episodes: int, new_snapshots: int) -> None:
        if len(self.episodes) + new_episodes > self.max_episodes:
            raise EnvError(
                ErrorCode.CAPACITY,
                f"live episodes would exceed the cap ({len(self.episodes)} live + {new_episodes} new > "
                f"{self.max_episodes}); delete finished episodes or wait for idle ones to expire "
                f"({self.ttl_s:.0f}s TTL)",
            )
        over = len(self.snapshots) + new_snapshots - self.max_snapshots
        if over > 0 and over > len(self.auto):
            raise EnvError(
                ErrorCode.CAPACITY,
                f"live snapshots would exceed the cap ({len(self.snapshots)} live + {new_snapshots} new > "
                f"{self.max_snapshots}, of which {len(self.snapshots) - len(self.auto)} explicit); delete snapshots "
                "you no longer need",
            )
        for _ in range(max(over, 0)):
            sid, _ = self.auto.popitem(last=False)
            del self.snapshots[sid]
            self.evicted += 1

    # ------------------------------------------------------------------ mutations
    def add_snapshot(self, node: StateNode, *, auto: bool = False, now: float | None = None) -> str:
        """Name `node`; `auto` marks the automatic snapshot of a create/step (evictable, see `auto`). `now`: the
        caller's time.monotonic(), when it has one."""
        sid = self._new_id("snp")
        self.snapshots[sid] = Pin(node, time.monotonic() if now is None else now)
        if auto:
            self.auto[sid] = None
        return sid

    def create(self, task: TaskRecord) -> tuple[str, str, StateNode]:
        """A new episode at turn 0; returns (episode_id, snapshot_id, root)."""
        self.check_capacity(1, 1)
        root = StateNode(parent=None, task=task, turn=0, record=None)
        eid = self._new_id("ep")
        now = time.monotonic()
        self.episodes[eid] = Handle(root, now)
        return eid, self.add_snapshot(root, auto=True, now=now), root

    def spawn(self, node: StateNode, n: int) -> list[str]:
        """n new episodes on `node` (fork, or start from a snapshot)."""
        self.check_capacity(n, 0)
        now = time.monotonic()
        ids = [self._new_id("ep") for _ in range(n)]
        for eid in ids:
            self.episodes[eid] = Handle(node, now)
        return ids

    def advance(self, handle: Handle, record: TurnRecord) -> tuple[StateNode, str]:
        """Move an episode to the child of its node made by `record`; returns (node, snapshot_id)."""
        self.check_capacity(0, 1)
        node = StateNode(parent=handle.node, task=handle.node.task, turn=handle.node.turn + 1, record=record)
        handle.node = node
        handle.last_used = now = time.monotonic()
        return node, self.add_snapshot(node, auto=True, now=now)

    def delete_episode(self, episode_id: str) -> None:
        if self.episodes.pop(episode_id, None) is None:
            raise EnvError(ErrorCode.NOT_FOUND, f"no episode {episode_id!r}")

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.auto.pop(snapshot_id, None)
        if self.snapshots.pop(snapshot_id, None) is None:
            raise EnvError(ErrorCode.NOT_FOUND, f"no snapshot {snapshot_id!r}")

    def reap(self, now: float | None = None) -> tuple[int, int]:
        """Drop episodes and snapshots idle longer than the TTL; returns how many of each. Busy ones stay."""
        now = time.monotonic() if now is None else now
        cutoff = now - self.ttl_s
        dead_e = [k for k, h in self.episodes.items() if h.last_used < cutoff and not h.lock.locked()]
        dead_s = [k for k, h in self.snapshots.items() if h.last_used < cutoff]
        for k in dead_e:
            del self.episodes[k]
        for k in dead_s:
            del self.snapshots[k]
            self.auto.pop(k, None)
        return len(dead_e), len(dead_s)


# ---------------------------------------------------------------------------------------------- export/import
_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(SnapshotBlob)
_blob_json_encoder = msgspec.json.Encoder()
_blob_json_decoder = msgspec.json.Decoder(SnapshotBlob)


def export_blob(node: StateNode, *, corpus_id: str, reward_metric: str, as_json: bool = False) -> bytes:
    """A self-contained MessagePack blob of the state at `node` (walks its parent chain once); with `as_json`, the
    same `SnapshotBlob` as JSON (readable; `import_blob` takes either)."""
    turns: list[TurnRecord] = []
    cur: StateNode | None = node
    while cur is not None and cur.record is not None:
        turns.append(cur.record)
        cur = cur.parent
    turns.reverse()
    blob = SnapshotBlob(
        format=SNAPSHOT_FORMAT,
        version=SNAPSHOT_FORMAT_VERSION,
        task=node.task,
        turns=turns,
        corpus_id=corpus_id,
        reward_metric=reward_metric,
        server_version=__version__,
    )
    return (_blob_json_encoder if as_json else _blob_encoder).encode(blob)


def import_blob(data: bytes, *, corpus_id: str, reward_metric: str, max_turns: int, as_json: bool = False) -> StateNode:
    """Rebuild the node chain of a blob from `export_blob` (MessagePack, or JSON with `as_json`); raise EnvError (422)
    on a corrupt, foreign or invalid blob. `max_turns` is this server's cap: the blob's task must pass `check_task`
    with it, as a created task does."""
    try:
        blob = (_blob_json_decoder if as_json else _blob_decoder).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        other = sniff_format(data)  # the other view, sent with this one's type
        hint = ""
        if other == MSGPACK and as_json:
            hint = "; the body looks like a blob (MessagePack): send it with Content-Type: application/octet-stream"
        elif other == JSON and not as_json:
            hint = "; the body looks like the blob's JSON view: send it with Content-Type: application/json"
        raise EnvError(
            ErrorCode.INVALID_VALUE, f"not a TRACE snapshot blob (GET /v1/snapshots/{{id}} makes one): {e}{hint}"
        ) from None
    except RecursionError:  # nesting past the interpreter's limit, which msgspec's decoder shares
        raise EnvError(
            ErrorCode.INVALID_VALUE, f"snapshot blob nests too deeply (the limit is {MAX_BLOB_DEPTH} levels)"
        ) from None
    if blob.version != SNAPSHOT_FORMAT_VERSION:
        raise EnvError(
            ErrorCode.INVALID_VALUE,
            f"snapshot format version {blob.version} is not supported (this server reads {SNAPSHOT_FORMAT_VERSION})",
        )
    if blob.corpus_id != corpus_id:
        raise EnvError(
            ErrorCode.INVALID_VALUE,
            f"snapshot was made against corpus {blob.corpus_id!r} but this server searches {corpus_id!r}; "
            "continuations would not match: import it on a server with the same corpus",
        )
    if blob.reward_metric != reward_metric:
        raise EnvError(
            ErrorCode.INVALID_VALUE,
            f"snapshot was judged with reward_metric={blob.reward_metric!r}, this server uses {reward_metric!r}",
        )
    _check_free_form(blob.task.metadata, "task.metadata")
    check_task(blob.task, max_turns, where="snapshot task: ", answers_field="golden_answers")
    if len(blob.turns) > blob.task.max_turns:
        raise EnvError(
            ErrorCode.INVALID_VALUE, f"snapshot has {len(blob.turns)} turns > max_turns {blob.task.max_turns}"
        )
    for i, t in enumerate(blob.turns, start=1):
        _check_free_form(t.info, f"turns[{i - 1}].info")
        if t.done and i < len(blob.turns):
            raise EnvError(ErrorCode.INVALID_VALUE, "snapshot has a finished turn before its last one")
        if not t.done and i == blob.task.max_turns:
            raise EnvError(
                ErrorCode.INVALID_VALUE, f"snapshot turn {i} reaches max_turns {i} without ending the episode"
            )
        if t.truncated and not t.done:
            raise EnvError(ErrorCode.INVALID_VALUE, f"snapshot turn {i} is truncated but not done")
        if not math.isfinite(t.reward):
            raise EnvError(ErrorCode.INVALID_VALUE, f"snapshot turn {i} has reward {t.reward}; rewards are finite")
        _check_reward(i, t, blob.task.golden_answers, reward_metric)
    node = StateNode(parent=None, task=blob.task, turn=0, record=None)
    for i, rec in enumerate(blob.turns, start=1):
        node = StateNode(parent=node, task=blob.task, turn=i, record=rec)
    return node


def _check_reward(i: int, t: TurnRecord, golden: list[str], reward_metric: str) -> None:
    """A turn's reward is one this server would have given it (`service.step_reward`): 0.0 unless the turn answered
    (done, not cut off at max turns), and then the judge's `reward_metric` score of its prediction against the
    task's golden answers, judged again here, with the judge's scores in its info as the judge gives them."""
    if not t.done or t.truncated:
        if t.reward != 0.0:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                f"snapshot turn {i} has reward {t.reward} but did not answer: only an answer is rewarded (0.0 here)",
            )
        return
    prediction = t.info.get("prediction")
    if not isinstance(prediction, str):
        raise EnvError(
            ErrorCode.INVALID_VALUE, f"snapshot turn {i} ends the episode but its info has no answer (`prediction`)"
        )
    scores = judge(prediction, golden)
    if t.reward != scores[reward_metric] or any(t.info.get(k) != v for k, v in scores.items()):
        raise EnvError(
            ErrorCode.INVALID_VALUE,
            f"snapshot turn {i}'s reward {t.reward} and scores "
            f"{ {k: t.info.get(k) for k in scores} } are not the judge's for its answer {prediction!r}: {scores}",
        )


# ---------------------------------------------------------------------------------------------- task checks
MAX_BLOB_DEPTH = 32
"""How deep an imported blob's free-form values (`task.metadata`, a turn's `info`) may nest (a dict or list is one
level). The server's own nest at most 3 (`metadata.oracle[i]` is a dict in a list in a dict); 32 leaves room for a
dataset's own metadata while staying far below the interpreter's recursion limit (1000 frames), which msgspec's
decoder and encoder share: a blob nested ~1000 levels deep made import answer 500 (RecursionError), and whether one
a little less deep decodes or encodes depends on how deep the stack already is (measured: 900 levels decode and
encode 10 frames down, and fail 120 frames down), so it could import and then fail when exported or answered."""

NON_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
"""A regex matching one character that is not white space, written as an explicit class so that it means the same
in Python, ECMA-262 (JSON Schema's dialect) and Rust regexes: the union of Python's `str.isspace` and ECMA's `\\s`.
A question or gold answer must contain one; `/openapi.json` publishes the same pattern."""
_NON_BLANK = re.compile(NON_BLANK)
INT64 = (-(2**63), 2**63 - 1)
"""A seed must fit in a signed 64-bit integer: JSON integers are unbounded, but snapshot blobs are MessagePack."""


def is_blank(text: str) -> bool:
    """True when `text` has no character matched by `NON_BLANK` (empty, or only white space)."""
    return _NON_BLANK.search(text) is None


def check_max_turns(max_turns: int, cap: int, where: str = "") -> None:
    if not 1 <= max_turns <= cap:
        raise EnvError(ErrorCode.INVALID_VALUE, f"{where}max_turns must be in [1, {cap}], got {max_turns}")


def check_seed(seed: int | None, where: str = "") -> None:
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise EnvError(ErrorCode.INVALID_VALUE, f"{where}seed must fit in a signed 64-bit integer, got {seed}")


def check_question(question: str | None, where: str = "") -> None:
    if not question or is_blank(question):
        raise EnvError(ErrorCode.INVALID_VALUE, f"{where}question must be a non-empty string")


def check_answers(answers: list[str] | None, where: str = "", field_name: str = "answers") -> None:
    if not answers or any(is_blank(a) for a in answers):
        raise EnvError(
            ErrorCode.INVALID_VALUE, f"{where}{field_name} must be a non-empty list of non-blank strings, got {answers}"
        )


def check_task(task: TaskRecord, max_turns_cap: int, *, where: str = "", answers_field: str = "answers") -> None:
    """The checks every task passes before it enters the store, whether `create` built it or a blob carried it:
    max_turns in [1, cap], a 64-bit seed, a non-blank question and a non-empty list of non-blank gold answers (the
    judge cannot score an answer without one). Raises EnvError 422 prefixed with `where`."""
    check_max_turns(task.max_turns, max_turns_cap, where)
    check_seed(task.seed, where)
    check_question(task.question, where)
    check_answers(task.golden_answers, where, answers_field)


def _check_free_form(value: Any, name: str) -> None:
    """Raise EnvError 422 unless `value` (a blob's `task.metadata` or a turn's `info`) is JSON data nested at most
    `MAX_BLOB_DEPTH` levels: objects with string keys, arrays, strings, booleans, null, finite numbers and integers
    that MessagePack carries ([-2**63, 2**64 - 1]). So a state imported in either encoding exports in both, and its
    JSON view is the blob itself (MessagePack could carry bytes, extension types, other keys, NaN; JSON, integers of
    any size). Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_BLOB_DEPTH:
                raise EnvError(
                    ErrorCode.INVALID_VALUE,
                    f"snapshot {name} nests deeper than {MAX_BLOB_DEPTH} levels; this server refuses such blobs",
                )
            if isinstance(v, dict) and not all(isinstance(k, str) for k in v):
                bad = next(k for k in v if not isinstance(k, str))
                raise EnvError(
                    ErrorCode.INVALID_VALUE,
                    f"snapshot {name} has a key of type {type(bad).__name__} ({repr(bad)[:40]}); keys are strings",
                )
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        elif isinstance(v, int):
            if not INT64[0] <= v <= 2**64 - 1:
                raise EnvError(
                    ErrorCode.INVALID_VALUE,
                    f"snapshot {name} holds an integer outside [-2**63, 2**64 - 1], past what MessagePack carries",
                )
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise EnvError(ErrorCode.INVALID_VALUE, f"snapshot {name} holds {v}; numbers are finite")
        else:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                f"snapshot {name} holds a {type(v).__name__}; free-form values are JSON data (objects with string "
                "keys, arrays, strings, numbers, booleans, null)",
            )
