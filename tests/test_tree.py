"""RolloutTree: invariants, backup, mixedness, ledger and serialisation round-trips."""

import pytest

from trainer.algo.tree import FinishStatus, Ledger, NodeKind, RolloutTree


def turn(tree: RolloutTree, parent: int, n_gen: int = 2, n_obs: int = 1, **attrs):
    """A turn with n_gen generated tokens (logprob -0.5) followed by n_obs observation tokens."""
    base = 100 + len(tree.nodes) * 10
    ids = list(range(base, base + n_gen + n_obs))
    return tree.add_child(parent, ids, [1] * n_gen + [0] * n_obs, [-0.5] * n_gen + [0.0] * n_obs, **attrs)


def small_tree() -> RolloutTree:
    """root -> a -> {leaf 1.0, b -> {leaf 0.0, leaf 0.0}}; root -> leaf 1.0 (answered at turn 1)."""
    t = RolloutTree.new("p0", "q?", ["gold"], [1, 2, 3], snapshot_id="s0", split="train")
    a = turn(t, 0, snapshot_id="sa")  # 1
    turn(t, a.node_id, status=FinishStatus.ANSWERED, reward=1.0)  # 2
    b = turn(t, a.node_id)  # 3
    turn(t, b.node_id, status="answered", reward=0.0)  # 4
    turn(t, b.node_id, status=FinishStatus.TRUNCATED, reward=0.0)  # 5
    turn(t, 0, status=FinishStatus.ANSWERED, reward=1.0)  # 6
    return t


def test_new_and_add_child_structure():
    t = small_tree()
    assert t.root.kind == NodeKind.ROOT and t.root.loss_mask == [0, 0, 0] and t.meta == {"split": "train"}
    assert [n.depth for n in t.nodes] == [0, 1, 2, 2, 3, 3, 1]
    assert t.nodes[1].children == [2, 3] and t.root.children == [1, 6]
    assert t.nodes[4].status == FinishStatus.ANSWERED  # a plain string is coerced to the enum
    assert [n.node_id for n in t.leaves()] == [2, 4, 5, 6]
    assert t.path(5) == [0, 1, 3, 5]
    assert t.history_ids(3) == [1, 2, 3, *t.nodes[1].token_ids, *t.nodes[3].token_ids]
    assert t.subtree(1) == [1, 2, 3, 4, 5]
    t.validate()


@pytest.mark.parametrize(
    "ids, mask, lps, match",
    [
        ([1, 2], [1], [-1.0], "lengths differ"),
        ([1, 2], [1, 2], [-1.0, -1.0], "expected 0 or 1"),
        ([1, 2], [1, 0], [-1.0, -0.3], "where loss_mask is 0"),
        ([1], [1], [float("nan")], "not a log-probability"),
    ],
)
def test_add_child_rejects_bad_segments(ids, mask, lps, match):
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    with pytest.raises(AssertionError, match=match):
        t.add_child(0, ids, mask, lps)


def test_add_child_rejects_missing_or_finished_parent():
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    with pytest.raises(AssertionError, match="parent 5"):
        t.add_child(5, [1], [1], [-0.1])
    leaf = t.add_child(0, [1], [1], [-0.1], status=FinishStatus.ANSWERED, reward=1.0)
    with pytest.raises(AssertionError, match="only an open node"):
        t.add_child(leaf.node_id, [1], [1], [-0.1])


