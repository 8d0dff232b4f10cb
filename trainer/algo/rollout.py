"""The token-level ReAct agent loop that grows rollout trees (DESIGN §3 "Token-in/token-out").

Contract:
- The prompt is chat-templated ONCE (the root's ids). Each turn the policy generates from the exact
  token ids of its history until a stop token/string (`</search>`, `</answer>`, EOS) or its token
  cap; the env server is stepped with the text of exactly those tokens; the observation is
  tokenized on its own and appended with loss mask 0. No history is ever detokenized and
  re-tokenized, so the ids trained on are the ids sampled.
- Branching from any node = `POST /v1/snapshots/{node.snapshot_id}/episodes {n: k}` on the env
  server + generation from `tree.history_ids(node)`; every request of one tree carries the tree's
  route key, so one engine serves it and its radix/prefix cache holds the shared prefixes.
- Limits end an episode cleanly: the env's max turns (sent on every create by the trainer: env.max_turns,
  not the server's default) -> TRUNCATED; a history that cannot fit
  another turn in `max_context_tokens` -> TRUNCATED. Engine aborts (a weight update with pause
  mode "abort") are retried from the same prefix; engine failures raise.
- Env failures (`env_lost`: the env replica holding a tree went away, a call timed out, its state is gone) do not
  raise out of `expand`: the tree is marked `lost` (with the reason, logged once) and `env_failures` counts them;
  the step redoes or drops lost trees (`TraceStep.collect`). A create that hits a replica going away is re-sent (to
  another replica when there is one; also after a timeout); `shared.replicas.EnvUnavailable` (no replica came back within the patience)
  always raises.
- A finished leaf's reward is the env server's `StepResult.reward` of its last step, taken as is:
  the server alone turns a judged answer into a reward (its `reward_metric`), and by its contract
  a step that did not answer (a search, an invalid action, max turns) has reward 0, so a
  truncated leaf scores 0. Nothing here re-derives a reward from `info` (em/f1 there are for
  evaluation only).
- Every tree's `Ledger` counts leaves, generated tokens, prefill tokens, cached prefill tokens
  and env calls, so allocators are compared at equal, measured cost.
- Concurrency is bounded by one semaphore over branches in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from shared.client import EnvClient
from shared.engine_protocol import SamplingParams
from shared.replicas import EnvPool, EnvUnavailable
from shared.wire import EnvError, ErrorCode, StepResult
from trainer.algo.allocation import topk_entropy
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.engines.client import EngineClient, Generation

STOP_TAGS = ("</search>", "</answer>")
CREATE_ATTEMPTS = 3
"""Times a create is sent when the replica it went to goes away or it times out (each time to the least-loaded
replica up; a create that timed out may leave an episode behind, which the server's TTL reaps)."""

log = structlog.get_logger("rollout")
T = TypeVar("T")


class _TreeLost(Exception):
    """A branch stopped because its tree was marked lost by another branch (not an env failure of its own)."""


def env_lost(e: BaseException) -> bool:
    """Whether `e` means the env state a call needed is gone or unknown (so its tree must be redone), as opposed to
    a bug or bad input: the replica went away or could not be reached, the call timed out (it may or may not have
    been applied), or the server no longer has the episode/snapshot (expired, evicted, or a restarted server).
    `EnvUnavailable` is not: no replica is left to redo anything on."""
    if isinstance(e, EnvUnavailable):
        return False
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    return isinstance(e, EnvError) and e.code in (ErrorCode.NOT_FOUND, ErrorCode.SHUTTING_DOWN)


async def again_on_env_loss(
    call: Callable[[], Awaitable[T]],
    attempts: int,
    event: str,
    on_loss: Callable[[], None] | None = None,
    **log_fields: Any,
) -> T:
    """Await `call()` and, while it fails with an env loss (`env_lost`), log `event` and await it again: `attempts`
    times in all, the last failure raising; `on_loss` is called for each loss. Any other error raises at once. For
    work that starts over from scratch (a create, a whole episode), never for a call that may have been applied."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as e:
            if not env_lost(e):
                raise
            if on_loss is not None:
                on_loss()
            if attempt == attempts:
                raise
            log.warning(event, attempt=attempt, error=str(e), **log_fields)
    raise AssertionError("unreachable")


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    """Token cap of one turn's generation (the tiny demo's actions are ~20 tokens; Search-R1 uses 500 on 7B)."""
    max_context_tokens: int = 1024
    """A history that cannot fit another `min_turn_tokens` ends the episode as truncated."""
    min_turn_tokens: int = 32
    """Smallest room a turn needs (its action plus the start of an observation)."""
    temperature: float = 1.0
    """Sampling temperature; the logprobs the engine returns are of this distribution."""
    top_p: float = 1.0
    top_k: int = -1
    max_concurrency: int = 64
    """Branches (episodes) generating at once over all trees."""
    abort_retries: int = 3
    """Times a generation aborted by a weight update is re-sent before the branch is marked ERROR."""


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat-templated prompt as token ids (the only time a chat template is applied to an episode)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 answers a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    assert ids and all(isinstance(i, int) for i in ids), (
        f"chat template gave {type(ids[0]).__name__ if ids else 'nothing'}"
    )
    return ids


class StopSpec:
    """How generation stops at the end of an action: single-token tags -> stop_token_ids (works on an
    SGLang server without a tokenizer); multi-token tags (e.g. Qwen3's) -> stop strings."""

    def __init__(self, tokenizer: Any) -> None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TAGS]
        single = all(isinstance(i, int) and i != tokenizer.unk_token_id and i is not None for i in ids) and all(
            tokenizer.encode(t, add_special_tokens=False) == [i] for t, i in zip(STOP_TAGS, ids, strict=True)
        )
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_token_ids = (ids if single else []) + eos
        self.stop = None if single else list(STOP_TAGS)


