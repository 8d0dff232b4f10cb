"""Rollout-tree dumps (`run.save_trees`): every step's trees as `<output_dir>/trees/step_XXXXX.jsonl.gz`, what a
person (and `trace-view`) reads to see where a step's budget went and what each node taught the policy.

One gzipped JSON Lines file a step. Its first line is the header: `{"schema": SCHEMA, "kind": "trace-trees",
"step", "config_hash", "allocator", "trees": n, "features": bool}`; then one line a tree: `{"prompt_id", "question",
"golden_answers", "ledger", "meta", "nodes": [...]}`. A node: `node_id`, `parent`, `children`, `depth`,
`status`, `reward` (leaves), `info` (the judge's, and `round`: the allocation phase that made it, 0 = stage 1's
bare rollouts, r = stage 2's round r, `trainer.algo.plan.mark_round`), `action` (the decoded action),
`action_kind` ("search" | "answer" | "invalid"; the root: "prompt"), `observation`, `tokens` (this node's token
count), `generated` (of them, the policy's), `weight_version`, `value` / `outcome` / `n_fresh` / `n_leaves`
(`trainer.algo.tree`'s backup), `predicted` (the predictor's V(H) at allocation time), `entropy` (the policy's
entropy over this turn's first tokens, set when the "entropy" allocator asked the engine for it, else null), `expanded` (continuations
were placed at it: more than one child, below the root), `adv_outcome` / `adv_process` (the node's advantage terms,
`trainer.algo.advantages.node_terms`, weighted as the update weighs them: the process term 0 for allocators that do
not expand), `trained` (a sample the update used passed through it). Token ids, logprobs and the predictor's raw
input (`features`: ~4k floats a node at 8B) are left out unless `run.save_tree_features` asks for the features.

Written off the event loop, to a `.tmp` file renamed into place, so a file without `.tmp` is whole; `read_dump`
names the file and what to do when one is missing, truncated or of another schema.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.algo.advantages import AdvantageConfig, node_terms
from trainer.algo.predictor import ANSWER_TAG, SEARCH_TAG
from trainer.algo.tree import RolloutTree, TurnNode

SCHEMA = 1
KIND = "trace-trees"


class DumpError(ValueError):
    """A tree dump that cannot be read: the message names the file and what to do."""


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of the run's config (its dict as `trainer.config.config_to_dict` gives it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def action_kind(node: TurnNode) -> str:
    if node.parent is None:
        return "prompt"
    if ANSWER_TAG.search(node.action_text):
        return "answer"
    return "search" if SEARCH_TAG.search(node.action_text) else "invalid"


def tree_record(
    tree: RolloutTree, adv: AdvantageConfig, process: bool, trained: set[int], features: bool = False
) -> dict[str, Any]:
    """One tree's line (module docstring). trained: the ids of its nodes a training sample passed through."""
    terms = node_terms(tree, adv) if tree.root.n_leaves else {}
    nodes = []
    for n in tree.nodes:
        o, p = terms.get(n.node_id, (None, None))
        rec = {
            "node_id": n.node_id,
            "parent": n.parent,
            "children": list(n.children),
            "depth": n.depth,
            "status": n.status.value,
            "reward": n.reward,
            "info": n.info,
            "action": n.action_text,
            "action_kind": action_kind(n),
            "observation": n.observation,
            "tokens": len(n.token_ids),
            "generated": sum(n.loss_mask),
            "weight_version": n.weight_version,
            "value": n.value,
            "outcome": n.outcome,
            "n_fresh": n.n_fresh,
            "n_leaves": n.n_leaves,
            "predicted": n.predicted,
            "entropy": n.entropy,
            "expanded": n.parent is not None and len(n.children) > 1,
            "adv_outcome": None if o is None else adv.w_outcome * o,
            "adv_process": None if p is None else (adv.w_process * p if process else 0.0),
            "trained": n.node_id in trained,
        }
        if features:
            rec["features"] = n.features
        nodes.append(rec)
    return {
        "prompt_id": tree.prompt_id,
        "question": tree.question,
        "golden_answers": list(tree.golden_answers),
        "ledger": tree.ledger.to_dict(),
        "meta": tree.meta,
        "nodes": nodes,
    }


def write_dump(path: Path, header: dict[str, Any], records: Iterable[dict[str, Any]]) -> int:
    """Write a step's dump (header first) gzipped to `path` through `path.tmp`; returns the bytes written."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
        f.write(json.dumps({"schema": SCHEMA, "kind": KIND, **header}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path.stat().st_size


def read_dump(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, trees) of a step's dump; a `DumpError` naming the file and what to do otherwise."""
    path = Path(path)
    if not path.exists():
        near = sorted(p.name for p in path.parent.glob("step_*")) if path.parent.exists() else []
        raise DumpError(
            f"{path}: no such tree dump"
            + (f" (the folder has {', '.join(near[:5])}{', ...' if len(near) > 5 else ''})" if near else "")
            + "; run trace-train with run.save_trees = true to write them"
        )
    if path.suffix != ".gz":
        raise DumpError(
            f"{path}: an older, uncompressed dump (before schema {SCHEMA}); it lacks what the viewer shows "
            "(advantages, rounds, trained nodes): run the step again with this trace-train to dump it anew"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DumpError(
            f"{path}: truncated or not a gzip file ({e}); it was cut off while written: dump it again"
        ) from e
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError as e:
        raise DumpError(f"{path}: its first line is not JSON ({e}): not a trace-train tree dump") from e
    if not isinstance(header, dict) or header.get("kind") != KIND:
        raise DumpError(f"{path}: no trace-trees header on its first line: not a trace-train tree dump")
    if header.get("schema") != SCHEMA:
        raise DumpError(
            f"{path}: tree dump schema {header.get('schema')}, this trace-train reads schema {SCHEMA}: "
            "open it with the trace-train that wrote it, or dump the step again"
        )
    trees = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            trees.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DumpError(f"{path}: line {i} is not JSON ({e}): the dump is damaged; dump the step again") from e
    if len(trees) != header.get("trees"):
        raise DumpError(f"{path}: {len(trees)} trees where its header says {header.get('trees')}: truncated")
    return header, trees


def sample_rows(records: list[dict[str, Any]], trees: int, chars: int = 300) -> list[dict[str, Any]]:
    """The trackers' samples (`run.tracker_samples`): for the first `trees` tree records, one row per leaf with its
    trajectory as text (each turn's action, then a cut of its observation, `chars` characters at most each)."""
    rows = []
    for rec in records[:trees]:
        nodes = {n["node_id"]: n for n in rec["nodes"]}
        for leaf in (n for n in rec["nodes"] if not n["children"] and n["parent"] is not None):
            path, cur = [], leaf
            while cur["parent"] is not None:
                path.append(cur)
                cur = nodes[cur["parent"]]
            turns = [
                n["action"][:chars] + (" -> " + n["observation"][:chars] if n["observation"] else "")
                for n in path[::-1]
            ]
            rows.append(
                {
                    "prompt_id": rec["prompt_id"],
                    "question": rec["question"][:chars],
                    "leaf": leaf["node_id"],
                    "round": leaf["info"].get("round"),
                    "trajectory": " || ".join(turns),
                    "reward": leaf["reward"],
                    "adv_outcome": leaf["adv_outcome"],
                    "trained": leaf["trained"],
                }
            )
    return rows
