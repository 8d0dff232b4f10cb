"""Training samples with real rollout trees' shapes, for benches and checks that time an update (no model, no engine).

A tree dump (`trainer.dumps`, `run.save_trees`) keeps each node's token count and how many of them the policy
generated, not the token ids. `samples_from_dump` rebuilds one `TrainSample` per trained leaf: the leaf's path from
the root, each node's tokens drawn at random (one draw a node, so leaves below a node share its tokens as the real
samples shared them; siblings draw independently, so two may begin with the same token, ~1 in 2,000, and share
one token more than the real ones did), each node's generated tokens trained, a random advantage a leaf. The shipped dumps
(bench/data/trees/) are one step of each allocator's tuning run in the epochs comparison.
"""

from __future__ import annotations

import random
from pathlib import Path

from trainer.dumps import read_dump
from trainer.learner.samples import TrainSample

TREES = Path(__file__).resolve().parents[1] / "bench/data/trees"


def samples_from_dump(path: Path, seed: int = 0, vocab: tuple[int, int] = (11, 2000)) -> list[TrainSample]:
    """One TrainSample per trained leaf of the dump's trees, with the trees' shapes and random token ids drawn from
    range(*vocab) (the default avoids the tiny tokenizer's 11 special and tag ids)."""
    rng = random.Random(seed)
    _, records = read_dump(path)
    out = []
    for t, rec in enumerate(records):
        nodes = {n["node_id"]: n for n in rec["nodes"]}
        toks = {i: [rng.randrange(*vocab) for _ in range(n["tokens"])] for i, n in nodes.items()}
        for leaf in (n for n in nodes.values() if not n["children"] and n["trained"]):
            path_ids, i = [], leaf["node_id"]
            while i is not None:
                path_ids.append(i)
                i = nodes[i]["parent"]
            ids: list[int] = []
            mask: list[int] = []
            for i in reversed(path_ids):
                ids += toks[i]
                gen = nodes[i]["generated"] if nodes[i]["parent"] is not None else 0
                mask += [1] * gen + [0] * (nodes[i]["tokens"] - gen)
            adv = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 1.0)
            out.append(
                TrainSample(
                    ids, mask, [adv * m for m in mask], [float(m) for m in mask], [-2.0 * m for m in mask],
                    prompt_id=rec["prompt_id"], tree_index=t, leaf_id=leaf["node_id"],
                )
            )  # fmt: skip
    return out
