"""Stage-1 and stage-2 allocation: exactness against brute force, budgets, baselines and the registry."""

import itertools
import math
import random

import pytest

from trainer.algo.allocation import (
    ALLOCATORS,
    AllocationConfig,
    Anchor,
    allocate_prefixes,
    allocate_roots,
    anchors_from_tree,
    entropy_prefixes,
    make_allocator,
    prefix_value,
    random_prefixes,
    root_value,
    split_rounds,
    topk_entropy,
    uniform_prefixes,
    uniform_roots,
)
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.config import load_train_config


def objective(v, m):
    return sum(root_value(x, k) for x, k in zip(v, m, strict=True))


def brute_roots(v, budget, options):
    """Largest reachable total <= budget first, then the best objective: (total, objective)."""
    best = None
    for m in itertools.product(options, repeat=len(v)):
        if sum(m) <= budget:
            key = (sum(m), round(objective(v, m), 12))
            best = key if best is None or key > best else best
    return best


def test_objectives():
    assert root_value(0.5, 0) == root_value(0.5, 1) == 0.0
    assert root_value(0.5, 2) == pytest.approx(0.5) and root_value(0.3, 3) == pytest.approx(1 - 0.027 - 0.343)
    assert root_value(1.0, 8) == 0.0
    # observed success (r=1), V=0.8: a continuation matches w.p. 0.8; two of them flip w.p. 1 - 0.64
    assert prefix_value(1.0, 0.8, 2) == pytest.approx(0.36)
    assert prefix_value(0.0, 0.8, 1) == pytest.approx(0.8)
    assert prefix_value(0.5, 0.8, 1) == pytest.approx(0.5)  # fractional r: q = .5*.8 + .5*.2


def test_greedy_counterexample_solved_exactly():
    """Greedy from 0 would give (4, 0) = 0.875; two groups of two are worth 1.0."""
    assert allocate_roots([0.5, 0.5], 4, m_min=1, m_max=8) == [2, 2]
    assert allocate_roots([0.5, 0.5], 4, m_min=0, m_max=8) == [2, 2]


@pytest.mark.parametrize("seed", range(6))
def test_roots_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(25):
        n = rng.randint(1, 4)
        v = [rng.choice([0.0, 1.0, 0.5, rng.random(), rng.random()]) for _ in range(n)]
        m_min = rng.randint(0, 3)
        m_max = rng.randint(max(m_min, 1), 5)
        budget = rng.randint(0, 14)
        m = allocate_roots(v, budget, m_min, m_max)
        assert all(k == 0 or m_min <= k <= m_max for k in m), (v, budget, m_min, m_max, m)
        options = [0, *range(max(m_min, 1), m_max + 1)]
        total, obj = brute_roots(v, budget, options)
        assert sum(m) == total and objective(v, m) == pytest.approx(obj, abs=1e-9), (v, budget, m_min, m_max, m)


@pytest.mark.parametrize("seed", range(4))
def test_roots_no_drop_greedy_and_dp_match_brute_force(seed):
    rng = random.Random(100 + seed)
    for _ in range(25):
        n = rng.randint(1, 4)
        v = [rng.random() for _ in range(n)]
        m_min = rng.randint(1, 3)
        m_max = rng.randint(m_min, 5)
        budget = rng.randint(n * m_min, n * m_max + 3)
        total, obj = brute_roots(v, budget, range(m_min, m_max + 1))
        for method in ("greedy", "dp"):
            m = allocate_roots(v, budget, m_min, m_max, drop=False, method=method)
            assert all(m_min <= k <= m_max for k in m), (method, m)
            assert sum(m) == total and objective(v, m) == pytest.approx(obj, abs=1e-9), (method, v, budget, m)


def test_roots_rejects_inexact_or_infeasible_requests():
    with pytest.raises(ValueError, match="exact only"):
        allocate_roots([0.5, 0.5], 4, 1, 4, method="greedy")
    with pytest.raises(ValueError, match="budget >= B"):
        allocate_roots([0.5, 0.5], 3, 2, 4, drop=False)
    with pytest.raises(AssertionError, match=r"v\[1\]=1.5"):
        allocate_roots([0.5, 1.5], 4, 1, 4)


