"""The allocation simulator's truth (bench/simulate_allocation.py): its exact state values match Monte Carlo, policy
gradient under `uniform` reaches the known optimal policy, the project's value estimator is unbiased under TRACE
allocation where the visit-weighted backup is not, and every allocator spends exactly the leaf budget a step."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.algo.allocation import Anchor, entropy_prefixes
from trainer.algo.tree import RolloutTree

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("simulate_allocation", REPO / "bench" / "simulate_allocation.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["simulate_allocation"] = sim  # dataclasses look their module up by name
_spec.loader.exec_module(sim)


def test_success_table_matches_monte_carlo() -> None:
    """V(root) from the dynamic programme against 5k episodes played by `Simulation.expand` on real trees."""
    s = sim.Simulation(sim.SimConfig(seed=3, n_prompts=4, kinds=(1, 2, 3)))
    s.theta.data[:] = 0.3 * s.theta.data.new_tensor(np.random.default_rng(0).normal(size=tuple(s.theta.shape)))
    s._pi = s.probs(s.task)
    truth = sim.success_table(s.task, s._pi, s.cfg.max_turns)
    for idx in range(4):
        tree = s.new_tree(idx)
        s.expand(tree, 0, 5_000)
        tree.backup()
        assert tree.ledger.leaves == 5_000
        # se <= 0.0071; 0.025 is > 3.5 se
        assert tree.root.value == pytest.approx(truth[idx, 0, 0], abs=0.025), (idx, tree.root.value, truth[idx, 0, 0])


def test_uniform_policy_gradient_reaches_the_optimal_policy() -> None:
    """On 1- and 2-hop prompts, GRPO (uniform, the project's advantages and loss) from a uniform policy gets within
    0.03 of the optimal policy's exact success and learns its decisions (search right until every hop is found,
    then answer)."""
    cfg = sim.SimConfig(
        allocator="uniform", seed=1, steps=60, optimizer="sgd", lr=20.0, grad_clip=0.0, kinds=(1, 2), max_turns=4
    )
    s = sim.Simulation(cfg)
    out = s.run()
    # measured: initial 0.067, final 0.425, optimal 0.431
    assert out["initial_success"] < out["optimal_success"] - 0.2, out
    assert out["final_success"] > out["optimal_success"] - 0.03, (out["final_success"], out["optimal_success"])
    pi = sim.policy_probs(s.theta.detach().numpy(), np.array([1, 2]))
    assert pi[0, 0, sim.SEARCH_RIGHT] > 0.9 and pi[0, 1, sim.ANSWER] > 0.9, pi[0]
    assert pi[1, 0, sim.SEARCH_RIGHT] > 0.9 and pi[1, 1, sim.SEARCH_RIGHT] > 0.9 and pi[1, 2, sim.ANSWER] > 0.9, pi[1]


def test_a_warm_start_answers_early_at_the_stated_rate_and_policy_gradient_fixes_it() -> None:
    """SimConfig.warm_early: the LM testbed's flawed warm start in the simulator. Its early-answer probability is
    the stated one at every intermediate hop, and GRPO training moves it towards searching on."""
    cfg = sim.SimConfig(allocator="uniform", seed=2, steps=30, kinds=(2, 3), max_turns=5, warm_early=0.7)
    s = sim.Simulation(cfg)
    pi = s.probs(s.task)
    inner = [(i, f) for i, h in enumerate(s.task.hops) for f in range(1, int(h))]
    assert all(pi[i, f, sim.ANSWER] == pytest.approx(0.7, abs=0.01) for i, f in inner)
    assert all(pi[i, int(h), sim.ANSWER] == pytest.approx(0.95, abs=0.01) for i, h in enumerate(s.task.hops))
    out = s.run()
    after = s.probs(s.task)
    assert np.mean([after[i, f, sim.ANSWER] for i, f in inner]) < 0.3, "RL learned to search on"
    assert out["final_success"] > out["initial_success"] + 0.1, out


def visit_weighted(tree: RolloutTree) -> dict[int, float]:
    """The witness, re-implemented here: Vhat(y) = mean of the scored leaves' rewards below y."""
    out = {}
    for node in tree.nodes:
        rs = [float(tree.nodes[i].reward) for i in tree.subtree(node.node_id) if tree.nodes[i].is_scored_leaf]
        out[node.node_id] = sum(rs) / len(rs) if rs else 0.0
    return out


