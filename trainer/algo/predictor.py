"""The shared success predictor V(H): one small model for all prompts and depths, plus its calibration.

Contract:
- Inputs are ours to choose (DESIGN §1): the trainer stores on each node, as `TurnNode.features`, the policy's
  last hidden state at the prefix end concatenated with `structural_features(node, tree)`. Any fixed width D
  works; `SuccessPredictor` standardises its inputs with running statistics, so raw hidden states are fine.
- Targets are outcomes, in [0, 1], paired with the node whose state they are samples of (`trainer.algo.tree` defines
  O): a node's own outcome O(y), always; the own outcome O(c) of each continuation c that stage 2 added at y; for
  the root, the bare rollouts' O. `collect_training_set` gives one row per node: target = the mean of its
  samples, weight = their count, which has the same loss gradient as one row per (node, sample) pair (MSE's and
  BCE's gradients are linear in the target). Why pairs and not a per-node estimate such as Vhat: the allocator
  expands y *because of* O(y), so the number of samples at y depends on O(y), but each added sample is still a
  fresh draw with mean V(y) whatever that number, and O(y) counts once whatever happens. The expected gradient
  at y is then (1 + E[k]) * (f - V(y)) (k: continuations added), zero at f = V: weighted regression over the
  pairs is consistent. A per-node value is not: an unexpanded node's only sample is O(y), and being left
  unexpanded is itself evidence about O(y); and a weight of 1 per node with the pair mean as target gives
  E[(O + sum O_i) / (1 + k(O))] != V. The features never depend on the gold answers (a test checks it).
  `SuccessPredictor.fit` is called every trainer step *before* the policy update, continues from the previous
  step's weights (warm start), takes at most `max_steps` gradient steps, and never touches the policy: it sees
  detached CPU tensors only.
- Roots never seen before get their stage-1 estimate from `BetaPrior`, a per-prompt Beta posterior of past
  outcomes, optionally centred on the predictor's own root estimate (`mean(prompt_id, prior_mean=...)`).
- `calibration` (Brier, rank AUC) is what the trainer logs each step; `split_calibration` applies it to the
  step's trees, using the `predicted` values written at allocation time against the outcomes that followed,
  separately for roots (V(root) against each bare rollout's outcome) and for anchors (V(H) against O(node)).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shared.text import normalize_answer
from trainer.algo.tree import SUCCESS_THRESHOLD, RolloutTree, TurnNode


@dataclass
class PredictorConfig:
    hidden: int = 64
    """Width of the predictor MLP."""
    lr: float = 3e-3
    epochs: int = 30
    """Epochs of minibatch steps per refit (every step, before the policy update), at most max_steps steps."""
    max_steps: int = 300
    """Cap on a refit's minibatch steps (256 rows each), whatever epochs says: with replay the training set grows."""
    loss: str = "bce"
    """The refit's loss on the [0, 1] targets: "bce" (binary cross-entropy on the logit) or "mse" (squared error of
    the probability). DESIGN allows either; BCE is the default."""
    use_hidden_state: bool = True
    """Input = the policy's last hidden state at the prefix end + structural features (else structural only)."""
    prior_a: float = 1.0
    prior_b: float = 1.0
    """A prompt's stage-1 value is a Beta posterior of its past bare-rollout outcomes centred on the predictor's
    V(root) with a + b pseudo-counts (a prompt never seen gets V(root) itself); a / (a + b) is the centre only where
    there is no predictor value."""
    prior_decay: float = 1.0
    """In (0, 1]: a prompt's past counts are multiplied by this before each new visit's outcomes are added, so that
    outcomes of an older policy fade over passes (1.0: every visit counts for ever, as the paper's prior)."""
    replay_steps: int = 0
    """Refit on this step's rows and those of the last replay_steps steps (`RowReplay`; 0 = this step only). A step
    gives a few dozen outcomes; older rows carry older features (the policy's hidden states moved since)."""
    open_only: bool = False
    """Leave finished nodes (leaves: their value is their reward) out of the training rows: only open nodes, roots
    and anchors, are ever queried."""
    probe_prompts: int = 0
    """Calibration probe (issue 22), comparable across allocators: this many prompts a step drawn at random from the
    training split (their own generator, seeded by run.seed: the same prompts for every allocator of a seed), each
    given one rollout from its root and one from a random non-final turn of that rollout, outside the leaf budget
    and never trained on (nor counted in the prior); the predictions made for them are scored against those
    outcomes: metrics `probe_auc` (this step), `probe_auc_run` (every pair so far), `probe_leaves`. 0 = none."""
    policy_signals: bool = False
    """Two more gold-free inputs at every node, from the same forward as its hidden state: the policy's log
    p(`<answer>` next | H) and its next-token entropy at H's last token (the next action's first token; at the
    rollout temperature). Where the tag is several tokens (Qwen3's `<answer>` is `<`, `answer`, `>`), the first is
    its first token's, shared with `<search>`: the entropy then carries the signal alone. Our addition (issue 22);
    off in the paper's setting."""

    def __post_init__(self) -> None:
        if not (self.prior_a > 0 and self.prior_b > 0):
            raise ValueError(f"predictor.prior_a and prior_b must be > 0, got {self.prior_a} and {self.prior_b}")
        if not 0 < self.prior_decay <= 1:
            raise ValueError(f"predictor.prior_decay must be in (0, 1], got {self.prior_decay}")
        if self.loss not in ("bce", "mse"):
            raise ValueError(f"predictor.loss must be 'bce' or 'mse', got {self.loss!r}")
        if self.max_steps < 1 or self.epochs < 1:
            raise ValueError(f"predictor.epochs ({self.epochs}) and max_steps ({self.max_steps}) must be >= 1")


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run a block with n torch intra-op threads, then restore. A 64-wide MLP gains nothing from threads, and on a
    loaded host their synchronisation makes each step ~10x slower (measured: 8 s -> 0.6 s for 240 steps on 2 busy
    cores). With torch's default OpenMP backend the setting belongs to the calling thread (checked: a worker
    thread's set_num_threads leaves the main thread's count alone); other backends make it process-wide."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- the model ----------------------------------------------------------------------------------------------