def test_roots_prefers_uncertain_prompts_and_drops_settled_ones():
    v = [0.02, 0.5, 0.98, 0.4, 0.999]
    m = allocate_roots(v, 8, m_min=2, m_max=4)
    assert m == [0, 4, 0, 4, 0]
    assert sum(allocate_roots(v, 100, 2, 4)) == 20  # caps bind: everyone at m_max


def brute_prefixes(anchors, budget, cap):
    best = None
    for k in itertools.product(range(cap + 1), repeat=len(anchors)):
        if sum(k) <= budget:
            key = (sum(k), round(sum(prefix_value(a.r, a.v, x) for a, x in zip(anchors, k, strict=True)), 12))
            best = key if best is None or key > best else best
    return best


@pytest.mark.parametrize("seed", range(5))
def test_prefixes_greedy_matches_brute_force(seed):
    rng = random.Random(200 + seed)
    for _ in range(25):
        n = rng.randint(1, 4)
        anchors = [Anchor(i, rng.choice([0.0, 1.0, rng.random()]), rng.choice([rng.random(), 1.0])) for i in range(n)]
        cap = rng.randint(0, 4)
        budget = rng.randint(0, 12)
        k = allocate_prefixes(anchors, budget, cap)
        total, obj = brute_prefixes(anchors, budget, cap)
        got = sum(prefix_value(a.r, a.v, x) for a, x in zip(anchors, k, strict=True))
        assert sum(k) == total and got == pytest.approx(obj, abs=1e-9), (anchors, budget, cap, k)


def test_prefixes_favour_likely_flips():
    # a success whose prefix the predictor thinks is hopeless is the best place to look for a failure
    # gains q^k (1-q): anchor 1 (q=.95): .05, ...; anchor 2 (q=.2): .8, .16, ...; anchor 3 (q=.5): .5, .25, .125
    anchors = [Anchor(1, 1.0, 0.95), Anchor(2, 1.0, 0.2), Anchor(3, 0.0, 0.5)]
    assert allocate_prefixes(anchors, 1, 4) == [0, 1, 0]
    assert allocate_prefixes(anchors, 3, 4) == [0, 1, 2]
    assert allocate_prefixes(anchors, 5, 4) == [0, 2, 3]


def test_uniform_roots_reproduce_grpo_groups():
    assert uniform_roots(8, 40) == [5] * 8
    assert uniform_roots(3, 10) == [4, 3, 3]
    assert uniform_roots(4, 5, m_min=2) == [3, 2, 0, 0]
    assert uniform_roots(4, 1, m_min=2) == [0, 0, 0, 0]
    cfg = AllocationConfig(type="uniform", leaf_budget=32, root_budget=16, m_max=4)
    alloc = make_allocator("uniform")
    budget = alloc.stage1_budget(cfg)
    assert budget == 32  # no expansion: the roots get the continuations' share too (equal sampling cost)
    assert make_allocator("trace").stage1_budget(cfg) == 16
    assert alloc.roots([0.0, 0.3, 0.9, 1.0], budget, cfg) == [8, 8, 8, 8]  # m_max does not cap GRPO groups
    assert alloc.prefixes([Anchor(1, 1.0, 0.5)], 5, random.Random(0), cfg) == [0]


