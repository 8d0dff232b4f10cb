"""Tree-aware advantages, laid out as training sequences (DESIGN §1 "Policy update").

Per prompt (one RolloutTree, backed up), with node values Vhat (`trainer.algo.tree`: fresh-sample means, not
visit-weighted leaf means), baseline mu = Vhat(root) and scale sigma:
- mu = Vhat(root), the mean outcome of the bare rollouts: i.i.d. samples of the prompt's success probability,
  so an unbiased baseline. The mean over all leaves is not: stage 2 placed continuations by outcome;
- sigma = the std of all scored leaves' rewards (ddof as configured). A tree allocator creates its contrast
  through continuations; a std over the bare rollouts alone would be 0 for a prompt whose bare rollouts all
  agree and so silence exactly the trees stage 2 made mixed. It only scales, so it biases no sign;
- outcome term of a node y: (Vhat(y) - mu) / (sigma + eps); 0 for every node when sigma = 0;
- process term: Vhat(y) - Vhat(parent(y)), the change in success probability that turn y brought (not
  normalised: already a difference of probabilities, in [-1, 1]). Both values are unbiased for an expanded y
  and the root (given the history); for an unexpanded y, Vhat(y) = O(y) is its one sample (`trainer.algo.tree`);
- node advantage A(y) = w_outcome * outcome + w_process * process, given to every policy-generated token of y.
  `build_training_samples(..., process=False)` drops the process term whatever w_process says: with no
  expansion that is exactly GRPO (every node on leaf j's chain has Vhat = r_j and mu is the group mean, so each
  token gets (r_j - mean) / (std + eps)); the trainer passes process=False for allocators that do not expand.
A node without a value (no scored sample of its own state: rare, an error-ended chain) gets advantage 0, and
a node whose parent has none gets process term 0: there is nothing to compare against.

Layout (our choice; DESIGN says only that a shared prefix is trained once, with its own node advantage): one
`TrainSample` per scored leaf, holding that leaf's whole root-to-leaf history, with per-token advantages and a
per-token weight 1 / n(y), n(y) = number of scored leaves below the token's node y, i.e. the number of samples
that contain it. A node's tokens appear in n(y) samples with the same context, so their summed weight is 1:
the weighted token loss trains each node exactly once. The alternative, one sample per node holding its
history as context with only its own tokens trained, costs sum_{nodes} |H(y)| forward tokens, which is the
leaf layout's sum_{leaves} |H(leaf)| plus the histories of all internal nodes; the leaf layout is never more
compute, and for a plain chain of T turns it is T times less.

Contract: the loss must use the token weights (`trainer.learner.loss.policy_loss` takes them) and normalise by the
summed weight of trained tokens; tokens with loss_mask 0 have advantage 0.0 and weight 0.0. Leaves without a
reward (errors) and open branches produce no sample and do not enter mu or sigma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.algo.tree import RolloutTree, TurnNode
from trainer.learner.samples import TrainSample

PROCESS_BASELINES = ("parent", "fresh", "predicted")
"""`AdvantageConfig.process_baseline`'s values."""


@dataclass
class AdvantageConfig:
    w_outcome: float = 1.0
    """Weight of the inter-tree outcome term (GRPO's normalised reward)."""
    w_process: float = 1.0
    """Weight of the intra-tree process term Vhat(node) - Vhat(parent); build_training_samples(process=False)
    ignores it (the trainer does so for allocators that do not expand)."""
    eps: float = 1e-6
    """Added to the reward std before dividing (verl's GRPO uses 1e-6)."""
    std_ddof: int = 1
    """Delta degrees of freedom of the reward std: 1 = unbiased (torch.std, as verl's GRPO), 0 = population."""
    scale_by_std: bool = True
    """Divide the outcome term by the std; False gives Dr. GRPO's mean-centred rewards."""
    process_baseline: str = "parent"
    """What the process term subtracts. "parent" (the paper's): Vhat(parent). An unexpanded parent's Vhat is its own
    outcome, the one sample whose result stage 2 selected the child's anchor on: a biased baseline (issue 22).
    "fresh" (our deviation): Vhat(parent) only where it is a mean of fresh samples (the root, or a parent that got
    continuations of its own), else no process term. "predicted" (our deviation): an unexpanded parent's predicted
    V(H) (`predicted`, written when stage 2 valued the anchors) instead, where it has one."""

    def __post_init__(self) -> None:
        assert self.eps >= 0 and self.std_ddof in (0, 1), f"eps={self.eps} std_ddof={self.std_ddof}"
        if self.process_baseline not in PROCESS_BASELINES:
            raise ValueError(
                f"advantage.process_baseline must be one of {PROCESS_BASELINES}, got {self.process_baseline!r}"
            )


def reward_stats(tree: RolloutTree, cfg: AdvantageConfig) -> tuple[float, float]:
    """(mean, std) of the tree's scored-leaf rewards; std is 0.0 when fewer than 1 + ddof leaves."""
    rs = tree.rewards()
    if not rs:
        return 0.0, 0.0
    mu = sum(rs) / len(rs)
    dof = len(rs) - cfg.std_ddof
    sigma = math.sqrt(sum((r - mu) ** 2 for r in rs) / dof) if dof > 0 else 0.0
    return mu, sigma


