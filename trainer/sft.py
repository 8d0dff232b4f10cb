"""SFT warm start on oracle trajectories (DESIGN §3 "Embedded default").

A randomly initialised tiny model knows nothing of the action format, so RL from it would see only
zero rewards. We play each training question's oracle trajectory (the searches and answer a perfect
agent makes, from the synthetic world's metadata) through the REAL env server, so the observations
are exactly what rollouts will see, and lay each episode out token by token the way the agent loop
does: the chat-templated prompt, then per turn the action's tokens (loss mask 1) and the
observation's tokens (mask 0), tokenized on their own. Training is plain next-token cross-entropy on
the mask-1 tokens.

Contract:
- `oracle_examples` plays the oracle episodes (at most `concurrency` live at once) and returns them in
  question-index order; an oracle that does not score reward 1 is an error, an episode longer than the
  context budget is left out (rollouts could not reproduce it either).
- `run_sft(cfg, env, base, dest)` trains `base` for `sft.epochs` over those examples with the `sft_lr`
  schedule (no KL term: there is no reference yet) and saves the result at `dest`, written to
  `dest.tmp` and renamed, so `dest/config.json` existing means the warm start is complete. The caller
  caches `dest` (`services.sft_dir`), so later runs skip SFT.
- `sft.flawed_frac > 0` mixes in a flawed strategy (`FLAWS`): each bridge question is played with it instead of
  the oracle with that probability, through the same env server (a flawed trajectory may score 0; an oracle one
  may not). Each example records the searches the env server counted, so the rate of the flawed decision in
  the data is measured, not assumed (logged as `bridge_answered_early`).
- `sft.context_weight` weighs the loss on the prompt and observation tokens (the agent's own weigh 1): next-token
  prediction on the question and the passages, which is what teaches the tiny model to copy names.
- Everything random (which questions, which are flawed, batch order) is seeded by `model.tiny_seed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from tqdm import tqdm

from shared.client import EnvClient
from shared.replicas import EnvPool
from shared.wire import EnvError
from trainer.algo.rollout import again_on_env_loss, prompt_ids
from trainer.config import Flaw, SFTConfig, TrainConfig
from trainer.learner.compute import compute
from trainer.learner.policy import Policy

log = structlog.get_logger("trainer")

ORACLE_ATTEMPTS = 3
"""Times an oracle episode is played when its env state goes away mid-episode (a replica died, a call timed out)."""


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[float]
    """Per-token loss weight: 1 on the agent's action tokens, `context_weight` on the prompt and observations."""
    kind: str = ""
    """The question's kind from its metadata ("single", "bridge", "comparison"; "" if it has none)."""
    hops: int = 0
    """Searches the question's oracle makes."""
    searches: int = 0
    """Searches this trajectory made before its answer, as the env server counted them (its turns minus one)."""
    flawed: bool = False
    """Played with the flawed strategy (`flawed_actions`) instead of the oracle."""


FLAWS: tuple[str, ...] = typing.get_args(Flaw)
"""Flawed strategies a warm start can mix in (`sft.flaw`). early_answer: a bridge question answered after k of
its `hops` searches, k uniform in 1..hops-1, with the entity the last passage read names (the next hop's query):
the decision of a model that answers before its last hop. Only bridge questions have that decision to get
wrong (single questions have one hop; a comparison's second entity is in its text)."""


def flawed_actions(
    oracle: list[dict[str, str]], kind: str, rng: random.Random, flaw: str
) -> list[dict[str, str]] | None:
    """The flawed version of an oracle trajectory, or None where `flaw` has no decision to get wrong."""
    _check_flaw(flaw)
    searches = [st for st in oracle if st["kind"] == "search"]
    if kind != "bridge" or len(searches) < 2:
        return None
    k = rng.randint(1, len(searches) - 1)
    return [*searches[:k], {"kind": "answer", "text": searches[k]["text"]}]


def _check_flaw(flaw: str) -> None:
    if flaw not in FLAWS:
        raise ValueError(f"unknown sft.flaw {flaw!r}; known: {', '.join(FLAWS)}")


def oracle_action(step: dict[str, str], think: bool = False) -> str:
    """The text of one oracle turn in the Search-R1 tag format, with or without a short <think>."""
    if step["kind"] == "search":
        act = f"<search> {step['text']} </search>"
        return f"<think> I need to look up {step['text']}. </think>{act}" if think else act
    act = f"<answer> {step['text']} </answer>"
    return f"<think> I know the answer. </think>{act}" if think else act


