"""The rollout tree: one prompt's tree-structured rollouts, as token ids, with budget accounting.

Contract (who writes what):
- The agent loop creates a tree with `RolloutTree.new` (root = the chat-templated prompt) and grows it with
  `add_child`, one node per ReAct turn: the policy's generated action tokens (loss mask 1, engine logprobs)
  followed by the observation tokens (loss mask 0, logprob 0.0). It sets `status`, `reward` and `info` on the node
  after which the episode ended, and `snapshot_id` on every node whose episode state can be forked.
- `backup()` (called once the tree is finished, again after each expansion round) writes `n_leaves`, `outcome`,
  `value` (the node value Vhat) and `n_fresh` on every node. The allocator, the predictor and the advantage
  builder read them.

How a tree grows (the runner's contract, relied on by the values below): the root's children are the first
turns of the bare rollouts, i.i.d. and as many as stage 1 decided before any outcome was seen. Every other inner
node y was created by one chain (a bare rollout or a continuation) that went on: `y.children[0]` is that chain's
next turn; `y.children[1:]` are continuations stage 2 added at y later, fresh samples from y's state, started
only once the chain below `children[0]` had finished.

Node values (DESIGN §1 "Predictor V"). Stage 2 adds leaves where an outcome is likely to flip, so a visit-weighted
mean of the leaves below a node is biased (a simulation put a true 0.215 at ~0.33; tests/test_values.py keeps
that estimator as a witness that fails). Instead:
- own outcome O(y): the reward of the leaf reached from y by following `children[0]` down (a scored leaf: its
  reward; None if that chain ended without one; None for the root, which no chain created). Whether y is later
  expanded is decided after O(y) is drawn, and nothing after that changes it, so O(y) is an unbiased single
  sample of V(y) unconditionally.
- value Vhat(y):
  * root: the mean of O(c) over its children, the bare rollouts: i.i.d. samples of V(root), unbiased;
  * an inner node with added continuations: the mean of O(c) over `children[1:]` that have one. Each is a fresh
    draw from y's state, so the mean is unbiased *given* the history that made stage 2 expand y. The triggering
    O(y) is left out on purpose: the allocator picked y because of O(y), and any rule that lets that outcome
    decide how much it counts (including it in the mean, or weighting by leaves below) stays biased;
  * an inner node without added continuations: O(y), its only sample (also the fallback when every
    continuation ended without a reward: rare, and then as biased as the outcome that triggered them). Unbiased over all draws, but biased *given* that y was left alone, since the allocator's choice
    can depend on O(y) (targeting successes leaves mostly failures unexpanded). No per-node value can avoid this
    with one sample; the predictor's targets therefore use (node, sample) pairs instead
    (`trainer.algo.predictor.collect_training_set`), and priors count only the root's bare rollouts (`root_outcomes`);
  * a scored leaf: its reward; no scored sample at all: None.
- `n_fresh` is the number of samples Vhat averages; `n_leaves` stays the structural count of scored leaves in the
  subtree (the 1/n(y) token weights of `trainer.algo.advantages`), which is no estimate of anything.

Invariants (checked by `add_child` and `validate`, loudly, with the values in the message):
- `nodes[i].node_id == i`; a child's id is greater than its parent's, so `reversed(nodes)` is a bottom-up order;
- `len(token_ids) == len(loss_mask) == len(logprobs)`, mask values in {0, 1}, logprob 0.0 where mask is 0;
- the root has depth 0, no parent, and an all-zero mask; a child's depth is its parent's depth + 1;
- only an OPEN node has children (an episode that ended cannot be continued).

A leaf is *finished* when its status is not OPEN and *scored* when it is finished and has a reward. Backup
and every statistic built on it use scored leaves only: a finished leaf without a reward (an env or engine
error) carries no outcome, so it neither counts as a failure nor dilutes its ancestors' values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack

# A leaf counts as a success for `is_mixed` (and for the effective ratio) when reward >= SUCCESS_THRESHOLD.
# Rewards are EM in {0, 1} by default, where any threshold in (0, 1] is exact; 0.5 also splits F1-style
# rewards in [0, 1] at the midpoint.
SUCCESS_THRESHOLD = 0.5


class NodeKind(StrEnum):
    ROOT = "root"
    TURN = "turn"


class FinishStatus(StrEnum):
    """Status of a node's episode after that node."""

    OPEN = "open"  # the episode continues after this node (it can be branched)
    ANSWERED = "answered"  # the node's action was a final answer; reward set by the judge
    TRUNCATED = "truncated"  # max turns or max tokens reached
    ERROR = "error"  # env or engine failure; the reward may be missing


