"""`trace-view` (tools/view.py, issue 24) without a browser: the pages it writes from dumps, the escaping of every
text the model or the corpus wrote, two runs side by side, and a clear error for a run without dumps. The page in
a real browser: tests/test_view_browser.py (the `browser` tier)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tools.view import main as view_main
from trainer.algo.advantages import AdvantageConfig
from trainer.algo.tree import RolloutTree
from trainer.dumps import tree_record, write_dump

PLANT = "<script>window.__pwned = 1</script><b>bold</b> & more"


def _dump(run: Path, step: int, observation: str = "Doc 1") -> dict:
    t = RolloutTree.new(f"p{step}", "Who <i>is</i> it?", ["Ada"], [1, 2], "s0")
    a = t.add_child(0, [3, 4], [1, 0], [-0.1, 0.0], snapshot_id="s1", action_text="<search>x</search>",
                    observation=observation)  # fmt: skip
    t.add_child(a.node_id, [5], [1], [-0.2], action_text="<answer>Ada</answer>", status="answered").reward = 1.0
    t.add_child(0, [6], [1], [-0.2], action_text="<answer>Bo</answer>", status="answered").reward = 0.0
    for n in t.nodes[1:]:
        n.info["round"] = 0  # stage 1's bare rollouts (trainer.algo.plan.mark_round)
    t.backup()
    rec = tree_record(t, AdvantageConfig(), True, {1, 2})
    write_dump(run / "trees" / f"step_{step:05d}.jsonl.gz", {"step": step, "trees": 1}, [rec])
    return rec


def _data(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.S)
    assert m, "the page carries its data"
    return json.loads(m.group(1))


def test_pages_escape_every_text_and_show_two_runs_side_by_side(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "trace-run", tmp_path / "grpo-run"
    _dump(a, 0, PLANT)
    _dump(a, 1)
    _dump(b, 1)
    assert view_main([str(a), str(b), "--out", str(tmp_path / "view")]) == 0
    assert "2 steps" in capsys.readouterr().out
    page = (tmp_path / "view" / "step_00000.html").read_text()
    assert "<script>window.__pwned" not in page and "<b>bold" not in page, "no text from the dump as markup"
    assert page.count("<script") == 2, "the data block and the page's own script, nothing else"
    data = _data(tmp_path / "view" / "step_00000.html")
    assert data["panels"][0]["trees"][0]["nodes"][1]["observation"] == PLANT, "the text itself survives, as text"
    assert data["panels"][1]["missing"] and data["steps"] == [0, 1]
    both = _data(tmp_path / "view" / "step_00001.html")["panels"]
    assert [p["run"] for p in both] == ["trace-run", "grpo-run"] and all(p["summary"]["leaves"] == 2 for p in both)
    assert both[0]["summary"]["mixed"] == 1 and both[0]["summary"]["bare"] == 2
    # each tree carries the counts its heading shows (tree_counts), the same the step's summary adds up
    counts = both[0]["trees"][0]["counts"]
    assert counts == {"leaves": 2, "wins": 1, "mixed": True, "bare": 2, "continuations": 0}, counts
    index = _data(tmp_path / "view" / "index.html")
    assert [r["step"] for r in index["rows"]] == [0, 1] and index["runs"] == ["trace-run", "grpo-run"]
    assert "innerHTML" not in page and "textContent" in page


def test_a_run_without_dumps_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    assert view_main([str(tmp_path / "run")]) == 2
    assert "no tree dumps; run trace-train with run.save_trees = true" in capsys.readouterr().err


def test_non_finite_numbers_and_older_dumps(tmp_path: Path, capsys) -> None:
    """A NaN in a dump (a predictor's value, say) must not blank the page: it becomes null; a run holding only
    older, uncompressed dumps gets read_dump's reason, not "no dumps"."""
    rec = _dump(tmp_path / "run", 0)
    rec["nodes"][1]["predicted"] = float("nan")
    write_dump(tmp_path / "run" / "trees" / "step_00000.jsonl.gz", {"step": 0, "trees": 1}, [rec])
    assert view_main([str(tmp_path / "run"), "--out", str(tmp_path / "view")]) == 0
    assert _data(tmp_path / "view" / "step_00000.html")["panels"][0]["trees"][0]["nodes"][1]["predicted"] is None
    old = tmp_path / "old" / "trees"
    old.mkdir(parents=True)
    (old / "step_00000.jsonl").write_text("{}\n")
    assert view_main([str(tmp_path / "old")]) == 2
    assert "an older, uncompressed dump" in capsys.readouterr().err


def test_an_unreadable_step_is_shown_as_one_and_the_others_still_render(tmp_path: Path, capsys) -> None:
    """From a user-side audit: one truncated dump (a run killed mid-write) made the whole run unviewable, a tree
    line without `nodes` was a KeyError, a renamed dump (step_final.jsonl.gz) a ValueError, a second run without
    dumps showed every step as missing; --out a file and a bad --port were tracebacks."""
    run = tmp_path / "run"
    _dump(run, 0)
    _dump(run, 1)
    _dump(run, 2)
    cut = run / "trees" / "step_00001.jsonl.gz"
    cut.write_bytes(cut.read_bytes()[:40])
    write_dump(run / "trees" / "step_00002.jsonl.gz", {"step": 2, "trees": 1}, [{"prompt_id": "p"}])
    (run / "trees" / "step_final.jsonl.gz").write_bytes((run / "trees" / "step_00000.jsonl.gz").read_bytes())
    assert view_main([str(run), "--out", str(tmp_path / "view")]) == 0
    err = capsys.readouterr().err
    assert err.count("trace-view: skipped") == 2 and "step_00001" in err and "step_00002" in err, err
    assert _data(tmp_path / "view" / "step_00000.html")["panels"][0]["summary"]["leaves"] == 2
    for step in (1, 2):
        panel = _data(tmp_path / "view" / f"step_{step:05d}.html")["panels"][0]
        assert panel["missing"] and panel["error"], panel
    assert [r["step"] for r in _data(tmp_path / "view" / "index.html")["rows"]] == [0, 1, 2], "step_final is no step"
    _dump(run, 100_000)  # step_{step:05d} has six digits from here
    assert view_main([str(run), "--out", str(tmp_path / "view")]) == 0
    assert _data(tmp_path / "view" / "index.html")["rows"][-1]["step"] == 100_000
    capsys.readouterr()
    (tmp_path / "empty" / "trees").mkdir(parents=True)
    assert view_main([str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "v2")]) == 2
    assert "no tree dumps" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    for argv in (["--out", str(tmp_path / "a-file")], ["--port", "99999"]):
        try:
            rc = view_main([str(run), *argv])
        except SystemExit as e:
            rc = e.code
        assert rc == 2, argv