def test_uniform_and_random_prefixes():
    assert uniform_prefixes(3, 7, 4) == [3, 2, 2]
    assert uniform_prefixes(3, 20, 4) == [4, 4, 4]
    assert uniform_prefixes(0, 5, 4) == []
    a = random_prefixes(5, 9, 3, random.Random(7))
    assert a == random_prefixes(5, 9, 3, random.Random(7)) and sum(a) == 9 and max(a) <= 3
    assert random_prefixes(2, 10, 3, random.Random(0)) == [3, 3]
    assert split_rounds(7, 3) == [3, 2, 2]


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_budget_never_exceeded(name):
    rng = random.Random(1)
    alloc = make_allocator(name)
    for _ in range(40):
        root = rng.randint(1, 40)
        cfg = AllocationConfig(
            type=name,
            leaf_budget=root + rng.randint(0, 40),
            root_budget=root,
            m_min=rng.randint(0, 3),
            max_per_anchor=rng.randint(0, 5),
        )
        v = [rng.random() for _ in range(rng.randint(1, 12))]
        budget = alloc.stage1_budget(cfg)
        m = alloc.roots(v, budget, cfg)
        assert len(m) == len(v) and sum(m) <= budget and min(m) >= 0, (name, cfg, m)
        anchors = [Anchor(i, rng.random(), rng.random()) for i in range(rng.randint(0, 8))]
        pb = rng.randint(0, 30)
        k = alloc.prefixes(anchors, pb, rng, cfg)
        assert len(k) == len(anchors) and sum(k) <= pb and all(0 <= x <= cfg.max_per_anchor for x in k)
        if alloc.expands:
            assert sum(k) == min(pb, len(anchors) * cfg.max_per_anchor)


def test_topk_entropy_is_within_its_truncation_bounds():
    """topk_entropy of the n largest logprobs lies in [H - m log(V - n), H] (m the mass outside them), float64; exact
    when the top n hold all the mass, and a confident distribution is nearly exact."""
    rng = random.Random(3)
    for _ in range(200):
        vocab, n = rng.randint(2, 60), rng.randint(1, 8)
        logits = [rng.gauss(0.0, rng.choice([0.3, 2.0, 6.0])) for _ in range(vocab)]
        z = math.log(sum(math.exp(x) for x in logits))
        lps = sorted((x - z for x in logits), reverse=True)
        full = -sum(math.exp(x) * x for x in lps)
        top = lps[: min(n, vocab)]
        m = max(0.0, 1.0 - sum(math.exp(x) for x in top))
        got = topk_entropy(top)
        slack = m * math.log(max(vocab - len(top), 1)) + 1e-12
        assert full - slack <= got <= full + 1e-12, (vocab, n, got, full, m)
        assert topk_entropy(lps) == pytest.approx(full, abs=1e-12)
    assert topk_entropy([0.0]) == 0.0 and topk_entropy([math.log(0.5)] * 2) == pytest.approx(math.log(2))


def test_entropy_prefixes_take_the_top_k_then_spread_with_a_penalty():
    an = [Anchor(i, 0.0, 0.5, h) for i, h in enumerate([0.2, 1.5, None, 0.9, 1.4])]
    assert entropy_prefixes(an, 2, 4) == [0, 1, 0, 0, 1]  # AT2PO's top-K by entropy
    assert entropy_prefixes(an, 3, 4) == [0, 1, 0, 1, 1]
    assert entropy_prefixes(an, 4, 4) == [1, 1, 0, 1, 1]  # top-K whatever the gaps: 0.2 before a second on 1.5
    # past one each, h / (1 + k): 1.5 / 2 = 0.75 > 1.4 / 2 = 0.7 > 1.5 / 3 = 0.5 > 0.9 / 2; no entropy counts as 0
    assert entropy_prefixes(an, 6, 4) == [1, 2, 1, 1, 1] and entropy_prefixes(an, 8, 4) == [1, 3, 1, 1, 2]
    assert entropy_prefixes([Anchor(0, 0.0, 0.5, 2.0), Anchor(1, 0.0, 0.5, 0.5)], 2, 4) == [1, 1]
    assert entropy_prefixes(an, 20, 2) == [2, 2, 2, 2, 2] and entropy_prefixes(an, 7, 0) == [0] * 5
    assert entropy_prefixes([Anchor(0, 0.0, 0.5), Anchor(1, 1.0, 0.5)], 1, 4) == [1, 0]  # ties: lower index
    assert entropy_prefixes([Anchor(i, 0.0, 0.5) for i in range(3)], 3, 4) == [1, 1, 1], "no entropy: spread, not piled"
    assert entropy_prefixes([Anchor(i, 0.0, 0.5) for i in range(3)], 5, 4) == [2, 2, 1]
    with pytest.raises(AssertionError, match="finite"):
        entropy_prefixes([Anchor(0, 0.0, 0.5, float("nan"))], 1, 1)
    assert topk_entropy([1e-7]) == 0.0, "a logprob rounded above 0 is a certain token, not a negative entropy"
    greso = make_allocator("greso")  # GRPO's group shape on the prompts GRESO's filter kept, no tree
    assert not greso.selects and not greso.expands and greso.stage1_budget(AllocationConfig(leaf_budget=16)) == 16
    v = [0.02, 0.5, 0.97, 0.4]  # values are never read: the filter decided which prompts are here
    assert greso.roots(v, 16, AllocationConfig(group_size=4)) == [4, 4, 4, 4]
    ent = make_allocator("entropy")
    assert ent.needs_entropy and not ent.selects and ent.expands and ent.name == "uniform-entropy"
    assert not any(make_allocator(n).needs_entropy for n in ALLOCATORS if n != "entropy")
    with pytest.raises(ValueError, match="entropy_top_k"):
        AllocationConfig(entropy_top_k=0)


