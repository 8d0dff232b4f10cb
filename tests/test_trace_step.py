"""TraceStep's own state: the prompt sampler's data order (what --resume must reproduce)."""

from __future__ import annotations

import pytest

from trainer.algo.step import PromptSampler


def test_sampler_order_is_seeded_and_covers_each_epoch() -> None:
    a, b, c = PromptSampler(10, seed=1), PromptSampler(10, seed=1), PromptSampler(10, seed=2)
    first = a.take(10)
    assert sorted(first) == list(range(10))
    assert first == b.take(10) and first != c.take(10)
    second = a.take(10)
    assert sorted(second) == list(range(10)) and second != first  # a fresh permutation each epoch


def test_an_epoch_boundary_inside_a_take_defers_a_repeat_instead_of_losing_it() -> None:
    """A take that crosses into the next epoch can meet a prompt it already holds from the last one: it waits at the
    front for the next take, so every prompt is visited once per epoch (it used to be dropped: one visit lost)."""
    from collections import Counter

    for seed in range(20):
        s = PromptSampler(10, seed=seed)
        draws: list[int] = []
        for _ in range(25):
            got = s.take(4)
            assert len(set(got)) == 4
            draws += got
        consumed = Counter()  # every permutation entry the stream has passed
        for e in range(s.epoch + 1):
            ref = PromptSampler(10, seed=seed)
            ref.epoch = e
            consumed.update(ref._make_perm()[: s.pos if e == s.epoch else 10])
        assert Counter(draws) + Counter(s.returned) == consumed, seed


def test_prompts_left_at_zero_come_back_first() -> None:
    s = PromptSampler(20, seed=0)
    batch = s.take(4)
    s.give_back(batch[2:])
    nxt = s.take(4)
    assert nxt[:2] == batch[2:]
    assert len(set(nxt)) == 4


def test_state_round_trip_reproduces_the_order() -> None:
    s = PromptSampler(7, seed=3)
    s.take(5)
    s.give_back([1])
    t = PromptSampler(7, seed=3)
    t.load_state_dict(s.state_dict())
    assert [s.take(3) for _ in range(4)] == [t.take(3) for _ in range(4)]


def test_a_pool_larger_than_the_batch_returns_the_unfunded_first() -> None:
    """Stage 1 draws a pool of candidates and gives back those it did not fund: they lead the next pool, and no
    prompt appears twice in one draw, across an epoch boundary too."""
    s = PromptSampler(10, seed=0)
    pool = s.take(8)
    s.give_back(pool[2:])  # funded two
    nxt = s.take(8)
    assert nxt[:6] == pool[2:] and len(set(nxt)) == 8  # two fresh ones from the rest of the epoch (or the next)
    with pytest.raises(AssertionError, match="11 distinct prompts of a split of 10"):
        s.take(11)


def test_a_pool_over_many_passes_never_holds_a_prompt_twice() -> None:
    """Regression (the epochs regime): stage 1 takes a pool, funds some, gives the rest back, pass after pass. A
    prompt waiting in the queue that the next pass's permutation gives again used to be queued a second time (and a
    third at the pass after), so late pools held fewer distinct prompts (about 41 of 64 over 300 prompts by the
    fifth pass) and one prompt could be funded twice in a step. A prompt waits in the queue at most once."""
    import random

    for seed in range(10):
        s, rng = PromptSampler(30, seed=seed), random.Random(seed)
        for step in range(60):  # 60 x 4 funded of pools of 12 over 30 prompts: 8 passes
            pool = s.take(12)
            assert len(set(pool)) == 12, (seed, step, pool)
            funded = set(rng.sample(pool, 4))
            s.give_back([i for i in pool if i not in funded])
            assert len(set(s.returned)) == len(s.returned), (seed, step, s.returned)
        assert s.epoch >= 5
    s = PromptSampler(5, seed=0)
    s.give_back([1, 1, 2])
    s.give_back([2, 3])
    assert s.returned == [1, 2, 3]  # given back twice: waits once


def test_a_checkpoint_taken_while_the_next_step_collects_resumes_that_step_from_its_start() -> None:
    """Regression: with run.max_staleness >= 1, step t+1's collection has drawn its prompts (and rng values) when
    step t's checkpoint is written; the checkpoint held the state after that draw, so a resumed run skipped that
    batch. `state_dict(at_step=t+1)` holds the state collect(t+1) started from."""
    from trainer.algo.step import TraceStep
    from trainer.config import TrainConfig

    live = TraceStep(TrainConfig(), None, None, 64)  # type: ignore[arg-type]  # no policy/runner: state only
    live.remember_draw_state(1)  # collect(1) starts ...
    drawn, rolled = live.sampler.take(8), live.rng.random()  # ... and draws, while step 0's checkpoint is written
    saved = live.state_dict(at_step=1)
    resumed = TraceStep(TrainConfig(), None, None, 64)  # type: ignore[arg-type]
    resumed.load_state_dict(saved)
    assert resumed.sampler.take(8) == drawn and resumed.rng.random() == rolled
    after = TraceStep(TrainConfig(), None, None, 64)  # type: ignore[arg-type]
    after.load_state_dict(live.state_dict())  # without at_step: the state as it is now, past the draw
    assert after.sampler.take(8) != drawn