def test_values_are_unbiased_under_trace_allocation_and_visit_weighted_ones_are_not() -> None:
    """TRACE allocation (predictor-valued stage 1 and stage 2 on the simulator's hard prompts, low success rates) on
    a fixed policy: the backed-up root values and the values of the anchors stage 2 expanded are within 0.02 of the
    exact truth on average; the visit-weighted backup of the very same trees is more than 0.04 above it at the
    root (continuations are placed where a success was seen, so the leaves below over-represent successes). Two
    rounds of 48 continuations over 48 roots: the witness's bias grows as continuations concentrate on few anchors
    (measured with one round, 64 leaves: +0.03)."""
    cfg = sim.SimConfig(allocator="trace", seed=2, lr=0.0, kinds=(2, 3), leaf_budget=96, root_budget=48, rounds=2)
    s = sim.Simulation(cfg)
    err = {"root": [], "anchor": [], "visit_root": []}
    for _ in range(50):
        s._pi = s.probs(s.task)
        trees, _ = s.collect()
        idx = np.asarray([t.meta["index"] for t in trees])
        truth = sim.success_table(s.task, s._pi[idx], cfg.max_turns, idx)
        for t, tv in zip(trees, truth, strict=True):
            err["root"].append(t.root.value - tv[0, 0])
            err["visit_root"].append(visit_weighted(t)[0] - tv[0, 0])
            err["anchor"] += [
                n.value - tv[n.info["f"], n.depth] for n in t.nodes[1:] if len(n.children) > 1 and n.value is not None
            ]
        s.update(trees)  # refits the predictor and the priors; lr = 0 keeps the policy (and so the truth) fixed
    bias = {k: float(np.mean(v)) for k, v in err.items()}
    # measured: root -0.0025, anchor +0.013 (n=1343, se 0.007), visit-weighted root +0.054 (se 0.004)
    assert len(err["anchor"]) > 1000, len(err["anchor"])
    assert abs(bias["root"]) < 0.02 and abs(bias["anchor"]) < 0.02, bias
    assert bias["visit_root"] > 0.04, bias


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"leaf_budget": 50, "root_budget": 19, "rounds": 3, "max_per_anchor": 1, "m_max": 5, "pool_size": 40},
        {"max_turns": 1, "kinds": (1,)},  # no anchor ever: every continuation is re-spent as new roots
    ],
)
def test_every_allocator_spends_exactly_the_leaf_budget(overrides: dict) -> None:
    """Equal leaves per step: `Simulation.collect` asserts it; checked here too, step by step, per allocator."""
    for name in sim.ALL:
        cfg = sim.SimConfig(allocator=name, seed=4, lr=5.0, **overrides)
        s = sim.Simulation(cfg)
        for _ in range(4):
            s._pi = s.probs(s.task)
            trees, count = s.collect()
            assert sum(len(t.scored_leaves()) for t in trees) == cfg.leaf_budget, (name, count)
            assert count["roots"] + count["continuations"] + count["respent_as_roots"] == cfg.leaf_budget, count
            # Issue 24: every node records the allocation phase that made it (trainer.algo.plan.mark_round)
            rounds = [n.info.get("round") for t in trees for n in t.nodes[1:]]
            assert None not in rounds and set(rounds) <= set(range(cfg.rounds + 2)), set(rounds)
            first = sum(1 for t in trees for n in t.nodes[1:] if n.parent == 0 and n.info["round"] == 0)
            assert first == count["roots"], (name, count, first)  # stage 1's bare rollouts, one first turn each
            if name == "trace" and count["continuations"]:
                later = [n for t in trees for n in t.nodes[1:] if n.info["round"] >= 1 and n.parent != 0]
                assert later and all(t.nodes[n.parent].info["round"] <= n.info["round"] for t in trees for n in t.nodes[1:]
                                     if n.parent), "a node is never made before its parent"  # fmt: skip
            s.update(trees)


