"""Rollout-tree dumps (`trainer.dumps`, issue 24): what a node's record carries, and a clear error, naming the file
and what to do, for a dump that is missing, truncated, uncompressed (older) or of another schema."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from trainer.algo.advantages import AdvantageConfig
from trainer.algo.tree import RolloutTree
from trainer.dumps import SCHEMA, DumpError, config_hash, read_dump, sample_rows, tree_record, write_dump


def _tree() -> RolloutTree:
    """A root with two bare rollouts (one fails after a search, one answers right) and a continuation at the
    search turn (it answers right): mixed, with an expanded anchor."""
    t = RolloutTree.new("p1", "Who <b>wrote</b> it?", ["Ada"], [1, 2, 3], "s0")
    a = t.add_child(0, [10, 11, 12], [1, 1, 0], [-0.1, -0.2, 0.0], snapshot_id="s1", action_text="<search>x</search>",
                    observation="<script>alert(1)</script> Doc 1")  # fmt: skip
    a.info["round"] = 0
    a.entropy = 0.75  # the entropy allocator's signal, when the engine was asked for top logprobs
    bad = t.add_child(a.node_id, [13], [1], [-0.3], action_text="<answer>Bo</answer>", status="answered")
    bad.reward, bad.info["round"] = 0.0, 0
    good = t.add_child(0, [14], [1], [-0.3], action_text="<answer>Ada</answer>", status="answered")
    good.reward, good.info["round"] = 1.0, 0
    cont = t.add_child(a.node_id, [15], [1], [-0.3], action_text="<answer>Ada</answer>", status="answered")
    cont.reward, cont.info["round"] = 1.0, 1
    t.add_child(0, [16], [1], [-0.3], action_text="hmm", status="truncated").reward = 0.0
    t.backup()
    return t


def test_a_node_record_says_what_the_update_saw(tmp_path: Path) -> None:
    t = _tree()
    rec = tree_record(t, AdvantageConfig(), process=True, trained={1, 2, 3, 4})
    by = {n["node_id"]: n for n in rec["nodes"]}
    assert [by[i]["action_kind"] for i in range(6)] == ["prompt", "search", "answer", "answer", "answer", "invalid"]
    assert by[1]["expanded"] and not by[0]["expanded"] and by[4]["info"]["round"] == 1
    assert by[1]["trained"] and not by[5]["trained"] and by[1]["generated"] == 2 and by[1]["tokens"] == 3
    assert by[3]["adv_outcome"] > 0 > by[2]["adv_outcome"], "the right answer above the tree's mean, the wrong below"
    assert by[4]["adv_process"] == pytest.approx(by[4]["value"] - by[1]["value"]), "V(node) - V(parent), fresh parent"
    assert by[1]["entropy"] == 0.75 and by[2]["entropy"] is None
    assert by[0]["adv_outcome"] is None and "features" not in by[1] and "token_ids" not in by[1]
    grpo = tree_record(t, AdvantageConfig(), process=False, trained=set())
    assert {n["adv_process"] for n in grpo["nodes"][1:]} == {0.0}, "no process term for allocators that do not expand"
    path = tmp_path / "trees" / "step_00003.jsonl.gz"
    n = write_dump(path, {"step": 3, "config_hash": config_hash({"a": 1}), "trees": 1}, [rec])
    assert n == path.stat().st_size > 0 and not path.with_name(path.name + ".tmp").exists()
    header, trees = read_dump(path)
    assert header["schema"] == SCHEMA and header["step"] == 3 and trees == [json.loads(json.dumps(rec))]
    assert trees[0]["nodes"][1]["observation"].startswith("<script>"), "text is kept as written: the viewer escapes"


def test_bad_dumps_are_clear_errors(tmp_path: Path) -> None:
    rec = tree_record(_tree(), AdvantageConfig(), process=True, trained=set())
    good = tmp_path / "trees" / "step_00000.jsonl.gz"
    write_dump(good, {"step": 0, "trees": 1}, [rec])
    with pytest.raises(DumpError, match=r"step_00001.jsonl.gz: no such tree dump \(the folder has step_00000"):
        read_dump(tmp_path / "trees" / "step_00001.jsonl.gz")
    cut = tmp_path / "trees" / "step_00002.jsonl.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DumpError, match=r"step_00002\.jsonl\.gz: truncated or not a gzip file"):
        read_dump(cut)
    old = tmp_path / "trees" / "step_00004.jsonl"
    old.write_text(json.dumps({"prompt_id": "p"}) + "\n")
    with pytest.raises(DumpError, match="an older, uncompressed dump"):
        read_dump(old)
    other = tmp_path / "trees" / "step_00005.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"schema": SCHEMA + 1, "kind": "trace-trees", "trees": 0}) + "\n")
    with pytest.raises(DumpError, match=f"schema {SCHEMA + 1}, this trace-train reads schema {SCHEMA}"):
        read_dump(other)
    short = tmp_path / "trees" / "step_00006.jsonl.gz"
    write_dump(short, {"step": 6, "trees": 2}, [rec])
    with pytest.raises(DumpError, match="1 trees where its header says 2: truncated"):
        read_dump(short)


def test_tracker_samples_are_each_leaf_s_trajectory_as_text() -> None:
    rec = tree_record(_tree(), AdvantageConfig(), process=True, trained={1, 2})
    rows = sample_rows([rec, rec], trees=1, chars=20)
    assert [r["leaf"] for r in rows] == [2, 3, 4, 5] and [r["round"] for r in rows] == [0, 0, 1, None]
    assert rows[0]["trajectory"] == "<search>x</search> -> <script>alert(1)</sc || <answer>Bo</answer>"
    assert rows[0]["reward"] == 0.0 and rows[0]["trained"] and not rows[3]["trained"]