class SuccessPredictor:
    """A small MLP with a sigmoid output: V(H) = P(success | prefix features)."""

    # Standardised inputs are clipped to +-CLIP: a feature that was constant so far (a binary flag never yet
    # seen set) would otherwise reach the MLP as a value of thousands the first time it changes.
    CLIP = 10.0
    # The running statistics count at most STATS_HORIZON samples, so that they keep following the policy's
    # hidden states as training moves them (an exponential forgetting with this horizon).
    STATS_HORIZON = 100_000

    def __init__(
        self,
        input_dim: int,
        hidden: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        *,
        loss: str = "bce",
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_steps: int = 300,
        threads: int | None = 1,
    ) -> None:
        assert input_dim >= 1 and hidden >= 1, f"input_dim={input_dim} hidden={hidden}"
        assert loss in ("bce", "mse"), f"loss={loss!r}, expected 'bce' or 'mse'"
        self.input_dim, self.hidden, self.loss = input_dim, hidden, loss
        self.batch_size, self.max_steps, self.threads = batch_size, max_steps, threads
        self.gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
            )
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.count = 0.0
        self.mean = torch.zeros(input_dim, dtype=torch.float64)
        self.m2 = torch.zeros(input_dim, dtype=torch.float64)

    # -- standardisation --

    def _update_stats(self, x: Tensor) -> None:
        """Chan et al.'s parallel merge of (count, mean, M2) with the batch's."""
        x = x.to(torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if self.count > self.STATS_HORIZON:  # forget: keep the mean, shrink the weight of the past
            self.m2 *= self.STATS_HORIZON / self.count
            self.count = float(self.STATS_HORIZON)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    def _standardise(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x.to(torch.float32).clamp(-self.CLIP, self.CLIP)
        std = (self.m2 / self.count).sqrt().clamp_min(1e-3)
        return ((x.to(torch.float64) - self.mean) / std).clamp(-self.CLIP, self.CLIP).to(torch.float32)

    def _check(self, features: Tensor) -> Tensor:
        features = torch.as_tensor(features).detach().cpu()
        assert features.ndim == 2 and features.shape[1] == self.input_dim, (
            f"features shape {tuple(features.shape)}, expected (N, {self.input_dim})"
        )
        assert torch.isfinite(features).all(), "features hold NaN or inf"
        return features

    # -- public API --

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        """V(H) in (0, 1) for each row of features [N, D] -> [N] (float32, CPU, no grad)."""
        x = self._standardise(self._check(features))
        if x.shape[0] == 0:
            return torch.zeros(0)
        self.net.eval()
        with _intra_op_threads(self.threads):
            return torch.sigmoid(self.net(x).squeeze(-1))

    def fit(self, features: Tensor, targets: Tensor, weights: Tensor | None = None, epochs: int = 20) -> float:
        """Train on (features [N, D], targets [N] in [0, 1], weights [N] >= 0) for min(epochs passes,
        max_steps) minibatch steps, continuing from the current weights. Returns the final weighted loss on the
        whole set (BCE or MSE, as configured); nan, without training, when the set is empty."""
        with _intra_op_threads(self.threads):
            return self._fit(features, targets, weights, epochs)

    def _fit(self, features: Tensor, targets: Tensor, weights: Tensor | None, epochs: int) -> float:
        if len(features) == 0:
            return math.nan
        features = self._check(features)
        targets = torch.as_tensor(targets, dtype=torch.float32).detach().cpu().reshape(-1)
        n = features.shape[0]
        assert targets.shape[0] == n, f"targets {targets.shape[0]} != features {n}"
        assert ((targets >= 0) & (targets <= 1)).all(), f"targets outside [0, 1]: {targets.min()}..{targets.max()}"
        w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        assert w.shape == (n,) and (w >= 0).all() and w.sum() > 0, f"bad weights {w}"
        w = w * (n / w.sum())  # mean 1: the learning rate does not depend on the weighting's scale
        self._update_stats(features)
        x = self._standardise(features)
        bs = min(self.batch_size, n)
        steps = min(self.max_steps, epochs * math.ceil(n / bs))
        self.net.train()
        for _ in range(steps):
            idx = torch.randint(0, n, (bs,), generator=self.gen)
            loss = self._loss(self.net(x[idx]).squeeze(-1), targets[idx], w[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.net.eval()
        with torch.no_grad():
            return float(self._loss(self.net(x).squeeze(-1), targets, w))

    def _loss(self, logits: Tensor, targets: Tensor, w: Tensor) -> Tensor:
        if self.loss == "bce":
            per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        else:
            per = (torch.sigmoid(logits) - targets) ** 2
        return (per * w).sum() / w.sum()

    def state_dict(self) -> dict[str, Any]:
        """A deep copy: later fits do not change a saved state (torch's optimiser state_dict shares tensors)."""
        return copy.deepcopy(
            {
                "config": {"input_dim": self.input_dim, "hidden": self.hidden, "loss": self.loss},
                "net": self.net.state_dict(),
                "opt": self.opt.state_dict(),
                "stats": {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()},
                "gen": self.gen.get_state(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = state["config"]
        if (cfg["input_dim"], cfg["hidden"], cfg["loss"]) != (self.input_dim, self.hidden, self.loss):
            raise ValueError(
                f"the checkpoint's predictor (input_dim {cfg['input_dim']}, predictor.hidden {cfg['hidden']}, "
                f"predictor.loss {cfg['loss']!r}) is not this run's ({self.input_dim}, {self.hidden}, {self.loss!r}): "
                "resume with the settings it was trained with"
            )
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.count = float(state["stats"]["count"])
        self.mean = state["stats"]["mean"].clone().to(torch.float64)
        self.m2 = state["stats"]["m2"].clone().to(torch.float64)
        self.gen.set_state(state["gen"])


# ---- structural features ------------------------------------------------------------------------------------

STRUCTURAL_FEATURES = (
    "depth",  # turns taken so far (the root, i.e. the bare prompt, is 0)
    "searches",  # turns on the path whose action holds a <search> call
    "invalid_actions",  # turns on the path whose action is neither a <search> nor an <answer>
    "distinct_queries",  # distinct search queries on the path (SQuAD-normalised): repeats signal a stuck agent
    "last_obs_passages",  # 1 if this node's own observation returned passages ("Doc i(Title: ...)"), else 0
    "tokens_k",  # history length in tokens / 1000 (prompt + actions + observations)
    "generated_k",  # policy-generated tokens on the path / 1000
    "mean_logprob",  # mean engine logprob of the generated tokens on the path (0 at the root): policy confidence
)
# Every feature is a function of the prefix alone. Not of the gold answers: the trainer learns those only from the
# first answered leaf and caches features, so a gold-dependent feature would differ with when it was computed.
SEARCH_TAG = re.compile(r"<search>", re.IGNORECASE)  # also the tree dumps' action kinds (trainer.dumps)
_QUERY = re.compile(r"<search>(.*?)</search>", re.IGNORECASE | re.DOTALL)
ANSWER_TAG = re.compile(r"<answer>", re.IGNORECASE)
_PASSAGE = re.compile(r"Doc \d+\s*\(Title:")  # env_server.retrieval.format.format_observation


def new_predictor(cfg: PredictorConfig, input_dim: int, seed: int) -> SuccessPredictor:
    """The predictor a run's config describes (its width, rate, loss and step cap), on `input_dim` features."""
    return SuccessPredictor(input_dim, hidden=cfg.hidden, lr=cfg.lr, seed=seed, loss=cfg.loss, max_steps=cfg.max_steps)


def structural_features(node: TurnNode, tree: RolloutTree) -> list[float]:
    """Cheap features of the prefix ending at `node`, in the order of STRUCTURAL_FEATURES."""
    path = [tree.nodes[i] for i in tree.path(node.node_id)]
    turns = path[1:]
    searches = sum(1 for n in turns if SEARCH_TAG.search(n.action_text))
    invalid = sum(1 for n in turns if not SEARCH_TAG.search(n.action_text) and not ANSWER_TAG.search(n.action_text))
    queries = {normalize_answer(q) for n in turns for q in _QUERY.findall(n.action_text)}
    passages = bool(turns) and _PASSAGE.search(node.observation) is not None
    tokens = sum(len(n.token_ids) for n in path)
    gen_lp = [lp for n in turns for lp, m in zip(n.logprobs, n.loss_mask, strict=True) if m]
    return [
        float(node.depth),
        float(searches),
        float(invalid),
        float(len(queries)),
        float(passages),
        tokens / 1000.0,
        len(gen_lp) / 1000.0,
        float(np.mean(gen_lp)) if gen_lp else 0.0,
    ]


# ---- per-prompt prior -----------------------------------------------------------------------------------------


class BetaPrior:
    """Per-prompt Beta(a0 + s, b0 + f) posterior of past outcomes (s, f: summed rewards and 1 - rewards).

    decay in (0, 1] multiplies a prompt's past counts before each update, so that old outcomes (from an older
    policy) fade; 1.0 keeps them all.
    """

    def __init__(self, a0: float = 1.0, b0: float = 1.0, decay: float = 1.0) -> None:
        if not (a0 > 0 and b0 > 0 and 0 < decay <= 1):
            raise ValueError(f"the prior needs a0 > 0, b0 > 0 and prior_decay in (0, 1]; got {a0}, {b0}, {decay}")
        self.a0, self.b0, self.decay = a0, b0, decay
        self.counts: dict[str, tuple[float, float]] = {}

    def update(self, prompt_id: str, rewards: Iterable[float]) -> None:
        rewards = [float(r) for r in rewards]
        assert all(0.0 <= r <= 1.0 for r in rewards), f"prompt {prompt_id!r}: rewards outside [0, 1]: {rewards}"
        s, f = self.counts.get(prompt_id, (0.0, 0.0))
        self.counts[prompt_id] = (self.decay * s + sum(rewards), self.decay * f + sum(1.0 - r for r in rewards))

    def mean(self, prompt_id: str, prior_mean: float | None = None) -> float:
        """Posterior mean; unseen prompts get the prior mean a0 / (a0 + b0), or `prior_mean` (e.g. the
        predictor's V(root)) with the same prior strength a0 + b0 when given."""
        s, f = self.counts.get(prompt_id, (0.0, 0.0))
        strength = self.a0 + self.b0
        p = self.a0 / strength if prior_mean is None else float(prior_mean)
        assert 0.0 <= p <= 1.0, f"prior_mean={prior_mean}"
        return (p * strength + s) / (strength + s + f)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.counts

    def state_dict(self) -> dict[str, Any]:
        return {"a0": self.a0, "b0": self.b0, "decay": self.decay, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a0, self.b0, self.decay = state["a0"], state["b0"], state["decay"]
        self.counts = {k: (float(v[0]), float(v[1])) for k, v in state["counts"].items()}


# ---- calibration and training data ----------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def calibration(pred: Sequence[float], outcomes: Sequence[float]) -> dict[str, float]:
    """Brier score (mean squared error against the outcomes as given, fractional or not) and ROC AUC by rank
    (Mann-Whitney U, ties counted 1/2) with successes = outcome >= SUCCESS_THRESHOLD; auc is nan when only
    one class is present. Also n, mean_pred, mean_outcome."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    assert p.shape == y.shape, f"pred {p.shape} vs outcomes {y.shape}"
    if p.size == 0:
        return {"brier": math.nan, "auc": math.nan, "n": 0, "mean_pred": math.nan, "mean_outcome": math.nan}
    pos = y >= SUCCESS_THRESHOLD
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        auc = math.nan
    else:
        ranks = _average_ranks(p)
        auc = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return {
        "brier": float(np.mean((p - y) ** 2)),
        "auc": float(auc),
        "n": int(p.size),
        "mean_pred": float(p.mean()),
        "mean_outcome": float(y.mean()),
    }


def split_calibration(trees: Iterable[RolloutTree]) -> dict[str, float]:
    """Calibration of the `predicted` values written at allocation time against the outcomes that followed:
    root_* for roots (`root.predicted` against each bare rollout's outcome, i.i.d. samples of the root), anchor_*
    for other nodes (`node.predicted` against O(node), an unbiased sample of that node), each with brier, auc and
    n; the unprefixed keys (brier, auc, n, mean_pred, mean_outcome) pool both sets of pairs."""
    roots: list[tuple[float, float]] = []
    anchors: list[tuple[float, float]] = []
    for tree in trees:
        if tree.root.predicted is not None:
            roots += [(tree.root.predicted, o) for o in tree.root_outcomes()]
        for node in tree.nodes[1:]:
            if node.predicted is not None and (o := tree.own_outcome(node.node_id)) is not None:
                anchors.append((node.predicted, o))
    out: dict[str, float] = dict(calibration([p for p, _ in roots + anchors], [o for _, o in roots + anchors]))
    for name, pairs in (("root", roots), ("anchor", anchors)):
        c = calibration([p for p, _ in pairs], [o for _, o in pairs])
        out.update({f"{name}_brier": c["brier"], f"{name}_auc": c["auc"], f"{name}_n": c["n"]})
    return out


def node_samples(tree: RolloutTree, node: TurnNode) -> list[float]:
    """The outcomes that are unbiased samples of V(node) given its history (module docstring): the root's bare
    rollouts; for another node its own O plus the O of each continuation added at it; a scored leaf's reward."""
    kids = node.children if node.parent is None else node.children[1:]
    out = [] if node.parent is None else [tree.own_outcome(node.node_id)]
    out += [tree.own_outcome(c) for c in kids]
    return [o for o in out if o is not None]


def collect_training_set(trees: Iterable[RolloutTree], *, open_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(features [N, D], targets [N], weights [N]) from every node of the trees that has `features` and at least
    one sample (`node_samples`): target = the samples' mean, weight = their count. Equivalent to one row per
    (node, sample) pair, which is what makes the regression consistent (module docstring); a root with 16 bare
    rollouts counts 16 times a single chain node. open_only: finished nodes (leaves) left out."""
    feats, targets, weights = [], [], []
    for tree in trees:
        for node in tree.nodes:
            if node.features is None or (open_only and node.is_finished):
                continue
            samples = node_samples(tree, node)
            if not samples:
                continue
            assert not feats or len(node.features) == len(feats[0]), (
                f"prompt {tree.prompt_id!r} node {node.node_id}: {len(node.features)} features, "
                f"others have {len(feats[0])}"
            )
            feats.append(node.features)
            targets.append(sum(samples) / len(samples))
            weights.append(float(len(samples)))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0), torch.zeros(0)
    return (
        torch.tensor(feats, dtype=torch.float32),
        torch.tensor(targets, dtype=torch.float32),
        torch.tensor(weights, dtype=torch.float32),
    )


class RowReplay:
    """The predictor's training rows of the last `steps` + 1 steps (`PredictorConfig.replay_steps`): `add` this
    step's rows, get them together with the kept ones."""

    def __init__(self, steps: int) -> None:
        assert steps >= 0, steps
        self.rows: collections.deque[tuple[Tensor, Tensor, Tensor]] = collections.deque(maxlen=steps + 1)

    def add(self, feats: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if len(feats):
            self.rows.append((feats, targets, weights))
        if not self.rows:
            return feats, targets, weights
        return tuple(torch.cat(part) for part in zip(*self.rows, strict=True))  # type: ignore[return-value]