def test_every_pair_of_stages_spends_exactly_the_leaf_budget() -> None:
    """The per-stage ablation (allocation.type "STAGE1+STAGE2") through the trainer's planning code: every stage 1
    with every stage 2 (greso with none only), 3 steps each over a stream that wraps (greso's filter gets history),
    exactly the leaf budget a step."""
    from trainer.algo.allocation import STAGE1, STAGE2

    pairs = [(a, b) for a, b in itertools.product(STAGE1, STAGE2) if a != "greso" or b == "none"]
    for stage1, stage2 in pairs:
        cfg = sim.SimConfig(allocator=f"{stage1}+{stage2}", seed=5, lr=5.0, n_prompts=24, steps=3)
        s = sim.Simulation(cfg)
        for _ in range(3):
            s._pi = s.probs(s.task)
            trees, count = s.collect()
            assert sum(len(t.scored_leaves()) for t in trees) == cfg.leaf_budget, (stage1, stage2, count)
            s.update(trees)


def test_the_entropy_allocator_ranks_anchors_by_the_policys_exact_action_entropy() -> None:
    """A simulated turn is one action, and its entropy is the policy's action entropy at the state it was taken in
    (the simulator's analogue of the LM testbed's estimate from a turn's first tokens): every turn node carries it, the "entropy" allocator
    reads it off the turn after each anchor, gives its first continuations to the highest, and spends exactly the
    leaf budget."""
    s = sim.Simulation(sim.SimConfig(allocator="entropy", seed=3, warm_early=0.7, lr=0.0))
    for _ in range(3):
        s._pi = s.probs(s.task)
        trees, count = s.collect()
        assert sum(len(t.scored_leaves()) for t in trees) == s.cfg.leaf_budget, count
        assert count["continuations"] > 0, count
        for t in trees:
            pi = s._pi[t.meta["index"]]
            for n in t.nodes[1:]:
                assert n.entropy == pytest.approx(sim.action_entropy(pi[n.info["f_in"]]), abs=1e-12)
        s.update(trees)
    h = [0.3, 1.1, 0.7, 0.0]
    anchors = [Anchor(i, 0.0, 0.5, x) for i, x in enumerate(h)]
    assert entropy_prefixes(anchors, 2, 2) == [0, 1, 1, 0]  # the two most uncertain first


def test_greso_is_grpo_until_a_prompt_comes_back_then_skips_by_its_history() -> None:
    """GRESO in the simulator (the trainer's filter and plan): over a 64-prompt stream, 16 prompts a step, the first
    pass (4 steps) draws the same prompts as GRPO and skips nothing; in the next passes prompts whose last visits
    were zero-variance are skipped, and every step still spends exactly the leaf budget."""
    runs = {name: sim.Simulation(sim.SimConfig(allocator=name, seed=4, n_prompts=64)) for name in ("uniform", "greso")}
    skipped = []
    for step in range(12):
        drawn = {}
        for name, s in runs.items():
            s._pi = s.probs(s.task)
            trees, count = s.collect()
            assert sum(len(t.scored_leaves()) for t in trees) == s.cfg.leaf_budget
            drawn[name] = [t.prompt_id for t in trees]
            if name == "greso":
                skipped.append(count["prompts_skipped"])
            s.update(trees)
        if step < 4:
            assert drawn["greso"] == drawn["uniform"], step
    assert skipped[:4] == [0] * 4 and sum(skipped[4:]) > 0, skipped
    assert runs["greso"].greso.streak, "the history is kept"