@dataclass
class TurnNode:
    node_id: int  # index in RolloutTree.nodes
    parent: int | None  # None only for the root
    depth: int  # root = 0; a node after t turns has depth t
    token_ids: list[int]  # tokens this node appends to its parent's history (root: the chat-templated prompt;
    #   turn: the policy's generated action tokens followed by the observation tokens)
    loss_mask: list[int]  # 1 = policy-generated token, 0 = prompt/observation; len == len(token_ids)
    logprobs: list[float]  # engine sampling logprob per token; 0.0 where loss_mask == 0; same length
    snapshot_id: str | None = None  # env-server snapshot of the episode state after this node (the branch point)
    status: FinishStatus = FinishStatus.OPEN
    reward: float | None = None  # terminal reward, set on leaves whose episode ended
    info: dict = field(default_factory=dict)  # judge info on leaves (em, f1, ...), finish_reason etc.
    action_text: str = ""  # decoded text of the generated action (for logs/inspection only; never re-tokenized)
    observation: str = ""
    weight_version: int = 0  # policy weight version that generated this node
    children: list[int] = field(default_factory=list)
    value: float | None = None  # node value Vhat (set by backup(); module docstring); None without a scored sample
    outcome: float | None = None  # own outcome O: reward at the end of children[0]'s chain (set by backup())
    n_fresh: int = 0  # number of outcomes `value` averages (set by backup())
    predicted: float | None = None  # predictor's V(H) at allocation time (for calibration logs)
    features: list[float] | None = None  # predictor input at this prefix (hidden state + structural), optional
    entropy: float | None = None  # mean top-k entropy (nats) of this node's first generated tokens (the "entropy"
    #   allocator's signal: allocation.entropy_tokens tokens, allocation.entropy_top_k logprobs each); None unless asked
    n_leaves: int = 0  # number of scored leaves in this node's subtree, including itself (set by backup())

    @property
    def kind(self) -> NodeKind:
        return NodeKind.ROOT if self.parent is None else NodeKind.TURN

    @property
    def is_finished(self) -> bool:
        return self.status != FinishStatus.OPEN

    @property
    def is_scored_leaf(self) -> bool:
        return not self.children and self.is_finished and self.reward is not None

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)


def _check_segment(token_ids: list[int], loss_mask: list[int], logprobs: list[float], where: str) -> None:
    assert len(token_ids) == len(loss_mask) == len(logprobs), (
        f"{where}: lengths differ: token_ids={len(token_ids)} loss_mask={len(loss_mask)} logprobs={len(logprobs)}"
    )
    for i, (m, lp) in enumerate(zip(loss_mask, logprobs, strict=True)):
        assert m in (0, 1), f"{where}: loss_mask[{i}]={m!r}, expected 0 or 1"
        if m == 0:
            assert lp == 0.0, f"{where}: logprobs[{i}]={lp!r} where loss_mask is 0 (expected 0.0)"
        else:
            assert math.isfinite(lp) and lp <= 1e-4, f"{where}: logprobs[{i}]={lp!r} is not a log-probability"


