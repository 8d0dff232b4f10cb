"""Tree-aware advantages: hand-computed trees, GRPO equivalence on chains, sample layout and metrics."""

import math
import random

import pytest
import torch

from trainer.algo.advantages import (
    AdvantageConfig,
    build_training_samples,
    effective_ratio,
    mixed_per_100_leaves,
    node_advantages,
    node_terms,
    nonzero_adv_token_frac,
)
from trainer.algo.tree import FinishStatus, RolloutTree

DONE = FinishStatus.ANSWERED


def turn(tree, parent, n_gen=2, n_obs=1, **attrs):
    base = 100 + 10 * len(tree.nodes)
    ids = list(range(base, base + n_gen + n_obs))
    lps = [-0.1 * (k + 1) for k in range(n_gen)] + [0.0] * n_obs
    return tree.add_child(parent, ids, [1] * n_gen + [0] * n_obs, lps, **attrs)


def hand_tree():
    """root(0) -> 1 -> {2: r=1, 3 -> {4: r=0, 5: r=0}}; root -> 6: r=1."""
    t = RolloutTree.new("p", "q", ["a"], [1, 2, 3], "s")
    turn(t, 0)
    turn(t, 1, status=DONE, reward=1.0)
    turn(t, 1)
    turn(t, 3, status=DONE, reward=0.0)
    turn(t, 3, n_obs=0, status=FinishStatus.TRUNCATED, reward=0.0)
    turn(t, 0, status=DONE, reward=1.0)
    t.backup()
    return t


# Hand computation with population std (ddof 0) and eps 0. Read as grown: bare rollouts 1->2 (r=1) and 6 (r=1);
# continuation 3->4 (r=0) added at node 1, continuation 5 (r=0) added at node 3. Recomputed when the values moved
# from visit-weighted leaf means to fresh-sample means (trainer.algo.tree); the tree and the checks are unchanged.
# rewards (1, 0, 0, 1): sigma = .5 (all leaves); mu = Vhat(root) = mean O(bare) = mean(1, 1) = 1.
# Vhat: root 1, n1 O(3) = 0, n2 1, n3 O(5) = 0, n4 0, n5 0, n6 1.
# outcome (V - 1) / .5:   n1 -2, n2 0, n3 -2, n4 -2, n5 -2, n6 0
# process V - V(parent):  n1 -1, n2 1, n3 0,  n4 0,  n5 0,  n6 0
HAND = AdvantageConfig(w_outcome=1.0, w_process=1.0, eps=0.0, std_ddof=0)
EXPECTED_TERMS = {1: (-2, -1), 2: (0, 1), 3: (-2, 0), 4: (-2, 0), 5: (-2, 0), 6: (0, 0)}
EXPECTED_ADV = {1: -3.0, 2: 1.0, 3: -2.0, 4: -2.0, 5: -2.0, 6: 0.0}


def test_hand_computed_terms_and_advantages():
    t = hand_tree()
    terms = node_terms(t, HAND)
    assert terms.keys() == EXPECTED_TERMS.keys()
    for i, (o, p) in EXPECTED_TERMS.items():
        assert terms[i] == pytest.approx((o, p)), i
    assert node_advantages(t, HAND) == pytest.approx(EXPECTED_ADV)
    # weights: outcome only, process only, process switched off
    assert node_advantages(t, AdvantageConfig(w_process=0.0, eps=0.0, std_ddof=0))[3] == pytest.approx(-2.0)
    assert node_advantages(t, AdvantageConfig(w_outcome=0.0))[2] == pytest.approx(1.0)
    assert node_advantages(t, HAND, process=False) == pytest.approx({i: o for i, (o, _) in EXPECTED_TERMS.items()})
    # Dr. GRPO: no std scaling -> outcome = V - mu
    assert node_terms(t, AdvantageConfig(scale_by_std=False))[1][0] == pytest.approx(-1.0)