def test_make_allocator_per_stage_and_registry():
    assert make_allocator("trace").name == "active-active"
    assert make_allocator("root-only").name == "active-none"
    assert make_allocator("random-node").name == "uniform-random"
    a = make_allocator(stage1="active", stage2="uniform")
    assert a.name == "active-uniform" and a.expands
    with pytest.raises(ValueError, match=r"unknown allocator 'nope'.*STAGE1\+STAGE2"):
        make_allocator("nope")
    with pytest.raises(ValueError, match="stage 1 'greedy'"):
        make_allocator(stage1="greedy", stage2="active")
    with pytest.raises(ValueError, match="unknown allocator"):
        AllocationConfig(type="nope")
    # The paper's per-stage ablation by name (issue: DESIGN "Uniform/active can be chosen per stage"): any pair.
    s2 = make_allocator("uniform+active")  # TRACE's stage 2 alone, on GRPO's stage 1
    assert s2.name == "uniform-active" and s2.expands and not s2.selects and not s2.needs_entropy
    assert make_allocator("active+uniform").name == a.name
    assert make_allocator("skip+entropy").needs_entropy and make_allocator("greso+none").stage1 == "greso"
    bad_pairs = (("uniform+nope", "stage 2 'nope'"), ("a+b+c", "unknown allocator"), ("+", "stage 1 ''"))
    for bad, msg in (*bad_pairs, ("greso+active", "'greso' goes with stage 2 'none' only")):
        with pytest.raises(ValueError, match=msg):
            make_allocator(bad)
    assert AllocationConfig(type="uniform+active").type == "uniform+active"
    cfg = load_train_config(None, ['allocation.type="uniform+active"'])
    assert make_allocator(cfg.allocation.type).stage2 == "active"
    with pytest.raises(ValueError, match="stage 2 'greedy'"):
        load_train_config(None, ['allocation.type="active+greedy"'])
    assert not make_allocator("uniform").selects and not make_allocator("random-node").selects
    assert make_allocator("trace").selects and make_allocator("root-only").selects
    assert AllocationConfig().leaf_budget == 128 and AllocationConfig().root_budget == 64


def test_anchors_from_tree():
    t = RolloutTree.new("p", "q", ["a"], [1], "s0")
    a = t.add_child(0, [5, 6], [1, 0], [-0.1, 0.0], snapshot_id="s1")
    t.add_child(a.node_id, [7], [1], [-0.2], status=FinishStatus.ANSWERED, reward=1.0)
    t.add_child(0, [8], [1], [-0.2], status=FinishStatus.ANSWERED, reward=0.0)
    t.backup()
    with pytest.raises(AssertionError, match="no predicted"):
        anchors_from_tree(t)
    a.predicted = 0.25
    assert anchors_from_tree(t) == [Anchor(1, 1.0, 0.25)]
    assert anchors_from_tree(t, max_turns=1) == []


