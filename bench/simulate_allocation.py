"""Allocation simulator: the project's allocators, value estimator, predictor and advantages on a ground-truth task.

    python bench/simulate_allocation.py --out FILE.json [--seeds 20] [--steps 50] [--workers 2]
        [--allocators trace,uniform,root-only,random-node] [--optimizer adamw|sgd] [--lr 0.05] [--grad-clip 1.0]
        [--sweep-lrs 0.01,0.03,0.1,0.3 --tune-seeds 2] [--leaf-budget 64] [--root-budget 32]
        [--pool-size 64] [--rounds 1] [--max-per-anchor 2] [--target 0.3] ...

No language model. The task (DESIGN §1's multi-hop search, reduced to its decisions):
- A prompt has a kind h in {1, 2, 3} (hops to find), a search success rate p_search and an answer accuracy
  p_correct (drawn per prompt), and a noisy hint of both (what a hidden state might carry about the prompt).
- State = (found f in 0..h, turns taken d). Each turn the policy picks one of three actions: ANSWER (the episode
  ends; reward 1 with probability p_correct if f == h, else 0), SEARCH_RIGHT (f -> f + 1 with probability p_search,
  capped at h) or SEARCH_WRONG (nothing changes). An episode that has taken `max_turns` turns without answering
  is truncated with reward 0.
- The policy: a softmax over the three actions with logits theta[h, f], one parameter table per kind shared by
  all its prompts, starting at 0 (uniform), or with `--warm-early P` at a warm start like the LM testbed's
  (`sft.flawed_frac`): it searches right and answers once every hop is found, but at an intermediate hop answers
  early with probability P. A node's one "token" is its action, with the policy's logprob.
- Truth: `success_table` gives every state's success probability under the current policy exactly (dynamic
  programming over the remaining turns); the optimal policy (search right until f == h, then answer) is known, and
  its success is the same table under a deterministic policy.

What runs is the project's own code: real `RolloutTree`s (dummy token ids: the kind at the root, the action at
a turn), `backup()`, `anchors_from_tree`, the allocators (`make_allocator`, stage 1, `plan_round`, `share`,
`split_rounds`, `Allocator.spill_roots`), `PromptSampler`, `BetaPrior`, `GresoFilter` (greso's history, fed as
`TraceStep.collect` feeds it), `entropy_prefixes` (the "entropy" allocator: a simulated turn is one action, and its
entropy is the policy's action entropy where it was taken), `SuccessPredictor` fitted every step on
`collect_training_set` from state features, `split_calibration`, `build_training_samples(..., process=
allocator.expands)`, `effective_ratio`, `mixed_per_100_leaves` and `trainer.learner.loss.policy_loss` for the policy-
gradient step (on-policy, one optimizer step a training step: the trainer's AdamW with its gradient norm clipped at
1.0 by default, plain SGD as the labelled old setting; each allocator at its own rate when --sweep-lrs picks them
on tuning seeds that are never reported).
`Simulation.collect` runs the trainer's own plan (`trainer.algo.plan.plan_rollouts`, which `TraceStep.collect` runs
against the engines and the env server) with this simulation as its rollout source: the same stage 1, stage 2
rounds and spill, not a copy. Every allocator generates exactly `leaf_budget` leaves a step (asserted), as the
trainer asserts.

Figures per allocator (mean over seeds, with `_ci95` = half-width of Student's t interval over seeds):
- value_bias: mean (Vhat - truth) over the root values and the expanded anchors' values (nodes that received
  continuations) of every step's trees; value_bias_root / value_bias_anchor split it (anchor: nan without
  expansion); visit_bias_root / visit_bias_anchor: the same for the visit-weighted backup (the biased witness);
- effective_ratio, mixed_per_100_leaves, nonzero_adv_token_frac: per-step means (equal leaves per step);
- final_success: the exact expected success of the policy after `steps` steps, averaged over held-out prompts;
- leaves_to_target: cumulative leaves when that success first reached `target`; a run that never reaches it counts
  as steps * leaf_budget (a lower bound: `reached_target` says which share did);
- predictor_auc / predictor_brier: calibration of the allocation-time predictions (trace.py's split_calibration);
- mean_success: the exact held-out success averaged over the run's evaluations (after each step);
- probe_auc / probe_auc_oracle: the predictor's AUC on the calibration probe (`SimConfig.probe`: the same random
  prompts and turns for every allocator, outside the budget, never trained on), and an oracle's (the exact values)
  on the same pairs: comparable across allocators, where predictor_auc scores each allocator's own nodes;
- grad_norm / clip_rate: the policy gradient's norm before clipping, and the share of steps it was clipped;
- continuations_to_mixed_frac: the share of stage 2's continuations placed on prompts whose bare rollouts were
  already mixed (nan without expansion); prompts_skipped: prompts greso's filter skipped a step (0 for the others);
- vs_grpo_mean_success and vs_grpo_final_success (paired by seed, mean difference with its 95% interval: the mean
  over the run, the primary figure, and at its end) and vs_grpo_leaves_ratio (leaves to
  target over GRPO's, the geometric mean of the per-seed ratios with its 95% interval), against "uniform".
A figure without samples (anchor bias of an allocator that never expands) is null. FILE.runs.json holds the per-run
figures and curves. Also FILE.png: success vs cumulative leaves, mean and 95% band per allocator; a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.algo.advantages import (
    AdvantageConfig,
    build_training_samples,
    effective_ratio,
    mixed_per_100_leaves,
    nonzero_adv_token_frac,
)
from trainer.algo.allocation import (
    AllocationConfig,
    GresoFilter,
    make_allocator,
)
from trainer.algo.plan import feed_history, plan_rollouts
from trainer.algo.predictor import (
    BetaPrior,
    RowReplay,
    SuccessPredictor,
    calibration,
    collect_training_set,
    split_calibration,
)
from trainer.algo.step import PromptSampler
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.learner.loss import policy_loss

ALL = ("trace", "uniform", "root-only", "random-node")
ANSWER, SEARCH_RIGHT, SEARCH_WRONG = 0, 1, 2
N_ACTIONS = 3
MAX_HOPS = 3
N_STATES = MAX_HOPS + 1  # f in 0..MAX_HOPS


# ---- the task ------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A population of prompts: arrays indexed by prompt."""

    hops: np.ndarray  # [n] int, 1..MAX_HOPS
    p_search: np.ndarray  # [n] probability that SEARCH_RIGHT finds the next hop
    p_correct: np.ndarray  # [n] probability that ANSWER with every hop found is right
    hint: np.ndarray  # [n, 2] noisy logits of p_search and p_correct (a feature the predictor may use)

    def __len__(self) -> int:
        return len(self.hops)


