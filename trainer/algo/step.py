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

Threads (`trainer.learner.compute`): `update` runs on the torch thread. With `run.max_staleness >= 1` collection's own
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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog
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
    anchors_from_tree,
    make_allocator,
    plan_round,
    uniform_group,
)
from trainer.algo.plan import draw_replacement, feed_history, mark_round, plan_rollouts
from trainer.algo.predictor import (
    BetaPrior,
    PredictorConfig,
    RowReplay,
    SuccessPredictor,
    calibration,
    collect_training_set,
    new_predictor,
    split_calibration,
    structural_features,
)
from trainer.algo.rollout import RolloutRunner
from trainer.algo.staleness import drop_stale
from trainer.algo.tree import Ledger, RolloutTree
from trainer.learner.compute import compute, infer
from trainer.learner.policy import FeatureModel, Policy

log = structlog.get_logger("trace")


class _RunSettings(Protocol):
    @property
    def seed(self) -> int: ...
    @property
    def prompts_per_step(self) -> int: ...
    @property
    def max_staleness(self) -> int: ...


class _EnvSettings(Protocol):
    @property
    def max_turns(self) -> int: ...


class StepConfig(Protocol):
    """What a step reads of the trainer's config: the algorithm's own sections (`allocation`, `predictor`,
    `advantage`) and three run settings and one env setting. `trainer.config.TrainConfig`, composed on top, is
    one; naming the shape here keeps the algorithm from importing the loop's config."""

    @property
    def run(self) -> _RunSettings: ...
    @property
    def env(self) -> _EnvSettings: ...
    @property
    def allocation(self) -> AllocationConfig: ...
    @property
    def predictor(self) -> PredictorConfig: ...
    @property
    def advantage(self) -> AdvantageConfig: ...


class PromptSampler:
    """The data stream every allocator draws from: a seeded permutation per epoch; prompts stage 1 leaves at 0
    (the candidates of the pool it did not fund) go back to the front of the queue for the next batch (DESIGN:
    "left for a later batch"). `take(k)` gives k distinct prompts (k <= n); a prompt the next epoch's permutation
    gives again within one take (it was also near the end of the last) waits at the front for the next take, so
    every epoch still visits every prompt once. A prompt waits in the queue at most once: given back while it
    waits, or given again by a later epoch's permutation while it waits, it keeps its one place (over several
    passes a pool would otherwise fill with copies of the prompts stage 1 keeps leaving unfunded)."""

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
        assert 0 <= k <= self.n, f"asked for {k} distinct prompts of a split of {self.n}"
        out = self.returned[:k]
        self.returned = self.returned[k:]
        later: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            i = self._perm[self.pos]
            self.pos += 1
            (later if i in out or i in self.returned else out).append(i)
        self.returned[:0] = [i for i in dict.fromkeys(later) if i not in self.returned]
        return out

    def give_back(self, idxs: list[int]) -> None:
        waiting = set(self.returned)
        self.returned.extend(i for i in dict.fromkeys(idxs) if i not in waiting)

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
    trained: set[tuple[int, int]] = field(default_factory=set)  # (tree index, node id) a training sample used