def test_samples_layout_and_shared_prefix_trained_once():
    t = hand_tree()
    samples = build_training_samples([t], HAND)
    assert [s.leaf_id for s in samples] == [2, 4, 5, 6]
    s = samples[1]  # path 0 -> 1 -> 3 -> 4
    assert s.input_ids == t.history_ids(4) and len(s) == 3 + 3 * 3
    assert s.segments == [(0, 0, 3), (1, 3, 6), (3, 6, 9), (4, 9, 12)]
    assert s.loss_mask == [0, 0, 0] + [1, 1, 0] * 3
    assert s.advantages == pytest.approx([0, 0, 0, -3, -3, 0, -2, -2, 0, -2, -2, 0])
    assert s.weights == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 0, 1 / 2, 1 / 2, 0, 1, 1, 0])
    assert s.engine_logprobs == pytest.approx([0, 0, 0, -0.1, -0.2, 0, -0.1, -0.2, 0, -0.1, -0.2, 0])
    assert samples[2].loss_mask[-2:] == [1, 1]  # leaf 5 has no observation tokens
    # every node's tokens carry total weight 1 over all samples: each node is trained once
    per_node: dict[int, float] = {}
    for s in samples:
        for node_id, a, _end in s.segments[1:]:
            per_node[node_id] = per_node.get(node_id, 0.0) + s.weights[a]
    assert per_node == pytest.approx({i: 1.0 for i in range(1, 7)})


def grpo(rewards):
    r = torch.tensor(rewards)
    return ((r - r.mean()) / (r.std() + 1e-6)).tolist()  # verl's compute_grpo_outcome_advantage


@pytest.mark.parametrize("seed", range(3))
def test_chain_trees_reproduce_grpo(seed):
    rng = random.Random(seed)
    trees, expected = [], []
    for p in range(4):
        t = RolloutTree.new(f"p{p}", "q", ["a"], [1, 2], None)
        rewards = [float(rng.random() < 0.5) for _ in range(5)]
        for r in rewards:
            node = t.root
            for _ in range(rng.randint(0, 3)):
                node = turn(t, node.node_id)
            turn(t, node.node_id, status=DONE, reward=r)
        t.backup()
        trees.append(t)
        expected.extend(grpo(rewards))
    samples = build_training_samples(trees, AdvantageConfig(w_process=0.0))
    assert len(samples) == len(expected) == 20
    for s, a in zip(samples, expected, strict=True):
        trained = [x for x, m in zip(s.advantages, s.loss_mask, strict=True) if m]
        assert trained == pytest.approx([a] * len(trained), abs=1e-6)
        assert all(w == 1.0 for w, m in zip(s.weights, s.loss_mask, strict=True) if m)


def test_unscored_paths_and_flat_trees():
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    a = turn(t, 0)
    turn(t, a.node_id, status=FinishStatus.ERROR)  # no reward: no sample, no statistics
    turn(t, a.node_id, status=DONE, reward=1.0)
    turn(t, 0, status=DONE, reward=1.0)
    turn(t, 0)  # open, abandoned
    t.backup()
    samples = build_training_samples([t], AdvantageConfig())
    assert [s.leaf_id for s in samples] == [3, 4]
    assert all(x == 0.0 for s in samples for x in s.advantages)  # all rewards equal: no signal at all
    assert nonzero_adv_token_frac(samples) == 0.0
    assert effective_ratio([t]) == 0.0


def test_metrics():
    """Numbers recomputed for fresh-sample values (see HAND): node 6 now has advantage 0, so 10 of 12 tokens'
    weight is non-zero; with w_outcome 0 only nodes 1 and 2 have a non-zero process term (4 of 12)."""
    mixed = hand_tree()
    assert nonzero_adv_token_frac(build_training_samples([mixed], HAND)) == pytest.approx(10 / 12)
    # each node's 2 generated tokens carry total weight 2 (module docstring of trainer.algo.advantages)
    frac = nonzero_adv_token_frac(build_training_samples([mixed], AdvantageConfig(w_outcome=0.0)))
    assert frac == pytest.approx(4 / 12)
    flat = RolloutTree.new("f", "q", ["a"], [1], None)
    turn(flat, 0, status=DONE, reward=0.0)
    flat.backup()
    assert effective_ratio([mixed, flat]) == 0.5
    # 1 mixed prompt over 4 + 1 scored leaves
    assert mixed_per_100_leaves([mixed, flat]) == pytest.approx(20.0)
    assert math.isnan(effective_ratio([])) and math.isnan(nonzero_adv_token_frac([]))
    assert math.isnan(mixed_per_100_leaves([])) and math.isnan(
        mixed_per_100_leaves([RolloutTree.new("e", "q", [], [1], None)])
    )


