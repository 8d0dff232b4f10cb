"""Run an agent over a dataset split served by an env server: bounded concurrency, per-question errors, resume.

What always holds:
- Questions are `(dataset, split, index)` for index in `[0, limit)`; the server's `/v1/info` says how many a
  split has. `concurrency` workers pull indices from one iterator, so at most that many episodes are live; every
  worker is awaited (a `TaskGroup`), and a fatal error cancels the rest.
- One jsonl row (`ResultRow`) per question, appended and flushed as soon as the question finishes, in finishing
  order; a run that completes rewrites the file (atomically) sorted by (dataset, split, index). A question that fails (the agent's endpoint is dead or answers garbage, the agent raises, the env
  server rejects a call) is written with `error` set and zero scores; it is never dropped and the run goes on.
- Scores, turns and searches come from the env server's own record of the episode (a snapshot of its final
  state, exported), never from the agent's account of itself.
- The env server going away is not a per-question error: when a call fails to connect (or answers 503) and
  `/health` fails too, the run stops with `EnvUnavailable`; the rows written so far stay, and rerunning the
  same command resumes. With several `--env-url` replicas, one going away while another is up costs only the
  questions it held, which are played again from the start on the others (`REPLAYS` times at most).
- Resume: rows already in the output file are skipped by `(dataset, split, index)`. An interrupted run can
  leave one incomplete last line; it is cut off (with a note on stderr) before resuming. `retry_errors`
  rewrites the file without the error rows of this dataset/split so those questions run again. One file holds
  one agent+model (mixing them would make the summary meaningless): a different one is a usage error, and an
  exclusive lock (on `FILE.lock`, left in place) stops two runs from appending to one file at once.
- Retries live at the transport layer: the env client retries what it safely can (`env_retries`), the agents'
  openai client retries connection errors, 408/409/429 and 5xx (`AgentConfig.retries`). A question is replayed
  from scratch only when its env replica went away; its row is written once, when it ends, so nothing is
  double-counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

import msgspec
import structlog
import tyro
from tqdm import tqdm

from shared.replicas import EnvPool, ReplicaLost, ReplicasDiffer
from shared.wire import EnvError, Info, SnapshotBlob
from tools.eval.agents import Agent, AgentConfig, AgentConfigError, AgentError, build_agent

REPLAYS = 2
"""Times a question is played again after its env replica went away (another replica being up)."""

log = structlog.get_logger("trace_eval")


class UsageError(Exception):
    """Bad arguments or an unusable output file: nothing ran (exit code 2)."""


class EnvUnavailable(Exception):
    """The env server cannot be reached or refuses us (exit code 3)."""


class ResultRow(msgspec.Struct, kw_only=True):
    """One question's result: a line of the output jsonl."""

    id: str | None = None  # the dataset's question id (None when the episode could not be created)
    dataset: str
    split: str
    index: int  # position in the split: with (dataset, split), the resume key
    question: str | None = None
    golden_answers: list[str] | None = None
    prediction: str | None = None  # the answer given (None: no answer, truncated or error)
    em: float = 0.0  # the server's judge (SQuAD normalisation); 0 when unanswered
    f1: float = 0.0
    cover_em: float = 0.0
    reward: float = 0.0  # the episode's terminal reward (the server's reward_metric)
    turns: int = 0  # env steps taken, valid or not
    searches: int = 0  # valid search calls
    truncated: bool = False  # ended by max turns without an answer
    tokens: int | None = None  # prompt + completion tokens over all model calls, if the endpoint reported usage
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0  # wall time of the whole question (create .. read back)
    error: str | None = None  # why the question failed; None when it ran to the end of the episode
    hops: int | None = None  # metadata of the question, when the dataset has it (the synthetic world does)
    kind: str | None = None
    agent: str
    model: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.dataset, self.split, self.index)


