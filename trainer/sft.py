"""SFT warm start on oracle trajectories (DESIGN §3 "Embedded default").

A randomly initialised tiny model knows nothing of the action format, so RL from it would see only
zero rewards. We play each training question's oracle trajectory (the searches and answer a perfect
agent makes, from the synthetic world's metadata) through the REAL env server, so the observations
are exactly what rollouts will see, and lay each episode out token by token the way the agent loop
does: the chat-templated prompt, then per turn the action's tokens (loss mask 1) and the
observation's tokens (mask 0), tokenized on their own. Training is plain next-token cross-entropy on
the mask-1 tokens. The result is cached by the caller (a checkpoint folder), so later runs skip it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from shared.client import EnvClient
from trainer.rollout import prompt_ids


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]


def oracle_action(step: dict[str, str], think: bool = False) -> str:
    """The text of one oracle turn in the Search-R1 tag format, with or without a short <think>."""
    if step["kind"] == "search":
        act = f"<search> {step['text']} </search>"
        return f"<think> I need to look up {step['text']}. </think>{act}" if think else act
    act = f"<answer> {step['text']} </answer>"
    return f"<think> I know the answer. </think>{act}" if think else act


async def oracle_examples(
    env: EnvClient,
    tokenizer: Any,
    *,
    dataset: str,
    split: str,
    count: int,
    max_context_tokens: int,
    seed: int = 0,
    think: bool = False,
    concurrency: int = 32,
) -> list[SFTExample]:
    """Play `count` oracle episodes of `dataset/split` through the env server; examples in index order."""
    info = await env.info()
    sizes = {d.name: d.splits for d in info.datasets}
    if dataset not in sizes or split not in sizes[dataset]:
        raise ValueError(f"SFT needs dataset {dataset}/{split}; the env server has {sizes}")
    n = sizes[dataset][split]
    indices = sorted(random.Random(seed).sample(range(n), min(count, n)))
    sem = asyncio.Semaphore(concurrency)

    async def one(index: int) -> SFTExample | None:
        async with sem:
            ep = await env.create(dataset=dataset, split=split, index=index, include_oracle=True)
            oracle = ep.metadata.get("oracle")
            if not oracle:
                raise ValueError(f"{dataset}/{split}[{index}] has no oracle trajectory: SFT warm start needs one")
            messages = [{"role": m.role, "content": m.content} for m in ep.messages]
            prompt = prompt_ids(tokenizer, messages)
            ids, mask = list(prompt), [0] * len(prompt)
            try:
                for st in oracle:
                    text = oracle_action(st, think)
                    act = tokenizer.encode(text, add_special_tokens=False)
                    res = await env.step(ep.episode_id, action=text)
                    obs = tokenizer.encode(res.observation, add_special_tokens=False) if res.observation else []
                    ids += act + obs
                    mask += [1] * len(act) + [0] * len(obs)
                    if res.done:
                        if res.reward < 1.0:
                            raise AssertionError(f"oracle of {dataset}/{split}[{index}] scored {res.reward}")
                        break
            finally:
                await env.delete(ep.episode_id)
            if len(ids) > max_context_tokens:
                return None  # too long for the context budget: rollouts could not reproduce it either
            return SFTExample(ids, mask)

    out = await asyncio.gather(*(one(i) for i in indices))
    return [ex for ex in out if ex is not None]
