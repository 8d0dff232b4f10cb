"""What the learner trains on: `TrainSample`, one root-to-leaf history laid out for a forward pass.

The algorithm (`trainer.algo.advantages.build_training_samples`) builds them from finished trees; the learner
(`trainer.learner.policy`, `trainer.learner.loss`) consumes them. The type lives here, below both, so the learner
never imports the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
