"""One step's rollout plan, run against anything that makes rollouts: the trainer's `TraceStep` (engines and the env
server, over HTTP) and the allocation simulator (`bench/simulate_allocation.py`, a ground-truth task) call this same
code, so what the simulator measures is the trainer's allocation, not a copy of it.

`plan_rollouts` spends exactly allocation.leaf_budget leaves (the rules: trainer/algo/allocation.py, "The leaf
budget"): stage 1 values a candidate pool (an allocator that selects) or takes the stream's next prompts (a uniform
one) and funds bare rollouts; stage 2, for allocators that expand, places continuations at anchors, round by round,
each funded prompt's share exact; what no anchor can take is re-spent as new root rollouts (`spill_roots`). The
caller owns everything that is not allocation: replacing trees that lost their env state (the trainer's `_recover`),
giving unfunded prompts back to the stream, the step's bookkeeping.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainer.algo.allocation import (
    AllocationConfig,
    Allocator,
    GresoFilter,
    anchors_from_tree,
    plan_round,
    share,
    split_rounds,
    uniform_group,
)
from trainer.algo.tree import SUCCESS_THRESHOLD, RolloutTree


class PromptStream(Protocol):
    """The training prompts' stream (`trainer.algo.step.PromptSampler`)."""

    @property
    def n(self) -> int: ...

    def take(self, k: int) -> list[int]: ...

    def give_back(self, idxs: list[int]) -> None: ...

    @property
    def epoch(self) -> int:
        """Passes over the split begun before the current one (0 in the first)."""
        ...


class Rollouts(Protocol):
    """What the plan asks of whoever makes rollouts."""

    async def new_trees(self, idxs: list[int], step: int) -> list[RolloutTree]:
        """Root-only trees for these prompts (each root's features set)."""
        ...

    async def value_roots(self, trees: list[RolloutTree]) -> list[float]:
        """Stage-1 values V(root), also written to `root.predicted`."""
        ...

    async def value_anchors(self, trees: list[RolloutTree]) -> None:
        """Back up the trees and write V(H) on every anchor (`predicted`)."""
        ...

    def expand(self, tree: RolloutTree, node_id: int, k: int) -> Awaitable[Any]:
        """k continuations of `tree` from node `node_id`, run to their ends."""
        ...


@dataclass
class StepPlan:
    """What `plan_rollouts` spent: the candidate pool (trees, their prompt indices and values), the bare rollouts m[i]
    and continuations cont[i] each prompt received (a lost tree's are owed to its redo), and the counts."""

    pool: list[RolloutTree]
    idxs: list[int]
    v: list[float]
    m: list[int]
    cont: list[int]
    count: dict[str, int] = field(default_factory=dict)