@dataclass
class EvalConfig:
    """One `trace-eval` run."""

    env_urls: Annotated[list[str], tyro.conf.arg(aliases=("--env-url",))] = field(default_factory=list)
    """Env server base URL, e.g. http://127.0.0.1:8000 (or $TRACE_ENV_URL, comma-separated for several). Required.
    Several (`--env-url A --env-url B`): replicas of one server (`shared.replicas.EnvPool`); each question's
    episode stays on the replica it was created on, and new ones go to the least-loaded replica up."""
    agent: str = ""
    """Which agent plays the episodes (a name in tools.eval.agents.AGENTS). Required."""
    dataset: str = ""
    """Dataset name as the server's /v1/info lists it. Required."""
    split: str = ""
    """Split of that dataset (train, dev, test, ...). Required."""
    out: Path = Path()
    """Results jsonl (appended to; existing rows are skipped). Required."""
    limit: int | None = None
    """First N questions of the split (None: all)."""
    concurrency: int = 16
    """Questions in flight at once (= live episodes on the server)."""
    max_turns: int | None = None
    """Turns per episode (None: the server's default; it caps it)."""
    env_token: str | None = None
    """Bearer token of the env server (or $TRACE_ENV_TOKEN / $TRACE_AUTH_TOKEN)."""
    env_retries: int = 3
    """Retries of env calls that are safe to retry."""
    env_timeout_s: Annotated[float, tyro.conf.arg(aliases=("--env-timeout",))] = 60.0
    """Seconds per env call."""
    retry_errors: bool = False
    """Run again the questions whose rows have an error (their old rows are removed first)."""
    progress: bool = True
    """Show a progress bar (`--no-progress`: none)."""
    agent_cfg: Annotated[AgentConfig, tyro.conf.arg(name="")] = field(default_factory=AgentConfig)
    """Options of the model-backed agents (openai-tools, react-text, policy)."""

    def validate(self) -> EvalConfig:
        """The required fields; everything else is checked where it is used (against the live server)."""
        from tools.eval.agents import AGENTS

        missing = [
            f"--{n.replace('_', '-')}" for n in ("env_urls", "agent", "dataset", "split") if not getattr(self, n)
        ]
        if self.out == Path():
            missing.append("--out")
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        if self.agent not in AGENTS:
            raise ValueError(f"--agent {self.agent!r}: choose one of {', '.join(AGENTS)}")
        return self


@dataclass
class RunStats:
    total: int  # questions in this run (after --limit)
    skipped: int  # already in the file
    written: int  # rows written by this run
    errors: int  # of those, rows with an error


# ---------------------------------------------------------------------------------------------- results file
_row_decoder = msgspec.json.Decoder(ResultRow)
_row_encoder = msgspec.json.Encoder()


def read_rows(path: Path, *, repair: bool = False) -> list[ResultRow]:
    """The rows of a results file ([] if it does not exist). An incomplete last line (an interrupted write) is
    cut off when `repair`, else ignored; any other bad line is a UsageError naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        if repair:
            print(
                f"trace-eval: {path}: cut off an incomplete last line ({len(data) - complete} bytes) left by an "
                "interrupted run",
                file=sys.stderr,
            )
            with open(path, "r+b") as f:
                f.truncate(complete)
        data = data[:complete]
    rows: list[ResultRow] = []
    seen: set[tuple[str, str, int]] = set()
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = _row_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise UsageError(f"{path}:{lineno} is not a trace-eval result row ({e}); choose another --out") from None
        if row.key in seen:
            raise UsageError(f"{path}:{lineno} repeats question {row.key}; the file was not written by one run chain")
        seen.add(row.key)
        rows.append(row)
    return rows


def _rewrite(path: Path, rows: list[ResultRow]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(_row_encoder.encode(r) + b"\n" for r in rows))
    os.replace(tmp, path)


class _RowWriter:
    """Appends one row per line and flushes it at once, so a killed run loses at most the line being written.

    Writes happen on the event loop on purpose: one small append to a local file per finished question costs
    microseconds, far less than handing it to a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None

    def __enter__(self) -> _RowWriter:
        self._f = open(self.path, "ab")  # closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._f is not None
        self._f.close()

    def write(self, row: ResultRow) -> None:
        assert self._f is not None, "write outside `with`"
        self._f.write(_row_encoder.encode(row) + b"\n")
        self._f.flush()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `<out>.lock` for the whole run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another trace-eval is writing {path} (lock {lock_path} is held)") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- the run