def test_prior_decay_fades_a_prompts_earlier_visits() -> None:
    """--prior-decay reaches the simulator's per-prompt prior: over two passes of a 32-prompt stream, a prompt's
    Beta counts with decay 0.5 are its last visit's outcomes plus half of the one before, against the plain sum at
    1.0; a decay outside (0, 1] is refused."""
    counts = {}
    for decay in (1.0, 0.5):
        s = sim.Simulation(sim.SimConfig(allocator="trace", seed=4, n_prompts=32, lr=0.0, prior_decay=decay))
        visits: dict[str, list[list[float]]] = {}
        for _ in range(6):
            s._pi = s.probs(s.task)
            trees, _ = s.collect()
            for t in trees:
                visits.setdefault(t.prompt_id, []).append([float(r) for r in t.root_outcomes()])
            s.update(trees)
        for pid, vs in visits.items():
            succ = 0.0
            for rs in vs:
                succ = decay * succ + sum(rs)
            assert s.prior.counts[pid][0] == pytest.approx(succ), (decay, pid, vs)
        counts[decay] = {pid: len(vs) for pid, vs in visits.items()}
        assert max(counts[decay].values()) >= 2, "some prompt was visited twice"
    with pytest.raises(ValueError, match="prior_decay"):
        sim.Simulation(sim.SimConfig(seed=0, prior_decay=0.0))


def test_comparison_against_grpo_is_paired_by_seed() -> None:
    """Issue 22: each allocator's mean success over the run minus GRPO's on the same seed (same prompts and start),
    with a t interval over seeds, and its leaves to target over GRPO's as a geometric mean with its interval."""
    fig = dict.fromkeys(sim.FIGURES, 0.0)
    runs = []
    for seed, (g, t, lg, lt) in enumerate(((0.30, 0.32, 640, 320), (0.40, 0.41, 1280, 640), (0.20, 0.23, 320, 160))):
        common = {**fig, "seed": seed, "success_curve": [0.1, 0.2], "initial_success": 0.1, "optimal_success": 0.5}
        common |= {"wall_s": 1.0, "lr": 0.1}
        runs.append({**common, "allocator": "uniform", "mean_success": g, "leaves_to_target": lg, "final_success": g})
        runs.append({**common, "allocator": "trace", "mean_success": t, "leaves_to_target": lt, "final_success": g - t})
    out = sim.summarise(runs, ["uniform", "trace"])
    assert out["trace"]["vs_grpo_final_success"] == pytest.approx(-(0.32 + 0.41 + 0.23) / 3)  # (g - t) - g, paired
    assert out["uniform"]["vs_grpo_final_success"] == 0
    assert out["trace"]["vs_grpo_mean_success"] == pytest.approx(0.02)
    assert out["trace"]["vs_grpo_mean_success_ci95"] == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3)
    assert out["trace"]["vs_grpo_leaves_ratio"] == pytest.approx(0.5) and out["uniform"]["vs_grpo_leaves_ratio"] == 1
    assert out["trace"]["vs_grpo_leaves_ratio_ci95"] == pytest.approx([0.5, 0.5])
    assert "| trace | +0.020 ± 0.025 | -0.320 ± 0." in sim.table(out)


def test_calibration_probe_is_outside_the_run_and_scores_an_oracle_too() -> None:
    """Issue 22: the probe's rollouts draw from their own generator (the run's curve is the same with or without
    it), an oracle V ranks the probe's outcomes well above chance, and the predictor is scored on the same pairs."""
    cfg = sim.SimConfig(allocator="trace", seed=4, steps=4, warm_early=0.9, probe=16)
    with_probe = sim.Simulation(cfg).run()
    without = sim.Simulation(sim.SimConfig(**{**cfg.__dict__, "probe": 0})).run()
    assert with_probe["success_curve"] == without["success_curve"]
    assert with_probe["probe_auc_oracle"] > 0.75, with_probe["probe_auc_oracle"]
    assert 0.0 <= with_probe["probe_auc"] <= 1.0 and np.isnan(without["probe_auc"])