def make_task(n: int, rng: np.random.Generator, kinds: tuple[int, ...], hint_noise: float) -> Task:
    hops = rng.choice(np.asarray(kinds), size=n)
    p_search = rng.uniform(0.4, 0.95, size=n)
    p_correct = rng.uniform(0.1, 0.95, size=n)
    logit = np.log(np.stack([p_search, p_correct], 1) / (1 - np.stack([p_search, p_correct], 1)))
    return Task(hops, p_search, p_correct, logit + rng.normal(0.0, hint_noise, size=(n, 2)))


def policy_probs(theta: np.ndarray, hops: np.ndarray) -> np.ndarray:
    """[n, N_STATES, N_ACTIONS] action probabilities of each prompt's kind, from logits theta[MAX_HOPS + 1, ...]."""
    z = theta[hops]
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def optimal_probs(hops: np.ndarray) -> np.ndarray:
    """The optimal policy: SEARCH_RIGHT while f < h, ANSWER at f == h (dominant: an early answer scores 0, a wrong
    search wastes a turn, and searching at f == h changes nothing)."""
    f = np.arange(N_STATES)[None, :]
    done = f >= hops[:, None]
    pi = np.zeros((len(hops), N_STATES, N_ACTIONS))
    pi[..., ANSWER] = done
    pi[..., SEARCH_RIGHT] = ~done
    return pi


def warm_theta(early: float) -> np.ndarray:
    """Logits theta[MAX_HOPS + 1, N_STATES, N_ACTIONS] of SimConfig.warm_early's warm start."""
    theta = np.zeros((MAX_HOPS + 1, N_STATES, N_ACTIONS))
    for h in range(1, MAX_HOPS + 1):
        for f in range(N_STATES):
            if f >= h:
                p = [0.95, 0.025, 0.025]
            elif f == 0:
                p = [0.025, 0.95, 0.025]
            else:
                rest = 1.0 - early
                p = [max(early, 1e-3), 0.95 * rest + 1e-3, 0.05 * rest + 1e-3]
            theta[h, f] = np.log(np.asarray(p) / sum(p))
    return theta


def success_table(task: Task, pi: np.ndarray, max_turns: int, idx: np.ndarray | None = None) -> np.ndarray:
    """V[n, f, d]: exact success probability from state (f found, d turns taken) under policy pi (dynamic
    programming from d = max_turns, where a truncated episode scores 0)."""
    sel = slice(None) if idx is None else idx
    hops, ps, pc = task.hops[sel], task.p_search[sel], task.p_correct[sel]
    f = np.arange(N_STATES)[None, :]
    done = f >= hops[:, None]
    answer = np.where(done, pc[:, None], 0.0)
    v = np.zeros((len(hops), N_STATES, max_turns + 1))
    for d in range(max_turns - 1, -1, -1):
        nxt = v[:, :, d + 1]
        up = np.where(done, nxt, np.concatenate([nxt[:, 1:], nxt[:, -1:]], 1))
        v[:, :, d] = (
            pi[..., ANSWER] * answer
            + pi[..., SEARCH_RIGHT] * (ps[:, None] * up + (1 - ps[:, None]) * nxt)
            + pi[..., SEARCH_WRONG] * nxt
        )
    return v


# ---- the simulation ------------------------------------------------------------------------------------------


