"""Tree-aware advantages, laid out as training sequences (DESIGN §1 "Policy update").

Per prompt (one RolloutTree, backed up), over its scored leaves with rewards r, mean mu and std sigma:
- outcome term of a node y: (Vhat(y) - mu) / (sigma + eps), i.e. the visit-weighted mean of the normalised
  rewards of the leaves below y (for a leaf: its own normalised reward); 0 for every node when sigma = 0;
- process term: Vhat(y) - Vhat(parent(y)), the change in backed-up value that turn y brought (not normalised:
  it is already a difference of success probabilities, in [-1, 1]);
- node advantage A(y) = w_outcome * outcome + w_process * process, given to every policy-generated token of y.

Layout (our choice; DESIGN says only that a shared prefix is trained once, with its own node advantage): one
`TrainSample` per scored leaf, holding that leaf's whole root-to-leaf history, with per-token advantages and a
per-token weight 1 / n(y), n(y) = number of scored leaves below the token's node y, i.e. the number of samples
that contain it. A node's tokens appear in n(y) samples with the same context, so their summed weight is 1:
the weighted token loss trains each node exactly once. The alternative, one sample per node holding its
history as context with only its own tokens trained, costs sum_{nodes} |H(y)| forward tokens, which is the
leaf layout's sum_{leaves} |H(leaf)| plus the histories of all internal nodes; the leaf layout is never more
compute, and for a plain chain of T turns it is T times less.

Contract: the loss must use the token weights (`trainer.loss.policy_loss` takes them) and normalise by the
summed weight of trained tokens; tokens with loss_mask 0 have advantage 0.0 and weight 0.0. Leaves without a
reward (errors) and open branches produce no sample and do not enter mu or sigma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from trainer.tree import RolloutTree


@dataclass
class AdvantageConfig:
    w_outcome: float = 1.0
    """Weight of the inter-tree outcome term (GRPO's normalised reward)."""
    w_process: float = 1.0
    """Weight of the intra-tree process term Vhat(node) - Vhat(parent). 0 gives plain (tree-averaged) GRPO."""
    eps: float = 1e-6
    """Added to the reward std before dividing (verl's GRPO uses 1e-6)."""
    std_ddof: int = 1
    """Delta degrees of freedom of the reward std: 1 = unbiased (torch.std, as verl's GRPO), 0 = population."""
    scale_by_std: bool = True
    """Divide the outcome term by the std; False gives Dr. GRPO's mean-centred rewards."""

    def __post_init__(self) -> None:
        assert self.eps >= 0 and self.std_ddof in (0, 1), f"eps={self.eps} std_ddof={self.std_ddof}"


@dataclass
class TrainSample:
    """One root-to-leaf history laid out for a forward pass; every list has len(input_ids) entries."""

    input_ids: list[int]  # the leaf's full history: prompt, then each turn's action and observation tokens
    loss_mask: list[int]  # 1 on policy-generated tokens of scored nodes, 0 on prompt and observation tokens
    advantages: list[float]  # the token's node advantage A(y) where loss_mask is 1, else 0.0
    weights: list[float]  # 1 / n(y) where loss_mask is 1 (n(y) = samples sharing node y), else 0.0
    engine_logprobs: list[float]  # the engine's sampling logprob where loss_mask is 1, else 0.0
    prompt_id: str
    tree_index: int  # position of the tree in the list given to build_training_samples
    leaf_id: int  # node id of the leaf in its tree
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (node_id, start, end) per path node
    min_weight_version: int = 0  # oldest policy version that generated a node of this path (staleness)

    def __len__(self) -> int:
        return len(self.input_ids)


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
    """{node_id: (outcome term, process term)} for every non-root node with a backed-up value.

    The tree must be backed up (`tree.backup()`); values are read, not recomputed."""
    mu, sigma = reward_stats(tree, cfg)
    assert tree.root.value is None or abs(tree.root.value - mu) < 1e-9, (
        f"prompt {tree.prompt_id!r}: root value {tree.root.value} != leaf mean {mu}; call tree.backup() first"
    )
    scale = (sigma + cfg.eps) if cfg.scale_by_std else 1.0
    flat = sigma < 1e-12  # all rewards equal: no contrast, no outcome signal
    out: dict[int, tuple[float, float]] = {}
    for node in tree.nodes[1:]:
        if node.value is None:
            continue
        parent = tree.nodes[node.parent]
        outcome = 0.0 if flat else (node.value - mu) / scale
        out[node.node_id] = (outcome, node.value - parent.value)
    return out


def node_advantages(tree: RolloutTree, cfg: AdvantageConfig) -> dict[int, float]:
    """{node_id: A(y) = w_outcome * outcome + w_process * process} for every non-root node with a value."""
    return {i: cfg.w_outcome * o + cfg.w_process * p for i, (o, p) in node_terms(tree, cfg).items()}


def build_training_samples(trees: Sequence[RolloutTree], cfg: AdvantageConfig) -> list[TrainSample]:
    """One TrainSample per scored leaf of every (backed-up) tree, in tree order then leaf id order."""
    samples = []
    for t_idx, tree in enumerate(trees):
        adv = node_advantages(tree, cfg)
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
                    a, w = adv[i], 1.0 / node.n_leaves
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
    """Share of trees holding both a success and a failure leaf (the paper's headline); nan for no trees."""
    return sum(t.is_mixed() for t in trees) / len(trees) if trees else math.nan
