"""The env server's service: every call of the contract (DESIGN §2), implemented once, with no HTTP in it.

Who owns what:
- `build_resources(cfg)` opens the search backend and loads the question sets (blocking: run it in an
  executor); `Resources` owns them and `Resources.aclose` closes them. Whoever built a `Resources` closes it.
- `EnvService` owns the episode store and implements each call as a method taking and returning the wire
  structs of `shared.wire`. The aiohttp handlers (`env_server.app`) and `/v1/batch` (`EnvService.batch`)
  both call these methods, so a batched op answers exactly what the single call would. Failures are
  `EnvError`s; turning them into HTTP answers is the app's job.
- The reward of a step is decided in one place, `step_reward`, which `EnvService.step` calls: the judged
  answer's `cfg.reward_metric` score (`judge.judge` gives em, f1 and cover_em) when the step answered, else
  0.0. Nothing else (tools, trainer, eval) re-derives a reward from `info`; clients read `StepResult.reward`.

What always holds:
- A step's reward is non-zero only on the step that answers (done, not truncated); searches, invalid actions
  and a step that reaches max turns (truncated) get 0.0. All judge metrics still go in `info`.
- A snapshot blob carries the server's `reward_metric` and `corpus_id`; importing one judged otherwise is
  refused, so a continued episode gets the rewards it would have got here.
- `/v1/batch` answers one result per op, in order, whatever happens to the others: an op that hits a bug gets an
  `internal_error` result (logged with its traceback) and the other ops keep theirs, so the ids of episodes the batch
  created always reach the client.
- Search never holds the event loop for long: `EnvService.search` (`env_server.retrieval.scheduler`) answers a
  repeated query of the local index from its cache (`search_cache` entries), searches the others inline while the
  index answers within `search_inline_max_ms`, else in the `search_threads` pool (owned by `Resources`); a remote
  retriever is awaited, never cached. A backend failure is 502 and the step is not applied.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from env_server.config import BUILTIN_WORLD, ServerConfig
from env_server.datasets import DatasetRegistry, read_questions
from env_server.episodes import (
    EpisodeStore,
    check_answers,
    check_max_turns,
    check_question,
    check_seed,
    check_task,
    export_blob,
    import_blob,
)
from env_server.metrics import ServerMetrics
from env_server.retrieval import RemoteRetriever, Retriever, RetrieverError, TantivyRetriever
from env_server.retrieval.scheduler import SearchCounters, SearchScheduler
from env_server.tools import (
    DEFAULT_PROMPT,
    INVALID_ACTION,
    TOOLS,
    ToolContext,
    ToolError,
    ToolResult,
    call_tool,
    coerce_arguments,
    function_schema,
    parse_action,
    wrap_information,
)
from shared.version import API_VERSION, __version__
from shared.wire import (
    BatchRequest,
    BatchResult,
    CreateEpisode,
    CreateOp,
    DatasetInfo,
    Deleted,
    DeleteOp,
    DeleteSnapshotOp,
    EnvError,
    EpisodeCreated,
    ErrorCode,
    ForkOp,
    ForkResult,
    Info,
    Limits,
    Message,
    RetrieveRequest,
    SnapshotCreated,
    SnapshotOp,
    SpawnOp,
    StepOp,
    StepRequest,
    StepResult,
    TaskRecord,
    ToolCall,
    TurnRecord,
)

log = structlog.get_logger("env_server")

_ORACLE_KEYS = ("oracle", "supporting_ids")


# ---------------------------------------------------------------------------------------------- resources
@dataclass
class Resources:
    retriever: Retriever
    datasets: DatasetRegistry
    executor: ThreadPoolExecutor | None = None  # the local index's `search_threads` pool; shut down by aclose()

    async def aclose(self) -> None:
        """Close the retriever, then its thread pool."""
        await self.retriever.aclose()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.shutdown, wait=True)


def build_resources(cfg: ServerConfig) -> Resources:
    """Open (building if needed) the search backend and load the question sets. Blocking: run in an executor."""
    datasets = DatasetRegistry()
    retriever: Retriever
    executor = None if cfg.retriever_url else ThreadPoolExecutor(cfg.search_threads, thread_name_prefix="search")
    if cfg.uses_synthetic:
        for split in ("train", "dev", "test"):
            datasets.add("synthetic", split, read_questions(BUILTIN_WORLD / f"{split}.jsonl"))
        index_dir = cfg.resolved_cache_dir() / "synthetic-builtin.index"  # the package folder may be read-only
        retriever = TantivyRetriever.open_or_build(BUILTIN_WORLD / "corpus.jsonl", index_dir, executor=executor)
    elif cfg.retriever_url:
        retriever = RemoteRetriever(cfg.retriever_url, timeout_s=cfg.retriever_timeout_s, retries=cfg.retriever_retries)
    elif cfg.corpus:
        index_dir = Path(cfg.index_dir) if cfg.index_dir else Path(cfg.corpus + ".index")
        retriever = TantivyRetriever.open_or_build(Path(cfg.corpus), index_dir, executor=executor)
    else:
        assert cfg.index_dir is not None, "validate() guarantees a search backend"
        retriever = TantivyRetriever(Path(cfg.index_dir), executor=executor)
    for key, path in cfg.data.items():
        datasets.add_spec(key, path)
    return Resources(retriever, datasets, executor)


# ---------------------------------------------------------------------------------------------- the reward
def step_reward(result: ToolResult, reward_metric: str) -> float:
    """The reward of one step, decided here and nowhere else: the judged answer's `reward_metric` score when
    the step answered (the only way an episode ends with a reward), else 0.0 (a search, an invalid action, a
    step cut off at max turns). `reward_metric` is `ServerConfig.reward_metric` (em, f1 or cover_em)."""
    assert result.done == (result.judged is not None), (
        f"a tool ended the episode without judging (or judged without ending it): done={result.done}, "
        f"judged={result.judged}"
    )
    if result.judged is None:
        return 0.0
    assert reward_metric in result.judged, f"reward_metric {reward_metric!r} is not a judge score: {result.judged}"
    return float(result.judged[reward_metric])


def _tool_call_text(call: ToolCall | None) -> str:
    """A tool call as the JSON text its turn records; a 400 when a value inside its arguments is one JSON cannot carry
    (a MessagePack extension type other than a timestamp), before the step spends anything."""
    try:
        return msgspec.json.encode(call).decode()
    except TypeError as e:
        raise EnvError(ErrorCode.MALFORMED, f"tool_call.arguments holds a value JSON cannot carry: {e}") from None


# ---------------------------------------------------------------------------------------------- batch results
@functools.cache
def _result_type(answer_type: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """`answer_type` with an `ok` field in front: a `/v1/batch` op's result, `{"ok": ok, **answer}`, as one struct that
    encodes to the bytes `{"ok": ok, **msgspec.to_builtins(answer)}` would (the same keys in the same order, every
    field present as `_Ans` encodes them), without building that dict (to_builtins and the merge cost ~2 us an op, a
    thirtieth of a batched step that hits the search cache). `_batch_result` builds one."""
    cfg = answer_type.__struct_config__
    assert not cfg.array_like and cfg.tag is None and not cfg.omit_defaults, f"{answer_type} must encode as a map"
    fields = msgspec.structs.fields(answer_type)
    assert all(f.name == f.encode_name for f in fields) and "ok" not in {f.name for f in fields}, fields
    return msgspec.defstruct(f"Batch{answer_type.__name__}", [("ok", bool), *((f.name, f.type) for f in fields)])


def _batch_result(ok: bool, answer: msgspec.Struct) -> msgspec.Struct:
    return _result_type(type(answer))(ok, *msgspec.structs.astuple(answer))


# ---------------------------------------------------------------------------------------------- the service
class EnvService:
    """Every call of the contract, implemented once (handlers and /v1/batch share it).

    Methods take and return `shared.wire` structs and raise `EnvError`; `step` is the only method that makes
    a reward (through `step_reward`)."""

    def __init__(self, cfg: ServerConfig, res: Resources, metrics: ServerMetrics) -> None:
        self.cfg = cfg
        self.retriever = res.retriever
        self.datasets = res.datasets
        self.metrics = metrics
        self.store = EpisodeStore(
            max_episodes=cfg.max_episodes, max_snapshots=cfg.max_snapshots, ttl_s=cfg.episode_ttl_s
        )
        self.prompt_template = cfg.prompt_template or DEFAULT_PROMPT
        self.corpus_id = res.retriever.corpus_id
        self.started = time.monotonic()
        # Steps by tool, counted in plain ints and copied into `metrics.steps` by refresh_gauges (when /metrics is
        # scraped), as the search counters are: a Prometheus inc takes a lock, ~1.5 us on every step.
        self._steps_by_tool = dict.fromkeys((*TOOLS, "invalid"), 0)
        self._steps_counted = dict.fromkeys(self._steps_by_tool, 0)
        self._steps_metric = {tool: metrics.steps.labels(tool) for tool in self._steps_by_tool}
        self.search = SearchScheduler(
            res.retriever,
            res.executor,
            mode=cfg.search_inline,
            max_inline_s=cfg.search_inline_max_ms / 1e3,
            threads=cfg.search_threads,
            cache_size=cfg.search_cache,
            observe=metrics.search_latency.observe,
        )
        self._searches_counted = SearchCounters()  # what refresh_gauges has copied into the metrics so far
        self._search_metrics = [(metrics.searches.labels(w), w) for w in ("inline", "thread", "remote")] + [
            (metrics.search_cache.labels(r), f"cache_{r}") for r in ("hit", "miss")
        ]  # (Prometheus counter, SearchCounters field)
        self._tool_ctx_base = dict(retriever=self.search, topk=cfg.topk, max_topk=cfg.max_topk)

    # ------------------------------------------------------------------ calls
    def create(self, req: CreateEpisode) -> EpisodeCreated:
        max_turns = self.cfg.max_turns if req.max_turns is None else req.max_turns
        check_max_turns(max_turns, self.cfg.max_turns)
        check_seed(req.seed)
        by_ref = req.dataset is not None or req.split is not None or req.index is not None
        by_text = req.question is not None or req.answers is not None
        if by_ref == by_text:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                "give either {dataset, split, index} or {question, answers}, not both and not neither",
            )
        metadata: dict[str, Any] = {}
        if by_ref:
            if req.dataset is None or req.split is None or req.index is None:
                raise EnvError(ErrorCode.INVALID_VALUE, "dataset, split and index must all be given")
            row = self.datasets.get(req.dataset, req.split, req.index)
            question, golds, qid = row.question, row.golden_answers, row.id
            # What would give the answer away (the oracle trajectory, the gold passage ids) only on request.
            metadata = {k: v for k, v in row.metadata.items() if k not in _ORACLE_KEYS or req.include_oracle}
        else:
            check_question(req.question)
            check_answers(req.answers)
            assert req.question is not None and req.answers is not None
            question, golds, qid = req.question, list(req.answers), None
        task = TaskRecord(
            question=question,
            golden_answers=golds,
            max_turns=max_turns,
            question_id=qid,
            dataset=req.dataset,
            split=req.split,
            seed=req.seed,
            metadata=metadata,
        )
        check_task(task, self.cfg.max_turns)  # the same checks an imported blob's task passes
        eid, sid, _ = self.store.create(task)
        self.metrics.episodes_created.inc()
        prompt = self.prompt_template.format(question=question)
        return EpisodeCreated(
            episode_id=eid,
            snapshot_id=sid,
            prompt=prompt,
            messages=[Message(role="user", content=prompt)],
            turn=0,
            done=False,
            max_turns=max_turns,
            question_id=qid,
            dataset=req.dataset,
            split=req.split,
            metadata=metadata,
        )

    async def step(self, episode_id: str, req: StepRequest) -> StepResult:
        if (req.action is None) == (req.tool_call is None):
            raise EnvError(ErrorCode.INVALID_VALUE, "give exactly one of `action` (model text) or `tool_call`")
        if req.action is not None and len(req.action) > self.cfg.max_action_chars:
            raise EnvError(
                ErrorCode.INVALID_VALUE,
                f"action is {len(req.action)} characters; the limit is {self.cfg.max_action_chars}",
            )
        action = req.action if req.action is not None else _tool_call_text(req.tool_call)
        h = self.store.episode(episode_id)
        async with h.lock:
            if self.store.episodes.get(episode_id) is not h:  # deleted (or reaped) while this step waited
                raise EnvError(ErrorCode.NOT_FOUND, f"episode {episode_id!r} was deleted before this step ran")
            node = h.node
            if node.done:
                raise EnvError(
                    ErrorCode.EPISODE_DONE,
                    f"episode {episode_id} is done (turn {node.turn}): it takes no more steps (a fork of it is done "
                    "too); to continue from an earlier turn, spawn from the snapshot that turn's answer carried "
                    "(POST /v1/snapshots/{id}/episodes)",
                )
            task = node.task
            text_mode = req.action is not None
            ctx = ToolContext(golden_answers=task.golden_answers, **self._tool_ctx_base)
            name = "invalid"
            try:
                if req.action is not None:
                    parsed = parse_action(req.action)
                    if parsed is None:
                        raise ToolError(INVALID_ACTION)
                    name, args = parsed
                else:
                    assert req.tool_call is not None
                    name = req.tool_call.name
                    args = coerce_arguments(name, req.tool_call.arguments)
                result = await call_tool(ctx, name, args)
                valid = True
            except ToolError as e:
                msg = str(e)
                result = ToolResult(msg if msg == INVALID_ACTION or not text_mode else wrap_information(msg))
                result.info["error"] = msg.strip()
                valid = False
            except RetrieverError as e:
                raise EnvError(
                    ErrorCode.UPSTREAM, f"search backend failed; the step was not applied, retry it: {e}"
                ) from None
            if valid and text_mode and name == "search":
                result.observation = wrap_information(result.observation)
            turn = node.turn + 1
            truncated = not result.done and turn >= task.max_turns
            done = result.done or truncated
            reward = step_reward(result, self.cfg.reward_metric)
            info: dict[str, Any] = {"tool": name if name in TOOLS else "invalid", "valid": valid, **result.info}
            if done:
                info["golden_answers"] = task.golden_answers
            record = TurnRecord(action, result.observation, reward, done, truncated, info)
            new, sid = self.store.advance(h, record)
        self._steps_by_tool[info["tool"]] += 1
        return StepResult(episode_id, sid, result.observation, reward, done, truncated, new.turn, info)

    def fork(self, episode_id: str, n: int) -> ForkResult:
        self._check_n(n)
        h = self.store.episode(episode_id)
        ids = self.store.spawn(h.node, n)
        self.metrics.forks.inc(n)
        return ForkResult(ids)

    def snapshot(self, episode_id: str) -> SnapshotCreated:
        h = self.store.episode(episode_id)
        self.store.check_capacity(0, 1)
        return SnapshotCreated(self.store.add_snapshot(h.node))

    def from_snapshot(self, snapshot_id: str, n: int) -> ForkResult:
        self._check_n(n)
        ids = self.store.spawn(self.store.snapshot(snapshot_id).node, n)
        self.metrics.forks.inc(n)
        return ForkResult(ids)

    def delete(self, episode_id: str) -> Deleted:
        self.store.delete_episode(episode_id)
        return Deleted(episode_id)

    def delete_snapshot(self, snapshot_id: str) -> Deleted:
        self.store.delete_snapshot(snapshot_id)
        return Deleted(snapshot_id)

    def export_snapshot(self, snapshot_id: str, as_json: bool = False, turns: int | None = None) -> bytes:
        """The snapshot's blob, or with `turns` the blob of the state after its first `turns` turns."""
        node = self.store.snapshot(snapshot_id).node
        if turns is not None:
            if turns > node.turn:
                raise EnvError(
                    ErrorCode.INVALID_VALUE, f"snapshot {snapshot_id} is after turn {node.turn}; turns={turns} is later"
                )
            for _ in range(node.turn - turns):
                assert node.parent is not None
                node = node.parent
        return export_blob(node, corpus_id=self.corpus_id, reward_metric=self.cfg.reward_metric, as_json=as_json)

    def import_snapshot(self, data: bytes, as_json: bool = False) -> SnapshotCreated:
        node = import_blob(
            data,
            corpus_id=self.corpus_id,
            reward_metric=self.cfg.reward_metric,
            max_turns=self.cfg.max_turns,
            as_json=as_json,
        )
        self.store.check_capacity(0, 1)
        return SnapshotCreated(self.store.add_snapshot(node))

    async def batch(self, req: BatchRequest) -> BatchResult:
        if len(req.ops) > self.cfg.max_batch_ops:
            raise EnvError(ErrorCode.CAPACITY, f"batch has {len(req.ops)} ops; the limit is {self.cfg.max_batch_ops}")

        async def run(op: Any) -> msgspec.Struct:
            try:
                if isinstance(op, CreateOp):
                    ans: Any = self.create(op)
                elif isinstance(op, StepOp):
                    ans = await self.step(op.episode_id, op)
                elif isinstance(op, SpawnOp):  # a snapshot is immutable: nothing to wait behind
                    ans = self.from_snapshot(op.snapshot_id, op.n)
                elif isinstance(op, DeleteSnapshotOp):
                    ans = self.delete_snapshot(op.snapshot_id)
                else:
                    assert isinstance(op, ForkOp | SnapshotOp | DeleteOp), op
                    # Wait behind any earlier op of this batch on the same episode (a step in flight holds
                    # the lock): [step e, fork e] must fork the state after the step, as the order says.
                    async with self.store.episode(op.episode_id).lock:
                        if isinstance(op, ForkOp):
                            ans = self.fork(op.episode_id, op.n)
                        elif isinstance(op, SnapshotOp):
                            ans = self.snapshot(op.episode_id)
                        else:
                            ans = self.delete(op.episode_id)
            except EnvError as e:
                self.metrics.errors.labels(e.code.value if isinstance(e.code, ErrorCode) else str(e.code)).inc()
                return _batch_result(False, e.to_body())
            except Exception:
                # A bug in one op is that op's 500, as the single call would answer; the other ops were applied (or
                # are still running) and their answers, such as the ids of created episodes, must reach the client.
                log.exception("unhandled error in a batch op", op=type(op).__name__)
                err = EnvError(ErrorCode.INTERNAL, "internal error in this op; see the server log")
                self.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
                return _batch_result(False, err.to_body())
            return _batch_result(True, ans)

        if self.search.inline_now():
            # Searches run on the event loop, so ops have nothing to overlap: run them one after another, in order,
            # without a task each (measured: ~25 us an op, a seventh of a search step's cost in a batch).
            return BatchResult([await run(op) for op in req.ops])  # structs that encode as the contract's dicts
        # Searches in threads or remote: overlap them. Tasks start in order and every op on an existing episode takes
        # its lock (FIFO) before its first real await, so ops on one episode apply in the order given while
        # independent ops (searches) overlap. Snapshot ops (spawn, delete_snapshot) never await: they apply in the
        # order given among themselves.
        return BatchResult(list(await asyncio.gather(*(run(op) for op in req.ops))))

    async def retrieve(self, req: RetrieveRequest) -> dict[str, Any]:
        topk = self.cfg.topk if req.topk is None else req.topk  # Search-R1's server: its own --topk when not asked
        if not 1 <= topk <= self.cfg.max_topk:
            raise EnvError(ErrorCode.INVALID_VALUE, f"topk must be in [1, {self.cfg.max_topk}], got {topk}")
        if len(req.queries) > self.cfg.max_batch_ops:
            raise EnvError(
                ErrorCode.CAPACITY, f"{len(req.queries)} queries in one call; the limit is {self.cfg.max_batch_ops}"
            )
        try:
            results = await self.search.search(req.queries, topk)
        except RetrieverError as e:
            raise EnvError(ErrorCode.UPSTREAM, f"search backend failed: {e}") from None
        if req.return_scores:
            out = [
                [{"document": {"id": h.id, "contents": h.contents}, "score": h.score} for h in hits] for hits in results
            ]
        else:
            out = [[{"id": h.id, "contents": h.contents} for h in hits] for hits in results]
        return {"result": out}

    def info(self) -> Info:
        c = self.cfg
        return Info(
            version=__version__,
            api_version=API_VERSION,
            tools=[function_schema(fn, c.max_topk) for fn in TOOLS.values()],
            datasets=[DatasetInfo(**d) for d in self.datasets.describe()],
            action_format={
                "type": "search-r1-tags",
                "description": "Write <think>..</think>, then <search> query </search> or <answer> text </answer>. "
                "Or send a tool_call with one of `tools`.",
                "stop": ["</search>", "</answer>"],
                "observation_wrapper": ["\n\n<information>", "</information>\n\n"],
                "invalid_action_observation": INVALID_ACTION,
                "reward": c.reward_metric,
            },
            limits=Limits(
                max_episodes=c.max_episodes,
                max_snapshots=c.max_snapshots,
                max_action_chars=c.max_action_chars,
                max_batch_ops=c.max_batch_ops,
                max_body_bytes=c.max_body_bytes,
                max_turns=c.max_turns,
                max_topk=c.max_topk,
                max_fork_n=c.max_fork_n,
                episode_ttl_s=c.episode_ttl_s,
            ),
            corpus_id=self.corpus_id,
            reward_metric=c.reward_metric,
        )

    def health(self, shutting_down: bool) -> dict[str, Any]:
        return {
            "status": "shutting_down" if shutting_down else "ok",
            "version": __version__,
            "api_version": API_VERSION,
            "episodes": len(self.store.episodes),
            "snapshots": len(self.store.snapshots),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "corpus_id": self.corpus_id,
            "num_docs": self.retriever.num_docs,
        }

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.cfg.max_fork_n:
            raise EnvError(ErrorCode.INVALID_VALUE, f"n must be in [1, {self.cfg.max_fork_n}], got {n}")

    def refresh_gauges(self) -> None:
        """Bring the metrics kept outside Prometheus up to date (called when /metrics is scraped, and by the reaper)."""
        for tool, n in self._steps_by_tool.items():
            if n != self._steps_counted[tool]:
                self._steps_metric[tool].inc(n - self._steps_counted[tool])
                self._steps_counted[tool] = n
        for counter, name in self._search_metrics:
            new = getattr(self.search.counters, name) - getattr(self._searches_counted, name)
            if new:
                counter.inc(new)
                setattr(self._searches_counted, name, getattr(self.search.counters, name))
        self.metrics.search_cache_entries.set(len(self.search.cache or ()))
        self.metrics.episodes_live.set(len(self.store.episodes))
        self.metrics.snapshots_live.set(len(self.store.snapshots))
        self.metrics.snapshots_evicted.set(self.store.evicted)

    async def aclose(self) -> None:
        """Stop the search scheduler (its flush task and thread jobs); the resources stay open (their owner closes
        them)."""
        await self.search.aclose()

    async def reap_forever(self) -> None:
        """Expire idle episodes/snapshots every min(ttl / 4, 30 s) until cancelled (the app owns the task)."""
        period = min(self.cfg.episode_ttl_s / 4, 30.0)
        while True:
            await asyncio.sleep(period)
            eps, snaps = self.store.reap()
            if eps or snaps:
                self.metrics.reaped.labels("episode").inc(eps)
                self.metrics.reaped.labels("snapshot").inc(snaps)
                log.info("reaped idle state", episodes=eps, snapshots=snaps)
            self.refresh_gauges()