@dataclass
class SimConfig:
    allocator: str = "trace"
    seed: int = 0
    steps: int = 50
    """Training steps; each generates exactly leaf_budget leaves."""
    optimizer: str = "adamw"
    """The policy's optimizer: "adamw" (the trainer's: torch AdamW, weight decay 0, the gradient norm clipped at
    grad_clip) or "sgd" (plain SGD, the simulator's setting before issue 22, whose larger gradients took larger steps:
    with grad_clip 0 it reproduces the old tables)."""
    lr: float = 0.05
    """The policy's learning rate (a sweep picks one per allocator: --sweep-lrs)."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping), as optim.grad_clip."""
    leaf_budget: int = 64
    root_budget: int = 32
    m_min: int = 2
    m_max: int = 6
    group_size: int = 0
    rounds: int = 1
    max_per_anchor: int = 2
    prompts_per_step: int = 16
    pool_size: int = 64
    max_turns: int = 5
    kinds: tuple[int, ...] = (1, 2, 3)
    n_prompts: int = 4000
    """The training stream: with 50 steps of <= 64 candidates, most prompts are seen once or never (one epoch); a
    smaller one (200: 50 steps of 16 prompts are 4 passes) is a multi-pass regime, where greso's history has data."""
    n_eval: int = 500
    hint_noise: float = 0.5
    target: float = 0.3
    """Exact held-out success that leaves_to_target waits for."""
    w_process: float = 1.0
    process_baseline: str = "parent"
    """advantage.process_baseline: "parent" (the paper's), "fresh" or "predicted" (our deviations, issue 22)."""
    stage2_share: str = "roots"
    """allocation.stage2_share: "roots" (the paper's) or "unmixed" (our deviation, issue 22)."""
    predictor_hidden: int = 32
    predictor_lr: float = 3e-3
    predictor_epochs: int = 30
    predictor_max_steps: int = 100
    predictor_replay: int = 0
    """predictor.replay_steps: also refit on the rows of this many earlier steps."""
    predictor_open_only: bool = False
    """predictor.open_only: no leaf rows."""
    predictor_policy_signals: bool = False
    """predictor.policy_signals: two more features at every node, from the policy that generates the step: its
    probability of answering next and the entropy (nats) of its next action (the trainer's: log p(`<answer>` next)
    and the next-token entropy at the node's last token)."""
    prior_a: float = 1.0
    prior_b: float = 1.0
    prior_decay: float = 1.0
    """predictor.prior_decay: a prompt's past bare-rollout counts are multiplied by this before each new visit's
    (1.0, the paper's: every past outcome counts; below 1 an older policy's outcomes fade), in (0, 1]."""
    probe: int = 32
    """Calibration probe (issue 22): prompts a step drawn at random from the training stream, the same for every
    allocator of a seed, outside the leaf budget and never trained on; each gets one rollout from its root and one
    from a random non-final turn of that rollout, and its predicted V(root) / V(H) is scored against those outcomes
    (`probe_auc`) and the exact values of the same states (`probe_auc_oracle`). 0 = no probe."""
    warm_early: float = -1.0
    """< 0: the policy starts uniform (theta = 0). In [0, 1): a warm start like the LM testbed's (trainer's
    `sft.flawed_frac`): at 0 < f < h it answers early with this probability (else searches right, 95% of the
    rest), at f = 0 it searches right and at f == h it answers (95% each)."""

    def allocation(self) -> AllocationConfig:
        return AllocationConfig(
            type=self.allocator,
            leaf_budget=self.leaf_budget,
            root_budget=self.root_budget,
            m_min=self.m_min,
            m_max=self.m_max,
            group_size=self.group_size,
            rounds=self.rounds,
            max_per_anchor=self.max_per_anchor,
            stage2_share=self.stage2_share,
        )


N_FEATURES = 2 + 3 + N_STATES + 2 + 1  # depth, turns left; kind one-hot; f one-hot; hint; ended