async def plan_rollouts(
    src: Rollouts,
    alloc: Allocator,
    a: AllocationConfig,
    sampler: PromptStream,
    rng: random.Random,
    *,
    pool_size: int,
    prompts_per_step: int,
    max_turns: int,
    step: int,
    prompt_filter: GresoFilter | None = None,
) -> StepPlan:
    """One step's allocation and rollouts (the module docstring). Trees whose `lost` is set sit the later rounds out,
    their shares owed in `cont`. prompt_filter: the "greso" allocator's history (`GresoFilter`), required by it."""
    stage1 = alloc.stage1_budget(a)
    # Stage 1: an active stage 1 values a candidate pool and funds the best (the rest go back to the stream);
    # a uniform one takes stage1 // group prompts as the stream gives them and never looks at values; greso's
    # takes as many that its filter keeps.
    if alloc.selects:
        n_draw = min(pool_size, sampler.n)
    else:
        n_draw = stage1 // uniform_group(stage1, a.group_size, prompts_per_step)
    skipped = 0
    if alloc.stage1 == "greso":
        if prompt_filter is None:
            raise ValueError(
                f"allocator {alloc.name!r} filters prompts by their history: pass plan_rollouts a prompt_filter"
            )
        idxs, skipped = draw_kept(sampler, min(n_draw, sampler.n), lambda i: prompt_filter.keep(i, rng))
    else:
        idxs = sampler.take(n_draw)
    pool = await src.new_trees(idxs, step)
    v = await src.value_roots(pool)
    m = alloc.roots(v, stage1, a)
    funded = [i for i, mi in enumerate(m) if mi > 0]
    await asyncio.gather(*(src.expand(pool[i], 0, m[i]) for i in funded))
    mark_round(pool, {}, 0)
    count = {
        "roots": sum(m),
        "continuations": 0,
        "continuations_moved": 0,
        "respent_as_roots": 0,
        "trees_redone": 0,
        "trees_dropped": 0,
        "leaves_lost": 0,
        "continuations_to_mixed": 0,
        "prompts_skipped": skipped,
    }
    plan = StepPlan(pool, idxs, v, m, [0] * len(pool), count)
    left = a.leaf_budget - sum(m)  # stage 2's continuations; for allocators that do not expand, normally 0
    spill = dict(alloc=alloc, a=a, sampler=sampler, prompts_per_step=prompts_per_step, step=step)
    # Stage 2: prefix expansion, round by round; each funded prompt's share of the continuations is exact.
    if alloc.expands and funded:
        shares = share(left, stage2_weights(pool, funded, m, a.stage2_share))
        mixed = {i for i in funded if bare_mixed(pool[i])}
        per_round = {i: split_rounds(s, a.rounds) for i, s in zip(funded, shares, strict=True)}
        left = 0
        cont = plan.cont
        for r in range(a.rounds):
            cont += [0] * (len(pool) - len(cont))  # prompts an earlier round's spill added
            # With prompts an earlier round's spill funded; a lost tree sits the rounds out, its shares owed.
            for i in range(len(pool)):
                if m[i] > 0 and pool[i].lost is not None and i in per_round:
                    cont[i] += per_round[i][r]
            live = [i for i in range(len(pool)) if m[i] > 0 and pool[i].lost is None]
            await src.value_anchors([pool[i] for i in live])
            anchors = [anchors_from_tree(pool[i], max_turns) for i in live]
            want = [per_round[i][r] if i in per_round else 0 for i in live]
            placed, unplaced = plan_round(alloc, anchors, want, [m[i] for i in live], rng, a)
            count["continuations"] += sum(map(sum, placed))
            count["continuations_moved"] += sum(max(sum(ks) - w, 0) for ks, w in zip(placed, want, strict=True))
            for i, ks in zip(live, placed, strict=True):
                cont[i] += sum(ks)
                count["continuations_to_mixed"] += sum(ks) if i in mixed else 0  # its bare rollouts were mixed
            jobs = []
            for i, an, ks in zip(live, anchors, placed, strict=True):
                jobs += [src.expand(pool[i], x.node_id, k) for x, k in zip(an, ks, strict=True) if k]
            sizes = {id(t): len(t.nodes) for t in pool}
            jobs += await spill_roots(src, plan, unplaced, **spill)
            await asyncio.gather(*jobs)
            mark_round(pool, sizes, r + 1)
    sizes = {id(t): len(t.nodes) for t in pool}
    await asyncio.gather(*await spill_roots(src, plan, left, **spill))
    mark_round(pool, sizes, a.rounds + 1 if alloc.expands else 0)
    plan.cont += [0] * (len(pool) - len(plan.cont))
    return plan


def draw_kept(sampler: PromptStream, n: int, keep: Callable[[int], bool]) -> tuple[list[int], int]:
    """n distinct prompts from the stream that `keep` lets through, examined in stream order; the ones it skips are
    consumed (GRESO skips a prompt for the pass). At most one whole pass of the split is examined: if fewer than n
    pass, the first skipped fill in, in stream order. A prompt the stream gives again within the call (it wrapped into
    its next pass) goes back to its front, examined next step. Returns (the prompts, how many were skipped)."""
    assert 0 <= n <= sampler.n, f"{n} prompts from a split of {sampler.n}"
    kept: list[int] = []
    skipped: list[int] = []
    again: list[int] = []
    seen: set[int] = set()
    while len(kept) < n and len(seen) < sampler.n:
        for i in sampler.take(min(n - len(kept), sampler.n - len(seen))):
            if i in seen:
                again.append(i)
                continue
            seen.add(i)
            (kept if keep(i) else skipped).append(i)
    fill = skipped[: n - len(kept)]
    sampler.give_back(list(dict.fromkeys(again)))
    return kept + fill, len(skipped) - len(fill)


def draw_replacement(
    sampler: PromptStream, in_step: Collection[int], keep: Callable[[int], bool] | None = None
) -> tuple[int | None, int]:
    """The prompt that takes a dropped prompt's leaves (`TraceStep._recover`): the stream's next prompt not in this
    step that `keep` lets through (the "greso" allocator's filter, as its stage 1 draws; None: the next one). Prompts
    in this step that the stream gives (it wrapped into its next pass) go back to its front; prompts `keep` skips are
    consumed, skipped for the pass as in `draw_kept`. At most one whole pass is examined; if nothing passes, the first
    skipped fills in. Returns (the prompt, or None when every prompt of the split is in this step; how many skipped)."""
    again: list[int] = []
    skipped: list[int] = []
    seen: set[int] = set()
    new = None
    while len(seen) < sampler.n:
        (i,) = sampler.take(1)
        if i in seen:  # a whole pass examined
            again.append(i)
            break
        seen.add(i)
        if i in in_step:
            again.append(i)
        elif keep is None or keep(i):
            new = i
            break
        else:
            skipped.append(i)
    if new is None and skipped:
        new = skipped.pop(0)
    sampler.give_back(again)
    return new, len(skipped)


