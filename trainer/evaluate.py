"""Greedy evaluation of a policy: ONE path for the trainer's periodic eval, `trace-train eval` and
`trace-eval --agent policy`.

Contract:
- `play_greedy(runner, episode)` is the one evaluation episode. It plays an env episode the caller created
  (and deletes afterwards) to its end through the trainer's own agent loop (`RolloutRunner.play`: the prompt
  chat-templated once, token-in/token-out, the same stop rules and context limit as training), with greedy
  decoding: the runner must come from `greedy_runner` (temperature 0; anything else is an error, not a
  silent sample). The policy's own failures end the episode and are reported, not raised: no room left in
  `max_context_tokens` (TRUNCATED) or a generation aborted too often (ERROR) give `GreedyResult.error`;
  engine and env server failures raise. The tree's route key is the episode id, so a question evaluated while
  training trees of the same question are in flight never shares (or releases) their engine pin.
- Scores are the env server's judge on the last step (`em`, `f1` in its info): 0 when the episode ended
  without an answer. Token counts are the engine's (prefill and generated, over all turns).
- `evaluate(runner, dataset, split, limit=N)` maps `play_greedy` over questions 0..N-1 of a split (capped at
  the split's size), at most `concurrency` episodes live at once (default: the runner's
  `max_concurrency`), each created, played and deleted; it returns the mean EM/F1 as
  {"<prefix>_em", "<prefix>_f1"}, and where every question's metadata gives its oracle's `hops` (the synthetic
  world's do), "<prefix>_early": the share of questions answered after fewer searches than `hops` (the env
  server's turn count), the decision a flawed warm start (`sft.flawed_frac`) gets wrong. Any question raising
  fails the evaluation.
- `evaluate_checkpoint(cfg, split=, limit=)` (`trace-train eval`) starts or attaches the env server and
  engine(s) exactly as training does and runs `evaluate` on the checkpoint at `cfg.model.path`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from transformers import AutoTokenizer

from shared.client import EnvClient
from shared.replicas import EnvPool
from shared.wire import EnvError, EpisodeCreated, Info, StepResult
from trainer import services
from trainer.algo.rollout import RolloutConfig, RolloutRunner, again_on_env_loss
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.config import RunError, TrainConfig
from trainer.engines.client import EngineClient


@dataclass
class GreedyResult:
    """One question played greedily to its end."""

    status: FinishStatus
    """ANSWERED; TRUNCATED (the env's max turns, or no room for another turn); ERROR (generation aborted)."""
    final: StepResult | None
    """The env server's answer to the last step (None: no step was taken); `final.done` iff the env ended it."""
    em: float
    """The server's exact match of the answer (0 when not answered)."""
    f1: float
    """The server's token F1 of the answer (0 when not answered)."""
    turns: int
    """Env steps taken."""
    prompt_tokens: int
    """Prefill tokens the engine reported, summed over the turns."""
    generated_tokens: int
    """Tokens generated, summed over the turns."""
    error: str | None
    """Why the policy stopped before the env server ended the episode; None when it ended there."""


EVAL_ATTEMPTS = 3
"""Times an eval question is played when its env state goes away mid-episode (a replica died, a call timed out)."""


def greedy_runner(
    env: EnvClient | EnvPool, engine: EngineClient, tokenizer: Any, rollout: RolloutConfig
) -> RolloutRunner:
    """A runner of the agent loop with `rollout`'s limits and greedy decoding (temperature 0)."""
    return RolloutRunner(env, engine, tokenizer, dataclasses.replace(rollout, temperature=0.0))


async def play_greedy(runner: RolloutRunner, episode: EpisodeCreated) -> GreedyResult:
    """Play `episode` (created by the caller, in its first state; the caller deletes it) to its end, greedily."""
    assert runner.cfg.temperature == 0.0, f"greedy evaluation needs a greedy runner, got {runner.cfg.temperature=}"
    where = f"{episode.dataset}/{episode.split} {episode.question_id or episode.episode_id}"
    ids = runner.encode_prompt([{"role": m.role, "content": m.content} for m in episode.messages])
    if len(ids) + runner.cfg.min_turn_tokens > runner.cfg.max_context_tokens:
        raise ValueError(
            f"{where}: the prompt is {len(ids)} tokens, leaving no room for a turn in "
            f"max_context_tokens={runner.cfg.max_context_tokens}; raise rollout.max_context_tokens"
        )
    tree = RolloutTree.new(episode.episode_id, episode.prompt, [], ids, episode.snapshot_id)
    try:
        leaf_id, final = await runner.play(tree, 0, episode.episode_id, release=False)
    finally:
        runner.engine.release(tree.prompt_id)
    leaf = tree.nodes[leaf_id]
    error = None
    if final is None or not final.done:
        why = leaf.info.get("error") if leaf.status == FinishStatus.ERROR else None
        error = why or f"context limit at turn {leaf.depth}"
    return GreedyResult(
        status=leaf.status,
        final=final,
        em=float(leaf.info.get("em", 0.0)),
        f1=float(leaf.info.get("f1", 0.0)),
        turns=final.turn if final is not None else 0,
        prompt_tokens=tree.ledger.prefill_tokens,
        generated_tokens=tree.ledger.generated_tokens,
        error=error,
    )


async def evaluate(
    runner: RolloutRunner,
    dataset: str,
    split: str,
    *,
    limit: int,
    prefix: str = "eval",
    concurrency: int | None = None,
    max_turns: int | None = None,
) -> dict[str, float]:
    """Greedy EM/F1 on the first `limit` questions of `dataset/split`: {"<prefix>_em", "<prefix>_f1"}.
    `max_turns` is sent with every create (None: the server's default), as training sends env.max_turns."""
    env = runner.env
    n = min(limit, split_size(await env.info(), dataset, split))
    live = asyncio.Semaphore(concurrency or runner.cfg.max_concurrency)

    async def play(index: int) -> tuple[GreedyResult, int | None]:
        ep = await env.create(dataset=dataset, split=split, index=index, max_turns=max_turns)  # None: not sent
        try:
            hops = ep.metadata.get("hops")
            return await play_greedy(runner, ep), (int(hops) if hops is not None else None)
        finally:  # a failed delete must not hide the error that ended the question
            with contextlib.suppress(EnvError, ConnectionError, TimeoutError):
                await env.delete(ep.episode_id)

    def count() -> None:
        runner.env_failures += 1

    async def one(index: int) -> tuple[GreedyResult, int | None]:
        async with live:  # a question whose env state went away is played again, from the start
            event = "an eval question lost its env state; playing it again"
            return await again_on_env_loss(lambda: play(index), EVAL_ATTEMPTS, event, count, index=index)

    res = await asyncio.gather(*(one(i) for i in range(n)))
    out = {
        f"{prefix}_em": sum(r.em for r, _ in res) / max(n, 1),
        f"{prefix}_f1": sum(r.f1 for r, _ in res) / max(n, 1),
    }
    early = answered_early(res)
    if early is not None:
        out[f"{prefix}_early"] = early
    return out


def answered_early(results: list[tuple[GreedyResult, int | None]]) -> float | None:
    """Share of (result, oracle hops) answered after fewer searches (turns before the answer) than hops; None
    when some question has no hops (or there are none)."""
    if not results or any(h is None for _, h in results):
        return None
    early = sum(r.status == FinishStatus.ANSWERED and r.turns - 1 < h for r, h in results)  # type: ignore[operator]
    return early / len(results)


async def evaluate_checkpoint(cfg: TrainConfig, *, split: str | None = None, limit: int = 200) -> dict[str, Any]:
    """`trace-train eval`: `evaluate` on the checkpoint at `cfg.model.path`, split default `env.eval_split`."""
    assert cfg.model.path is not None, "evaluate_checkpoint needs cfg.model.path"
    model = Path(cfg.model.path)
    split = split or cfg.env.eval_split
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        env = await stack.enter_async_context(services.env_client(cfg, out))
        split_size(await server_info(env, cfg), cfg.env.dataset, split)  # before the engine: a wrong split in seconds
        urls = await stack.enter_async_context(services.engines(cfg, model, out))
        engine = await stack.enter_async_context(EngineClient(urls, max_concurrency=cfg.rollout.max_concurrency))
        tok = AutoTokenizer.from_pretrained(str(model))
        greedy = greedy_runner(env, engine, tok, cfg.rollout)
        res = await evaluate(greedy, cfg.env.dataset, split, limit=limit, max_turns=cfg.env.max_turns)
    return {"model": str(model), "dataset": cfg.env.dataset, "split": split, **res}


async def server_info(env: Any, cfg: TrainConfig) -> Info:
    """The env server's /v1/info; a server that cannot be reached is a RunError naming the URL and what to do."""
    try:
        return await env.info()
    except (TimeoutError, aiohttp.ClientError, OSError) as e:  # ReplicaLost is a ConnectionError
        where = ", ".join(cfg.env.urls) or "the env server this run launched"
        raise RunError(
            f"the env server at {where} answered nothing ({type(e).__name__}: {e}); start one (`trace-env serve`) "
            "or fix --env-url"
        ) from None


def check_env_server(cfg: TrainConfig, info: Info) -> None:
    """The run against the env server it talks to (/v1/info): its train split is served, and its eval split when the
    run evaluates (run.eval_every > 0), and the episodes' env.max_turns is within the server's cap (a create past it
    answers 422). ValueError saying what to change. A server the trainer launches itself gets env.max_turns as its
    cap; its data (the synthetic world unless env.dataset names another) must still hold the splits."""
    e = cfg.env
    for split in dict.fromkeys((e.train_split, *([e.eval_split] if cfg.run.eval_every > 0 else []))):
        split_size(info, e.dataset, split)
    if e.max_turns > info.limits.max_turns:
        raise RunError(
            f"env.max_turns {e.max_turns} is past the env server's cap of {info.limits.max_turns} turns an episode: "
            f"lower env.max_turns, or serve with --max-turns {e.max_turns} or more"
        )


def split_size(info: Info, dataset: str, split: str) -> int:
    """Questions in `dataset/split` per the env server's /v1/info; ValueError naming what it serves if absent."""
    sizes = {d.name: d.splits for d in info.datasets}
    if dataset not in sizes or split not in sizes[dataset]:
        raise RunError(f"the env server has no {dataset}/{split}; it serves {sizes}")
    return sizes[dataset][split]