class _AsRollouts:
    """A `Simulation` as `trainer.algo.plan.Rollouts` (its synchronous methods under the protocol's names)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    async def new_trees(self, idxs: list[int], step: int) -> list[RolloutTree]:
        return [self.sim.new_tree(i) for i in idxs]

    async def value_roots(self, trees: list[RolloutTree]) -> list[float]:
        return self.sim.value_roots(trees)

    async def value_anchors(self, trees: list[RolloutTree]) -> None:
        self.sim.value_anchors(trees)

    async def expand(self, tree: RolloutTree, node_id: int, k: int) -> None:
        self.sim.expand(tree, node_id, k)


def action_entropy(p: np.ndarray) -> float:
    """The entropy (nats) of the policy's action distribution at a state: a simulated turn's entropy (a turn is one
    action; the simulator's analogue of the LM testbed's top-k estimate over a turn's first tokens), which the
    "entropy" allocator ranks anchors by."""
    return float(-(p * np.log(np.maximum(p, 1e-300))).sum())


class Simulation:
    """One (allocator, seed) run. Prompts, eval prompts and the initial policy depend on the seed only, so every
    allocator of a seed trains on the same stream from the same start."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.acfg = cfg.allocation()
        self.alloc = make_allocator(cfg.allocator)
        task_rng = np.random.default_rng(cfg.seed)
        self.task = make_task(cfg.n_prompts, task_rng, cfg.kinds, cfg.hint_noise)
        self.eval_task = make_task(cfg.n_eval, task_rng, cfg.kinds, cfg.hint_noise)
        self.rng = np.random.default_rng(cfg.seed + 1_000_003)  # outcomes
        self.alloc_rng = random.Random(cfg.seed)  # trace.py's self.rng (random-node's anchors)
        self.sampler = PromptSampler(cfg.n_prompts, cfg.seed)
        self.prior = BetaPrior(cfg.prior_a, cfg.prior_b, cfg.prior_decay)  # a value out of range: its ValueError
        self.greso = GresoFilter(self.acfg.greso_p, self.acfg.greso_target, self.acfg.greso_step)  # as TraceStep's
        self.success_count = [1.0, 2.0]  # trace.py's unseen-root fallback
        self.predictor = SuccessPredictor(
            N_FEATURES + (2 if cfg.predictor_policy_signals else 0),
            hidden=cfg.predictor_hidden,
            lr=cfg.predictor_lr,
            seed=cfg.seed,
            max_steps=cfg.predictor_max_steps,
        )
        self.fitted = False
        self.replay = RowReplay(cfg.predictor_replay)
        init = warm_theta(cfg.warm_early) if cfg.warm_early >= 0 else np.zeros((MAX_HOPS + 1, N_STATES, N_ACTIONS))
        self.theta = torch.tensor(init, dtype=torch.float64, requires_grad=True)
        if cfg.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW([self.theta], lr=cfg.lr, weight_decay=0.0)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD([self.theta], lr=cfg.lr)
        else:
            raise ValueError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")
        self.probe_rng = np.random.default_rng(cfg.seed + 7_000_001)  # the probe's prompts and outcomes, its own
        self.probe_pairs: dict[str, list[float]] = {"pred": [], "oracle": [], "outcome": []}
        self.adv_cfg = AdvantageConfig(w_process=cfg.w_process, process_baseline=cfg.process_baseline)
        self._pi = self._truth = None  # per step: policy probabilities and exact values of the training prompts

    # -- policy and truth --

    def probs(self, task: Task) -> np.ndarray:
        return policy_probs(self.theta.detach().numpy(), task.hops)

    def eval_success(self) -> float:
        v = success_table(self.eval_task, self.probs(self.eval_task), self.cfg.max_turns)
        return float(v[:, 0, 0].mean())

    def optimal_success(self) -> float:
        v = success_table(self.eval_task, optimal_probs(self.eval_task.hops), self.cfg.max_turns)
        return float(v[:, 0, 0].mean())

    # -- trees --

    def features(self, idx: int, f: int, depth: int, ended: bool) -> list[float]:
        kind = [0.0] * 3
        kind[int(self.task.hops[idx]) - 1] = 1.0
        state = [0.0] * N_STATES
        state[f] = 1.0
        out = [float(depth), float(self.cfg.max_turns - depth), *kind, *state, *self.task.hint[idx], float(ended)]
        if self.cfg.predictor_policy_signals:
            p = self._pi[idx, f]
            out += [float(p[ANSWER]), action_entropy(p)]
        return out

    def new_tree(self, idx: int) -> RolloutTree:
        tree = RolloutTree.new(f"p{idx}", f"q{idx}", ["a"], [int(self.task.hops[idx])], None, index=idx)
        tree.root.info["f"] = 0
        tree.root.features = self.features(idx, 0, 0, False)
        return tree

    def expand(self, tree: RolloutTree, node_id: int, k: int) -> None:
        """k chains from `node_id` to their ends under the current policy (trace.py's runner.expand)."""
        idx = tree.meta["index"]
        h, ps, pc = int(self.task.hops[idx]), float(self.task.p_search[idx]), float(self.task.p_correct[idx])
        pi = self._pi[idx]
        for _ in range(k):
            cur = tree.nodes[node_id]
            while True:
                f = cur.info["f"]
                a = int(self.rng.choice(N_ACTIONS, p=pi[f]))
                lp = min(math.log(pi[f, a]), 0.0)
                node = tree.add_child(cur.node_id, [a], [1], [lp], info={"f_in": f})
                node.entropy = action_entropy(pi[f])  # the distribution this turn's one "token" was drawn from
                if a == ANSWER:
                    node.status, node.reward = FinishStatus.ANSWERED, float(f >= h and self.rng.random() < pc)
                elif a == SEARCH_RIGHT and f < h and self.rng.random() < ps:
                    f += 1
                node.info["f"] = f
                if a != ANSWER and node.depth >= self.cfg.max_turns:
                    node.status, node.reward = FinishStatus.TRUNCATED, 0.0
                node.features = self.features(idx, f, node.depth, node.is_finished)
                if node.is_finished:
                    tree.ledger.leaves += 1
                    break
                cur = node

    # -- values (trace.py: _predict, value_roots) --

    @property
    def base_rate(self) -> float:
        return self.success_count[0] / self.success_count[1]

    def predict(self, feats: list[list[float]]) -> list[float]:
        if not self.fitted or not feats:
            return [self.base_rate] * len(feats)
        return [float(v) for v in self.predictor.predict(torch.tensor(feats, dtype=torch.float32))]

    def value_roots(self, trees: list[RolloutTree]) -> list[float]:
        """trace.py TraceStep.value_roots: the predictor's V(root), the Beta posterior centred there, clipped."""
        root_v = self.predict([t.root.features for t in trees])
        v = [
            min(max(self.prior.mean(t.prompt_id, prior_mean=rv), 1e-4), 1 - 1e-4)
            for t, rv in zip(trees, root_v, strict=True)
        ]
        for t, vi in zip(trees, v, strict=True):
            t.root.predicted = vi
        return v

    # -- collection: the trainer's own plan (trainer.algo.plan), this class as its Rollouts --

    def value_anchors(self, trees: list[RolloutTree]) -> None:
        """TraceStep.value_anchors: back up, then the predictor's V(H) on every anchor."""
        for t in trees:
            t.backup()
        cands = [n for t in trees for n in t.anchors(self.cfg.max_turns)]
        for n, p in zip(cands, self.predict([n.features for n in cands]), strict=True):
            n.predicted = p

    def collect(self) -> tuple[list[RolloutTree], dict[str, int]]:
        """TraceStep.collect without its env-failure recovery (no tree is lost here): `plan_rollouts`, then the
        unfunded candidates go back to the stream and the funded trees are backed up."""
        c, a, alloc = self.cfg, self.acfg, self.alloc
        plan = asyncio.run(
            plan_rollouts(
                _AsRollouts(self),
                alloc,
                a,
                self.sampler,
                self.alloc_rng,
                pool_size=c.pool_size,
                prompts_per_step=c.prompts_per_step,
                max_turns=c.max_turns,
                step=0,
                prompt_filter=self.greso,
            )
        )
        if alloc.selects:
            self.sampler.give_back([idx for idx, mi in zip(plan.idxs, plan.m, strict=True) if mi == 0])
        trees = [t for t, mi in zip(plan.pool, plan.m, strict=True) if mi > 0]
        for t in trees:
            t.backup()
        feed_history(plan, alloc, self.greso, self.sampler)  # as TraceStep.collect feeds it
        leaves = sum(t.ledger.leaves for t in trees)
        assert leaves == a.leaf_budget, f"{alloc.name} generated {leaves} leaves, leaf_budget is {a.leaf_budget}"
        return trees, plan.count

    # -- update: mirrors TraceStep.update (predictor refit, priors, samples, policy step) --

    def update(self, trees: list[RolloutTree]) -> dict[str, float]:
        rows = collect_training_set(trees, open_only=self.cfg.predictor_open_only)
        feats, targets, weights = self.replay.add(*rows)
        if len(feats):
            self.predictor.fit(feats, targets, weights, epochs=self.cfg.predictor_epochs)
            self.fitted = True
        for t in trees:
            rs = t.root_outcomes()
            self.prior.update(t.prompt_id, rs)
            self.success_count[0] += sum(rs)
            self.success_count[1] += len(rs)
        samples = build_training_samples(trees, self.adv_cfg, process=self.alloc.expands)
        # The policy-gradient step: one token per turn node (its action); logp of that action under theta at the
        # node's input state; the project's loss (on-policy: ratio 1, so it is -sum(w A logp) / sum(w)).
        kinds, states, actions, advs, wts = [], [], [], [], []
        for s in samples:
            tree = trees[s.tree_index]
            h = int(tree.root.token_ids[0])
            for node_id, start, _ in s.segments[1:]:
                if s.loss_mask[start]:
                    kinds.append(h)
                    states.append(tree.nodes[node_id].info["f_in"])
                    actions.append(s.input_ids[start])
                    advs.append(s.advantages[start])
                    wts.append(s.weights[start])
        logp_all = torch.log_softmax(self.theta[torch.tensor(kinds), torch.tensor(states)], -1)
        logp = logp_all.gather(1, torch.tensor(actions)[:, None]).squeeze(1)
        old = logp.detach()
        loss, _ = policy_loss(
            logp,
            old,
            old,
            torch.tensor(advs, dtype=torch.float64),
            torch.tensor(wts, dtype=torch.float64),
            torch.ones_like(logp),
            tis_cap=None,
        )
        self.opt.zero_grad()
        loss.backward()
        norm = float(self.theta.grad.norm())  # type: ignore[union-attr]
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([self.theta], self.cfg.grad_clip)
        self.opt.step()
        clipped = float(self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip)
        return {"nonzero_adv_token_frac": nonzero_adv_token_frac(samples), "grad_norm": norm, "clipped": clipped}

    # -- one run --

    def run(self) -> dict[str, Any]:
        c = self.cfg
        success = [self.eval_success()]
        errs: dict[str, list[float]] = {"root": [], "anchor": [], "visit_root": [], "visit_anchor": []}
        per_step: dict[str, list[float]] = {"effective_ratio": [], "mixed_per_100_leaves": []}
        per_step |= {"nonzero_adv_token_frac": [], "predictor_auc": [], "predictor_brier": []}
        per_step |= {"grad_norm": [], "clip_rate": [], "continuations_to_mixed_frac": [], "prompts_skipped": []}
        for _ in range(c.steps):
            self._pi = self.probs(self.task)
            trees, count = self.collect_with_truth(errs)
            if count["continuations"]:
                per_step["continuations_to_mixed_frac"].append(count["continuations_to_mixed"] / count["continuations"])
            per_step["prompts_skipped"].append(count["prompts_skipped"])  # greso's, this step (0 for the others)
            per_step["effective_ratio"].append(effective_ratio(trees))
            per_step["mixed_per_100_leaves"].append(mixed_per_100_leaves(trees))
            calib = split_calibration(trees)
            per_step["predictor_auc"].append(calib["auc"])
            per_step["predictor_brier"].append(calib["brier"])
            self.run_probe()
            upd = self.update(trees)
            per_step["nonzero_adv_token_frac"].append(upd["nonzero_adv_token_frac"])
            per_step["grad_norm"].append(upd["grad_norm"])
            per_step["clip_rate"].append(upd["clipped"])
            success.append(self.eval_success())
        leaves = [i * c.leaf_budget for i in range(c.steps + 1)]
        hit = [x for x, s in zip(leaves, success, strict=True) if s >= c.target]
        out: dict[str, Any] = {k: _nanmean(xs) for k, xs in per_step.items()}
        out |= {
            "value_bias": _nanmean(errs["root"] + errs["anchor"]),
            "value_bias_root": _nanmean(errs["root"]),
            "value_bias_anchor": _nanmean(errs["anchor"]),
            "visit_bias_root": _nanmean(errs["visit_root"]),
            "visit_bias_anchor": _nanmean(errs["visit_anchor"]),
            "n_anchor_estimates": len(errs["anchor"]),
            "probe_auc": calibration(self.probe_pairs["pred"], self.probe_pairs["outcome"])["auc"],
            "probe_auc_oracle": calibration(self.probe_pairs["oracle"], self.probe_pairs["outcome"])["auc"],
            "final_success": success[-1],
            "mean_success": float(np.mean(success[1:])) if len(success) > 1 else success[0],
            "leaves_to_target": float(hit[0] if hit else leaves[-1]),
            "reached_target": float(bool(hit)),
            "success_curve": success,
            "initial_success": success[0],
            "optimal_success": self.optimal_success(),
        }
        return out

    def run_probe(self) -> None:
        """The calibration probe of `SimConfig.probe`: outcomes drawn with the probe's own generator, so the
        allocation and training streams are untouched."""
        if self.cfg.probe <= 0:
            return
        idx = self.probe_rng.choice(self.cfg.n_prompts, size=self.cfg.probe, replace=False)
        truth = success_table(self.task, self._pi[idx], self.cfg.max_turns, idx)
        trees = [self.new_tree(int(i)) for i in idx]
        roots = [min(max(self.prior.mean(t.prompt_id, prior_mean=v), 1e-4), 1 - 1e-4)
                 for t, v in zip(trees, self.predict([t.root.features for t in trees]), strict=True)]  # fmt: skip
        rng, self.rng = self.rng, self.probe_rng  # expand() draws from self.rng
        try:
            for k, t in enumerate(trees):
                self.expand(t, 0, 1)
                chain = [n for n in t.nodes[1:] if not n.is_finished]
                pairs = [(roots[k], truth[k][0, 0], t.nodes[-1].reward)]
                if chain:
                    node = chain[int(self.probe_rng.integers(len(chain)))]
                    before = len(t.nodes)
                    self.expand(t, node.node_id, 1)
                    pred = self.predict([node.features])[0]
                    pairs.append((pred, truth[k][node.info["f"], node.depth], t.nodes[-1].reward))
                    assert len(t.nodes) > before
                for pred, oracle, outcome in pairs:
                    self.probe_pairs["pred"].append(float(pred))
                    self.probe_pairs["oracle"].append(float(oracle))
                    self.probe_pairs["outcome"].append(float(outcome))
        finally:
            self.rng = rng

    def collect_with_truth(self, errs: dict[str, list[float]]) -> tuple[list[RolloutTree], dict[str, int]]:
        """`collect`, then each root's and each expanded anchor's Vhat (and the visit-weighted witness) against the
        exact value of its state under the policy that generated the step."""
        trees, count = self.collect()
        idx = np.asarray([t.meta["index"] for t in trees])
        truth = success_table(self.task, self._pi[idx], self.cfg.max_turns, idx)
        for t, tv in zip(trees, truth, strict=True):
            vw = visit_weighted(t)
            errs["root"].append(t.root.value - tv[0, 0])
            errs["visit_root"].append(vw[0] - tv[0, 0])
            for n in t.nodes[1:]:
                if len(n.children) > 1 and n.value is not None:  # an anchor stage 2 added continuations at
                    errs["anchor"].append(n.value - tv[n.info["f"], n.depth])
                    errs["visit_anchor"].append(vw[n.node_id] - tv[n.info["f"], n.depth])
        return trees, count


def visit_weighted(tree: RolloutTree) -> dict[int, float]:
    """The biased witness (DESIGN §1): Vhat(y) = sum_c n_c Vhat(c) / n_y, i.e. the mean over scored leaves below."""
    n: dict[int, int] = {}
    v: dict[int, float] = {}
    for node in reversed(tree.nodes):
        if not node.children:
            n[node.node_id] = int(node.is_scored_leaf)
            v[node.node_id] = float(node.reward) if node.is_scored_leaf else 0.0
            continue
        n[node.node_id] = sum(n[c] for c in node.children)
        v[node.node_id] = sum(n[c] * v[c] for c in node.children) / max(n[node.node_id], 1)
    return v


# ---- statistics, CLI -----------------------------------------------------------------------------------------


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def t975(df: int) -> float:
    """Student's t 97.5% quantile (Cornish-Fisher expansion from the normal's; within 0.005 for df >= 3)."""
    z = 1.959963984540054
    if df <= 2:
        return {1: 12.706, 2: 4.303}[max(df, 1)]
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval) over the non-nan values; nan for none, and a half-width of nan
    for one."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    if len(xs) == 1:
        return xs[0], math.nan
    return float(np.mean(xs)), t975(len(xs) - 1) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