class TraceStep:
    def __init__(self, cfg: StepConfig, policy: Policy, runner: RolloutRunner, n_train: int) -> None:
        self.cfg = cfg
        self.policy = policy
        self.runner = runner
        self.allocator = make_allocator(cfg.allocation.type)
        self.sampler = PromptSampler(n_train, cfg.run.seed)
        self._check_split(n_train)
        self.prior = BetaPrior(cfg.predictor.prior_a, cfg.predictor.prior_b, cfg.predictor.prior_decay)
        a = cfg.allocation
        self.greso = GresoFilter(a.greso_p, a.greso_target, a.greso_step)  # the "greso" allocator's prompt history
        self.rng = random.Random(cfg.run.seed)
        self.predictor: SuccessPredictor | None = None
        self.replay = RowReplay(cfg.predictor.replay_steps)  # the predictor's training rows of recent steps
        self.fitted = False
        self.success_count = [1.0, 2.0]  # running (successes, total) with a weak 0.5 prior: unseen-root fallback
        # Collection's side when it overlaps the update (max_staleness >= 1), set by publish(): the frozen feature
        # model and the predictor as of the last fit (None before the first). infer_wait_s: the seconds collection's
        # featurise/predict calls have waited for their thread, in all (the loop logs it per step).
        self.overlap = cfg.run.max_staleness >= 1
        self.features: FeatureModel | None = None
        self.served: SuccessPredictor | None = None
        self.infer_wait_s = 0.0
        # The data-order state each collect(step) started from (the last two steps). With overlap, step t+1's
        # collection has already drawn its prompts when step t's checkpoint is written: the checkpoint must hold
        # the state before that draw, or a resumed run would skip (or repeat) that batch.
        self._drawn_from: dict[int, dict[str, Any]] = {}
        # predictor.probe_prompts: the probe's own generator (the data order and allocation never see it), and
        # its (prediction, outcome) pairs so far
        self.probe_rng = random.Random(cfg.run.seed + 7_000_001)
        self.probe_pairs: list[tuple[float, float]] = []

    # ------------------------------------------------------------------ features and values
    def featurise(self, trees: list[RolloutTree], hidden_at: Callable[..., list[torch.Tensor]] | None = None) -> None:
        """Set `features` on every node that lacks them: hidden state at the node's last token (one
        forward per leaf path, each node computed once; with predictor.policy_signals, then log p(`<answer>` next)
        and the next-token entropy there, from the same forward) + structural features. hidden_at: the model to take the
        hidden states from, default the policy's (collection passes the frozen copy's when overlapping)."""
        pcfg = self.cfg.predictor
        forward = pcfg.use_hidden_state or pcfg.policy_signals
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
                seqs.append(tree.history_ids(end) if forward else [])
                positions.append([pos[i] for i in need])
                owners.append([(tree, i) for i in need])
                done.update(need)
        if not owners:
            return
        if forward:
            # predictor.policy_signals' token: the answer tag's (its first token where the tag is several)
            answer = self.policy.tokenizer.encode("<answer>", add_special_tokens=False)[0]
            signals = (answer, self.policy.temperature) if pcfg.policy_signals else None
            hidden = (hidden_at or self.policy.hidden_at)(seqs, positions, signals=signals)
            if not pcfg.use_hidden_state:  # the two signals only
                hidden = [h[:, -2:] for h in hidden]
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
            # under FSDP its first fill is a collective stream: on the thread of every other policy call
            self.features = await (compute if self.policy.sharded else infer)(FeatureModel, self.policy)
        else:
            await infer(self.features.sync)

    @property
    def base_rate(self) -> float:
        return self.success_count[0] / self.success_count[1]

    # ------------------------------------------------------------------ collection (event loop)
    async def collect(self, step: int) -> StepBatch:
        """One step's rollouts: exactly allocation.leaf_budget leaves, for every allocator (the rules:
        trainer/algo/allocation.py, "The leaf budget"); `batch.trees` are exactly the prompts that received rollouts."""
        t0 = time.perf_counter()
        failures0, requests0 = self.runner.env_failures, self.runner.env.http_requests
        self.remember_draw_state(step)
        c, a, alloc = self.cfg, self.cfg.allocation, self.allocator
        # Stage 1 and 2: the plan the simulator runs too (trainer.algo.plan), against this step's engines and env.
        plan = await plan_rollouts(
            self,
            alloc,
            a,
            self.sampler,
            self.rng,
            pool_size=c.run.pool_size,
            prompts_per_step=c.run.prompts_per_step,
            max_turns=c.env.max_turns,
            step=step,
            prompt_filter=self.greso,
        )
        pool, idxs, v, m, cont, count = plan.pool, plan.idxs, plan.v, plan.m, plan.cont, plan.count
        await self._recover(pool, idxs, v, m, cont, step, count)
        # Back to the stream: an allocator that selects, its unfunded candidates; every allocator, the prompts
        # _recover dropped (a non-selecting pool has no other prompt at 0), so none misses its pass over the data.
        self.sampler.give_back([idx for idx, mi in zip(idxs, m, strict=True) if mi == 0])
        trees = [t for t, mi in zip(pool, m, strict=True) if mi > 0]
        assert all(t.lost is None for t in trees), "a lost tree reached the batch"
        for t in pool:  # every tree's engine route, a dropped prompt's too
            self.engine_release(t)
        for t in trees:
            t.backup()
        feed_history(plan, alloc, self.greso, self.sampler)  # after _recover: the trees that count
        leaves = sum(t.ledger.leaves for t in trees)
        assert leaves == a.leaf_budget, (
            f"step {step}: {alloc.name} generated {leaves} leaves, allocation.leaf_budget is {a.leaf_budget} "
            f"(stage-1 roots {count['roots']}, continuations {count['continuations']}, re-spent as roots "
            f"{count['respent_as_roots']}, over {len(trees)} prompts of {len(pool)} candidates)"
        )
        # Calibration of the predictions made at allocation time against the outcomes that followed (roots against
        # their bare rollouts, anchors against their own outcomes: unbiased samples, trainer.algo.predictor).
        calib = split_calibration(trees)
        batch = StepBatch(step, trees, len(pool), len(trees), calib, time.perf_counter() - t0)
        # The step's budget accounting (pool_size / selected: candidates drawn / prompts funded). roots: stage 1's;
        # continuations: placed at anchors (continuations_moved of them on another prompt's anchors);
        # respent_as_roots: continuations no anchor could take, run as new roots. They sum to leaf_budget.
        batch.metrics = {"leaf_budget": float(a.leaf_budget), **{k: float(x) for k, x in count.items()}}
        # passes over the training split the stream has made (2.5: half-way through the third), for multi-pass runs
        batch.metrics["data_epoch"] = self.sampler.epoch + self.sampler.pos / self.sampler.n
        if alloc.stage1 == "greso":  # its keep probabilities after this step's observation
            batch.metrics.update(greso_p_easy=self.greso.p_easy, greso_p_hard=self.greso.p_hard)
        batch.metrics["env_failures"] = float(self.runner.env_failures - failures0)
        # HTTP requests to the env server(s) for the step's env_calls: calls made together go as one /v1/batch.
        # (With run.max_staleness >= 1 the evals that ran during this collection are in it too.)
        batch.metrics["env_requests"] = float(self.runner.env.http_requests - requests0)
        if c.predictor.probe_prompts > 0:
            batch.metrics.update(await self.probe(step))
        return batch

    async def probe(self, step: int) -> dict[str, float]:
        """predictor.probe_prompts' calibration probe: prompts drawn with the probe's own generator, valued as
        stage 1 values a root (`value_roots`), one rollout each; then a random non-final turn of that rollout,
        valued as an anchor is, and one rollout from it. Its trees are thrown away: no leaf of the budget, no
        training row, no prior update. Returns the step's figures."""
        t0 = time.perf_counter()
        n = min(self.cfg.predictor.probe_prompts, self.sampler.n)
        idxs = self.probe_rng.sample(range(self.sampler.n), n)
        trees = await self.new_trees(idxs, step)
        roots = await self.value_roots(trees)
        firsts = await asyncio.gather(*(self.runner.expand(t, 0, 1) for t in trees))
        pairs, picked = [], []
        for t, v, leaf in zip(trees, roots, firsts, strict=True):
            if t.lost is not None or not leaf:
                continue
            pairs.append((v, t.nodes[leaf[0]].reward))
            chain = [x for x in t.nodes[1:] if not x.is_finished]
            if chain:
                picked.append((t, chain[self.probe_rng.randrange(len(chain))]))
        await self.afeaturise([t for t, _ in picked])
        preds = await self.apredict([x.features for _, x in picked], self.base_rate)
        ends = await asyncio.gather(*(self.runner.expand(t, x.node_id, 1) for t, x in picked))
        for (t, _), pred, new in zip(picked, preds, ends, strict=True):
            if t.lost is None and new:
                pairs.append((pred, t.nodes[new[-1]].reward))
        for t in trees:
            self.engine_release(t)
        pairs = [(p, float(r)) for p, r in pairs if r is not None]
        self.probe_pairs += pairs
        now = calibration([p for p, _ in pairs], [r for _, r in pairs])
        run = calibration([p for p, _ in self.probe_pairs], [r for _, r in self.probe_pairs])
        return {
            "probe_auc": float(now["auc"]),
            "probe_brier": float(now["brier"]),
            "probe_n": float(len(pairs)),
            "probe_auc_run": float(run["auc"]),
            "probe_leaves": float(sum(t.ledger.leaves for t in trees)),
            "probe_s": time.perf_counter() - t0,
        }

    def _check_split(self, n_train: int) -> None:
        """TrainConfig.validate's leaf-budget checks again, now that the training split's size is known."""
        a, run, alloc = self.cfg.allocation, self.cfg.run, self.allocator
        stage1 = alloc.stage1_budget(a)
        if alloc.selects and min(run.pool_size, n_train) * a.m_max < a.leaf_budget:
            raise ValueError(
                f"a candidate pool of min(run.pool_size {run.pool_size}, {n_train} training prompts) x allocation."
                f"m_max {a.m_max} cannot spend allocation.leaf_budget {a.leaf_budget}; raise env.train_limit or "
                "allocation.m_max, or lower leaf_budget"
            )
        if not alloc.selects and stage1 // uniform_group(stage1, a.group_size, run.prompts_per_step) > n_train:
            raise ValueError(
                f"{a.type} takes {stage1 // uniform_group(stage1, a.group_size, run.prompts_per_step)} prompts a step "
                f"but the training split has {n_train}; raise env.train_limit or allocation.group_size"
            )

    async def new_trees(self, idxs: list[int], step: int) -> list[RolloutTree]:
        """Root-only trees for these prompts of the train split; episodes capped at env.max_turns."""
        c = self.cfg
        return list(
            await asyncio.gather(
                *(
                    self.runner.new_tree(c.env.dataset, c.env.train_split, i, max_turns=c.env.max_turns, step=step)
                    for i in idxs
                )
            )
        )

    def expand(self, tree: RolloutTree, node_id: int, k: int) -> Coroutine[Any, Any, list[int]]:
        """k continuations of `tree` from `node_id` (the runner's; `trainer.algo.plan.Rollouts`)."""
        return self.runner.expand(tree, node_id, k)

    async def value_roots(self, trees: list[RolloutTree]) -> list[float]:
        """Stage-1 values, also written to `root.predicted`: the predictor's V(root) from the prompt's own features
        (the base rate before its first fit), which is exactly the value of a prompt never trained on; a prompt seen
        before gets its Beta posterior centred there (the prior's a + b pseudo-counts, plus its past bare-rollout
        outcomes), clipped to [1e-4, 1 - 1e-4]."""
        await self.afeaturise(trees)
        root_v = await self.apredict([t.root.features for t in trees], self.base_rate)
        v = [
            min(max(self.prior.mean(t.prompt_id, prior_mean=rv), 1e-4), 1 - 1e-4)
            for t, rv in zip(trees, root_v, strict=True)
        ]
        for t, vi in zip(trees, v, strict=True):
            t.root.predicted = vi
        return v

    async def value_anchors(self, trees: list[RolloutTree]) -> None:
        """Back up `trees`, featurise them and write the predictor's V(H) on every anchor (`predicted`): what an
        expansion round allocates by."""
        for t in trees:
            t.backup()
        await self.afeaturise(trees)
        cands = [n for t in trees for n in t.anchors(self.cfg.env.max_turns)]
        for n, p in zip(cands, await self.apredict([n.features for n in cands], self.base_rate), strict=True):
            n.predicted = p

    async def _recover(
        self,
        pool: list[RolloutTree],
        idxs: list[int],
        v: list[float],
        m: list[int],
        cont: list[int],
        step: int,
        count: dict[str, int],
    ) -> None:
        """Replace every funded tree that lost its env state (`RolloutTree.lost`) with a whole one, so the step keeps
        exactly leaf_budget leaves and no half-finished tree reaches the update. A lost tree is *redone*: a new tree of
        the same prompt (a create, on a replica that is up; with none up it waits up to env.patience_s) gets the same
        m[i] bare rollouts and, for allocators that expand, its cont[i] continuations placed by one allocation round
        over its own anchors. After env.redo_attempts redos the prompt is *dropped* for this step (`collect` gives it
        back to the stream, as it does an allocator's unfunded candidates, so in a multi-pass run it does not miss
        its pass): its m[i] + cont[i] leaves go, as bare rollouts, to the first unfunded candidate of the pool, else to
        the next prompt of the stream that is not in this step. Counted in trees_redone / trees_dropped, the finished
        leaves thrown away in leaves_lost; each logged."""
        a, alloc, env = self.cfg.allocation, self.allocator, self.cfg.env
        tries: dict[int, int] = {}
        while lost := [i for i in range(len(pool)) if m[i] > 0 and pool[i].lost is not None]:
            redo, takers = [], []
            for i in lost:
                count["leaves_lost"] += pool[i].ledger.leaves
                tries[i] = tries.get(i, 0) + 1
                if tries[i] <= env.redo_attempts:
                    log.warning(
                        "redoing a rollout tree that lost its env state",
                        prompt=pool[i].prompt_id,
                        attempt=tries[i],
                        error=pool[i].lost,
                    )
                    count["trees_redone"] += 1
                    redo.append(i)
                    continue
                j = await self._drop_target(pool, idxs, v, m, step, count)
                if j is None:
                    raise RuntimeError(
                        f"step {step}: prompt {pool[i].prompt_id} lost its env state {tries[i]} times and every "
                        f"prompt of the training split is already in this step, so none can take its "
                        f"{m[i] + cont[i]} leaves; last error: {pool[i].lost}"
                    )
                log.error(
                    "a prompt lost its env state too often; dropped for this step, another prompt takes its leaves",
                    prompt=pool[i].prompt_id,
                    idx=idxs[i],
                    tries=tries[i],
                    leaves=m[i] + cont[i],
                    to=pool[j].prompt_id,
                    error=pool[i].lost,
                )
                count["trees_dropped"] += 1
                cont += [0] * (len(pool) - len(cont))
                m[j], cont[j] = m[i] + cont[i], 0  # bare rollouts of the taker
                m[i] = cont[i] = 0
                takers.append(j)
            for i, t in zip(redo, await self.new_trees([idxs[i] for i in redo], step), strict=True):
                pool[i] = t
                t.root.predicted = v[i]
            await self.afeaturise([pool[i] for i in redo])
            sizes = {id(t): len(t.nodes) for t in pool}
            await asyncio.gather(*(self.runner.expand(pool[i], 0, m[i]) for i in redo + takers))
            mark_round(pool, sizes, 0)  # bare rollouts (the tree dumps' rounds)
            sizes = {id(t): len(t.nodes) for t in pool}
            again = [i for i in redo if cont[i] and pool[i].lost is None]
            if again and alloc.expands:
                await self.value_anchors([pool[i] for i in again])
                jobs = []
                for i in again:  # one round over the tree's own anchors; what they cannot take runs from the root
                    anchors = anchors_from_tree(pool[i], env.max_turns)
                    plan, unplaced = plan_round(alloc, [anchors], [cont[i]], [m[i]], self.rng, a)
                    jobs += [
                        self.runner.expand(pool[i], x.node_id, k) for x, k in zip(anchors, plan[0], strict=True) if k
                    ]
                    jobs.append(self.runner.expand(pool[i], 0, unplaced))
                await asyncio.gather(*jobs)
            elif again:
                await asyncio.gather(*(self.runner.expand(pool[i], 0, cont[i]) for i in again))
            mark_round(pool, sizes, 1)

    async def _drop_target(
        self, pool: list[RolloutTree], idxs: list[int], v: list[float], m: list[int], step: int, count: dict[str, int]
    ) -> int | None:
        """The pool slot that takes a dropped prompt's leaves: the first unfunded candidate (its root is valued and
        live), else the next prompt of the stream not in this step (appended to pool/idxs/v/m), through the "greso"
        allocator's filter as its stage 1 draws (`draw_replacement`; its skips count in prompts_skipped); None if
        none is."""
        spare = next((j for j in range(len(pool)) if m[j] == 0 and pool[j].lost is None), None)
        if spare is not None:
            return spare
        greso = self.allocator.stage1 == "greso"
        keep = (lambda i: self.greso.keep(i, self.rng)) if greso else None
        new, skipped = draw_replacement(self.sampler, set(idxs), keep)
        count["prompts_skipped"] = count.get("prompts_skipped", 0) + skipped
        if new is None:
            return None
        tree = (await self.new_trees([new], step))[0]
        v += await self.value_roots([tree])
        pool.append(tree)
        idxs.append(new)
        m.append(0)
        return len(pool) - 1

    def engine_release(self, tree: RolloutTree) -> None:
        self.runner.engine.release(tree.prompt_id)

    # ------------------------------------------------------------------ update (worker thread)
    def update(self, batch: StepBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        trees = batch.trees
        self.featurise(trees)
        rows = collect_training_set(trees, open_only=self.cfg.predictor.open_only)
        feats, targets, weights = self.replay.add(*rows)
        if self.predictor is None and len(feats):
            p = self.cfg.predictor
            self.predictor = new_predictor(p, feats.shape[1], self.cfg.run.seed)
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
        samples, stale = drop_stale(samples, self.policy.version, self.cfg.run.max_staleness)  # trainer.algo.staleness
        batch.trained = {(s.tree_index, i) for s in samples for i, _, _ in s.segments[1:]}  # for the tree dumps
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
        m.update(batch.metrics)  # collect()'s budget accounting: leaf_budget, roots, continuations, ...
        return m

    # ------------------------------------------------------------------ checkpoint
    def remember_draw_state(self, step: int) -> None:
        """Record the sampler, rng, GRESO history and probe state as collect(step) starts, before it draws anything."""
        self._drawn_from[step] = {
            "sampler": self.sampler.state_dict(),
            "rng": self.rng.getstate(),
            "greso": self.greso.state_dict(),
            "probe": {"rng": self.probe_rng.getstate(), "pairs": list(self.probe_pairs)},
        }
        for old in [k for k in self._drawn_from if k < step - 1]:
            del self._drawn_from[old]

    def state_dict(self, at_step: int | None = None) -> dict[str, Any]:
        """The state to resume from. at_step: the step the resumed run starts with; when that step's collection
        has already begun (it overlaps the previous update), its data order is taken from before it drew."""
        drawn = self._drawn_from.get(at_step) if at_step is not None else None
        return {
            "sampler": drawn["sampler"] if drawn else self.sampler.state_dict(),
            "prior": self.prior.state_dict(),
            "greso": drawn["greso"] if drawn else self.greso.state_dict(),
            "rng": drawn["rng"] if drawn else self.rng.getstate(),
            "predictor": self.predictor.state_dict() if self.predictor is not None else None,
            "predictor_dim": self.predictor.input_dim if self.predictor is not None else None,
            "fitted": self.fitted,
            "success_count": list(self.success_count),
            "probe": drawn["probe"] if drawn else {"rng": self.probe_rng.getstate(), "pairs": list(self.probe_pairs)},
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.sampler.load_state_dict(s["sampler"])
        self.prior.load_state_dict(s["prior"])
        if "greso" in s:  # checkpoints from before the greso allocator have none
            self.greso.load_state_dict(s["greso"])
        self.rng.setstate(s["rng"])
        if s["predictor"] is not None:
            p = self.cfg.predictor
            self.predictor = new_predictor(p, s["predictor_dim"], self.cfg.run.seed)
            self.predictor.load_state_dict(s["predictor"])
        self.fitted = s["fitted"]
        self.success_count = list(s["success_count"])
        if "probe" in s:  # checkpoints from before predictor.probe_prompts have none
            self.probe_rng.setstate(s["probe"]["rng"])
            self.probe_pairs = [tuple(x) for x in s["probe"]["pairs"]]
