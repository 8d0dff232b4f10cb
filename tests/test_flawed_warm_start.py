"""The flawed-strategy warm start (issue 12): its trajectories make the flawed decision at the stated rate,
measured through the real env server, and greedy evaluation reports that decision as `<prefix>_early`."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from shared.client import EnvClient
from trainer.sft import FLAWS, flawed_actions, oracle_examples


def _oracle(hops: int) -> list[dict[str, str]]:
    return [{"kind": "search", "text": f"E{i}"} for i in range(hops)] + [{"kind": "answer", "text": "A"}]


def test_early_answer_stops_before_the_last_hop_with_the_entity_just_read() -> None:
    seen = set()
    for s in range(200):
        out = flawed_actions(_oracle(3), "bridge", random.Random(s), "early_answer")
        assert out is not None
        k = len(out) - 1
        seen.add(k)
        assert out[:k] == _oracle(3)[:k] and out[-1] == {"kind": "answer", "text": f"E{k}"}
    assert seen == {1, 2}, "k is drawn from 1..hops-1"
    # No decision to get wrong: single questions, comparisons (the second entity is in the question).
    assert flawed_actions(_oracle(1), "single", random.Random(0), "early_answer") is None
    assert flawed_actions(_oracle(2), "comparison", random.Random(0), "early_answer") is None
    with pytest.raises(ValueError, match=r"unknown sft\.flaw"):
        flawed_actions(_oracle(2), "bridge", random.Random(0), "verbatim")
    assert FLAWS == ("early_answer",)


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
async def test_flawed_decision_rate_measured_through_the_env_server(
    frac: float, env_client: EnvClient, tiny_model
) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ex = await oracle_examples(
        env_client, tok, dataset="synthetic", split="train", count=300, max_context_tokens=4096, seed=3,
        flawed_frac=frac,
    )  # fmt: skip
    bridges = [e for e in ex if e.kind == "bridge"]
    others = [e for e in ex if e.kind != "bridge"]
    assert len(bridges) > 100 and others
    # The env server's own turn count: a flawed trajectory answered before its last hop, an oracle one did not.
    assert all((e.searches < e.hops) == e.flawed for e in ex)
    assert all(e.searches == e.hops for e in others), "only bridge questions are ever played flawed"
    rate = sum(e.flawed for e in bridges) / len(bridges)
    assert abs(rate - frac) < 0.1, (rate, frac)  # a Bernoulli(frac) draw per question: sd < 0.05 at n > 100
    # The same seed gives the same choice of questions (the draw is per question, not per arrival order).
    again = await oracle_examples(
        env_client, tok, dataset="synthetic", split="train", count=300, max_context_tokens=4096, seed=3,
        flawed_frac=frac, concurrency=3,
    )  # fmt: skip
    assert [e.input_ids for e in again] == [e.input_ids for e in ex]


async def test_flawed_frac_out_of_range_is_an_error(env_client: EnvClient, tiny_model) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    with pytest.raises(ValueError, match="flawed_frac"):
        await oracle_examples(
            env_client, tok, dataset="synthetic", split="train", count=4, max_context_tokens=4096, flawed_frac=1.5
        )


def test_answered_early_counts_answers_before_the_last_hop() -> None:
    from trainer.algo.tree import FinishStatus
    from trainer.evaluate import GreedyResult, answered_early

    def r(status: FinishStatus, turns: int) -> GreedyResult:
        return GreedyResult(status, None, 0.0, 0.0, turns, 0, 0, None)

    ans = FinishStatus.ANSWERED
    # 2 searches + answer on a 2-hop question: on time; 1 search + answer: early; truncated: not an answer.
    res = [(r(ans, 3), 2), (r(ans, 2), 2), (r(ans, 2), 1), (r(FinishStatus.TRUNCATED, 1), 3)]
    assert answered_early(res) == 0.25
    assert answered_early([(r(ans, 1), 3), (r(ans, 4), 3)]) == 0.5
    assert answered_early([(r(ans, 1), None)]) is None and answered_early([]) is None


async def test_context_weight_weighs_prompt_and_observations_not_actions(env_client: EnvClient, tiny_model) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    kw = dict(dataset="synthetic", split="train", count=8, max_context_tokens=4096, seed=1)
    plain = await oracle_examples(env_client, tok, **kw)  # type: ignore[arg-type]
    ctx = await oracle_examples(env_client, tok, context_weight=0.25, **kw)  # type: ignore[arg-type]
    for a, b in zip(plain, ctx, strict=True):
        assert a.input_ids == b.input_ids
        assert set(a.loss_mask) == {0, 1} and set(b.loss_mask) == {0.25, 1.0}
        # The agent's own tokens keep weight 1; every other token (prompt, observations) gets the context weight.
        assert [m == 1 for m in a.loss_mask] == [m == 1.0 for m in b.loss_mask]
        assert b.loss_mask[0] == 0.25, "the prompt is weighted too"