FIGURES = (
    "value_bias",
    "value_bias_root",
    "value_bias_anchor",
    "visit_bias_root",
    "visit_bias_anchor",
    "effective_ratio",
    "mixed_per_100_leaves",
    "nonzero_adv_token_frac",
    "final_success",
    "mean_success",
    "grad_norm",
    "clip_rate",
    "continuations_to_mixed_frac",
    "prompts_skipped",
    "probe_auc",
    "probe_auc_oracle",
    "leaves_to_target",
    "reached_target",
    "predictor_auc",
)


def run_one(cfg: SimConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Simulation(cfg).run()
    out["wall_s"] = time.perf_counter() - t0
    out["allocator"], out["seed"], out["lr"] = cfg.allocator, cfg.seed, cfg.lr
    return out


TUNE_SEED0 = 10_000
"""Tuning seeds are TUNE_SEED0, TUNE_SEED0 + 1, ...: never among the seeds a comparison reports (0, 1, ...)."""


def sweep(
    base: dict[str, Any], allocators: list[str], lrs: list[float], tune_seeds: int, workers: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each allocator's rate: the one of `lrs` with the highest mean success over the run (`mean_success`), averaged
    over `tune_seeds` tuning seeds. Returns the chosen rates and every (allocator, rate) score."""
    cfgs = [
        SimConfig(allocator=a, seed=TUNE_SEED0 + s, **{**base, "lr": lr})
        for a in allocators
        for lr in lrs
        for s in range(tune_seeds)
    ]
    runs = _run_all(cfgs, workers)
    scores: dict[str, dict[str, float]] = {a: {} for a in allocators}
    for a in allocators:
        for lr in lrs:
            scores[a][str(lr)] = float(
                np.mean([r["mean_success"] for r in runs if r["allocator"] == a and r["lr"] == lr])
            )
    best = {a: float(max(lrs, key=lambda lr, a=a: scores[a][str(lr)])) for a in allocators}
    return best, scores


def _run_all(cfgs: list[SimConfig], workers: int) -> list[dict[str, Any]]:
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            return list(ex.map(run_one, cfgs))
    return [run_one(c) for c in cfgs]


def summarise(runs: list[dict[str, Any]], allocators: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for a in allocators:
        mine = [r for r in runs if r["allocator"] == a]
        fig: dict[str, Any] = {"seeds": len(mine)}
        for k in FIGURES:
            fig[k], fig[f"{k}_ci95"] = mean_ci([r[k] for r in mine])
        curves = np.asarray([r["success_curve"] for r in mine])
        fig["success_curve"] = curves.mean(0).tolist()
        fig["success_curve_ci95"] = [mean_ci(list(col))[1] for col in curves.T]
        fig["initial_success"] = float(np.mean([r["initial_success"] for r in mine]))
        fig["optimal_success"] = float(np.mean([r["optimal_success"] for r in mine]))
        fig["wall_s_per_run"] = float(np.mean([r["wall_s"] for r in mine]))
        fig["lr"] = mine[0].get("lr")
        out[a] = fig
    if "uniform" in allocators:  # paired by seed against GRPO: same prompts, eval prompts and start per seed
        base = {r["seed"]: r for r in runs if r["allocator"] == "uniform"}
        for a in allocators:
            pairs = [(r, base[r["seed"]]) for r in runs if r["allocator"] == a and r["seed"] in base]
            d_mean, d_ci = mean_ci([r["mean_success"] - g["mean_success"] for r, g in pairs])
            f_mean, f_ci = mean_ci([r["final_success"] - g["final_success"] for r, g in pairs])
            logs = [
                math.log(r["leaves_to_target"] / g["leaves_to_target"])
                for r, g in pairs
                if r["leaves_to_target"] > 0 and g["leaves_to_target"] > 0  # 0: the start was already at target
            ]
            l_mean, l_ci = mean_ci(logs) if logs else (math.nan, math.nan)
            out[a]["vs_grpo_mean_success"], out[a]["vs_grpo_mean_success_ci95"] = d_mean, d_ci
            out[a]["vs_grpo_final_success"], out[a]["vs_grpo_final_success_ci95"] = f_mean, f_ci
            out[a]["vs_grpo_leaves_ratio"] = math.exp(l_mean)
            out[a]["vs_grpo_leaves_ratio_ci95"] = [math.exp(l_mean - l_ci), math.exp(l_mean + l_ci)]
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    cols = (
        "value_bias",
        "value_bias_anchor",
        "visit_bias_root",
        "effective_ratio",
        "mixed_per_100_leaves",
        "final_success",
        "mean_success",
        "leaves_to_target",
        "reached_target",
        "grad_norm",
        "clip_rate",
    )
    lines = ["| allocator | lr | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for a, fig in summary.items():
        cells = []
        for k in cols:
            x, ci = fig[k], fig[f"{k}_ci95"]
            prec = 0 if k == "leaves_to_target" else 1 if k == "mixed_per_100_leaves" else 3
            if math.isnan(x):
                cells.append("n/a")
            else:
                cells.append(f"{x:+.{prec}f} ± {ci:.{prec}f}" if "bias" in k else f"{x:.{prec}f} ± {ci:.{prec}f}")
        lines.append(f"| {a} | {fig.get('lr')} | " + " | ".join(cells) + " |")
    if all("vs_grpo_mean_success" in f for f in summary.values()):
        lines += ["", "| allocator | mean success - GRPO's (paired, 95%) | final success - GRPO's (paired, 95%) "
                  "| leaves to target / GRPO's (95%) |"]  # fmt: skip
        lines.append("|---|---|---|---|")
        for a, f in summary.items():
            lo, hi = f["vs_grpo_leaves_ratio_ci95"]
            lines.append(f"| {a} | {f['vs_grpo_mean_success']:+.3f} ± {f['vs_grpo_mean_success_ci95']:.3f} | "
                         f"{f['vs_grpo_final_success']:+.3f} ± {f['vs_grpo_final_success_ci95']:.3f} | "
                         f"{f['vs_grpo_leaves_ratio']:.2f}x [{lo:.2f}, {hi:.2f}] |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], leaf_budget: int, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a, s in summary.items():
        y = np.asarray(s["success_curve"])
        ci = np.nan_to_num(np.asarray(s["success_curve_ci95"], dtype=float))
        x = np.arange(len(y)) * leaf_budget
        ax.plot(x, y, label=a)
        ax.fill_between(x, y - ci, y + ci, alpha=0.2)
    first = next(iter(summary.values()))
    ax.axhline(first["optimal_success"], color="k", ls="--", lw=0.8, label="optimal policy")
    ax.axhline(target, color="grey", ls=":", lw=0.8, label="target")
    ax.set_xlabel("cumulative leaves")
    ax.set_ylabel("exact held-out success")
    ax.set_title(f"success vs leaves (mean, 95% band over {first['seeds']} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    """nan (a figure with no sample, e.g. anchor bias without expansion) -> null, so FILE.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main() -> None:
    d = SimConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--allocators", default=",".join(ALL))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    skip = {"allocator", "seed", "kinds"}
    for f_name, f_val in asdict(d).items():
        if f_name not in skip:
            kind = (lambda x: x.lower() in ("1", "true", "yes")) if isinstance(f_val, bool) else type(f_val)
            ap.add_argument(f"--{f_name.replace('_', '-')}", type=kind, default=f_val)
    ap.add_argument("--kinds", default=",".join(map(str, d.kinds)), help="hop counts of the prompt kinds")
    ap.add_argument(
        "--sweep-lrs",
        default="",
        help="comma-separated rates: each allocator gets the one with the best mean success on --tune-seeds tuning "
        "seeds (never reported), then runs the --seeds seeds at it; empty: every allocator at --lr",
    )
    ap.add_argument("--tune-seeds", type=int, default=2)
    args = ap.parse_args()
    allocators = args.allocators.split(",")
    base = {k: getattr(args, k) for k in asdict(d) if k not in skip}
    base["kinds"] = tuple(int(x) for x in args.kinds.split(","))
    t0 = time.perf_counter()
    rates = dict.fromkeys(allocators, base["lr"])
    scores: dict[str, dict[str, float]] = {}
    if args.sweep_lrs:
        lrs = [float(x) for x in args.sweep_lrs.split(",")]
        rates, scores = sweep(base, allocators, lrs, args.tune_seeds, args.workers)
        print("rates by sweep (mean success on tuning seeds): " + "; ".join(
            f"{a} {rates[a]:g} (" + ", ".join(f"{lr}: {v:.3f}" for lr, v in scores[a].items()) + ")" for a in allocators
        ))  # fmt: skip
    cfgs = [SimConfig(allocator=a, seed=s, **{**base, "lr": rates[a]}) for s in range(args.seeds) for a in allocators]
    runs = _run_all(cfgs, args.workers)
    summary = summarise(runs, allocators)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {**base, "seeds": args.seeds, "rates": rates, "sweep": scores, "tune_seeds": args.tune_seeds}
    args.out.write_text(json.dumps(_json_safe({**summary, "_config": config}), indent=1))
    args.out.with_suffix(".runs.json").write_text(json.dumps(_json_safe(runs)))
    plot(summary, base["leaf_budget"], base["target"], args.out.with_suffix(".png"))
    first = summary[allocators[0]]
    print(table(summary))
    print(
        f"initial success {first['initial_success']:.3f}, optimal {first['optimal_success']:.3f}, target "
        f"{base['target']}; {len(runs)} runs in {time.perf_counter() - t0:.1f} s "
        f"({np.mean([r['wall_s'] for r in runs]):.2f} s per run); wrote {args.out}, {args.out.with_suffix('.png')}"
    )


if __name__ == "__main__":
    main()