def test_uniform_advantages_equal_a_hand_computed_grpo_group():
    """uniform's advantages equal a hand-computed GRPO group: root + 4 chains (single- and multi-turn), no
    expansion, process=False: every trained token of leaf j gets (r_j - mean) / (std_ddof1 + eps), weight 1.
    Rewards (1, 0, 0, 0): mean .25, std_ddof1 = sqrt((.75^2 + 3 * .25^2) / 3) = sqrt(.25) = .5."""
    t = RolloutTree.new("p", "q", ["a"], [1, 2], None)
    turn(t, 0, status=DONE, reward=1.0)  # single-turn chain
    n = turn(t, turn(t, 0).node_id)  # three-turn chain
    turn(t, n.node_id, status=DONE, reward=0.0)
    turn(t, turn(t, 0).node_id, status=DONE, reward=0.0)  # two-turn chain
    turn(t, 0, status=DONE, reward=0.0)
    t.backup()
    cfg = AdvantageConfig(w_process=1.0)  # ignored: process=False drops the term whatever its weight
    samples = build_training_samples([t], cfg, process=False)
    expected = {1.0: 0.75 / (0.5 + 1e-6), 0.0: -0.25 / (0.5 + 1e-6)}
    assert len(samples) == 4
    for s in samples:
        r = t.nodes[s.leaf_id].reward
        trained = [a for a, m in zip(s.advantages, s.loss_mask, strict=True) if m]
        assert trained and trained == pytest.approx([expected[r]] * len(trained), abs=1e-9), (s.leaf_id, trained)
        assert all(w == 1.0 for w, m in zip(s.weights, s.loss_mask, strict=True) if m)
    assert expected[1.0] == pytest.approx(grpo([1.0, 0.0, 0.0, 0.0])[0])  # and that is verl's formula
    # with the process term on, chain nodes would get extra Vhat(child) - Vhat(parent): the first turn of each
    # chain differs from the root's value (r_j - .25), so the two layouts differ
    with_process = build_training_samples([t], cfg)
    assert with_process[0].advantages != samples[0].advantages


def test_requires_backup():
    """Was detected by root value != leaf mean, which no longer holds; now by the root's scored-leaf count."""
    t = hand_tree()
    t.add_child(0, [9], [1], [-0.1], status=DONE, reward=0.0)  # new leaf, not backed up yet
    with pytest.raises(AssertionError, match="backup"):
        node_terms(t, AdvantageConfig())


def test_process_baseline_options_differ_only_below_an_unexpanded_parent():
    """Issue 22: root -> 1 -> 2 -> {3: r=0, 4: r=1 (a continuation at 2)}, root -> 5: r=1. Node 1 was never
    expanded, so Vhat(1) = O(1) = 0, the outcome of the very chain whose anchor 2 stage 2 expanded. "parent" (the
    paper's) subtracts it; "fresh" gives node 2 no process term; "predicted" subtracts node 1's predicted V(H).
    Where the parent is the root or expanded, every option is the paper's."""
    t = RolloutTree.new("p", "q", ["a"], [1, 2, 3], "s")
    turn(t, 0)
    turn(t, 1)
    turn(t, 2, status=DONE, reward=0.0)
    turn(t, 2, status=DONE, reward=1.0)
    turn(t, 0, status=DONE, reward=1.0)
    t.backup()
    t.nodes[1].predicted = 0.4
    assert t.nodes[1].value == 0.0 and t.nodes[2].value == 1.0
    process = {
        how: {i: p for i, (_, p) in node_terms(t, AdvantageConfig(process_baseline=how)).items()}
        for how in ("parent", "fresh", "predicted")
    }
    assert process["parent"][2] == pytest.approx(1.0)
    assert process["fresh"][2] == 0.0
    assert process["predicted"][2] == pytest.approx(0.6)
    for i in (1, 3, 4, 5):  # parents: the root, or node 2 (expanded)
        assert process["parent"][i] == process["fresh"][i] == process["predicted"][i], i
    t.nodes[1].predicted = None
    assert node_terms(t, AdvantageConfig(process_baseline="predicted"))[2][1] == 0.0, "nothing predicted: no term"
    with pytest.raises(ValueError, match="process_baseline"):
        AdvantageConfig(process_baseline="visits")
