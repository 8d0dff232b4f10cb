"""The leaf budget (trainer/algo/allocation.py, "The leaf budget"): every allocator spends exactly
allocation.leaf_budget rollouts a step, continuations that cannot be placed are re-spent in a fixed order and
never dropped, the config refuses settings that cannot spend the budget, and stage 1 chooses among a candidate
pool, valuing prompts it has never seen by the predictor.

Guards against the bugs of the equal-cost comparison: a prompt's continuation budget with no open anchor was
dropped, per-prompt flooring lost leaves at a fractional expansion factor, root-only spent fewer leaves than
trace when prompts x m_max capped it, and stage 1 chose among the very prompts it funded."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from shared.client import EnvClient
from trainer.algo.allocation import (
    ALLOCATORS,
    AllocationConfig,
    GresoFilter,
    anchors_from_tree,
    make_allocator,
    place_continuations,
    plan_round,
    share,
    top_up_roots,
)
from trainer.algo.predictor import SuccessPredictor
from trainer.algo.rollout import RolloutConfig, RolloutRunner
from trainer.algo.step import PromptSampler, TraceStep
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.config import TrainConfig, load_train_config
from trainer.engines.client import EngineClient
from trainer.evaluate import split_size

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- exact shares
def test_share_is_exact_proportional_and_capped() -> None:
    rng = random.Random(0)
    assert share(4, [3, 3, 2]) == [2, 1, 1]  # remainders .5, .5, 0: ties to the lower index
    assert share(7, [1, 1], [2, 10]) == [2, 5]  # the capped one's excess goes to the other
    assert share(5, [0, 0, 0]) == [2, 2, 1]  # no weight: evenly
    assert share(9, [1, 1], [2, 3]) == [2, 3]  # more than the caps: sum = min(total, sum(caps))
    for _ in range(300):
        n = rng.randint(1, 6)
        w = [rng.randint(0, 5) for _ in range(n)]
        total = rng.randint(0, 40)
        out = share(total, w)
        assert sum(out) == total, (total, w, out)
        if sum(w):
            assert all(abs(o - total * x / sum(w)) < 1 for o, x in zip(out, w, strict=True)), (total, w, out)
        caps = [rng.randint(0, 8) for _ in range(n)]
        out = share(total, w, caps)
        assert sum(out) == min(total, sum(caps)) and all(o <= c for o, c in zip(out, caps, strict=True))


def test_fractional_expansion_loses_no_leaf() -> None:
    """The debug config's old rule, floor(m_i * 0.5) per prompt, spent 3 of 4 continuations for m = (3, 3, 2)."""
    assert sum(share(12 - 8, [3, 3, 2])) == 4


# ---------------------------------------------------------------------------------------------- spill-over order
def _tree(pid: str, n_anchor_chains: int, n_turn1: int, predicted: float = 0.5) -> RolloutTree:
    """A hand-built backed-up tree: `n_anchor_chains` bare rollouts of two turns (their first turn is an open
    anchor) and `n_turn1` bare rollouts that answered at turn 1 (no anchor)."""
    t = RolloutTree.new(pid, "q", ["a"], [1, 2], "s0")
    for j in range(n_anchor_chains):
        mid = t.add_child(0, [5], [1], [-0.1], snapshot_id=f"{pid}-s{j}")
        t.add_child(mid.node_id, [6], [1], [-0.1], status=FinishStatus.ANSWERED, reward=float(j % 2))
    for _ in range(n_turn1):
        t.add_child(0, [7], [1], [-0.1], status=FinishStatus.ANSWERED, reward=0.0)
    t.backup()
    for n in t.anchors():
        n.predicted = predicted
    return t