@dataclass
class Ledger:
    """Budget accounting for one tree; ledgers add up field-wise (per step: `sum(ledgers, Ledger())`)."""

    leaves: int = 0  # finished rollouts (leaves) generated
    generated_tokens: int = 0  # tokens sampled by the engine
    prefill_tokens: int = 0  # prompt tokens sent to the engine, over all requests
    cached_prefill_tokens: int = 0  # of those, served from the engine's prefix cache
    env_calls: int = 0  # env-server calls (create, step, fork, snapshot, ...)

    def __add__(self, other: Ledger) -> Ledger:
        if not isinstance(other, Ledger):
            return NotImplemented
        return Ledger(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __radd__(self, other: Any) -> Ledger:
        if other == 0:  # lets the built-in sum() start from 0
            return self
        return self.__add__(other)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class RolloutTree:
    prompt_id: str
    question: str
    golden_answers: list[str]
    nodes: list[TurnNode]
    ledger: Ledger = field(default_factory=Ledger)
    meta: dict = field(default_factory=dict)
    lost: str | None = None
    """Why the tree lost its env state mid-step (its env replica died, a call timed out); None while it is whole. A
    lost tree never reaches the update: the step redoes it (`TraceStep.collect`) or drops it, counted."""

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        prompt_id: str,
        question: str,
        golden_answers: list[str],
        prompt_ids: list[int],
        snapshot_id: str | None,
        **meta: Any,
    ) -> RolloutTree:
        """A tree holding only its root: the chat-templated prompt (all mask 0) at the episode's first state."""
        assert len(prompt_ids) > 0, f"prompt {prompt_id!r}: empty prompt_ids"
        root = TurnNode(
            node_id=0,
            parent=None,
            depth=0,
            token_ids=list(prompt_ids),
            loss_mask=[0] * len(prompt_ids),
            logprobs=[0.0] * len(prompt_ids),
            snapshot_id=snapshot_id,
        )
        return cls(prompt_id=prompt_id, question=question, golden_answers=list(golden_answers), nodes=[root], meta=meta)

    def add_child(
        self, parent: int, token_ids: list[int], loss_mask: list[int], logprobs: list[float], **attrs: Any
    ) -> TurnNode:
        """Append a turn node below `parent`; `attrs` are any other TurnNode fields (status, reward, ...)."""
        assert 0 <= parent < len(self.nodes), (
            f"prompt {self.prompt_id!r}: parent {parent} not in 0..{len(self.nodes) - 1}"
        )
        p = self.nodes[parent]
        assert p.status == FinishStatus.OPEN, (
            f"prompt {self.prompt_id!r}: node {parent} has status {p.status.value!r}; only an open node can be continued"
        )
        for reserved in ("node_id", "parent", "depth", "children"):
            assert reserved not in attrs, f"add_child sets {reserved!r} itself"
        node_id = len(self.nodes)
        _check_segment(token_ids, loss_mask, logprobs, f"prompt {self.prompt_id!r} node {node_id}")
        if "status" in attrs:
            attrs["status"] = FinishStatus(attrs["status"])
        node = TurnNode(
            node_id=node_id,
            parent=parent,
            depth=p.depth + 1,
            token_ids=list(token_ids),
            loss_mask=list(loss_mask),
            logprobs=list(logprobs),
            **attrs,
        )
        self.nodes.append(node)
        p.children.append(node_id)
        return node

    # ---- navigation ---------------------------------------------------------------------------------------

    @property
    def root(self) -> TurnNode:
        return self.nodes[0]

    def leaves(self) -> list[TurnNode]:
        """Finished leaves: nodes without children whose status is not OPEN (scored or not)."""
        return [n for n in self.nodes if not n.children and n.is_finished]

    def scored_leaves(self) -> list[TurnNode]:
        """Finished leaves that carry a reward: the outcomes every statistic is built on."""
        return [n for n in self.nodes if n.is_scored_leaf]

    def open_leaves(self) -> list[TurnNode]:
        """Nodes without children whose episode has not ended (rollouts still running, or abandoned)."""
        return [n for n in self.nodes if not n.children and not n.is_finished]

    def path(self, node_id: int) -> list[int]:
        """Node ids from the root down to `node_id`, both included."""
        assert 0 <= node_id < len(self.nodes), f"node {node_id} not in 0..{len(self.nodes) - 1}"
        out = []
        cur: int | None = node_id
        while cur is not None:
            out.append(cur)
            cur = self.nodes[cur].parent
        return out[::-1]

    def history_ids(self, node_id: int) -> list[int]:
        """The prefix H: token ids of every node on the path, concatenated (what the engine continues from)."""
        out: list[int] = []
        for i in self.path(node_id):
            out.extend(self.nodes[i].token_ids)
        return out

    def subtree(self, node_id: int) -> list[int]:
        """Ids of `node_id` and all its descendants, in increasing order."""
        out, stack = [], [node_id]
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(self.nodes[i].children)
        return sorted(out)

    def anchors(self, max_turns: int | None = None) -> list[TurnNode]:
        """Stage-2 candidate branch points: open, non-root nodes with at least one scored leaf below.

        The root is excluded (spending rollouts on it is stage 1's job). A node at depth >= max_turns cannot
        take another turn, so it is excluded too. Whether a node holds a snapshot to fork from is the agent
        loop's concern, not checked here.
        """
        return [
            n
            for n in self.nodes[1:]
            if n.status == FinishStatus.OPEN
            and n.n_leaves > 0
            and n.value is not None
            and (max_turns is None or n.depth < max_turns)
        ]

    # ---- statistics ---------------------------------------------------------------------------------------

    def backup(self) -> None:
        """Set `n_leaves`, `outcome` (O), `value` (Vhat) and `n_fresh` bottom-up, as the module docstring defines
        them: root -> mean O over the bare rollouts; inner node -> mean O over the continuations added at it, else
        its own O; scored leaf -> its reward; None (n_fresh 0) where there is no scored sample."""
        for node in reversed(self.nodes):
            if not node.children:
                if node.is_scored_leaf:
                    node.n_leaves, node.outcome, node.value, node.n_fresh = 1, float(node.reward), float(node.reward), 1
                else:
                    node.n_leaves, node.outcome, node.value, node.n_fresh = 0, None, None, 0
                continue
            for c in node.children:
                assert c > node.node_id, f"child {c} of node {node.node_id} has a smaller id"
            kids = [self.nodes[c] for c in node.children]
            node.n_leaves = sum(k.n_leaves for k in kids)
            if node.parent is None:  # root: every child is a bare rollout, an i.i.d. sample
                node.outcome = None
                samples = [k.outcome for k in kids if k.outcome is not None]
            else:  # children[0] continues y's own chain; children[1:] are continuations added at y
                node.outcome = kids[0].outcome
                samples = [k.outcome for k in kids[1:] if k.outcome is not None]
                if not samples and node.outcome is not None:
                    samples = [node.outcome]
            node.n_fresh = len(samples)
            node.value = sum(samples) / len(samples) if samples else None

    def own_outcome(self, node_id: int) -> float | None:
        """O(y): the reward of the leaf reached from `node_id` by following children[0] down (None if that leaf has
        none, or for the root). Walks the tree; does not need `backup()`."""
        if node_id == 0:
            return None
        node = self.nodes[node_id]
        while node.children:
            node = self.nodes[node.children[0]]
        return float(node.reward) if node.is_scored_leaf else None

    def root_outcomes(self) -> list[float]:
        """The bare rollouts' own outcomes (those that have one): i.i.d. samples of the root's success probability.
        What per-prompt priors and base rates count, rather than all leaves (continuations were placed by outcome)."""
        out = [self.own_outcome(c) for c in self.root.children]
        return [o for o in out if o is not None]

    def rewards(self) -> list[float]:
        return [float(n.reward) for n in self.scored_leaves()]

    def is_mixed(self) -> bool:
        """Holds both a success (reward >= SUCCESS_THRESHOLD) and a failure (reward < SUCCESS_THRESHOLD) leaf."""
        rs = self.rewards()
        return any(r >= SUCCESS_THRESHOLD for r in rs) and any(r < SUCCESS_THRESHOLD for r in rs)

    def validate(self) -> None:
        """Check every invariant of the module docstring; raise AssertionError with the values."""
        assert self.nodes, f"prompt {self.prompt_id!r}: a tree has at least its root"
        for i, n in enumerate(self.nodes):
            where = f"prompt {self.prompt_id!r} node {i}"
            assert n.node_id == i, f"{where}: node_id={n.node_id}"
            _check_segment(n.token_ids, n.loss_mask, n.logprobs, where)
            if i == 0:
                assert n.parent is None and n.depth == 0, f"{where}: root has parent={n.parent} depth={n.depth}"
                assert not any(n.loss_mask), f"{where}: the root (prompt) has loss-mask 1 tokens"
            else:
                assert n.parent is not None and 0 <= n.parent < i, f"{where}: parent={n.parent}"
                p = self.nodes[n.parent]
                assert n.depth == p.depth + 1, f"{where}: depth={n.depth}, parent depth={p.depth}"
                assert i in p.children, f"{where}: missing from parent {n.parent}'s children {p.children}"
            for c in n.children:
                assert 0 < c < len(self.nodes) and self.nodes[c].parent == i, f"{where}: bad child {c}"
            if n.children:
                assert n.status == FinishStatus.OPEN, f"{where}: status {n.status.value!r} but has children"

    # ---- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes:
            d = asdict(n)
            d["status"] = n.status.value
            nodes.append(d)
        return {
            "prompt_id": self.prompt_id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
            "nodes": nodes,
            "ledger": self.ledger.to_dict(),
            "meta": self.meta,
            "lost": self.lost,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutTree:
        nodes = []
        for nd in d["nodes"]:
            nd = dict(nd)
            nd["status"] = FinishStatus(nd["status"])
            nodes.append(TurnNode(**nd))
        tree = cls(
            prompt_id=d["prompt_id"],
            question=d["question"],
            golden_answers=list(d["golden_answers"]),
            nodes=nodes,
            ledger=Ledger(**d.get("ledger", {})),
            meta=dict(d.get("meta", {})),
            lost=d.get("lost"),
        )
        tree.validate()
        return tree

    def save(self, path: str | Path) -> None:
        """Write the tree as MessagePack when the suffix is `.msgpack`, else as JSON."""
        path = Path(path)
        if path.suffix == ".msgpack":
            path.write_bytes(msgpack.packb(self.to_dict(), use_bin_type=True))
        else:
            path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> RolloutTree:
        path = Path(path)
        if path.suffix == ".msgpack":
            return cls.from_dict(msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False))
        return cls.from_dict(json.loads(path.read_text()))