def test_backup_fresh_sample_values():
    """Was test_backup_visit_weighted: the values changed with the estimator (trainer.algo.tree docstring); the counts,
    mixedness and anchors did not. small_tree read as it was grown: bare rollouts 1->2 (r=1) and 6 (r=1);
    continuation 3->4 (r=0) added at node 1; continuation 5 (r=0) added at node 3."""
    t = small_tree()
    t.backup()
    assert [n.n_leaves for n in t.nodes] == [4, 3, 1, 2, 1, 1, 1]  # structural count, unchanged
    # O follows children[0]: 1 -> 2 (1.0); 3 -> 4 (0.0); the root has none
    assert [n.outcome for n in t.nodes] == [None, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # root = mean O of bare rollouts 1, 6 = 1; node 1 = O(3) = 0 (its own O(1) = 1 triggered the expansion and
    # is left out); node 3 = O(5) = 0; leaves = rewards. The visit-weighted backup gave [.5, 1/3, 1, 0, 0, 0, 1].
    assert [n.value for n in t.nodes] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert [n.n_fresh for n in t.nodes] == [2, 1, 1, 1, 1, 1, 1]
    assert t.root_outcomes() == [1.0, 1.0]
    assert [t.own_outcome(i) for i in range(7)] == [n.outcome for n in t.nodes]
    assert t.is_mixed()
    assert [a.node_id for a in t.anchors()] == [1, 3]
    assert [a.node_id for a in t.anchors(max_turns=2)] == [1]


def test_unexpanded_chain_node_takes_its_own_outcome_and_continuations_average():
    """A chain node without continuations is valued by its own outcome; with continuations, by theirs only; when
    every continuation ended without a reward it falls back to its own outcome."""
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    a = turn(t, 0)  # 1: bare rollout 1 -> 2 -> 3 (r=1)
    b = turn(t, a.node_id)  # 2
    turn(t, b.node_id, status=FinishStatus.ANSWERED, reward=1.0)  # 3
    turn(t, 0, status=FinishStatus.ANSWERED, reward=0.0)  # 4: bare rollout, r=0
    for r in (0.0, 0.0, 1.0):  # 5, 6, 7: continuations at node 1
        turn(t, a.node_id, status=FinishStatus.ANSWERED, reward=r)
    turn(t, b.node_id, status=FinishStatus.ERROR)  # 8: continuation at node 2 without a reward
    t.backup()
    assert t.root.value == 0.5 and t.root.n_fresh == 2 and t.root_outcomes() == [1.0, 0.0]
    assert t.nodes[1].value == pytest.approx(1 / 3) and t.nodes[1].n_fresh == 3 and t.nodes[1].outcome == 1.0
    assert t.nodes[2].value == 1.0 and t.nodes[2].n_fresh == 1  # fallback to O(2)
    assert t.nodes[1].n_leaves == 4


def test_backup_ignores_unscored_and_open_leaves():
    """Node 1's own chain ended in an error and its continuation is still open: no sample, no value."""
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    a = turn(t, 0)
    turn(t, a.node_id, status=FinishStatus.ERROR)  # finished, no reward: carries no outcome
    turn(t, a.node_id)  # still open
    turn(t, 0, status=FinishStatus.ANSWERED, reward=0.0)
    t.backup()
    assert [n.n_leaves for n in t.nodes] == [1, 0, 0, 0, 1]
    assert t.nodes[1].value is None and t.root.value == 0.0
    assert [n.node_id for n in t.leaves()] == [2, 4] and [n.node_id for n in t.scored_leaves()] == [4]
    assert [n.node_id for n in t.open_leaves()] == [3]
    assert not t.is_mixed() and t.anchors() == []


def test_is_mixed_threshold():
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    turn(t, 0, status=FinishStatus.ANSWERED, reward=0.4)
    turn(t, 0, status=FinishStatus.ANSWERED, reward=0.49)
    assert not t.is_mixed()
    turn(t, 0, status=FinishStatus.ANSWERED, reward=0.5)
    assert t.is_mixed()


def test_ledger_adds_fieldwise():
    a = Ledger(leaves=1, generated_tokens=10, prefill_tokens=5, cached_prefill_tokens=2, env_calls=3)
    b = Ledger(leaves=2, generated_tokens=1, prefill_tokens=1, cached_prefill_tokens=1, env_calls=1)
    assert a + b == Ledger(3, 11, 6, 3, 4)
    assert sum([a, b]) == a + b == sum([a, b], Ledger())


@pytest.mark.parametrize("suffix", [".json", ".msgpack"])
def test_save_load_round_trip(tmp_path, suffix):
    t = small_tree()
    t.ledger = Ledger(leaves=4, generated_tokens=8)
    t.nodes[2].info = {"em": 1.0, "f1": 1.0}
    t.nodes[1].features = [0.25, -1.0]
    t.nodes[1].predicted = 0.3
    t.backup()
    path = tmp_path / f"tree{suffix}"
    t.save(path)
    u = RolloutTree.load(path)
    assert u == t
    assert isinstance(u.nodes[4].status, FinishStatus)
    assert RolloutTree.from_dict(t.to_dict()) == t


def test_from_dict_validates():
    d = small_tree().to_dict()
    d["nodes"][3]["depth"] = 7
    with pytest.raises(AssertionError, match="depth=7"):
        RolloutTree.from_dict(d)