def feed_history(plan: StepPlan, alloc: Allocator, prompt_filter: GresoFilter | None, sampler: PromptStream) -> None:
    """After a step's rollouts (and any tree redone since): the "greso" allocator's filter learns each rolled-out
    prompt's bare-rollout rewards, adapting its keep probabilities once the stream is past its first pass. Nothing
    for other allocators."""
    if alloc.stage1 != "greso" or prompt_filter is None:
        return
    outcomes = {i: t.root_outcomes() for i, t, mi in zip(plan.idxs, plan.pool, plan.m, strict=True) if mi > 0}
    prompt_filter.observe(outcomes, SUCCESS_THRESHOLD, adapt=sampler.epoch > 0)


def mark_round(trees: list[RolloutTree], sizes: dict[int, int], r: int) -> None:
    """Record on every node added since `sizes` (id(tree) -> its node count then; a tree not in it: all but its root)
    the allocation phase that made it, `info["round"]`: 0 for stage 1's bare rollouts, r >= 1 for stage 2's round r
    (its continuations, and the root rollouts it re-spent), rounds + 1 for the closing re-spend of an allocator that
    expands (0 for one that does not: its re-spent rollouts are bare rollouts too). A tree redone after losing its env
    state (`TraceStep._recover`) is marked there the same way (0 bare, 1 its continuations)."""
    for t in trees:
        for n in t.nodes[sizes.get(id(t), 1) :]:
            n.info.setdefault("round", r)


async def spill_roots(
    src: Rollouts,
    plan: StepPlan,
    n: int,
    *,
    alloc: Allocator,
    a: AllocationConfig,
    sampler: PromptStream,
    prompts_per_step: int,
    step: int,
) -> list[Awaitable[Any]]:
    """Re-spend `n` rollouts that no anchor could take as new root rollouts (`Allocator.spill_roots`): new prompts
    first (unfunded pool candidates, or the next prompts of the stream for a uniform stage 1, which are appended to
    the plan's pool/idxs/v/m), extra bare rollouts of funded prompts only for what cannot form a group. Updates m in
    place; returns the rollouts to run."""
    if n == 0:
        return []
    pool, idxs, v, m = plan.pool, plan.idxs, plan.v, plan.m
    if not alloc.selects:  # the next prompts of the stream, in groups of the uniform group size
        g = uniform_group(alloc.stage1_budget(a), a.group_size, prompts_per_step)
        drawn = sampler.take(min(n // g, sampler.n))
        fresh = [i for i in drawn if i not in idxs]  # a prompt appears once a step
        sampler.give_back([i for i in drawn if i in idxs])
        trees = await src.new_trees(fresh, step)
        v += await src.value_roots(trees)
        pool += trees
        idxs += fresh
        m += [0] * len(fresh)
    funded = [i for i, mi in enumerate(m) if mi > 0]
    new = [i for i, mi in enumerate(m) if mi == 0]
    extra, k_new = alloc.spill_roots([v[i] for i in funded], [m[i] for i in funded], [v[i] for i in new], n, a)
    jobs = []
    for i, k in [*zip(funded, extra, strict=True), *zip(new, k_new, strict=True)]:
        if k:
            m[i] += k
            jobs.append(src.expand(pool[i], 0, k))
    plan.count["respent_as_roots"] += n
    return jobs


def stage2_weights(pool: list[RolloutTree], funded: list[int], m: list[int], how: str) -> list[int]:
    """The weights stage 2 shares its continuations by, one per funded prompt (`AllocationConfig.stage2_share`):
    its bare rollouts ("roots"), or those of the prompts whose bare rollouts all succeed or all fail (the
    `bare_mixed`), 0 for the mixed ones ("unmixed"; all of them when none is)."""
    weights = [m[i] for i in funded]
    if how == "roots":
        return weights
    assert how == "unmixed", how
    unmixed = [not bare_mixed(pool[i]) for i in funded]
    if not any(unmixed):
        return weights
    return [w if u else 0 for w, u in zip(weights, unmixed, strict=True)]


def bare_mixed(tree: RolloutTree) -> bool:
    """Whether the prompt's bare rollouts hold both a success and a failure (by `SUCCESS_THRESHOLD`, as a mixed tree is
    defined), whatever stage 2 added."""
    return len({o >= SUCCESS_THRESHOLD for o in tree.root_outcomes()}) > 1