async def run_eval(cfg: EvalConfig) -> RunStats:
    """Run `cfg`; raise UsageError (bad arguments, unusable file) or EnvUnavailable (server unreachable)."""
    if cfg.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {cfg.limit}")
    try:
        # patience 0: with every replica down the run stops at once (exit 3), and a rerun resumes.
        pool = EnvPool(
            cfg.env_urls, token=cfg.env_token, retries=cfg.env_retries, timeout_s=cfg.env_timeout_s, patience_s=0
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    async with pool as env:
        info = await _server_info(env, ", ".join(cfg.env_urls))
        count = _check_against_server(cfg, info)
        try:
            agent = build_agent(cfg.agent, cfg.agent_cfg, info)
        except AgentConfigError as e:
            raise UsageError(str(e)) from None
        try:
            with _locked(cfg.out):
                return await _Run(cfg, env, agent, count).go()
        finally:
            await agent.aclose()


async def _server_info(env: EnvPool, url: str) -> Info:
    try:
        return await env.info()
    except ReplicasDiffer as e:
        raise UsageError(str(e)) from None
    except ConnectionError as e:
        raise EnvUnavailable(f"cannot reach the env server at {url}: {e.__cause__ or e}") from None
    except TimeoutError:
        raise EnvUnavailable(f"the env server at {url} did not answer GET /v1/info in time") from None
    except EnvError as e:
        hint = " (pass --env-token or set TRACE_ENV_TOKEN)" if e.status == 401 else ""
        raise EnvUnavailable(f"the env server at {url} refused GET /v1/info: {e}{hint}") from None


def _check_against_server(cfg: EvalConfig, info: Info) -> int:
    """Validate the run against the server's datasets and limits; the number of questions to run."""
    splits = {d.name: d.splits for d in info.datasets}
    if cfg.dataset not in splits:
        raise UsageError(f"the env server has no dataset {cfg.dataset!r}; it serves {sorted(splits)}")
    if cfg.split not in splits[cfg.dataset]:
        raise UsageError(f"dataset {cfg.dataset!r} has no split {cfg.split!r}; it has {sorted(splits[cfg.dataset])}")
    if cfg.max_turns is not None and not 1 <= cfg.max_turns <= info.limits.max_turns:
        raise UsageError(f"--max-turns must be in [1, {info.limits.max_turns}] (the server's cap), got {cfg.max_turns}")
    if cfg.concurrency > info.limits.max_episodes:
        raise UsageError(
            f"--concurrency {cfg.concurrency} exceeds the server's live-episode cap ({info.limits.max_episodes})"
        )
    n = splits[cfg.dataset][cfg.split]
    return n if cfg.limit is None else min(n, cfg.limit)


class _Run:
    """The state of one run: the client, the agent, the open results file, the counters."""

    def __init__(self, cfg: EvalConfig, env: EnvPool, agent: Agent, count: int) -> None:
        self.cfg, self.env, self.agent, self.count = cfg, env, agent, count
        self.errors = 0
        self.written = 0
        self.em_sum = 0.0

    async def go(self) -> RunStats:
        cfg = self.cfg
        rows = read_rows(cfg.out, repair=True)
        foreign = {(r.agent, r.model) for r in rows} - {(self.agent.name, self.agent.model)}
        if foreign:
            raise UsageError(
                f"{cfg.out} already holds results of agent/model {sorted(foreign, key=str)}; this run is "
                f"{self.agent.name}/{self.agent.model}. Write to another --out"
            )
        if cfg.retry_errors:
            keep = [r for r in rows if r.error is None or (r.dataset, r.split) != (cfg.dataset, cfg.split)]
            if len(keep) < len(rows):
                rows = keep
                _rewrite(cfg.out, rows)
        done = {r.index for r in rows if (r.dataset, r.split) == (cfg.dataset, cfg.split)}
        todo = [i for i in range(self.count) if i not in done]
        if todo and self.agent.needs_oracle:
            await self._check_oracle()
        bar = tqdm(
            total=len(todo),
            desc=f"{self.agent.name} {cfg.dataset}/{cfg.split}",
            unit="q",
            disable=not cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        indices = iter(todo)
        with _RowWriter(cfg.out) as out, bar:
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(cfg.concurrency, len(todo))):
                        tg.create_task(self._worker(indices, out, bar))
            except BaseExceptionGroup as eg:
                fatal = [e for e in eg.exceptions if isinstance(e, EnvUnavailable)]
                if fatal and len(fatal) == len(eg.exceptions):
                    raise fatal[0] from None
                raise
        # Complete: leave the file in question order (rows were appended in finishing order).
        _rewrite(cfg.out, sorted(read_rows(cfg.out), key=lambda r: r.key))
        return RunStats(total=self.count, skipped=self.count - len(todo), written=self.written, errors=self.errors)

    async def _worker(self, indices: Iterator[int], out: _RowWriter, bar: tqdm) -> None:
        for index in indices:
            row = await self.play(index)
            out.write(row)
            self.written += 1
            self.errors += row.error is not None
            self.em_sum += row.em
            bar.set_postfix(em=f"{self.em_sum / self.written:.3f}", errors=self.errors, refresh=False)
            bar.update(1)

    async def _check_oracle(self) -> None:
        cfg = self.cfg
        try:
            ep = await self.env.create(dataset=cfg.dataset, split=cfg.split, index=0, include_oracle=True)
            await self.env.delete(ep.episode_id)
        except (ConnectionError, EnvError, TimeoutError) as e:
            raise EnvUnavailable(
                f"the env server at {', '.join(cfg.env_urls)} failed the oracle check: {_describe(e)}"
            ) from e
        if "oracle" not in ep.metadata:
            raise UsageError(
                f"dataset {cfg.dataset!r} carries no oracle trajectories (metadata['oracle']), so --agent "
                f"{self.agent.name} cannot play it; use a dataset that has them, e.g. 'synthetic'"
            )

    async def play(self, index: int) -> ResultRow:
        """One question, start to end; every failure ends up in `row.error`, except the env server going away. With
        replicas, a question whose replica went away is played again from the start on another one (the row is
        written only once the question ends, so nothing is counted twice)."""
        for attempt in range(REPLAYS + 1):
            try:
                return await self._play(index)
            except ReplicaLost as e:
                if attempt == REPLAYS:
                    raise EnvUnavailable(
                        f"question {index} lost its env replica {REPLAYS + 1} times (last: {e}); {self.written} rows "
                        f"were written to {self.cfg.out}; rerun the same command to resume"
                    ) from e
                log.warning("a question lost its env replica; playing it again", index=index, error=str(e))
        raise AssertionError("unreachable")

    async def _play(self, index: int) -> ResultRow:
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        row = ResultRow(
            dataset=cfg.dataset, split=cfg.split, index=index, agent=self.agent.name, model=self.agent.model
        )
        episode_id: str | None = None
        snapshots: list[str] = []
        try:
            ep = await env.create(
                dataset=cfg.dataset,
                split=cfg.split,
                index=index,
                max_turns=cfg.max_turns,
                include_oracle=self.agent.needs_oracle,
            )
            episode_id = ep.episode_id
            snapshots.append(ep.snapshot_id)
            task = (await self._export(ep.snapshot_id)).task
            row.id, row.question, row.golden_answers = task.question_id, task.question, task.golden_answers
            hops, kind = ep.metadata.get("hops"), ep.metadata.get("kind")
            row.hops = hops if isinstance(hops, int) else None
            row.kind = kind if isinstance(kind, str) else None
            outcome = await self.agent.run(env, ep, task.question)
            row.prompt_tokens, row.completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
            if outcome.prompt_tokens is not None and outcome.completion_tokens is not None:
                row.tokens = outcome.prompt_tokens + outcome.completion_tokens
        except Exception as e:  # recorded on the row: an evaluation never drops a question
            await self._check_env(e)
            row.error = _describe(e)
        if episode_id is not None:
            try:
                await self._read_back(row, episode_id, snapshots)
            except Exception as e:  # the episode's record could not be read: say so on the row
                await self._check_env(e)
                row.error = row.error or f"reading the episode back failed: {_describe(e)}"
        row.latency_s = round(time.perf_counter() - t0, 4)
        return row

    async def _export(self, snapshot_id: str) -> SnapshotBlob:
        return await self.env.read_snapshot(snapshot_id)

    async def _read_back(self, row: ResultRow, episode_id: str, snapshots: list[str]) -> None:
        """Fill turns, searches, prediction and scores from the server's record; release the episode."""
        env = self.env
        final = await env.snapshot(episode_id)
        snapshots.append(final.snapshot_id)
        blob = await self._export(final.snapshot_id)
        await asyncio.gather(_release(env.delete(episode_id)), *(_release(env.delete_snapshot(s)) for s in snapshots))
        turns = blob.turns
        row.turns = len(turns)
        row.searches = sum(1 for t in turns if t.info.get("tool") == "search" and t.info.get("valid"))
        last = turns[-1] if turns else None
        if last is None or not last.done:
            if row.error is None:
                row.error = f"the agent returned before the episode ended (after {row.turns} turns)"
            return
        row.truncated = last.truncated
        row.reward = last.reward
        if not last.truncated:
            row.prediction = last.info.get("prediction")
            row.em, row.f1, row.cover_em = (float(last.info.get(k, 0.0)) for k in ("em", "f1", "cover_em"))

    async def _check_env(self, err: Exception) -> None:
        """Raise EnvUnavailable if `err` looks like the env server went away and /health confirms it for every
        replica; re-raise it if it is one replica going away while another is up (`play` plays the question
        again)."""
        if not (isinstance(err, ConnectionError) or (isinstance(err, EnvError) and err.status == 503)):
            return
        health = (await self.env.health())["replicas"]
        if not any(h.get("status") == "ok" for h in health):
            said = "; ".join(f"{h['url']}: {h.get('error') or h.get('status')}" for h in health)
            raise EnvUnavailable(
                f"the env server at {', '.join(self.cfg.env_urls)} went away ({_describe(err)}; /health: {said}). "
                f"{self.written} rows were written to {self.cfg.out}; rerun the same command to resume"
            ) from err
        if isinstance(err, ReplicaLost):
            raise err


async def _release(call: Awaitable[object]) -> None:
    """Await a delete; a 404 means it is already gone (expired), which is what we wanted."""
    try:
        await call
    except EnvError as e:
        if e.status != 404:
            raise


def _describe(e: BaseException) -> str:
    if isinstance(e, AgentError):
        return str(e)
    if isinstance(e, EnvError):
        return f"env server answered {e}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