def node_terms(tree: RolloutTree, cfg: AdvantageConfig) -> dict[int, tuple[float, float]]:
    """{node_id: (outcome term, process term)} for every non-root node with a value (module docstring).

    The tree must be backed up (`tree.backup()`); values are read, not recomputed."""
    assert tree.root.n_leaves == len(tree.scored_leaves()), (
        f"prompt {tree.prompt_id!r}: root n_leaves {tree.root.n_leaves} != {len(tree.scored_leaves())} scored leaves; "
        "call tree.backup() first"
    )
    _, sigma = reward_stats(tree, cfg)
    mu = tree.root.value
    scale = (sigma + cfg.eps) if cfg.scale_by_std else 1.0
    flat = sigma < 1e-12 or mu is None  # all rewards equal (no contrast), or no baseline: no outcome signal
    out: dict[int, tuple[float, float]] = {}
    for node in tree.nodes[1:]:
        if node.value is None:
            continue
        parent = tree.nodes[node.parent]
        outcome = 0.0 if flat else (node.value - mu) / scale
        base = process_base(parent, cfg.process_baseline)
        process = 0.0 if base is None else node.value - base
        out[node.node_id] = (outcome, process)
    return out


def process_base(parent: TurnNode, how: str) -> float | None:
    """The baseline the process term subtracts for a child of `parent` (`AdvantageConfig.process_baseline`)."""
    fresh = parent.parent is None or len(parent.children) > 1  # the root's bare rollouts, or its own continuations
    if how == "parent" or fresh:
        return parent.value
    if how == "fresh":
        return None
    return parent.predicted


def node_advantages(tree: RolloutTree, cfg: AdvantageConfig, *, process: bool = True) -> dict[int, float]:
    """{node_id: A(y)} for every non-root node with a value: w_outcome * outcome + w_process * process, or
    w_outcome * outcome alone when `process` is False."""
    w_process = cfg.w_process if process else 0.0
    return {i: cfg.w_outcome * o + w_process * p for i, (o, p) in node_terms(tree, cfg).items()}


def build_training_samples(
    trees: Sequence[RolloutTree], cfg: AdvantageConfig, *, process: bool = True
) -> list[TrainSample]:
    """One TrainSample per scored leaf of every (backed-up) tree, in tree order then leaf id order.
    process=False drops the process term (plain GRPO for trees without expansion)."""
    samples = []
    for t_idx, tree in enumerate(trees):
        adv = node_advantages(tree, cfg, process=process)
        for leaf in tree.scored_leaves():
            ids: list[int] = []
            mask: list[int] = []
            advs: list[float] = []
            wts: list[float] = []
            lps: list[float] = []
            segments = []
            for i in tree.path(leaf.node_id):
                node = tree.nodes[i]
                start = len(ids)
                ids.extend(node.token_ids)
                lps.extend(node.logprobs)
                if i == 0:
                    mask.extend([0] * len(node.token_ids))
                    advs.extend([0.0] * len(node.token_ids))
                    wts.extend([0.0] * len(node.token_ids))
                else:
                    assert node.n_leaves >= 1, f"prompt {tree.prompt_id!r} node {i}: n_leaves=0 on a scored path"
                    a, w = adv.get(i, 0.0), 1.0 / node.n_leaves  # no value: no signal (module docstring)
                    mask.extend(node.loss_mask)
                    advs.extend(a if m else 0.0 for m in node.loss_mask)
                    wts.extend(w if m else 0.0 for m in node.loss_mask)
                segments.append((i, start, len(ids)))
            samples.append(
                TrainSample(
                    input_ids=ids,
                    loss_mask=mask,
                    advantages=advs,
                    weights=wts,
                    engine_logprobs=lps,
                    prompt_id=tree.prompt_id,
                    tree_index=t_idx,
                    leaf_id=leaf.node_id,
                    segments=segments,
                    min_weight_version=min(tree.nodes[i].weight_version for i, _, _ in segments[1:]),
                )
            )
    return samples


def nonzero_adv_token_frac(samples: Sequence[TrainSample], tol: float = 1e-8) -> float:
    """Share of trained tokens with |advantage| > tol, each token counted once (weighted by its weight, so a
    shared prefix is not counted per leaf); nan when there is no trained token."""
    total = nonzero = 0.0
    for s in samples:
        for m, a, w in zip(s.loss_mask, s.advantages, s.weights, strict=True):
            if m:
                total += w
                if abs(a) > tol:
                    nonzero += w
    return nonzero / total if total > 0 else math.nan


def effective_ratio(trees: Sequence[RolloutTree]) -> float:
    """Share of trees holding both a success and a failure leaf (the paper's headline); nan for no trees.

    Callers pass exactly the prompts that received rollouts (not the candidate pool, not only the mixed ones),
    for every allocator alike, so that the figure compares allocators."""
    return sum(t.is_mixed() for t in trees) / len(trees) if trees else math.nan


def mixed_per_100_leaves(trees: Sequence[RolloutTree]) -> float:
    """Mixed prompts per 100 scored leaves, the equal-cost contrast figure (DESIGN §1 "Budget accounting");
    nan when there is no scored leaf. Same caller contract as `effective_ratio`."""
    leaves = sum(len(t.scored_leaves()) for t in trees)
    return 100.0 * sum(t.is_mixed() for t in trees) / leaves if leaves else math.nan
