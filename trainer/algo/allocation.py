"""Where the rollout budget goes: stage 1 (prompt roots) and stage 2 (turn-level prefixes), and the baselines.

Contract:
- Stage 1, `allocate_roots`: split a root budget M over a candidate pool of B prompts with estimated success
  probabilities v_i, maximising sum_i V_root(v_i, m_i), V_root(v, m) = 1 - v^m - (1-v)^m (the probability that
  m rollouts are mixed; V_root(v, 0) := 0). A prompt is either dropped (m_i = 0: it goes back to the pool for a
  later batch, as DESIGN §1 says) or selected with m_min <= m_i <= m_max.
- Stage 2, `allocate_prefixes`: split one prompt's continuation budget over its anchors (open non-root nodes
  of its tree) maximising sum_a V_pref(a, k_a), V_pref = 1 - [r V + (1-r)(1-V)]^k (the probability that at
  least one of k continuations flips the observed outcome r), with k_a <= max_per_anchor.
- Both spend the whole budget whenever the caps allow it: the sum of the allocation is min(budget, capacity),
  never more than the budget. Ties break towards lower indices, so every allocation is a deterministic function
  of its inputs (and of the rng for "random").
- `Allocator` (one ABC: roots, prefixes, spill_roots) is chosen by name from `ALLOCATORS`, or per stage with
  `make_allocator`.

The leaf budget (DESIGN §1 "Budget accounting"): every allocator generates exactly `leaf_budget` rollouts
(leaves) per step, and `TraceStep.collect` asserts it. Allocators that do not expand (uniform, root-only) spend
it all at stage 1. Allocators that expand spend `root_budget` at stage 1; each funded prompt's continuation
budget is its share of (leaf_budget - roots spent), proportional to its root rollouts and exact (`share`:
largest remainders, nothing lost to flooring), split evenly over the rounds. A continuation its prompt cannot
place in a round (no open anchor, every anchor at max_per_anchor) goes, in this order (`place_continuations`,
`spill_roots`):
  1. to another anchor of the same prompt (the stage-2 allocators fill every anchor before leaving any over);
  2. to other funded prompts' anchors with room, in proportion to their root rollouts (capped by their room);
  3. to new root rollouts: prompts of the pool stage 1 left unfunded (an active stage 1 values them as it did
     at stage 1; a uniform stage 1 takes the next prompts of the stream in groups of its group size), and only
     what cannot form a group of m_min goes as extra bare rollouts of funded prompts (chosen by their stage-1
     values, never by outcomes already seen; beyond m_max only when nothing else can take it).
So a budget is never dropped, and leaves are equal across allocators by construction, not by luck.

Solvers. V_root is concave in m only from m = 1 on: its marginal gains are 0 (0 -> 1; one rollout is never
mixed), 2v(1-v) (1 -> 2), then v(1-v)(v^(m-1) + (1-v)^(m-1)), decreasing. So greedy marginal gain is exact
when every prompt must be served (m_i >= max(m_min, 1) for all i: `drop=False`), but not when prompts may be
dropped, for any m_min (with m_min <= 1 the 0 -> 1 step gains nothing and greedy piles everything on one
prompt: v = (.5, .5), M = 4 gives greedy (4, 0) = 0.875 < (2, 2) = 1.0). With dropping allowed the problem is
solved exactly by a dynamic programme over prompts x budget: O(B * M * (m_max - m_min + 2)) numpy work, which
is milliseconds at B ~ 1k prompts, M ~ 4k rollouts. V_pref is concave in k from k = 0 (gains q^k (1-q), q the
match probability), so greedy is exact for stage 2.

Observed outcome in stage 2: an anchor's r is the own outcome O of the rollout through it (tree.py: the reward
at the end of the chain that created the anchor), the paper's r_ij, not a mean over the continuations added
since; an anchor with no own outcome (its chain ended unscored) falls back to its value. For fractional
rewards (F1; the paper states r in {0, 1}) q = r V + (1-r)(1-V) is the probability that a new continuation
matches an outcome drawn from the observed one *in a single draw*, raised to k; for r in {0, 1} it is exactly
the paper's formula.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import tyro

from trainer.algo.tree import RolloutTree

# ---- objectives ---------------------------------------------------------------------------------------------


def root_value(v: float, m: int) -> float:
    """V_root(v, m) = P(m rollouts of a prompt with success probability v are mixed); 0 for m <= 1."""
    if m <= 1:
        return 0.0
    return 1.0 - v**m - (1.0 - v) ** m


def match_probability(r: float, v: float) -> float:
    """q = r V + (1-r)(1-V): the probability that one continuation reproduces the observed outcome r."""
    return r * v + (1.0 - r) * (1.0 - v)


def prefix_value(r: float, v: float, k: int) -> float:
    """V_pref = 1 - q^k: the probability that at least one of k continuations flips the observed outcome."""
    return 1.0 - match_probability(r, v) ** k


def _check_probs(name: str, xs: Sequence[float]) -> None:
    for i, x in enumerate(xs):
        assert 0.0 <= x <= 1.0, f"{name}[{i}]={x!r} is not a probability in [0, 1]"


# ---- stage 1 -----------------------------------------------------------------------------------------------


def allocate_roots(
    v: Sequence[float], budget: int, m_min: int, m_max: int, *, drop: bool = True, method: str = "auto"
) -> list[int]:
    """Rollouts per prompt maximising sum_i V_root(v_i, m_i).

    drop=True (default): m_i = 0 or m_min <= m_i <= m_max; sum m_i is the largest total <= budget that such
    allocations can reach (= budget unless the caps bind), and the objective is maximised among those.
    drop=False: every prompt gets m_min <= m_i <= m_max (the paper's literal constraint); needs
    budget >= B * m_min; sum m_i = min(budget, B * m_max).
    method: "dp" (exact, both modes), "greedy" (exact only for drop=False with m_min >= 1; refused otherwise),
    "auto" (greedy where it is exact, else dp).
    """
    v = [float(x) for x in v]
    _check_probs("v", v)
    n = len(v)
    assert budget >= 0 and 0 <= m_min <= m_max and m_max >= 1, f"budget={budget} m_min={m_min} m_max={m_max}"
    if n == 0:
        return []
    greedy_exact = not drop and m_min >= 1
    if method == "auto":
        method = "greedy" if greedy_exact else "dp"
    if method == "greedy":
        if not greedy_exact:
            raise ValueError(
                f"greedy is exact only with drop=False and m_min >= 1 (got drop={drop}, m_min={m_min}); use 'dp'"
            )
        if budget < n * m_min:
            raise ValueError(f"drop=False needs budget >= B * m_min = {n} * {m_min}, got {budget}")
        return _greedy_box(v, budget, m_min, m_max)
    if method != "dp":
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'dp' or 'greedy'")
    if not drop:
        if budget < n * m_min:
            raise ValueError(f"drop=False needs budget >= B * m_min = {n} * {m_min}, got {budget}")
        return _dp(v, budget, range(max(m_min, 0), m_max + 1))
    options = range(m_max + 1) if m_min <= 1 else [0, *range(m_min, m_max + 1)]
    return _dp(v, budget, options)


def _greedy_box(v: list[float], budget: int, lo: int, hi: int) -> list[int]:
    """Greedy marginal gain from m_i = lo (>= 1): exact, V_root being concave in m on [1, inf)."""
    m = [lo] * len(v)
    left = min(budget, len(v) * hi) - len(v) * lo
    heap = [(-(root_value(x, lo + 1) - root_value(x, lo)), i) for i, x in enumerate(v) if lo < hi]
    heapq.heapify(heap)
    while left > 0:
        _, i = heapq.heappop(heap)
        m[i] += 1
        left -= 1
        if m[i] < hi:
            heapq.heappush(heap, (-(root_value(v[i], m[i] + 1) - root_value(v[i], m[i])), i))
    return m


def _dp(v: list[float], budget: int, options: Sequence[int]) -> list[int]:
    """Exact: best[b] = max objective of the prompts so far using exactly b rollouts (-inf: unreachable)."""
    options = sorted(options)
    assert options, "no options"
    cap = min(budget, len(v) * options[-1])
    best = np.full(cap + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((len(v), cap + 1), dtype=np.int32)
    for i, x in enumerate(v):
        new = np.full(cap + 1, -np.inf)
        pick = np.zeros(cap + 1, dtype=np.int32)
        for m in options:  # ascending, strict '>' below: ties keep the smaller allocation
            if m > cap:
                break
            cand = np.full(cap + 1, -np.inf)
            cand[m:] = best[: cap + 1 - m] + root_value(x, m)
            better = cand > new
            new[better] = cand[better]
            pick[better] = m
        best = new
        choice[i] = pick
    reachable = np.flatnonzero(np.isfinite(best))
    assert reachable.size, f"no feasible allocation for budget={budget} options={options[:3]}..."
    b = int(reachable[-1])  # the largest total within the budget first, then the best objective at it
    out = [0] * len(v)
    for i in range(len(v) - 1, -1, -1):
        out[i] = int(choice[i, b])
        b -= out[i]
    assert b == 0, f"dp backtrack left {b}"
    return out


def top_up_roots(v: Sequence[float], m: Sequence[int], budget: int, cap: int | None = None) -> list[int]:
    """Extra bare rollouts for prompts that already have m_i >= 1: greedy marginal gain of V_root from m_i
    (exact, V_root being concave in m from 1 on), at most `cap` in all per prompt (None = no cap); returns the
    extras, summing to min(budget, room)."""
    assert all(mi >= 1 for mi in m) and budget >= 0, f"m={list(m)} budget={budget}"
    _check_probs("v", v)
    room = [math.inf if cap is None else max(cap - mi, 0) for mi in m]
    extra = [0] * len(m)
    heap = [
        (-(root_value(x, mi + 1) - root_value(x, mi)), i)
        for i, (x, mi) in enumerate(zip(v, m, strict=True))
        if room[i] > 0
    ]
    heapq.heapify(heap)
    left = budget
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        extra[i] += 1
        left -= 1
        if extra[i] < room[i]:
            k = m[i] + extra[i]
            heapq.heappush(heap, (-(root_value(v[i], k + 1) - root_value(v[i], k)), i))
    return extra


def skip_roots(v: Sequence[float], budget: int, m: int, eps: float) -> list[int]:
    """GRESO's idea as a stage 1 on predicted values (Zheng et al., 2025, "Act Only When It Pays"): keep a uniform
    stage 1's breadth, m rollouts a prompt in the order the stream gave them, but skip a prompt whose value is within
    `eps` of 0 or 1 (confidently all-fail or all-succeed). Skipped prompts are funded after the others only if too few
    remain; the remainder of budget // m goes one rollout each to the first funded prompts. Sums to `budget` when the
    pool has budget // m prompts."""
    assert m >= 1 and budget >= 0 and 0.0 <= eps < 0.5, f"{m=} {budget=} {eps=}"
    out = [0] * len(v)
    n = budget // m
    keep = [i for i, x in enumerate(v) if eps < x < 1.0 - eps]
    skipped = [i for i, x in enumerate(v) if not eps < x < 1.0 - eps]
    chosen = (keep + skipped)[:n]
    for i in chosen:
        out[i] = m
    for i in sorted(chosen)[: budget - m * len(chosen)] if chosen else []:
        out[i] += 1
    return out


class GresoFilter:
    """GRESO's pre-rollout filter (Zheng et al., 2025, "Act Only When It Pays: Efficient Reinforcement Learning for
    LLM Reasoning via Selective Rollouts", arXiv 2506.02177; as its released code, Infini-AI-Lab/GRESO, runs it), the
    "greso" allocator's stage 1. A prompt's history is its kind on its latest zero-variance visit (every bare rollout
    the same reward: easy if they all succeeded, hard if they all failed) and z, how many of its latest visits in a
    row were zero-variance of that kind. Before rollout, a prompt with z > 0 is kept with probability
    max(p^z, min_keep) (p_easy or p_hard by its kind) and otherwise skipped for this pass of the data; a prompt never
    seen, or mixed on its latest visit, is always kept (and draws nothing from the generator, so with no history this
    is GRPO exactly). After each step past the first pass of the data, p_easy and p_hard move by `step` towards the
    target shares of zero-variance prompts among those rolled out: down (skip more) when the step's share of easy
    prompts is at or above target / 3, else up, and likewise hard against 2 * target / 3, each kept in
    [p_min, p_max]. Defaults are GRESO's released settings: p_easy = p_hard = 0.5, target 0.25, step 0.01, p in
    [0.05, 0.95], keep probability at least 0.01. Unlike GRESO, which runs on top of dynamic sampling (zero-variance
    groups dropped after rollout and the batch refilled), every group rolled out stays in the batch: the leaves per
    step are fixed. Keyed by the prompt's index in the training split; rewards are read as success at `threshold`
    (binary EM here). A visit with fewer than 2 bare rollouts says nothing about variance: ignored."""

    def __init__(
        self,
        p: float = 0.5,
        target: float = 0.25,
        step: float = 0.01,
        p_min: float = 0.05,
        p_max: float = 0.95,
        min_keep: float = 0.01,
    ) -> None:
        if not all(0.0 <= x <= 1.0 for x in (p, target, step, p_min, p_max, min_keep)) or not p_min <= p <= p_max:
            raise ValueError(
                f"GRESO's p ({p}), target ({target}), step ({step}), p_min ({p_min}), p_max ({p_max}) and min_keep "
                f"({min_keep}) must be in [0, 1], with p_min <= p <= p_max"
            )
        self.p_easy = self.p_hard = p
        self.alpha_easy, self.alpha_hard, self.step = target / 3, 2 * target / 3, step
        self.p_min, self.p_max, self.min_keep = p_min, p_max, min_keep
        self.streak: dict[int, int] = {}  # prompt index -> z
        self.easy: dict[int, bool] = {}  # prompt index -> the kind of its latest zero-variance visit

    def keep_probability(self, idx: int) -> float:
        z = self.streak.get(idx, 0)
        return 1.0 if z == 0 else max((self.p_easy if self.easy[idx] else self.p_hard) ** z, self.min_keep)

    def keep(self, idx: int, rng: random.Random) -> bool:
        """Whether to roll the prompt out on this visit (a draw from `rng` only when it has a zero-variance streak)."""
        q = self.keep_probability(idx)
        return q >= 1.0 or rng.random() < q

    def observe(self, outcomes: dict[int, Sequence[float]], threshold: float = 0.5, adapt: bool = True) -> None:
        """One step's bare-rollout rewards per prompt rolled out: update each prompt's streak, then (when `adapt`:
        GRESO starts after the first pass of the data) p_easy and p_hard from the step's shares."""
        easy = hard = n = 0
        for idx, rs in outcomes.items():
            if len(rs) < 2:
                continue
            n += 1
            if max(rs) != min(rs):
                self.streak[idx] = 0
                continue
            kind = rs[0] >= threshold
            same = self.streak.get(idx, 0) > 0 and self.easy[idx] == kind
            self.streak[idx] = self.streak[idx] + 1 if same else 1
            self.easy[idx] = kind
            easy += kind
            hard += not kind
        if n == 0 or not adapt:
            return
        sign_e = -1.0 if easy / n >= self.alpha_easy else 1.0
        sign_h = -1.0 if hard / n >= self.alpha_hard else 1.0
        self.p_easy = min(max(self.p_easy + sign_e * self.step, self.p_min), self.p_max)
        self.p_hard = min(max(self.p_hard + sign_h * self.step, self.p_min), self.p_max)

    def state_dict(self) -> dict[str, Any]:
        return {
            "p_easy": self.p_easy,
            "p_hard": self.p_hard,
            "streak": [[i, z, self.easy.get(i, False)] for i, z in self.streak.items()],
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.p_easy, self.p_hard = float(s["p_easy"]), float(s["p_hard"])
        self.streak = {int(i): int(z) for i, z, _ in s["streak"]}
        self.easy = {int(i): bool(e) for i, _, e in s["streak"]}


def uniform_roots(n_prompts: int, budget: int, m_min: int = 1) -> list[int]:
    """Plain GRPO groups: m = budget // B each, the remainder one by one to the first prompts.

    m_max does not apply (a baseline must spend the same budget). When budget // B < m_min, only the first
    budget // m_min prompts are served, with the budget spread evenly over them.
    """
    assert n_prompts >= 0 and budget >= 0, f"n_prompts={n_prompts} budget={budget}"
    if n_prompts == 0:
        return []
    served = n_prompts if budget >= n_prompts * m_min else budget // max(m_min, 1)
    out = [0] * n_prompts
    if served == 0:
        return out
    base, extra = divmod(budget, served)
    for i in range(served):
        out[i] = base + (1 if i < extra else 0)
    return out


# ---- stage 2 -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A stage-2 candidate branch point of one prompt's tree."""

    node_id: int  # the node in its RolloutTree
    r: float  # observed outcome r_ij: the own outcome of the rollout through the anchor (tree.py), in [0, 1]
    v: float  # the predictor's V(H) at this prefix, in [0, 1]
    h: float | None = None  # the policy's entropy right after this prefix (`TurnNode.entropy` of children[0]), if asked


def anchors_from_tree(tree: RolloutTree, max_turns: int | None = None) -> list[Anchor]:
    """Anchors of a backed-up tree whose nodes carry `predicted` (set by the trainer from the predictor)."""
    out = []
    for node in tree.anchors(max_turns):
        assert node.predicted is not None, f"prompt {tree.prompt_id!r} node {node.node_id}: no predicted V(H)"
        r = node.outcome if node.outcome is not None else node.value  # the paper's r_ij: the rollout's own outcome
        h = tree.nodes[node.children[0]].entropy if node.children else None
        out.append(Anchor(node.node_id, float(r), float(node.predicted), h))
    return out


def allocate_prefixes(anchors: Sequence[Anchor], budget: int, max_per_anchor: int) -> list[int]:
    """Continuations per anchor maximising sum_a V_pref(a, k_a), k_a <= max_per_anchor, sum = min(budget, cap).

    Greedy marginal gain, exact because every V_pref is concave in k. Anchors whose predicted outcome
    certainly matches (q = 1, gain 0) are used only once every other anchor is full.
    """
    assert budget >= 0 and max_per_anchor >= 0, f"budget={budget} max_per_anchor={max_per_anchor}"
    _check_probs("r", [a.r for a in anchors])
    _check_probs("v", [a.v for a in anchors])
    k = [0] * len(anchors)
    if max_per_anchor == 0:
        return k
    q = [match_probability(a.r, a.v) for a in anchors]
    heap = [(-(1.0 - qi), i) for i, qi in enumerate(q)]  # gain of the first continuation: q^0 (1 - q)
    heapq.heapify(heap)
    left = min(budget, len(anchors) * max_per_anchor)
    while left > 0:
        _, i = heapq.heappop(heap)
        k[i] += 1
        left -= 1
        if k[i] < max_per_anchor:
            heapq.heappush(heap, (-(q[i] ** k[i]) * (1.0 - q[i]), i))
    return k


def uniform_prefixes(n_anchors: int, budget: int, max_per_anchor: int) -> list[int]:
    """Spread evenly: budget // n each, the remainder one by one to the first anchors; capped per anchor."""
    assert n_anchors >= 0 and budget >= 0 and max_per_anchor >= 0, f"{n_anchors=} {budget=} {max_per_anchor=}"
    if n_anchors == 0:
        return []
    total = min(budget, n_anchors * max_per_anchor)
    base, extra = divmod(total, n_anchors)
    return [base + (1 if i < extra else 0) for i in range(n_anchors)]


def random_prefixes(n_anchors: int, budget: int, max_per_anchor: int, rng: random.Random) -> list[int]:
    """Each continuation goes to an anchor drawn uniformly among those below the cap (TreePO-style)."""
    assert n_anchors >= 0 and budget >= 0 and max_per_anchor >= 0, f"{n_anchors=} {budget=} {max_per_anchor=}"
    k = [0] * n_anchors
    open_ = list(range(n_anchors)) if max_per_anchor > 0 else []
    for _ in range(min(budget, n_anchors * max_per_anchor)):
        j = rng.randrange(len(open_))
        i = open_[j]
        k[i] += 1
        if k[i] == max_per_anchor:
            open_[j] = open_[-1]
            open_.pop()
    return k


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """The entropy (nats) of a next-token distribution known by its n largest logprobs (SGLang's top logprobs):
    -sum p log p over them, plus the rest of the mass m = 1 - sum p counted as one lump, -m log m.

    Truncation: the true entropy H lies in [this, this + m log(V - n)] (V the vocabulary): the tail's share of H is at
    least -m log m (each tail token has p <= m) and at most m log((V - n) / m) (the tail spread evenly). So the error
    is at most m log V: small for a trained policy, whose mass sits in its top few tokens, and the allocator only
    ranks anchors. Measured on the testbed's warm start (`python bench/bench_topk_entropy.py`, 106 turns after a tool
    result, their first 10 tokens): at n = 20 the mass left out is 0.005 on average, H - this 0.024 nats (H 0.29),
    Spearman 0.997 with H, and the top quarter by H is found whole; at n = 5, 0.970 and 0.88. Not good enough for a
    near-uniform policy (the untrained tiny model: tail mass 0.98 at n = 20, Spearman -0.11), where every turn is
    as uncertain as the next anyway."""
    ps = [math.exp(min(x, 0.0)) for x in top_logprobs]  # an engine may round a certain token's logprob above 0
    m = max(0.0, 1.0 - sum(ps))
    h = -sum(p * math.log(p) for p in ps if p > 0.0) - (m * math.log(m) if m > 0.0 else 0.0)
    return max(0.0, h)


def entropy_prefixes(anchors: Sequence[Anchor], budget: int, max_per_anchor: int) -> list[int]:
    """Continuations per anchor by the policy's uncertainty there (h = `Anchor.h`), capped at max_per_anchor; sum =
    min(budget, cap). First one each to the min(budget, anchors) highest-entropy anchors: AT2PO's top-K; then what is
    left one at a time to the highest h / (1 + k) (k: what the anchor already has this round), AT2PO's branching
    penalty on nodes already expanded, so a larger budget spreads before it piles up. An anchor without an entropy
    (none was asked, or its chain's next turn was lost) counts as 0; ties go to fewer continuations, then to lower
    indices. The penalty counts this round's continuations only (an anchor expanded in an earlier round starts at 0)."""
    assert budget >= 0 and max_per_anchor >= 0, f"budget={budget} max_per_anchor={max_per_anchor}"
    h = [a.h if a.h is not None else 0.0 for a in anchors]
    assert all(math.isfinite(x) and x >= 0.0 for x in h), f"entropies must be finite and >= 0, got {h}"
    k = [0] * len(anchors)
    if max_per_anchor == 0:
        return k
    left = min(budget, len(anchors) * max_per_anchor)
    for i in sorted(range(len(anchors)), key=lambda i: (-h[i], i))[:left]:
        k[i] = 1
    left -= sum(k)
    heap = [(-h[i] / 2, 1, i) for i in range(len(anchors)) if k[i] < max_per_anchor]
    heapq.heapify(heap)
    while left > 0:
        _, _, i = heapq.heappop(heap)
        k[i] += 1
        left -= 1
        if k[i] < max_per_anchor:
            heapq.heappush(heap, (-h[i] / (1 + k[i]), k[i], i))
    return k


def split_rounds(total: int, rounds: int) -> list[int]:
    """A budget split over expansion rounds: evenly, the remainder to the earliest rounds."""
    assert total >= 0 and rounds >= 1, f"total={total} rounds={rounds}"
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


# ---- the leaf budget: exact shares and spill-over -------------------------------------------------------------


def share(total: int, weights: Sequence[int], caps: Sequence[int] | None = None) -> list[int]:
    """`total` split in proportion to integer `weights`, exactly: each gets floor(total * w / W) and the remainder
    goes one by one to the largest fractional parts (ties to lower indices), so nothing is lost to flooring.
    With `caps`, none gets more than its cap: what a capped one cannot take is split again over the others
    (water-filling); the sum is min(total, sum(caps)). Weights all 0 (among those below their cap) split evenly.
    """
    n = len(weights)
    caps = [total] * n if caps is None else list(caps)
    assert total >= 0 and len(caps) == n, f"total={total} weights={len(weights)} caps={len(caps)}"
    assert all(isinstance(w, int) and w >= 0 for w in weights) and min(caps, default=0) >= 0, f"{weights=} {caps=}"
    out = [0] * n
    left = min(total, sum(caps))
    while left > 0:
        open_ = [i for i in range(n) if out[i] < caps[i]]
        w = [weights[i] for i in open_]
        if sum(w) == 0:
            w = [1] * len(open_)
        tw = sum(w)
        base = [left * wi // tw for wi in w]
        order = sorted(range(len(open_)), key=lambda j: (-(left * w[j] % tw), j))
        for j in order[: left - sum(base)]:
            base[j] += 1
        for j, i in enumerate(open_):  # every open item has room >= 1, and some base is >= 1: progress
            give = min(base[j], caps[i] - out[i])
            out[i] += give
            left -= give
    return out


def place_continuations(
    budgets: Sequence[int], capacities: Sequence[int], weights: Sequence[int]
) -> tuple[list[int], int]:
    """One round's continuations per prompt after spill-over, and what no anchor can take (-> new roots).

    budgets[i]: prompt i's share this round; capacities[i]: what its anchors can take this round (anchors x
    max_per_anchor); weights[i]: its root rollouts. A prompt keeps min(budget, capacity), which its stage-2
    allocator spreads over its own anchors; the excess of all prompts goes to the prompts with room left, in
    proportion to their weights, capped by their room (`share`).
    """
    assert len(budgets) == len(capacities) == len(weights), f"{len(budgets)=} {len(capacities)=} {len(weights)=}"
    kept = [min(b, c) for b, c in zip(budgets, capacities, strict=True)]
    spill = sum(budgets) - sum(kept)
    moved = share(spill, weights, [c - k for c, k in zip(capacities, kept, strict=True)])
    return [k + x for k, x in zip(kept, moved, strict=True)], spill - sum(moved)


def plan_round(
    allocator: Allocator,
    tree_anchors: Sequence[Sequence[Anchor]],
    want: Sequence[int],
    weights: Sequence[int],
    rng: random.Random,
    cfg: AllocationConfig,
) -> tuple[list[list[int]], int]:
    """One expansion round over the funded prompts: continuations per anchor of each prompt, and how many
    continuations no anchor can take (for `spill_roots`). want[i]: prompt i's share this round; weights[i]: its
    root rollouts. Spill-over order: the prompt's other anchors (its allocator fills every anchor before leaving
    any over), then other prompts' anchors (`place_continuations`); the count returned is what is left."""
    caps = [len(an) * cfg.max_per_anchor for an in tree_anchors]
    budgets, unplaced = place_continuations(want, caps, weights)
    out = []
    for an, b in zip(tree_anchors, budgets, strict=True):
        ks = allocator.prefixes(an, b, rng, cfg)
        assert sum(ks) == b, f"{allocator.name} placed {sum(ks)} of {b} continuations on {len(an)} anchors"
        out.append(ks)
    return out, unplaced


def uniform_group(budget: int, group_size: int, prompts_per_step: int) -> int:
    """Rollouts per prompt of a uniform stage 1 spending `budget`: `group_size`, or budget // prompts_per_step
    when group_size is 0 (then it takes prompts_per_step prompts, as plain GRPO does)."""
    assert budget >= 0 and group_size >= 0 and prompts_per_step >= 1, f"{budget=} {group_size=} {prompts_per_step=}"
    return group_size or budget // prompts_per_step


# ---- config and interface ------------------------------------------------------------------------------------


@dataclass
class AllocationConfig:
    type: Annotated[str, tyro.conf.arg(aliases=("--allocator",))] = "trace"
    """Allocator name in ALLOCATORS: "trace", "uniform" (GRPO), "root-only", "random-node", "trace-skip" (our
    variant: GRESO-style stage 1, TRACE's stage 2), "greso" (GRPO behind GRESO's filter of prompts whose latest
    visits were all-0 or all-1, no tree), "entropy" (GRPO's stage 1, continuations where the policy's entropy
    after a tool result is highest: ARPO's signal, AT2PO's selection). Or any pair of stages, the paper's per-stage
    ablation, as "STAGE1+STAGE2": stage 1 "active" (TRACE's), "uniform" (GRPO's), "skip" or "greso" (with stage 2
    "none" only); stage 2 "active" (TRACE's), "uniform", "random", "entropy" or "none" (e.g. "uniform+active":
    TRACE's stage 2 alone; "trace" is "active+active", "uniform" is "uniform+none")."""
    leaf_budget: int = 128
    """Rollouts (leaves) per step, exactly, for every allocator (equal sampling cost; the module docstring has
    the rules). Allocators that do not expand spend it all on prompt roots."""
    root_budget: int = 64
    """M: stage 1's share of leaf_budget for allocators that expand (trace, trace-skip, random-node, entropy); the
    rest, leaf_budget - M, are stage 2's continuations (the paper's M * N: leaf_budget = M (1 + N))."""
    m_min: int = 2
    """Fewest rollouts of a selected prompt (a prompt gets 0 or m_min..m_max); 2 is the fewest that can be mixed."""
    m_max: int = 8
    """Most rollouts of one prompt at an active stage 1."""
    group_size: int = 0
    """Rollouts per prompt of a uniform stage 1 (GRPO's group size G): uniform takes leaf_budget // G prompts
    from the stream, random-node root_budget // G, the remainder one by one to the first. 0 = the stage-1
    budget // run.prompts_per_step, i.e. prompts_per_step prompts a step. trace-skip's stage 1 funds group_size
    rollouts a prompt too when it is set (else m_min); greso's is uniform's on the prompts its filter kept."""
    rounds: int = 1
    """Expansion rounds (expand, observe, back up, re-score); each prompt's continuations are split evenly."""
    max_per_anchor: int = 4
    """Most continuations from one anchor per round."""
    skip_eps: float = 0.1
    """The "trace-skip" allocator's stage 1: a prompt valued at or below skip_eps or at or above 1 - skip_eps is
    skipped."""
    greso_p: float = 0.5
    """The "greso" allocator (`GresoFilter`): the starting keep probability of a prompt per zero-variance visit in a
    row (GRESO's p_easy = p_hard = 0.5; kept in [0.05, 0.95] as it adapts)."""
    greso_target: float = 0.25
    """The "greso" allocator: the share of zero-variance prompts among those rolled out that its keep probabilities
    adapt towards (a third of it easy, two thirds hard; GRESO's 0.25)."""
    greso_step: float = 0.01
    """The "greso" allocator: how far p_easy and p_hard move a step (GRESO's 0.01)."""
    entropy_top_k: int = 20
    """The "entropy" allocator's signal: top logprobs per generated token asked of the engine (SGLang's
    top_logprobs_num), from which each turn's entropy is computed (`topk_entropy`: exact up to the mass outside them)."""
    entropy_tokens: int = 10
    """The "entropy" allocator's signal: a turn's entropy is the mean over its first entropy_tokens generated tokens
    (ARPO's k tokens after a tool result)."""
    stage2_share: str = "roots"
    """How stage 2's continuations are shared across the funded prompts. "roots" (the paper's): in proportion to
    each prompt's stage-1 rollouts, whatever they showed. "unmixed" (our deviation, issue 22): only among prompts
    whose bare rollouts all agree (all 0 or all 1), in proportion to their rollouts, since a prompt already mixed
    has its contrast; every prompt when none is unmixed."""

    def __post_init__(self) -> None:
        make_allocator(self.type)  # an unknown name: the ValueError naming the choices, at load time
        if self.stage2_share not in STAGE2_SHARE:
            raise ValueError(f"allocation.stage2_share must be one of {STAGE2_SHARE}, got {self.stage2_share!r}")
        if self.leaf_budget < 1 or self.root_budget < 1:
            raise ValueError(
                f"allocation.leaf_budget ({self.leaf_budget}) and allocation.root_budget ({self.root_budget}) must be "
                ">= 1: the rollouts a step spends, and of them the bare ones"
            )
        if not (0 <= self.m_min <= self.m_max and self.m_max >= 1):
            raise ValueError(
                f"allocation.m_min ({self.m_min}) and m_max ({self.m_max}), a funded prompt's fewest and most bare "
                "rollouts, need 0 <= m_min <= m_max and m_max >= 1"
            )
        if self.group_size < 0:
            raise ValueError(
                f"allocation.group_size must be >= 0 (0: leaf_budget / prompts_per_step), got {self.group_size}"
            )
        GresoFilter(self.greso_p, self.greso_target, self.greso_step)  # the clear error, at load time
        if self.entropy_top_k < 1 or self.entropy_tokens < 1:
            raise ValueError(
                f"allocation.entropy_top_k ({self.entropy_top_k}) and entropy_tokens ({self.entropy_tokens}) must be >= 1"
            )
        if self.rounds < 1 or self.max_per_anchor < 0:
            raise ValueError(
                f"allocation.rounds ({self.rounds}) must be >= 1 and allocation.max_per_anchor ({self.max_per_anchor}) "
                ">= 0"
            )


STAGE2_SHARE = ("roots", "unmixed")
"""`AllocationConfig.stage2_share`'s values."""
STAGE1 = ("active", "uniform", "skip", "greso")
STAGE2 = ("active", "uniform", "random", "entropy", "none")


class Allocator(ABC):
    """The allocator seam: how many root rollouts each prompt gets, how many continuations each anchor gets, and
    where continuations no anchor can take go as new roots."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def expands(self) -> bool:
        """Whether `prefixes` ever allocates continuations."""
        return True

    @property
    def selects(self) -> bool:
        """Whether stage 1 values a candidate pool and funds the best (else it takes prompts as the stream gives
        them, `uniform_group` rollouts each, and never looks at values)."""
        return True

    @property
    def needs_entropy(self) -> bool:
        """Whether `prefixes` reads the anchors' entropies (`Anchor.h`): the rollouts must then ask the engine for top
        logprobs (allocation.entropy_top_k) and store each turn's entropy."""
        return False

    def stage1_budget(self, cfg: AllocationConfig) -> int:
        """Roots to allocate: root_budget when stage 2 spends the rest of the leaves, else all of leaf_budget, so
        that every allocator generates the same number of leaves per step (equal sampling cost)."""
        return cfg.root_budget if self.expands else cfg.leaf_budget

    @abstractmethod
    def roots(self, prompts_v: Sequence[float], budget: int, cfg: AllocationConfig) -> list[int]:
        """Rollouts per prompt of the pool (0 = back to the pool); sums to at most `budget`."""

    @abstractmethod
    def prefixes(
        self,
        tree_anchors: Sequence[Anchor],
        budget: int,
        rng: random.Random,
        cfg: AllocationConfig | None = None,
    ) -> list[int]:
        """Continuations per anchor of one prompt's tree (one round); sums to at most `budget`;
        at most cfg.max_per_anchor each (AllocationConfig's default when cfg is None)."""

    @abstractmethod
    def spill_roots(
        self,
        funded_v: Sequence[float],
        funded_m: Sequence[int],
        new_v: Sequence[float],
        budget: int,
        cfg: AllocationConfig,
    ) -> tuple[list[int], list[int]]:
        """Re-spend `budget` rollouts that no anchor could take as new root rollouts: (extra bare rollouts per
        funded prompt, rollouts per new candidate), summing to exactly `budget` (module docstring, step 3).
        funded_v/funded_m: stage-1 values and root rollouts of the funded prompts; new_v: values of the candidates
        that may be funded now (unfunded pool prompts, or the next prompts of the stream)."""


class StagedAllocator(Allocator):
    """Stage 1 in STAGE1 ("active" = allocate_roots, "uniform" = uniform_roots) and stage 2 in STAGE2
    ("active" = allocate_prefixes, "uniform", "random", "none"), fixed per subclass."""

    stage1: ClassVar[str] = "active"
    stage2: ClassVar[str] = "active"

    @property
    def name(self) -> str:
        return f"{self.stage1}-{self.stage2}"

    @property
    def expands(self) -> bool:
        return self.stage2 != "none"

    @property
    def selects(self) -> bool:
        return self.stage1 in ("active", "skip")

    @property
    def needs_entropy(self) -> bool:
        return self.stage2 == "entropy"

    def roots(self, prompts_v: Sequence[float], budget: int, cfg: AllocationConfig) -> list[int]:
        if not self.selects:  # uniform, or greso's: the stream's prompts its filter kept (plan_rollouts)
            return uniform_roots(len(prompts_v), budget, cfg.m_min)
        if self.stage1 == "skip":  # GRPO's group size when one is set, else m_min rollouts a prompt
            return skip_roots(prompts_v, budget, cfg.group_size or max(cfg.m_min, 1), cfg.skip_eps)
        return allocate_roots(prompts_v, budget, cfg.m_min, cfg.m_max)

    def spill_roots(
        self,
        funded_v: Sequence[float],
        funded_m: Sequence[int],
        new_v: Sequence[float],
        budget: int,
        cfg: AllocationConfig,
    ) -> tuple[list[int], list[int]]:
        assert len(funded_v) == len(funded_m) and budget >= 0, f"{len(funded_v)=} {len(funded_m)=} {budget=}"
        if not self.selects:  # new prompts of the stream, evenly; extra bare rollouts only without any
            new = uniform_roots(len(new_v), budget, 1)
            extra = uniform_roots(len(funded_m), budget - sum(new), 1)
            assert sum(extra) + sum(new) == budget, f"spill_roots: {budget} rollouts and no prompt to take them"
            return extra, new
        new = allocate_roots(new_v, budget, cfg.m_min, cfg.m_max) if new_v else []
        left = budget - sum(new)
        m = list(funded_m)
        v = list(funded_v)
        if not m and left:  # nothing funded at all: the best candidate takes what could not form a group
            assert new_v, f"{left} rollouts to re-spend and neither a funded prompt nor a candidate to take them"
            best = max(range(len(new_v)), key=lambda i: (root_value(new_v[i], 2), -i))
            new[best] += left
            return [], new
        extra = top_up_roots(v, m, left, cfg.m_max)
        beyond = top_up_roots(v, [a + b for a, b in zip(m, extra, strict=True)], left - sum(extra))
        extra = [a + b for a, b in zip(extra, beyond, strict=True)]
        assert sum(extra) + sum(new) == budget, f"spill_roots placed {sum(extra)} + {sum(new)} of {budget}"
        return extra, new

    def prefixes(
        self,
        tree_anchors: Sequence[Anchor],
        budget: int,
        rng: random.Random,
        cfg: AllocationConfig | None = None,
    ) -> list[int]:
        cap = (cfg or AllocationConfig()).max_per_anchor
        if self.stage2 == "none":
            return [0] * len(tree_anchors)
        if self.stage2 == "uniform":
            return uniform_prefixes(len(tree_anchors), budget, cap)
        if self.stage2 == "random":
            return random_prefixes(len(tree_anchors), budget, cap, rng)
        if self.stage2 == "entropy":
            return entropy_prefixes(tree_anchors, budget, cap)
        return allocate_prefixes(tree_anchors, budget, cap)


class TraceAllocator(StagedAllocator):
    """TRACE: active roots (stage 1) and active prefixes (stage 2)."""

    stage1, stage2 = "active", "active"


class UniformAllocator(StagedAllocator):
    """Uniform GRPO: m = M/B rollouts per prompt, no expansion."""

    stage1, stage2 = "uniform", "none"


class RootOnlyAllocator(StagedAllocator):
    """Prompt-only allocation: stage 1 active, no expansion."""

    stage1, stage2 = "active", "none"


class TraceSkipAllocator(StagedAllocator):
    """Our variant (issue 22), not the paper's: GRESO-style stage 1 (`skip_roots`: group_size, else m_min, rollouts
    a prompt in stream order, prompts valued within allocation.skip_eps of 0 or 1 skipped: GRPO's breadth, values
    used only to skip) and TRACE's active stage 2."""

    stage1, stage2 = "skip", "active"


class GresoAllocator(StagedAllocator):
    """GRESO as a peer (Zheng et al., 2025, arXiv 2506.02177): GRPO (groups of allocation.group_size when set) whose
    prompts pass GRESO's pre-rollout filter first (`GresoFilter`: a prompt whose latest visits were zero-variance is
    skipped for this pass of the data with a probability that grows with the streak and adapts to a target share),
    no tree. Its values are never used: a prompt's own history decides, so in a single pass over the data (no prompt
    seen twice) it is GRPO exactly. The stream's next prompts are examined in order until the step's groups are
    filled (`plan_rollouts`), at most one whole pass; skipped ones are consumed, not given back (a prompt taken to
    replace one whose env state was lost is taken unfiltered)."""

    stage1, stage2 = "greso", "none"


class RandomNodeAllocator(StagedAllocator):
    """TreePO / Tree-GRPO style: uniform roots (no prompt selection), continuations from random anchors."""

    stage1, stage2 = "uniform", "random"


class EntropyAllocator(StagedAllocator):
    """Entropy branching, the field's common alternative to a learned predictor: GRPO's stage 1 (uniform roots, no
    values) and continuations where the policy is most uncertain. The signal is ARPO's (Dong et al., "Agentic
    Reinforced Policy Optimization", arXiv 2507.19849): the entropy of the first k tokens the policy generates right
    after a tool's answer; our anchors are the prefixes that end in the env's observation of a turn (a search's
    passages, or the error message of a malformed or failed call, which ARPO would not branch on), and their entropy
    is read off the turn their chain generated next (`TurnNode.entropy`, the mean of `topk_entropy` over
    allocation.entropy_tokens tokens, from the engine's top logprobs). Raw entropy, not ARPO's change from the
    rollout's first-turn entropy: the anchors ranked here are one prompt's, so a per-rollout baseline matters less.
    The selection is AT2PO's (Zong et al., arXiv 2601.04767): the top-K highest-entropy turn nodes, with a penalty on
    nodes already branched (`entropy_prefixes`; the penalty acts only when a prompt's share of a round exceeds its
    anchors, rare at 2 continuations a prompt, so at configs/compare.toml the top-K decides). Per prompt, like every
    stage 2 here: each funded prompt's share of the continuations (allocation.stage2_share) goes to its own anchors
    by entropy, and the advantages are TRACE's (the process term at expanded anchors), as for every allocator that
    expands. Not ARPO's probabilistic branching during generation: that spends a random number of leaves, and every
    allocator here spends exactly allocation.leaf_budget."""

    stage1, stage2 = "uniform", "entropy"


ALLOCATORS: dict[str, type[StagedAllocator]] = {
    "trace": TraceAllocator,
    "uniform": UniformAllocator,
    "root-only": RootOnlyAllocator,
    "random-node": RandomNodeAllocator,
    "trace-skip": TraceSkipAllocator,
    "entropy": EntropyAllocator,
    "greso": GresoAllocator,
}


def make_allocator(name: str | None = None, *, stage1: str | None = None, stage2: str | None = None) -> StagedAllocator:
    """`make_allocator("trace")`, or per stage as in the paper's ablation: `make_allocator(stage1="active",
    stage2="uniform")`, or the same as a name, `make_allocator("active+uniform")` (stage1 in STAGE1, stage2 in
    STAGE2). An unknown name raises ValueError naming the choices."""
    if name is not None:
        assert stage1 is None and stage2 is None, "give either a name or the two stages, not both"
        if name in ALLOCATORS:
            return ALLOCATORS[name]()
        if name.count("+") != 1:
            raise ValueError(
                f"unknown allocator {name!r}: one of {sorted(ALLOCATORS)}, or STAGE1+STAGE2 with stage 1 in {STAGE1} "
                f"and stage 2 in {STAGE2} (e.g. 'uniform+active': TRACE's stage 2 on GRPO's stage 1)"
            )
        stage1, stage2 = name.split("+")
    if stage1 not in STAGE1 or stage2 not in STAGE2:
        raise ValueError(f"stage 1 {stage1!r} must be in {STAGE1}, stage 2 {stage2!r} in {STAGE2}")
    if stage1 == "greso" and stage2 != "none":  # its filter would be bypassed by the roots a round re-spends
        raise ValueError(
            f"stage 1 'greso' goes with stage 2 'none' only (got {stage2!r}): continuations no anchor can take are "
            "re-spent as new roots taken from the stream unfiltered, which GRESO's filter would have skipped"
        )
    cls = type(f"Allocator_{stage1}_{stage2}", (StagedAllocator,), {"stage1": stage1, "stage2": stage2})
    return cls()