def test_skip_roots_keeps_breadth_and_skips_confident_prompts() -> None:
    """Issue 22's GRESO-style stage 1: m rollouts a prompt in stream order, prompts valued within eps of 0 or 1
    skipped unless too few remain, the remainder one each to the first funded."""
    from trainer.algo.allocation import skip_roots

    v = [0.5, 0.02, 0.3, 0.99, 0.6, 0.4, 0.5]
    assert skip_roots(v, 8, 2, 0.1) == [2, 0, 2, 0, 2, 2, 0]
    assert skip_roots(v, 9, 2, 0.1) == [3, 0, 2, 0, 2, 2, 0], "the remainder to the first funded prompt"
    assert skip_roots(v, 12, 2, 0.1) == [2, 2, 2, 0, 2, 2, 2], "too few unskipped: skipped ones in stream order"
    assert skip_roots(v, 8, 2, 0.0) == [2, 2, 2, 2, 0, 0, 0], "eps 0 skips nothing: a uniform stage 1"
    assert sum(skip_roots([0.5] * 10, 17, 2, 0.1)) == 17


def test_greso_filter_skips_by_zero_variance_streaks_and_adapts() -> None:
    """GRESO's filter (Zheng et al., 2025, as its released code runs it): a prompt with z zero-variance visits of one
    kind in a row is kept with probability max(p^z, 0.01) (p_easy or p_hard by that kind); unseen or mixed prompts
    always, without a draw; p moves by `step` towards target / 3 easy and 2 target / 3 hard prompts among those rolled
    out (at or above: down), within [p_min, p_max], and only when asked to (after the first pass of the data)."""
    from trainer.algo.allocation import GresoFilter

    f = GresoFilter(p=0.5, target=0.3, step=0.1)
    rng = random.Random(0)
    state = rng.getstate()
    assert all(f.keep(i, rng) for i in range(50)) and rng.getstate() == state, "no history: GRPO, no draw"
    # 0 all-success (easy), 1 all-failure (hard), 2 mixed, 3 a single rollout (ignored); the first pass: no adapting
    f.observe({0: [1.0, 1.0], 1: [0.0, 0.0, 0.0], 2: [1.0, 0.0], 3: [1.0]}, adapt=False)
    assert [f.keep_probability(i) for i in range(4)] == [0.5, 0.5, 1.0, 1.0] and f.p_easy == f.p_hard == 0.5
    f.observe({0: [1.0, 1.0], 1: [0.0, 1.0], 5: [1.0, 0.0], 6: [1.0, 0.0], 7: [0.0, 1.0]})
    # easy 1/5 >= 0.1: p_easy 0.4; hard 0/5 < 0.2: p_hard 0.6; prompt 0 has z = 2, prompt 1's streak ended
    assert (f.p_easy, f.p_hard) == (pytest.approx(0.4), pytest.approx(0.6))
    assert f.keep_probability(0) == pytest.approx(0.4**2) and f.keep_probability(1) == 1.0
    f.observe({0: [0.0, 0.0], 4: [0.0, 0.0]})  # prompt 0 turns hard: a new streak of its new kind
    assert f.keep_probability(0) == pytest.approx(0.5) and f.keep_probability(4) == pytest.approx(0.5)
    f.observe({4: [0.0, 0.0]})  # hard share 1 >= 0.2 again: p_hard 0.4, and prompt 4's z = 2
    assert f.keep_probability(4) == pytest.approx(0.4**2)
    kept = sum(f.keep(4, random.Random(s)) for s in range(4000)) / 4000
    assert abs(kept - 0.16) < 0.03, kept
    g = GresoFilter()
    g.load_state_dict(f.state_dict())
    assert [g.keep_probability(i) for i in range(8)] == [f.keep_probability(i) for i in range(8)]
    for _ in range(200):  # p stays in [p_min, p_max], a long streak's keep probability at min_keep
        f.observe({9: [0.0, 0.0]})
    assert f.p_hard == pytest.approx(0.05) and f.keep_probability(9) == 0.01
    with pytest.raises(ValueError, match="GRESO"):
        GresoFilter(p=1.5)
    with pytest.raises(ValueError, match="GRESO"):
        GresoFilter(p=0.01)  # below p_min
    with pytest.raises(ValueError, match="GRESO"):
        AllocationConfig(greso_target=-0.1)