@pytest.mark.parametrize("name", [n for n in sorted(ALLOCATORS) if make_allocator(n).expands])
def test_spill_order_same_prompt_then_other_prompts_then_new_roots(name: str) -> None:
    alloc = make_allocator(name)
    cfg = AllocationConfig(type=name, leaf_budget=20, root_budget=6, max_per_anchor=2)
    a = _tree("a", n_anchor_chains=2, n_turn1=0)  # 2 anchors: room for 4
    b = _tree("b", n_anchor_chains=1, n_turn1=1)  # 1 anchor: room for 2
    c = _tree("c", n_anchor_chains=0, n_turn1=2)  # every rollout answered at turn 1: no anchor
    anchors = [anchors_from_tree(t) for t in (a, b, c)]
    assert [len(x) for x in anchors] == [2, 1, 0]
    rng = random.Random(0)
    # 1. The same prompt's other anchors first: a wants 3, more than one anchor takes; nothing moves.
    plan, left = plan_round(alloc, anchors, [3, 0, 0], [2, 2, 2], rng, cfg)
    assert [sum(k) for k in plan] == [3, 0, 0] and left == 0 and max(plan[0]) == 2
    # 2. Then other prompts' anchors: b wants 3 (room 2) and c wants 2 (room 0); a has room 4 - 1.
    plan, left = plan_round(alloc, anchors, [1, 3, 2], [2, 2, 2], rng, cfg)
    assert [sum(k) for k in plan] == [4, 2, 0] and left == 0
    # 3. Then new roots: every anchor is full and 3 remain.
    plan, left = plan_round(alloc, anchors, [4, 3, 2], [2, 2, 2], rng, cfg)
    assert [sum(k) for k in plan] == [4, 2, 0] and left == 3
    assert all(k <= cfg.max_per_anchor for ks in plan for k in ks)


def test_other_prompts_take_the_spill_in_proportion_to_their_roots() -> None:
    kept, left = place_continuations([0, 0, 6], [10, 10, 0], [1, 3, 2])
    assert kept == [2, 4, 0] and left == 0  # 6 split 1 : 3 over the two with room (1.5 / 4.5 -> 2 / 4)
    kept, left = place_continuations([0, 0, 6], [1, 10, 0], [1, 1, 2])
    assert kept == [1, 5, 0] and left == 0  # the first is capped at 1: the rest goes to the second