async def oracle_examples(
    env: EnvClient | EnvPool,
    tokenizer: Any,
    *,
    dataset: str,
    split: str,
    count: int,
    max_context_tokens: int,
    seed: int = 0,
    think: bool = False,
    concurrency: int = 32,
    flawed_frac: float = 0.0,
    flaw: str = "early_answer",
    context_weight: float = 0.0,
) -> list[SFTExample]:
    """Play `count` oracle episodes of `dataset/split` through the env server; examples in index order.
    Each question `flawed_actions` applies to is played with the flawed strategy instead, with probability
    `flawed_frac` (drawn per question from `seed` and its index, so the choice does not depend on the others)."""
    if not 0.0 <= flawed_frac <= 1.0:
        raise ValueError(f"sft.flawed_frac must be in [0, 1], got {flawed_frac}")
    _check_flaw(flaw)  # before any episode, whether or not a question is drawn flawed
    info = await env.info()
    sizes = {d.name: d.splits for d in info.datasets}
    if dataset not in sizes or split not in sizes[dataset]:
        raise ValueError(f"SFT needs dataset {dataset}/{split}; the env server has {sizes}")
    n = sizes[dataset][split]
    indices = sorted(random.Random(seed).sample(range(n), min(count, n)))
    sem = asyncio.Semaphore(concurrency)

    async def one(index: int) -> SFTExample | None:
        async with sem:  # an episode whose env state went away is played again, from the start
            event = "an oracle episode lost its env state; playing it again"
            return await again_on_env_loss(lambda: play(index), ORACLE_ATTEMPTS, event, index=index)

    async def play(index: int) -> SFTExample | None:
        ep = await env.create(dataset=dataset, split=split, index=index, include_oracle=True)
        oracle = ep.metadata.get("oracle")
        if not oracle:
            raise ValueError(f"{dataset}/{split}[{index}] has no oracle trajectory: SFT warm start needs one")
        kind, hops = str(ep.metadata.get("kind", "")), int(ep.metadata.get("hops", 0))
        rng = random.Random(seed * 1_000_003 + index)
        flawed = flawed_actions(oracle, kind, rng, flaw) if rng.random() < flawed_frac else None
        actions = flawed or oracle
        messages = [{"role": m.role, "content": m.content} for m in ep.messages]
        prompt = prompt_ids(tokenizer, messages)
        ids, mask = list(prompt), [context_weight] * len(prompt)
        searches = 0
        try:
            for st in actions:
                text = oracle_action(st, think)
                act = tokenizer.encode(text, add_special_tokens=False)
                res = await env.step(ep.episode_id, action=text)
                obs = tokenizer.encode(res.observation, add_special_tokens=False) if res.observation else []
                ids += act + obs
                mask += [1.0] * len(act) + [context_weight] * len(obs)
                if res.done:
                    searches = res.turn - 1
                    if res.reward < 1.0 and flawed is None:
                        raise AssertionError(f"oracle of {dataset}/{split}[{index}] scored {res.reward}")
                    break
        finally:
            with contextlib.suppress(EnvError, ConnectionError, TimeoutError):  # must not hide the step's error
                await env.delete(ep.episode_id)
        if len(ids) > max_context_tokens:
            return None  # too long for the context budget: rollouts could not reproduce it either
        return SFTExample(ids, mask, kind=kind, hops=hops, searches=searches, flawed=flawed is not None)

    out = await asyncio.gather(*(one(i) for i in indices))
    return [ex for ex in out if ex is not None]


async def run_sft(cfg: TrainConfig, env: EnvClient | EnvPool, base: Path, dest: Path) -> None:
    """SFT warm start of `base` on oracle trajectories played through the env server; saved at `dest`."""
    s = cfg.sft
    policy = await compute(
        Policy,
        base,
        cfg.model,
        dataclasses.replace(cfg.optim, kl_coef=0.0),
        seed=cfg.run.seed,
        temperature=cfg.rollout.temperature,
    )
    examples = await oracle_examples(
        env,
        policy.tokenizer,
        dataset=cfg.env.dataset,
        split=cfg.env.train_split,
        count=s.max_examples,
        max_context_tokens=cfg.rollout.max_context_tokens,
        seed=cfg.model.tiny_seed,
        think=s.think,
        flawed_frac=s.flawed_frac,
        flaw=s.flaw,
        context_weight=s.context_weight,
    )
    bridges = [e for e in examples if e.kind == "bridge"]
    early = sum(e.searches < e.hops for e in bridges)
    log.info("sft examples", examples=len(examples), bridge=len(bridges), bridge_answered_early=early)
    rng = random.Random(cfg.model.tiny_seed)
    steps = s.epochs * math.ceil(len(examples) / s.batch_size)
    bar = tqdm(total=steps, desc="sft warm start", dynamic_ncols=True)
    k = 0
    for _ in range(s.epochs):
        for chunk in _shuffled_batches(examples, s.batch_size, rng):
            lr = sft_lr(k, steps, s)
            policy.set_lr(lr)
            loss = await compute(
                policy.sft_update, [e.input_ids for e in chunk], [e.loss_mask for e in chunk], s.micro_batch_size
            )
            k += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    await compute(policy.save, tmp)
    tmp.rename(dest)
    log.info("sft warm start saved", dir=str(dest), examples=len(examples), steps=steps)


def sft_lr(k: int, steps: int, s: SFTConfig) -> float:
    """SFT learning rate at step k of `steps`: linear warmup, constant, then a linear decay to 0 over the last
    `decay_frac` of the steps. Copying names (what success hinges on) is learned late, so the rate stays up
    until then; the final decay is worth a lot (teacher-forced episode accuracy ~0.5 -> ~0.7 on train)."""
    lr = s.lr * min(1.0, (k + 1) / max(s.warmup_steps, 1))
    start = (1.0 - s.decay_frac) * steps
    if s.decay_frac > 0 and k >= start:
        lr *= max(0.0, (steps - k) / (s.decay_frac * steps))
    return lr


def _shuffled_batches(examples: list[Any], batch_size: int, rng: random.Random) -> list[list[Any]]:
    """Plain shuffled batches. Length-bucketed batches padded less (1.6 vs 2.2 s a step) but left the tiny
    model's SFT far behind (sampled success ~2% vs ~7% after the same steps): a bucket is mostly one
    question type, and at this learning rate the steps pull in turns."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [[examples[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