class RolloutRunner:
    """Grows rollout trees against one env server and one engine client."""

    def __init__(
        self,
        env: EnvClient | EnvPool,
        engine: EngineClient,
        tokenizer: Any,
        cfg: RolloutConfig,
        *,
        top_logprobs: int = 0,
        entropy_tokens: int = 0,
    ) -> None:
        """top_logprobs > 0: ask the engine for that many top logprobs per token and set each turn's `entropy` (the
        mean `topk_entropy` of its first `entropy_tokens` generated tokens), for the "entropy" allocator."""
        assert top_logprobs >= 0 and (entropy_tokens >= 1 or not top_logprobs), f"{top_logprobs=} {entropy_tokens=}"
        self.env = env
        self.engine = engine
        self.tok = tokenizer
        self.cfg = cfg
        self.top_logprobs = top_logprobs
        self.entropy_tokens = entropy_tokens
        self.stop = StopSpec(tokenizer)
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self.env_failures = 0
        """Env failures seen so far: trees lost (`lose`) and creates re-sent after their replica went away."""

    def _count_failure(self) -> None:
        self.env_failures += 1

    def lose(self, tree: RolloutTree, err: BaseException) -> None:
        """Mark `tree` lost because of env failure `err` (the first reason is kept and logged; every one counts)."""
        self.env_failures += 1
        if tree.lost is None:
            tree.lost = f"{type(err).__name__}: {err}"
            log.warning(
                "a rollout tree lost its env state; the step will redo it", prompt=tree.prompt_id, error=tree.lost
            )

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        c = self.cfg
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            stop=self.stop.stop,
            stop_token_ids=self.stop.stop_token_ids,
            skip_special_tokens=False,
            no_stop_trim=True,
        )

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return prompt_ids(self.tok, messages)

    async def new_tree(
        self, dataset: str, split: str, index: int, *, max_turns: int | None = None, **meta: Any
    ) -> RolloutTree:
        """Create the env episode for a prompt and a tree holding its root (no rollouts yet).

        `max_turns` is sent with the create, so that every rollout of the tree (all start from the root's
        snapshot, which carries it) ends truncated after that many turns, whatever the server's own default: the
        trainer passes env.max_turns, which its anchor logic assumes. None = the server's default (its
        --max-turns), for callers that do not care."""
        ep = await again_on_env_loss(  # the replica went away or the create timed out: send it again (elsewhere)
            lambda: self.env.create(dataset=dataset, split=split, index=index, max_turns=max_turns),  # None: not sent
            CREATE_ATTEMPTS,
            "an env create failed; sending it again",
            self._count_failure,
            prompt=f"{dataset}/{split}/{index}",
        )
        messages = [{"role": m.role, "content": m.content} for m in ep.messages]
        ids = self.encode_prompt(messages)
        if len(ids) + self.cfg.min_turn_tokens > self.cfg.max_context_tokens:
            await self.env.delete(ep.episode_id)
            raise ValueError(
                f"{dataset}/{split}[{index}]: the prompt is {len(ids)} tokens, leaving no room for a turn in "
                f"max_context_tokens={self.cfg.max_context_tokens}; raise rollout.max_context_tokens"
            )
        tree = RolloutTree.new(
            prompt_id=ep.question_id or f"{dataset}/{split}/{index}",
            question=ep.prompt,
            golden_answers=[],
            prompt_ids=ids,
            snapshot_id=ep.snapshot_id,
            dataset=dataset,
            split=split,
            index=index,
            **ep.metadata,
            **meta,
        )
        tree.ledger.env_calls += 2
        try:
            await self.env.delete(ep.episode_id)  # every rollout starts from the root snapshot instead
        except Exception as e:
            if not env_lost(e):
                raise
            self.lose(tree, e)  # its root snapshot went with it
        return tree

    async def expand(self, tree: RolloutTree, node_id: int, k: int) -> list[int]:
        """Run k continuations from `node_id` to their ends; returns the new leaves' ids. An env failure marks the
        tree `lost` instead of raising (then fewer than k leaves come back; a lost tree is not expanded further)."""
        if k <= 0 or tree.lost is not None:
            return []
        node = tree.nodes[node_id]
        assert node.snapshot_id is not None, f"node {node_id} of {tree.prompt_id} has no env snapshot to fork"
        assert node.status == FinishStatus.OPEN, f"node {node_id} of {tree.prompt_id} is finished ({node.status})"
        try:
            eids = (await self.env.episodes_from_snapshot(node.snapshot_id, k)).episode_ids
        except Exception as e:
            if not env_lost(e):
                raise
            self.lose(tree, e)
            return []
        tree.ledger.env_calls += 1
        done = await asyncio.gather(*(self.play(tree, node_id, eid) for eid in eids), return_exceptions=True)
        leaves = []
        for d in done:
            if isinstance(d, _TreeLost):
                continue  # stopped because the tree was already lost (counted then)
            if isinstance(d, BaseException):
                if not env_lost(d):
                    raise d
                self.lose(tree, d)
            else:
                leaves.append(d[0])
        return leaves

    async def _generate(self, tree: RolloutTree, ids: list[int], max_new: int) -> Generation:
        for _ in range(self.cfg.abort_retries + 1):
            gen = await self.engine.generate(
                ids, self.sampling(max_new), route_key=tree.prompt_id, top_logprobs=self.top_logprobs
            )
            tree.ledger.prefill_tokens += gen.prompt_tokens
            tree.ledger.cached_prefill_tokens += gen.cached_tokens
            tree.ledger.generated_tokens += len(gen.output_ids)
            if not gen.aborted:
                return gen
        return gen

    async def play(
        self, tree: RolloutTree, start: int, episode_id: str, *, release: bool = True
    ) -> tuple[int, StepResult | None]:
        """Play env episode `episode_id`, which is in node `start`'s state, to its end; every turn becomes a
        node. Returns (leaf id, the last step's answer). `release` deletes the episode afterwards."""
        cur = start
        res: StepResult | None = None
        async with self._sem:
            try:
                while True:
                    if tree.lost is not None:  # another branch lost the tree's env state: this one is wasted work
                        raise _TreeLost(tree.lost)
                    hist = tree.history_ids(cur)
                    room = self.cfg.max_context_tokens - len(hist)
                    gen = await self._generate(tree, hist, min(self.cfg.max_new_tokens, room))
                    out = gen.output_ids
                    if gen.aborted:
                        node = tree.add_child(cur, out, [1] * len(out), list(gen.logprobs), status=FinishStatus.ERROR)
                        node.info["error"] = f"generation aborted {self.cfg.abort_retries + 1} times"
                        tree.ledger.leaves += 1
                        return node.node_id, res
                    action = self.tok.decode(out, skip_special_tokens=True)
                    res = await self.env.step(episode_id, action=action)
                    tree.ledger.env_calls += 1
                    obs_ids = self.tok.encode(res.observation, add_special_tokens=False) if res.observation else []
                    status = FinishStatus.OPEN
                    if res.done:
                        status = FinishStatus.TRUNCATED if res.truncated else FinishStatus.ANSWERED
                    elif len(hist) + len(out) + len(obs_ids) + self.cfg.min_turn_tokens > self.cfg.max_context_tokens:
                        status = FinishStatus.TRUNCATED  # no room for another turn: end cleanly, reward 0
                    if status != FinishStatus.OPEN:
                        obs_ids = []  # nothing is generated after a final observation: it would be dead weight
                    assert status == FinishStatus.ANSWERED or res.reward == 0.0, (
                        f"env server gave reward {res.reward} to a step that did not answer (done={res.done}, "
                        f"truncated={res.truncated}, info={res.info})"
                    )
                    node = tree.add_child(
                        cur,
                        out + obs_ids,
                        [1] * len(out) + [0] * len(obs_ids),
                        list(gen.logprobs) + [0.0] * len(obs_ids),
                        snapshot_id=res.snapshot_id,
                        status=status,
                        reward=None if status == FinishStatus.OPEN else res.reward,
                        info={**res.info, "finish_reason": gen.finish_type},
                        action_text=action,
                        observation=res.observation,
                        weight_version=_version(gen.weight_version),
                    )
                    first = [row for row in gen.top_logprobs[: self.entropy_tokens] if row]  # [] = none sent
                    if self.top_logprobs and first:
                        node.entropy = sum(map(topk_entropy, first)) / len(first)
                    if res.done and "golden_answers" in res.info and not tree.golden_answers:
                        tree.golden_answers = list(res.info["golden_answers"])
                    if status != FinishStatus.OPEN:
                        tree.ledger.leaves += 1
                        return node.node_id, res
                    cur = node.node_id
            finally:
                # Release the episode; a failure here must not hide the error that ended the branch.
                if release:
                    with contextlib.suppress(EnvError, ConnectionError, TimeoutError):
                        await self.env.delete(episode_id)
                        tree.ledger.env_calls += 1


def _version(v: str | None) -> int:
    try:
        return int(v) if v is not None else 0
    except ValueError:
        return 0