def test_spill_roots_new_prompts_first_then_funded_prompts() -> None:
    cfg = AllocationConfig(type="trace", leaf_budget=20, root_budget=6, m_min=2, m_max=3)
    trace = make_allocator("trace")
    # New candidates first, valued as at stage 1: the one near 0.5 before the settled one.
    extra, new = trace.spill_roots([0.5, 0.5], [3, 3], [0.01, 0.5], 3, cfg)
    assert extra == [0, 0] and new == [0, 3]
    # What cannot form a group of m_min goes as extra bare rollouts of funded prompts, below m_max first.
    extra, new = trace.spill_roots([0.5, 0.5], [3, 2], [0.5], 1, cfg)
    assert extra == [0, 1] and new == [0]
    # Nothing else can take it: beyond m_max, never dropped.
    extra, new = trace.spill_roots([0.5], [3], [], 2, cfg)
    assert extra == [2] and new == []
    # A uniform stage 1 ignores values: new prompts of the stream evenly, else the funded prompts evenly.
    rn = make_allocator("random-node")
    assert rn.spill_roots([0.9, 0.1], [2, 2], [0.0, 1.0], 5, cfg) == ([0, 0], [3, 2])
    assert rn.spill_roots([0.9, 0.1], [2, 2], [], 3, cfg) == ([2, 1], [])
    assert top_up_roots([0.5, 0.05], [2, 2], 3, cap=4) == [2, 1]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (['allocation.type="root-only"', "run.pool_size=16", "allocation.m_max=2"], "run.pool_size"),
        (['allocation.type="trace"', "allocation.root_budget=80"], "allocation.root_budget"),
        (['allocation.type="trace"', "allocation.root_budget=1", "allocation.m_min=2"], "m_min"),
        (['allocation.type="root-only"', "allocation.leaf_budget=1", "allocation.m_min=2"], "m_min"),
        (['allocation.type="uniform"', "allocation.group_size=1"], "allocation.group_size"),
        (['allocation.type="uniform"', "allocation.group_size=65"], "allocation.group_size"),
        (['allocation.type="uniform"', "run.prompts_per_step=64"], "run.prompts_per_step"),
        (['allocation.type="random-node"', "run.prompts_per_step=32"], "run.prompts_per_step"),
        (['allocation.type="trace"', "run.pool_size=8"], "run.pool_size"),
        (["run.pool_size=0"], "run.pool_size"),
    ],
)
def test_config_refuses_budgets_an_allocator_cannot_spend(sets: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_train_config(None, sets)


@pytest.mark.parametrize("config", [None, "debug.toml", "compare.toml", "qwen3-8b-hotpotqa.toml"])
def test_shipped_configs_keep_their_leaf_totals(config: str | None) -> None:
    path = None if config is None else REPO / "configs" / config
    want = {None: (64, 32), "debug.toml": (12, 8), "compare.toml": (64, 32), "qwen3-8b-hotpotqa.toml": (1536, 512)}
    for name in ALLOCATORS:
        cfg = load_train_config(path, [f'allocation.type="{name}"'])
        assert (cfg.allocation.leaf_budget, cfg.allocation.root_budget) == want[config]
    assert TrainConfig().run.pool_size == 4 * TrainConfig().run.prompts_per_step


# ---------------------------------------------------------------------------------------------- candidate pool
async def test_stage1_funds_the_unseen_prompts_whose_features_say_mixed() -> None:
    """A predictor fitted on synthetic features where feature 0 = 1 means p ~ 0.5 (else p ~ 0.02) values twelve
    prompts never seen before from their own features; stage 1 funds exactly the four that carry the signal."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=gen)
    x[:, 0] = (torch.rand(3000, generator=gen) < 0.4).float()
    p = torch.where(x[:, 0] > 0.5, 0.5, 0.02)
    y = (torch.rand(3000, generator=gen) < p).float()
    predictor = SuccessPredictor(8, hidden=16, lr=1e-2, seed=0)
    predictor.fit(x, y, epochs=30)

    cfg = load_train_config(None, ["predictor.use_hidden_state=false", "run.pool_size=16", "run.prompts_per_step=4"])
    cfg.allocation = AllocationConfig(type="trace", leaf_budget=24, root_budget=12, m_min=2, m_max=3)
    step = TraceStep(cfg, policy=None, runner=None, n_train=100)  # type: ignore[arg-type]  # features given
    step.predictor, step.fitted = predictor, True
    mixed = {1, 4, 7, 10}
    pool = []
    for i in range(12):
        t = RolloutTree.new(f"unseen-{i}", "q", [], [1, 2, 3], f"s{i}")
        t.root.features = [1.0 if i in mixed else 0.0, *torch.randn(7, generator=gen).tolist()]
        pool.append(t)
    v = await step.value_roots(pool)
    assert all(0.2 < v[i] < 0.8 for i in mixed) and all(v[i] < 0.15 for i in range(12) if i not in mixed), v
    m = step.allocator.roots(v, step.allocator.stage1_budget(cfg.allocation), cfg.allocation)
    assert {i for i, mi in enumerate(m) if mi} == mixed, m
    # An unseen prompt's value is the predictor's; a seen one's is its Beta posterior centred there.
    rv = float(predictor.predict(torch.tensor([pool[1].root.features]))[0])
    assert v[1] == pytest.approx(rv, abs=1e-6)
    step.prior.update("unseen-1", [1.0, 1.0, 1.0, 1.0])
    pool[1].root.predicted = None
    [seen] = await step.value_roots([pool[1]])
    assert seen == pytest.approx((rv * 2 + 4) / (2 + 4), abs=1e-6)  # prior a + b = 2 pseudo-counts


# ---------------------------------------------------------------------------------------------- real trees
@pytest.mark.parametrize("max_turns", [1, 3])
async def test_every_allocator_spends_exactly_the_leaf_budget_on_real_trees(
    max_turns: int, make_env_server, engine_url: str, tiny_model: Path
) -> None:
    """Real rollouts (the tiny model on the CPU engine, the synthetic world on a real env server). With
    env.max_turns = 1 every rollout ends at turn 1, so no tree has an anchor: every continuation of trace and
    random-node must come back as new roots. With 3 turns and max_per_anchor = 1 anchors fill up and spill."""
    server = await make_env_server(max_turns=8)  # the trainer's max_turns, sent on create, must win
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EnvClient(server.url) as env, EngineClient([engine_url]) as engine:
        n_train = split_size(await env.info(), "synthetic", "train")
        runner = RolloutRunner(env, engine, tok, RolloutConfig(max_new_tokens=12, max_context_tokens=512))
        for name in [*sorted(ALLOCATORS), "uniform+active"]:  # and a pair of stages (the per-stage ablation)
            cfg = load_train_config(
                None,
                [
                    f'allocation.type="{name}"',
                    "allocation.leaf_budget=11",  # odd: shares, groups and rounds do not divide it
                    "allocation.root_budget=5",
                    "allocation.m_min=2",
                    "allocation.m_max=3",
                    "allocation.max_per_anchor=1",
                    "allocation.rounds=2",
                    "run.prompts_per_step=2",
                    "run.pool_size=6",
                    f"env.max_turns={max_turns}",
                    "predictor.use_hidden_state=false",
                ],
            )
            step = TraceStep(cfg, policy=None, runner=runner, n_train=n_train)  # type: ignore[arg-type]
            for s in range(2):  # the second step draws the prompts the first gave back
                batch = await step.collect(s)
                leaves = [n for t in batch.trees for n in t.leaves()]
                assert len(leaves) == sum(t.ledger.leaves for t in batch.trees) == 11, (name, max_turns)
                assert all(t.leaves() for t in batch.trees), "batch.trees = exactly the prompts with rollouts"
                assert len({t.prompt_id for t in batch.trees}) == len(batch.trees)
                assert all(n.depth <= max_turns for n in leaves)
                mt = batch.metrics
                assert mt["leaf_budget"] == 11 and mt["roots"] + mt["continuations"] + mt["respent_as_roots"] == 11
                assert batch.selected == len(batch.trees) <= batch.pool_size
                if max_turns == 1:
                    assert mt["continuations"] == 0
                if not make_allocator(name).expands:
                    assert mt["roots"] == 11
                for t in batch.trees:
                    t.validate()


def test_stage2_shares_by_roots_or_among_unmixed_prompts_only() -> None:
    """Issue 22: allocation.stage2_share. "roots" (the paper's) weighs every funded prompt by its bare rollouts;
    "unmixed" only the prompts whose bare rollouts all succeed or all fail (a mixed one has its contrast already),
    and every prompt again when none is unmixed."""
    from trainer.algo.allocation import AllocationConfig
    from trainer.algo.plan import stage2_weights
    from trainer.algo.tree import FinishStatus, RolloutTree

    def tree(rewards: list[float]) -> RolloutTree:
        t = RolloutTree.new("p", "q", ["a"], [1, 2], "s")
        for r in rewards:
            t.add_child(0, [5, 6], [1, 1], [-0.1, -0.2], status=FinishStatus.ANSWERED, reward=r)
        return t

    pool = [tree([1.0, 0.0]), tree([0.0, 0.0, 0.0]), tree([1.0] * 4), tree([])]
    m = [2, 3, 4, 0]
    funded = [0, 1, 2]
    assert stage2_weights(pool, funded, m, "roots") == [2, 3, 4]
    assert stage2_weights(pool, funded, m, "unmixed") == [0, 3, 4]
    mixed = [tree([1.0, 0.0]), tree([0.0, 1.0, 1.0])]
    assert stage2_weights(mixed, [0, 1], [2, 3], "unmixed") == [2, 3], "none unmixed: every prompt"
    with pytest.raises(ValueError, match="stage2_share"):
        AllocationConfig(stage2_share="deepest")


async def test_entropy_allocator_branches_where_the_engine_says_the_policy_is_uncertain(
    make_env_server, engine_url: str, tiny_model: Path
) -> None:
    """Issue 25: the "entropy" allocator on real trees. The rollouts ask the CPU engine for top logprobs, so every
    generated turn carries its entropy (the mean `topk_entropy` of its first tokens, in [0, log V]); each anchor reads
    it off the turn its chain generated next; each expanded prompt's first continuations went to its highest-entropy
    anchors; and the step spends exactly the leaf budget, like every allocator."""
    from trainer.algo.allocation import entropy_prefixes

    server = await make_env_server(max_turns=8)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EnvClient(server.url) as env, EngineClient([engine_url]) as engine:
        n_train = split_size(await env.info(), "synthetic", "train")
        rollout = RolloutConfig(max_new_tokens=12, max_context_tokens=512)
        runner = RolloutRunner(env, engine, tok, rollout, top_logprobs=5, entropy_tokens=4)
        sets = ['allocation.type="entropy"', "allocation.leaf_budget=12", "allocation.root_budget=6"]
        sets += ["allocation.max_per_anchor=1", "run.prompts_per_step=3", "env.max_turns=3"]
        cfg = load_train_config(None, [*sets, "predictor.use_hidden_state=false"])
        step = TraceStep(cfg, policy=None, runner=runner, n_train=n_train)  # type: ignore[arg-type]
        batch = await step.collect(0)
    assert sum(t.ledger.leaves for t in batch.trees) == 12 and batch.metrics["continuations"] > 0
    turns = [n for t in batch.trees for n in t.nodes[1:] if n.num_generated]
    assert turns and all(n.entropy is not None and 0.0 <= n.entropy <= math.log(2048) for n in turns)
    assert len({round(n.entropy, 6) for n in turns}) > len(turns) // 2  # a signal, not a constant
    checked = 0
    for t in batch.trees:
        # stage 2's anchors (one round): the open turns of the bare rollouts, below env.max_turns
        anchors = [n for n in t.nodes[1:] if n.info.get("round") == 0 and n.children and n.depth < 3]
        got = [len(n.children) - 1 for n in anchors]  # continuations each anchor received (one round)
        if sum(got):
            h = [t.nodes[n.children[0]].entropy for n in anchors]
            from trainer.algo.allocation import Anchor

            want = entropy_prefixes(
                [Anchor(n.node_id, 0.0, 0.5, x) for n, x in zip(anchors, h, strict=True)], sum(got), 1
            )
            assert got == want, (t.prompt_id, h, got)
            checked += 1
    assert checked


async def test_greso_skips_prompts_whose_last_visit_was_zero_variance_on_real_trees(
    make_env_server, engine_url: str, tiny_model: Path
) -> None:
    """GRESO on real rollouts over a 4-prompt split, 2 prompts a step: the first pass (steps 0-1) has no history,
    so nothing is skipped; the untrained tiny model fails every rollout, so every prompt comes back all-0, and with a
    keep probability of 0 the second pass (step 2) skips all four, consumed, and the first two skipped fill in."""
    server = await make_env_server(max_turns=2)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EnvClient(server.url) as env, EngineClient([engine_url]) as engine:
        runner = RolloutRunner(env, engine, tok, RolloutConfig(max_new_tokens=8, max_context_tokens=512))
        sets = ['allocation.type="greso"', "allocation.leaf_budget=4", "allocation.group_size=2"]
        sets += ["env.max_turns=2", "predictor.use_hidden_state=false"]
        cfg = load_train_config(None, [*sets, "run.prompts_per_step=2", "run.pool_size=8"])
        step = TraceStep(cfg, policy=None, runner=runner, n_train=4)  # type: ignore[arg-type]
        step.greso = GresoFilter(p=0.0, p_min=0.0, min_keep=0.0)  # a streak is always skipped: the test is exact
        ref = PromptSampler(4, cfg.run.seed)
        ref.take(4)
        second_pass = ref.take(4)
        seen = []
        for s in range(3):
            before = step.greso.state_dict()
            batch = await step.collect(s)
            assert sum(t.ledger.leaves for t in batch.trees) == 4 and len(batch.trees) == 2
            assert all(t.root_outcomes() == [0.0, 0.0] for t in batch.trees), "the untrained model fails"
            seen.append(batch.metrics["prompts_skipped"])
            assert batch.metrics["greso_p_hard"] == 0.0
            assert batch.metrics["data_epoch"] == [0.5, 1.0, 2.0][s]  # 2, then 4 of 4 prompts; then a whole pass
        assert seen == [0.0, 0.0, 2.0]
        assert step.greso.streak == dict.fromkeys(second_pass[:2], 2) | dict.fromkeys(second_pass[2:], 1)
        assert step.sampler.epoch == 1 and step.sampler.pos == 4, "the whole second pass was examined"
        # a checkpoint written while step 2's collection overlaps step 1's update holds the history from before it
        assert step.state_dict(at_step=2)["greso"] == before != step.state_dict()["greso"]
