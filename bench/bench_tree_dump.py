"""What a step's tree dump costs (`run.save_trees`, `trainer.dumps`; issue 24): bytes on disk and seconds to build
and write it, for trees shaped like the CPU demo's step and like `configs/qwen3-8b-hotpotqa.toml`'s, measured on
their own (a fraction of a step's time is below these machines' noise).

    python bench/bench_tree_dump.py --out runs/bench_tree_dump.json [--repeats 3]

Shapes (synthetic trees with the step's prompts, leaves, turns and text lengths; random text, which gzip compresses
less than language, so the sizes err high): `demo`: 64 leaves over 32 prompts (32 bare + 32 continuations), up to
4 turns, an action of ~40 characters and an observation of one passage (~400 characters, env.topk 1); `qwen3-8b`:
1,536 leaves over 128 prompts (512 bare + 1,024 continuations), up to 4 turns, actions of ~1,500 characters (a
500-token turn with thinking), observations of 3 passages (~2,000 characters). Features are left out, as by default;
`--features N` adds N floats a node (4,096 + 8 at 8B) to show what `run.save_tree_features` costs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.algo.advantages import AdvantageConfig  # noqa: E402
from trainer.algo.tree import RolloutTree  # noqa: E402
from trainer.dumps import tree_record, write_dump  # noqa: E402

SHAPES = {
    "demo": dict(prompts=32, bare=32, cont=32, action=40, obs=400),
    "qwen3-8b": dict(prompts=128, bare=512, cont=1024, action=1500, obs=2000),
}


def _text(rng: random.Random, n: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(n // 6 + 1)]
    return " ".join(words)[:n]


def make_trees(shape: dict, seed: int, features: int) -> list[RolloutTree]:
    rng = random.Random(seed)
    trees = []
    per = shape["bare"] // shape["prompts"]
    extra = shape["cont"] // shape["prompts"]
    for p in range(shape["prompts"]):
        t = RolloutTree.new(f"train-{p:06d}", _text(rng, 120), ["x"], [1] * 60, "s")

        def chain(start: int, rnd: int, t: RolloutTree = t) -> None:
            cur = start
            while True:
                depth = t.nodes[cur].depth + 1
                last = depth >= 4 or rng.random() < 0.35
                kind = "<answer>a</answer>" if last else "<search>q</search>"
                n = t.add_child(cur, [5] * 50, [1] * 50, [-1.0] * 50, snapshot_id=None if last else "s",
                                action_text=_text(rng, shape["action"]) + kind,
                                observation="" if last else _text(rng, shape["obs"]),
                                status="answered" if last else "open")  # fmt: skip
                n.info["round"] = rnd
                if features:
                    n.features = [rng.random() for _ in range(features)]
                if last:
                    n.reward = float(rng.random() < 0.4)
                    return
                cur = n.node_id

        for _ in range(per):
            chain(0, 0)
        for _ in range(extra):
            inner = [n.node_id for n in t.nodes[1:] if not n.is_finished]
            chain(rng.choice(inner) if inner else 0, 1)
        t.backup()
        trees.append(t)
    return trees


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_tree_dump.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", type=int, default=0)
    args = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            trees = make_trees(shape, 0, args.features)
            leaves = sum(t.ledger.leaves or len(t.scored_leaves()) for t in trees)
            secs, size = [], 0
            for r in range(args.repeats):
                t0 = time.perf_counter()
                records = [tree_record(t, AdvantageConfig(), True, set(), args.features > 0) for t in trees]
                size = write_dump(Path(tmp) / f"{name}-{r}.jsonl.gz", {"step": 0, "trees": len(records)}, records)
                secs.append(time.perf_counter() - t0)
            res[name] = {"leaves": leaves, "nodes": sum(len(t.nodes) for t in trees), "bytes": size,
                         "seconds": statistics.median(secs), "features": args.features}  # fmt: skip
            print(f"{name}: {leaves} leaves, {res[name]['nodes']} nodes: {size / 1e6:.2f} MB a step, "
                  f"{res[name]['seconds']:.3f} s to build and write (median of {args.repeats})")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
