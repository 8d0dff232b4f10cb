"""One TRACE step, in two halves the loop can overlap (DESIGN §1):

- `collect(step)` (async, on the event loop): draw the candidate pool, value the roots, stage 1
  root allocation, bare rollouts, then `rounds` of stage 2 prefix expansion (back up, featurise,
  predict V(H) at every anchor, allocate each prompt's continuation budget, expand), and score the
  predictor on the step's fresh outcomes before it is refit.
- `update(batch)` (blocking, run in a worker thread): featurise the remaining nodes, refit the
  predictor on backed-up targets, update the Beta priors, build tree-aware samples and take the
  policy step.

Who owns what: the allocator decides counts only; the runner owns env/engine traffic; the policy
owns the weights (and the lock around them); this class owns the predictor, the priors and the
prompt sampler, which are all checkpointed with `state_dict()`.

Threads (`trainer.compute`): `update` runs on the torch thread. With `run.max_staleness >= 1` collection's own
torch work (`afeaturise`, `apredict`) runs on the inference thread, on a frozen copy of the policy's model
(`features`) and a snapshot of the predictor (`served`), both refreshed by `publish()` after every update, so the
next step's rollouts never wait for this step's update and a refit never races a prediction. With 0 it runs on
the torch thread on the live policy and predictor, as collection and update never overlap.
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.advantages import build_training_samples, effective_ratio, mixed_per_100_leaves, nonzero_adv_token_frac
from trainer.allocation import anchors_from_tree, make_allocator, split_rounds
from trainer.compute import compute, infer
from trainer.config import TrainConfig
from trainer.policy import FeatureModel, Policy
from trainer.predictor import BetaPrior, SuccessPredictor, calibration, collect_training_set, structural_features
from trainer.rollout import RolloutRunner
from trainer.staleness import drop_stale
from trainer.tree import Ledger, RolloutTree


class PromptSampler:
    """Deterministic data order: a seeded permutation per epoch; prompts stage 1 leaves at 0 go back to
    the front of the queue for the next batch (DESIGN: "left for a later batch")."""

    def __init__(self, n: int, seed: int) -> None:
        assert n > 0, "the training split is empty"
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.returned: list[int] = []
        self._perm = self._make_perm()

    def _make_perm(self) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out = self.returned[:k]
        self.returned = self.returned[k:]
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            i = self._perm[self.pos]
            self.pos += 1
            if i not in out:
                out.append(i)
        return out

    def give_back(self, idxs: list[int]) -> None:
        self.returned.extend(idxs)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "returned": list(self.returned)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.epoch, self.pos, self.returned = s["epoch"], s["pos"], list(s["returned"])
        self._perm = self._make_perm()


@dataclass
class StepBatch:
    step: int
    trees: list[RolloutTree]
    pool_size: int
    selected: int
    calib: dict[str, float]
    rollout_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)


class TraceStep:
    def __init__(self, cfg: TrainConfig, policy: Policy, runner: RolloutRunner, n_train: int) -> None:
        self.cfg = cfg
        self.policy = policy
        self.runner = runner
        self.allocator = make_allocator(cfg.allocation.type)
        self.sampler = PromptSampler(n_train, cfg.run.seed)
        self.prior = BetaPrior(cfg.predictor.prior_a, cfg.predictor.prior_b)
        self.rng = random.Random(cfg.run.seed)
        self.predictor: SuccessPredictor | None = None
        self.fitted = False
        self.success_count = [1.0, 2.0]  # running (successes, total) with a weak 0.5 prior: unseen-root fallback
        # Collection's side when it overlaps the update (max_staleness >= 1), set by publish(): the frozen feature
        # model and the predictor as of the last fit (None before the first). infer_wait_s: the seconds collection's
        # featurise/predict calls have waited for their thread, in all (the loop logs it per step).
        self.overlap = cfg.run.max_staleness >= 1
        self.features: FeatureModel | None = None
        self.served: SuccessPredictor | None = None
        self.infer_wait_s = 0.0

    # ------------------------------------------------------------------ features and values
    def featurise(self, trees: list[RolloutTree], hidden_at: Callable[..., list[torch.Tensor]] | None = None) -> None:
        """Set `features` on every node that lacks them: hidden state at the node's last token (one
        forward per leaf path, each node computed once) + structural features. hidden_at: the model to take the
        hidden states from, default the policy's (collection passes the frozen copy's when overlapping)."""
        seqs: list[list[int]] = []
        positions: list[list[int]] = []
        owners: list[list[tuple[RolloutTree, int]]] = []
        for tree in trees:
            done: set[int] = set()
            ends = [n.node_id for n in tree.nodes if not n.children]
            for end in ends:
                path = tree.path(end)
                need = [i for i in path if tree.nodes[i].features is None and i not in done]
                if not need:
                    continue
                pos, acc = {}, 0
                for i in path:
                    acc += len(tree.nodes[i].token_ids)
                    pos[i] = acc - 1
                seqs.append(tree.history_ids(end) if self.cfg.predictor.use_hidden_state else [])
                positions.append([pos[i] for i in need])
                owners.append([(tree, i) for i in need])
                done.update(need)
        if not owners:
            return
        if self.cfg.predictor.use_hidden_state:
            hidden = (hidden_at or self.policy.hidden_at)(seqs, positions)
        else:
            hidden = [torch.zeros(len(p), 0) for p in positions]
        for h, own in zip(hidden, owners, strict=True):
            for row, (tree, i) in zip(h, own, strict=True):
                node = tree.nodes[i]
                node.features = row.tolist() + structural_features(node, tree)

    def _predict(self, nodes_features: list[list[float]], fallback: float) -> list[float]:
        predictor = self.served if self.overlap else (self.predictor if self.fitted else None)
        if predictor is None or not nodes_features:
            return [fallback] * len(nodes_features)
        x = torch.tensor(nodes_features, dtype=torch.float32)
        return [float(v) for v in predictor.predict(x)]

    async def afeaturise(self, trees: list[RolloutTree]) -> None:
        """`featurise` for collection: on the inference thread and the frozen copy when overlapping."""
        assert not self.overlap or self.features is not None, "publish() makes the feature model: call it first"
        await self._infer(self.featurise, trees, self.features.hidden_at if self.features is not None else None)

    async def apredict(self, nodes_features: list[list[float]], fallback: float) -> list[float]:
        """`_predict` for collection: on the inference thread and the served snapshot when overlapping."""
        return await self._infer(self._predict, nodes_features, fallback)

    async def _infer(self, fn: Callable[..., Any], *args: Any) -> Any:
        queued = time.perf_counter()

        def run() -> Any:
            self.infer_wait_s += time.perf_counter() - queued  # only ever written on this one thread
            return fn(*args)

        return await (infer if self.overlap else compute)(run)

    async def publish(self) -> None:
        """Hand the weights of the latest update to collection's side (no-op unless overlapping): a snapshot of the
        predictor, taken on the torch thread where it is fit, and the frozen feature model, made or synced on the
        inference thread. The loop calls it once before the first step and after every update."""
        if not self.overlap:
            return
        self.served = await compute(lambda: copy.deepcopy(self.predictor) if self.fitted else None)
        if self.features is None:
            self.features = await infer(FeatureModel, self.policy)
        else:
            await infer(self.features.sync)

    @property
    def base_rate(self) -> float:
        return self.success_count[0] / self.success_count[1]

    # ------------------------------------------------------------------ collection (event loop)
    async def collect(self, step: int) -> StepBatch:
        t0 = time.perf_counter()
        c, a = self.cfg, self.cfg.allocation
        idxs = self.sampler.take(c.run.prompts_per_step)
        trees = list(
            await asyncio.gather(*(self.runner.new_tree(c.env.dataset, c.env.train_split, i, step=step) for i in idxs))
        )
        # Stage 1: root values = per-prompt Beta posterior centred on the predictor's V(root) (or the base rate).
        await self.afeaturise(trees)
        root_v = await self.apredict([t.root.features for t in trees], self.base_rate)
        v = [
            min(max(self.prior.mean(t.prompt_id, prior_mean=rv), 1e-4), 1 - 1e-4)
            for t, rv in zip(trees, root_v, strict=True)
        ]
        for t, vi in zip(trees, v, strict=True):
            t.root.predicted = vi
        m = self.allocator.roots(v, self.allocator.stage1_budget(a), a)
        self.sampler.give_back([i for i, mi in zip(idxs, m, strict=True) if mi == 0])
        active = [(t, mi) for t, mi in zip(trees, m, strict=True) if mi > 0]
        await asyncio.gather(*(self.runner.expand(t, 0, mi) for t, mi in active))
        # Stage 2: prefix expansion, round by round.
        if self.allocator.expands:
            budgets = {t.prompt_id: split_rounds(a.continuation_budget(mi), a.rounds) for t, mi in active}
            for r in range(a.rounds):
                for t, _ in active:
                    t.backup()
                await self.afeaturise([t for t, _ in active])
                cands = [n for t, _ in active for n in t.anchors(c.env.max_turns)]
                preds = await self.apredict([n.features for n in cands], self.base_rate)
                for n, p in zip(cands, preds, strict=True):
                    n.predicted = p
                jobs = []
                for t, _ in active:
                    anchors = anchors_from_tree(t, c.env.max_turns)
                    ks = self.allocator.prefixes(anchors, budgets[t.prompt_id][r], self.rng, a)
                    jobs += [self.runner.expand(t, an.node_id, k) for an, k in zip(anchors, ks, strict=True) if k > 0]
                await asyncio.gather(*jobs)
        trees = [t for t, _ in active]
        for t in trees:
            t.backup()
            self.engine_release(t)
        # Calibration of the predictions made at allocation time against the outcomes that followed.
        pairs = [
            (n.predicted, n.value) for t in trees for n in t.nodes if n.predicted is not None and n.value is not None
        ]
        calib = calibration([p for p, _ in pairs], [o for _, o in pairs])
        return StepBatch(step, trees, len(idxs), len(active), calib, time.perf_counter() - t0)

    def engine_release(self, tree: RolloutTree) -> None:
        self.runner.engine.release(tree.prompt_id)

    # ------------------------------------------------------------------ update (worker thread)
    def update(self, batch: StepBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        trees = batch.trees
        self.featurise(trees)
        feats, targets, weights = collect_training_set(trees)
        if self.predictor is None and len(feats):
            p = self.cfg.predictor
            self.predictor = SuccessPredictor(feats.shape[1], hidden=p.hidden, lr=p.lr, seed=self.cfg.run.seed)
        pred_loss = math.nan
        if self.predictor is not None and len(feats):
            pred_loss = self.predictor.fit(feats, targets, weights, epochs=self.cfg.predictor.epochs)
            self.fitted = True
        for t in trees:  # the bare rollouts only: i.i.d. samples of the root (continuations were placed by outcome)
            rs = t.root_outcomes()
            self.prior.update(t.prompt_id, rs)
            self.success_count[0] += sum(rs)
            self.success_count[1] += len(rs)
        # No process term for allocators that do not expand: uniform and root-only are then exactly GRPO.
        samples = build_training_samples(trees, self.cfg.advantage, process=self.allocator.expands)
        samples, stale = drop_stale(samples, self.policy.version, self.cfg.run.max_staleness)  # trainer.staleness
        pol = self.policy.rl_update(samples) if samples else {}
        ledger = sum((t.ledger for t in trees), Ledger())
        rewards = [r for t in trees for r in t.rewards()]
        m: dict[str, float] = {
            "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
            "effective_ratio": effective_ratio(trees),
            "mixed_per_100_leaves": mixed_per_100_leaves(trees),
            "nonzero_adv_token_frac": nonzero_adv_token_frac(samples),
            **ledger.to_dict(),
            # predictor_*: roots and anchors pooled (split_calibration's unprefixed keys); the split figures follow.
            "predictor_brier": batch.calib["brier"],
            "predictor_auc": batch.calib["auc"],
            "predictor_n": float(batch.calib["n"]),
            **{
                f"predictor_{k}": float(batch.calib.get(k, math.nan))
                for k in ("root_brier", "root_auc", "root_n", "anchor_brier", "anchor_auc", "anchor_n")
            },
            "predictor_fit_loss": pred_loss,
            "prompts_pool": float(batch.pool_size),
            "prompts_selected": float(batch.selected),
            "samples": float(len(samples)),
            "stale_samples": float(stale),
            "rollout_time_s": batch.rollout_time_s,
            "update_time_s": time.perf_counter() - t0,
        }
        m.update({f"policy_{k}" if k not in ("loss", "grad_norm", "trained_tokens") else k: v for k, v in pol.items()})
        return m

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "prior": self.prior.state_dict(),
            "rng": self.rng.getstate(),
            "predictor": self.predictor.state_dict() if self.predictor is not None else None,
            "predictor_dim": self.predictor.input_dim if self.predictor is not None else None,
            "fitted": self.fitted,
            "success_count": list(self.success_count),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.sampler.load_state_dict(s["sampler"])
        self.prior.load_state_dict(s["prior"])
        self.rng.setstate(s["rng"])
        if s["predictor"] is not None:
            p = self.cfg.predictor
            self.predictor = SuccessPredictor(s["predictor_dim"], hidden=p.hidden, lr=p.lr, seed=self.cfg.run.seed)
            self.predictor.load_state_dict(s["predictor"])
        self.fitted = s["fitted"]
        self.success_count = list(s["success_count"])