def test_draw_kept_consumes_skipped_prompts_and_fills_in_when_too_few_pass() -> None:
    from trainer.algo.plan import draw_kept
    from trainer.algo.step import PromptSampler

    s = PromptSampler(10, seed=3)
    order = PromptSampler(10, seed=3).take(10)
    odd = lambda i: i % 2 == 1  # noqa: E731
    got, skipped = draw_kept(s, 3, odd)
    want = [i for i in order if i % 2][:3]
    assert got == want and skipped == order.index(want[-1]) + 1 - 3
    # the skipped ones were consumed: the next draw goes on from where this one stopped
    rest = order[order.index(want[-1]) + 1 :]
    got2, _ = draw_kept(s, 2, odd)
    assert got2 == [i for i in rest if i % 2][:2]
    # nothing passes: at most one whole pass is examined, then the first skipped fill in, distinct
    s = PromptSampler(6, seed=1)
    got, skipped = draw_kept(s, 4, lambda i: False)
    assert len(set(got)) == 4 and skipped == 2
    got, skipped = draw_kept(PromptSampler(6, seed=1), 6, lambda i: i == 2)
    assert sorted(got) == list(range(6)) and got[0] == 2 and skipped == 0
    # the stream wraps into its next pass within a call: a prompt it gives again goes back to the front, not lost
    first, ref = PromptSampler(6, seed=0).take(6), PromptSampler(6, seed=0)
    ref.take(6)
    second = ref.take(6)
    tail = first[4:]
    assert second[0] not in tail and set(second[1:3]) == set(tail), "the case this checks: seed 0's two passes"
    s = PromptSampler(6, seed=0)
    s.take(4)
    got, skipped = draw_kept(s, 3, lambda i: False)
    assert got == [*tail, second[0]] and skipped == 3
    assert s.returned == second[1:3], "the tail's next-pass visits come first next step"


def test_a_dropped_prompts_replacement_is_drawn_as_the_allocators_stage_1_draws() -> None:
    """_recover's replacement for a dropped prompt (`draw_replacement`): the stream's next prompt not in the step,
    in-step prompts the stream gives going back to its front; under greso, through the real filter: a prompt whose
    history says all-0 is skipped (consumed for the pass, counted) and the next one takes the leaves; if nothing
    passes, the first skipped fills in; every prompt in the step: none."""
    from trainer.algo.allocation import GresoFilter
    from trainer.algo.plan import draw_replacement
    from trainer.algo.step import PromptSampler

    order = PromptSampler(8, seed=5).take(8)
    s = PromptSampler(8, seed=5)
    in_step = set(order[:3])
    assert draw_replacement(s, in_step) == (order[3], 0)
    assert s.take(3) == order[:3], "the in-step prompts it passed over wait at the stream's front"
    assert s.take(4) == order[4:], "nothing else was consumed"

    never = GresoFilter(p=0.0, p_min=0.0, min_keep=0.0)  # a zero-variance streak: never kept
    never.observe({order[3]: [0.0, 0.0], order[4]: [1.0, 1.0], order[5]: [0.0, 1.0]})
    rng = random.Random(0)
    s = PromptSampler(8, seed=5)
    got = draw_replacement(s, in_step, lambda i: never.keep(i, rng))
    assert got == (order[5], 2), "the all-0 and all-1 prompts skipped, the mixed one takes the leaves"
    assert s.take(3) == order[:3] and s.take(2) == order[6:], "the skipped two were consumed for the pass"

    s = PromptSampler(8, seed=5)
    none_pass = draw_replacement(s, set(order[:6]), lambda i: False)
    assert none_pass == (order[6], 1), "nothing passes: the first skipped fills in, the other is consumed"
    assert draw_replacement(PromptSampler(8, seed=5), set(range(8))) == (None, 0)
