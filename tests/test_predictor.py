"""Success predictor: calibration by hand, Beta prior, structural features, learning a planted signal."""

import math
import random

import pytest
import torch

from trainer.algo.predictor import (
    STRUCTURAL_FEATURES,
    BetaPrior,
    SuccessPredictor,
    calibration,
    collect_training_set,
    normalize_answer,
    split_calibration,
    structural_features,
)
from trainer.algo.tree import FinishStatus, RolloutTree


def test_calibration_by_hand():
    # positives (outcome 1) scored .35 and .8, negatives .1 and .4: pairs won (.35>.1), (.8>.1), (.8>.4) -> 3/4
    c = calibration([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert c["auc"] == pytest.approx(0.75)
    assert c["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert c["n"] == 4 and c["mean_outcome"] == 0.5
    # ties count 1/2: the positive .5 beats .2 and ties two .5 negatives -> (1 + .5 + .5) / 3
    assert calibration([0.5, 0.5, 0.5, 0.2], [1, 0, 0, 0])["auc"] == pytest.approx(2 / 3)
    assert calibration([0.9, 0.1], [1, 0])["auc"] == 1.0
    assert math.isnan(calibration([0.3, 0.6], [1, 1])["auc"])
    assert math.isnan(calibration([], [])["brier"])
    # fractional outcomes: Brier on the values, AUC on outcome >= 0.5
    c = calibration([0.2, 0.7], [0.25, 0.75])
    assert c["brier"] == pytest.approx(0.0025) and c["auc"] == 1.0


def test_beta_prior():
    b = BetaPrior(a0=1.0, b0=3.0)
    assert b.mean("new") == 0.25 and "new" not in b
    assert b.mean("new", prior_mean=0.6) == pytest.approx(0.6)
    b.update("p", [1, 1, 0, 1])
    assert b.mean("p") == pytest.approx((1 + 3) / (4 + 4)) and "p" in b
    assert b.mean("p", prior_mean=0.5) == pytest.approx((0.5 * 4 + 3) / 8)
    d = BetaPrior(decay=0.5)
    d.update("p", [1, 1])
    d.update("p", [0])  # s = 0.5 * 2 = 1, f = 1
    assert d.mean("p") == pytest.approx((1 + 1) / (2 + 2))
    e = BetaPrior()
    e.load_state_dict(b.state_dict())
    assert e.mean("p") == b.mean("p") and e.a0 == 1.0
    with pytest.raises(AssertionError, match="outside"):
        b.update("p", [2.0])


def test_prior_decay_is_a_checked_setting_the_trainer_uses() -> None:
    from trainer.algo.step import TraceStep
    from trainer.config import TrainConfig, load_train_config

    cfg = load_train_config(sets=["predictor.prior_decay=0.5"])
    assert TraceStep(cfg, None, None, 64).prior.decay == 0.5  # type: ignore[arg-type]  # state only
    assert TraceStep(TrainConfig(), None, None, 64).prior.decay == 1.0  # type: ignore[arg-type]  # the paper's
    for bad in ("predictor.prior_decay=0", "predictor.prior_decay=1.5", "predictor.prior_a=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0].split(".")[1]):
            load_train_config(sets=[bad])


def test_predictor_loss_and_step_cap_are_checked_settings_the_trainer_uses() -> None:
    """DESIGN: "Loss is MSE (or BCE)". predictor.loss and predictor.max_steps reach the predictor the trainer builds
    (here through a checkpoint restore, the same `new_predictor` as a first fit), and a refit takes at most
    max_steps minibatch steps whatever epochs says."""
    from trainer.algo.predictor import new_predictor
    from trainer.algo.step import TraceStep
    from trainer.config import load_train_config

    default = new_predictor(load_train_config().predictor, 5, 0)
    assert (default.loss, default.max_steps) == ("bce", 300)
    cfg = load_train_config(sets=['predictor.loss="mse"', "predictor.max_steps=3"])
    saved = TraceStep(cfg, None, None, 64)  # type: ignore[arg-type]  # state only
    saved.predictor = new_predictor(saved.cfg.predictor, 5, 0)
    step = TraceStep(cfg, None, None, 64)  # type: ignore[arg-type]
    step.load_state_dict(saved.state_dict())
    assert step.predictor is not None and (step.predictor.loss, step.predictor.max_steps) == ("mse", 3)
    with pytest.raises(ValueError, match=r"predictor\.loss 'mse'"):  # a run resumed with another loss is refused
        TraceStep(load_train_config(), None, None, 64).load_state_dict(saved.state_dict())  # type: ignore[arg-type]
    calls = []
    opt_step = step.predictor.opt.step
    step.predictor.opt.step = lambda *a, **k: calls.append(1) or opt_step(*a, **k)  # type: ignore[method-assign]
    step.predictor.fit(torch.randn(600, 5), torch.rand(600), epochs=30)
    assert len(calls) == 3, "the refit stops at max_steps"
    for bad, field in (('predictor.loss="hinge"', "loss"), ("predictor.max_steps=0", "max_steps")):
        with pytest.raises(ValueError, match=field):
            load_train_config(sets=[bad])


def test_structural_features():
    t = RolloutTree.new("p", "Who?", ["The Eiffel Tower"], [1, 2, 3, 4], None)
    a = t.add_child(
        0,
        [10, 11, 12],
        [1, 1, 0],
        [-0.5, -1.5, 0.0],
        action_text="<think>x</think><search>tower</search>",
        observation="<information>Doc 1(Title: T) the eiffel tower, in Paris.</information>",
    )
    b = t.add_child(a.node_id, [13, 14], [1, 0], [-1.0, 0.0], action_text="hmm", observation="Invalid action.")
    assert len(STRUCTURAL_FEATURES) == len(structural_features(t.root, t)) == 8
    assert structural_features(t.root, t) == [0, 0, 0, 0, 0, 0.004, 0, 0]
    assert structural_features(a, t) == pytest.approx([1, 1, 0, 1, 1, 0.007, 0.002, -1.0])
    assert structural_features(b, t) == pytest.approx([2, 1, 1, 1, 0, 0.009, 0.003, -1.0])
    # the same query again (normalised) and an empty result: still 1 distinct query, no passages
    c = t.add_child(
        b.node_id,
        [15, 16],
        [1, 0],
        [-1.0, 0.0],
        action_text="<search> The Tower! </search>",
        observation="<information>No results found.</information>",
    )
    assert structural_features(c, t)[1:5] == [2, 1, 1, 0]
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"  # the judge's normalisation, shared


def test_structural_features_do_not_depend_on_gold_answers():
    """Regression: `answer_seen`/`answer_in_last_obs` read tree.golden_answers, which the trainer learns only from
    the first answered leaf, and features are cached on nodes: the same prefix got different features depending on
    when it was featurised. Features computed before and after the gold answers are set must be identical."""
    t = RolloutTree.new("p", "Who?", [], [1, 2, 3, 4], None)
    a = t.add_child(
        0,
        [10, 11, 12],
        [1, 1, 0],
        [-0.5, -1.5, 0.0],
        action_text="<search>tower</search>",
        observation="<information>Doc 1(Title: T) the eiffel tower, in Paris.</information>",
    )
    leaf = t.add_child(a.node_id, [13], [1], [-0.2], action_text="<answer>Eiffel Tower</answer>", status="answered")
    before = [structural_features(n, t) for n in t.nodes]
    t.golden_answers = ["The Eiffel Tower"]  # what rollout.py does once the first leaf is answered
    leaf.reward = 1.0
    assert [structural_features(n, t) for n in t.nodes] == before


def planted(n, d, rng):
    """Raw 'hidden states' (mean 50, std 20 per dim) whose success probability depends on two dims."""
    z = torch.randn(n, d, generator=rng)
    x = 50.0 + 20.0 * z
    p = torch.sigmoid(3.0 * z[:, 0] - 2.0 * z[:, 1])
    return x, p


def test_learns_planted_signal():
    rng = torch.Generator().manual_seed(0)
    x, p = planted(2000, 16, rng)
    xt, pt = planted(1000, 16, rng)
    yt = torch.bernoulli(pt, generator=rng)
    pred = SuccessPredictor(16, hidden=32, lr=3e-3, seed=0)
    before = calibration(pred.predict(xt).tolist(), yt.tolist())
    loss = pred.fit(x, p, epochs=30)
    after = calibration(pred.predict(xt).tolist(), yt.tolist())
    oracle = calibration(pt.tolist(), yt.tolist())
    assert after["auc"] > 0.8 and after["auc"] > oracle["auc"] - 0.03, (after, oracle)
    assert after["brier"] < before["brier"] - 0.05, (before, after)
    assert math.isfinite(loss)
    out = pred.predict(xt[:5])
    assert out.shape == (5,) and not out.requires_grad and ((out > 0) & (out < 1)).all()


def test_state_dict_round_trip():
    rng = torch.Generator().manual_seed(1)
    x, p = planted(300, 4, rng)
    a = SuccessPredictor(4, hidden=8, seed=1)
    a.fit(x, p, epochs=2)
    b = SuccessPredictor(4, hidden=8, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.predict(x), b.predict(x))
    a.fit(x, p, epochs=1)
    b.fit(x, p, epochs=1)  # same optimiser state and sampling generator: same trajectory
    assert torch.allclose(a.predict(x), b.predict(x))
    with pytest.raises(ValueError, match=r"is not this run's"):
        SuccessPredictor(5, hidden=8).load_state_dict(a.state_dict())


def synthetic_tree(i: int, rng: random.Random) -> RolloutTree:
    """A prompt whose difficulty s is written in its features; each of 4 chains succeeds w.p. s."""
    s = rng.random()
    t = RolloutTree.new(f"p{i}", "q", ["a"], [1], None)
    t.root.features = [s, rng.random()]
    for _ in range(4):
        node = t.add_child(0, [2, 3], [1, 0], [-0.1, 0.0])
        node.features = [s, rng.random()]
        t.add_child(
            node.node_id, [4], [1], [-0.1], status=FinishStatus.ANSWERED, reward=float(rng.random() < s)
        )  # the leaf has no features: skipped
    t.backup()
    return t


def test_collect_training_set_and_fit_on_trees():
    """The weighting="uniform" option is gone: one weight per node with the pair mean as target is not
    consistent (trainer.algo.predictor docstring). Chains without expansion give the same rows as before."""
    rng = random.Random(0)
    trees = [synthetic_tree(i, rng) for i in range(300)]
    x, y, w = collect_training_set(trees)
    assert x.shape == (300 * 5, 2) and y.shape == w.shape == (1500,)
    assert w[:5].tolist() == [4.0, 1.0, 1.0, 1.0, 1.0]  # root: its 4 bare rollouts; each chain node: its own O
    assert y[0] == pytest.approx(sum(y[1:5].tolist()) / 4)
    pred = SuccessPredictor(2, hidden=16, lr=3e-3, seed=0)
    pred.fit(x, y, w, epochs=20)
    roots = torch.tensor([t.root.features for t in trees])
    c = calibration(pred.predict(roots).tolist(), [t.root.features[0] for t in trees])
    assert c["auc"] > 0.9 and c["brier"] < 0.02, c
    empty = collect_training_set([RolloutTree.new("e", "q", ["a"], [1], None)])
    assert empty[0].shape[0] == 0 and math.isnan(pred.fit(*empty))


def expanded_tree() -> RolloutTree:
    """Bare rollouts 1->2 (r=1) and 3 (r=0); continuations at node 1: 4 (r=0) and 5->6 (r=0); continuation at node 5:
    7 (r=1). Every node has features [node_id]."""
    t = RolloutTree.new("p", "q", ["a"], [1], None)
    done = FinishStatus.ANSWERED
    one = t.add_child(0, [2], [1], [-0.1])  # 1
    t.add_child(1, [3], [1], [-0.1], status=done, reward=1.0)  # 2
    t.add_child(0, [4], [1], [-0.1], status=done, reward=0.0)  # 3
    t.add_child(1, [5], [1], [-0.1], status=done, reward=0.0)  # 4
    five = t.add_child(one.node_id, [6], [1], [-0.1])  # 5
    t.add_child(5, [7], [1], [-0.1], status=done, reward=0.0)  # 6
    t.add_child(five.node_id, [8], [1], [-0.1], status=done, reward=1.0)  # 7
    for n in t.nodes:
        n.features = [float(n.node_id)]
    t.backup()
    return t


def test_targets_are_pairs_of_node_and_unbiased_samples():
    """Node 1: its own O (1, the outcome that triggered the expansion) plus the O of its continuations 4 (0) and
    5 (O(5) follows 5 -> 6: 0): mean 1/3, weight 3. Its value Vhat(1) = 0 (fresh samples only) is not the target.
    Node 5: O(5) = 0 plus continuation 7 (1): 1/2, weight 2. Root: bare rollouts (1, 0): 1/2, weight 2."""
    t = expanded_tree()
    x, y, w = collect_training_set([t])
    assert x[:, 0].tolist() == list(range(8))
    assert y.tolist() == pytest.approx([0.5, 1 / 3, 1, 0, 0, 0.5, 0, 1])
    assert w.tolist() == [2, 3, 1, 1, 1, 2, 1, 1]
    assert t.nodes[1].value == 0.0 and t.nodes[5].value == 1.0


def test_split_calibration_by_hand():
    t = expanded_tree()
    t.root.predicted = 0.25  # against the bare rollouts' outcomes (1, 0)
    t.nodes[1].predicted = 0.75  # against O(1) = 1
    t.nodes[5].predicted = 0.5  # against O(5) = 0
    c = split_calibration([t])
    assert c["root_n"] == 2 and c["root_brier"] == pytest.approx((0.75**2 + 0.25**2) / 2) and c["root_auc"] == 0.5
    assert c["anchor_n"] == 2 and c["anchor_brier"] == pytest.approx((0.25**2 + 0.5**2) / 2)
    assert c["anchor_auc"] == 1.0
    assert c["n"] == 4 and c["brier"] == pytest.approx((0.75**2 + 0.25**2 + 0.25**2 + 0.5**2) / 4)
    # pooled AUC: positives .25 (root, O=1) and .75; negatives .25 (root, O=0) and .5 -> (0.5 + 0 + 1 + 1) / 4
    assert c["auc"] == pytest.approx(2.5 / 4)
    empty = split_calibration([])
    assert empty["root_n"] == empty["anchor_n"] == 0 and math.isnan(empty["root_brier"])


def test_row_replay_keeps_the_last_steps_and_open_only_drops_leaves() -> None:
    """Issue 22: predictor.replay_steps refits on the rows of recent steps too; predictor.open_only leaves finished
    nodes (never queried) out of the rows."""
    import torch

    from trainer.algo.predictor import RowReplay, collect_training_set
    from trainer.algo.tree import FinishStatus, RolloutTree

    replay = RowReplay(2)
    for step in range(4):
        f, _, _ = replay.add(torch.full((step + 1, 3), float(step)), torch.zeros(step + 1), torch.ones(step + 1))
    assert f.shape == (2 + 3 + 4, 3) and sorted(set(f[:, 0].tolist())) == [1.0, 2.0, 3.0], "this step + 2 before"
    empty = RowReplay(0).add(torch.zeros(0, 0), torch.zeros(0), torch.zeros(0))
    assert len(empty[0]) == 0
    tree = RolloutTree.new("p", "q", ["a"], [1], "s")
    tree.root.features = [0.0, 1.0]
    mid = tree.add_child(0, [5], [1], [-0.1])
    mid.features = [1.0, 1.0]
    leaf = tree.add_child(mid.node_id, [6], [1], [-0.1], status=FinishStatus.ANSWERED, reward=1.0)
    leaf.features = [2.0, 1.0]
    tree.backup()
    assert len(collect_training_set([tree])[0]) == 3
    assert collect_training_set([tree], open_only=True)[0][:, 0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("hidden", [True, False], ids=["with_hidden", "signals_only"])
def test_policy_signals_are_the_policy_s_next_token_at_each_prefix_end(tiny_model, hidden) -> None:
    """predictor.policy_signals (issue 22 §6): every node's features gain the policy's log p(`<answer>` next) and
    its next-token entropy at the node's last token (the distribution the next action's first token is drawn from),
    before the structural features; with use_hidden_state off they are the only model inputs."""
    from trainer.algo.step import TraceStep
    from trainer.config import TrainConfig
    from trainer.learner.policy import Policy

    cfg = TrainConfig()
    cfg.model.device = "cpu"
    cfg.predictor.policy_signals, cfg.predictor.use_hidden_state = True, hidden
    policy = Policy(tiny_model, cfg.model, cfg.optim, temperature=0.8)
    answer = policy.tokenizer.encode("<answer>", add_special_tokens=False)
    assert len(answer) == 1, "the tiny tokenizer has the tag as one token: the signal is p(<answer> next) itself"
    t = RolloutTree.new("p", "Who?", [], [40, 41, 42, 43], None)
    a = t.add_child(0, [50, 51, 52, 53, 54], [1, 1, 1, 0, 0], [-0.5] * 3 + [0.0] * 2, action_text="<search>x</search>")
    t.add_child(a.node_id, [60, 61], [1, 1], [-0.2] * 2, action_text="<answer>y</answer>", status="answered")
    t.add_child(0, [70], [1], [-0.1], action_text="<answer>z</answer>", status="answered")
    TraceStep(cfg, policy, runner=None, n_train=100).featurise([t])  # type: ignore[arg-type]
    ends = {0: 3, 1: 8, 2: 10, 3: 4}  # each node's last token in its history
    want = policy.hidden_at([t.history_ids(2)], [[3, 8, 10]], signals=(answer[0], 0.8))[0]
    want = torch.cat([want, policy.hidden_at([t.history_ids(3)], [[4]], signals=(answer[0], 0.8))[0]])
    width = policy.model.config.hidden_size + 2 if hidden else 2
    for n in t.nodes:
        assert len(n.features) == width + len(STRUCTURAL_FEATURES)
        row = want[[3, 8, 10, 4].index(ends[n.node_id])]
        assert n.features[width - 2 : width] == pytest.approx(row[-2:].tolist(), rel=1e-6)
        assert n.features[width - 2] < 0 < n.features[width - 1]
