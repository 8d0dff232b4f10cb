"""`trace-view`'s page in a real browser (the `browser` tier, tools/browser/run-tests; skipped elsewhere): headless
Debian chromium driven by Selenium through chromium-driver, on the dump of a real debug run. The page holds every
node of the step, a click shows the node's text, a `<script>` planted in a turn shows as text and never runs, and a
screenshot is written ($TRACE_VIEW_SCREENSHOT, else the test's folder)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import DEBUG_SMALL

from tools.view import main as view_main
from trainer.config import load_train_config
from trainer.dumps import read_dump, write_dump
from trainer.loop import train

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
PLANT = "<script>window.__pwned = 1</script><b id='bold'>bold</b> & more"
SMALL = [*DEBUG_SMALL, "run.eval_every=0", "run.save_every=0"]


def test_the_page_shows_every_node_and_its_text_as_text(browser, tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    asyncio.run(
        train(load_train_config(REPO / "configs" / "debug.toml", [*SMALL, f'run.output_dir="{out}"', "run.steps=1"]))
    )
    dump = out / "trees" / "step_00000.jsonl.gz"
    header, trees = read_dump(dump)
    turn = next(n for n in trees[0]["nodes"] if n["parent"] is not None)
    turn["observation"] = PLANT  # as if the corpus held it
    write_dump(dump, {k: v for k, v in header.items() if k not in ("schema", "kind")}, trees)
    assert view_main([str(out), "--out", str(tmp_path / "view")]) == 0

    browser.get((tmp_path / "view" / "step_00000.html").as_uri())
    circles = browser.find_elements(By.CSS_SELECTOR, "circle.node")
    assert len(circles) == sum(len(t["nodes"]) for t in trees), "every node of the step is on the page"
    target = browser.find_element(By.CSS_SELECTOR, f'circle[data-tree="0-0"][data-node="{turn["node_id"]}"]')
    target.click()
    assert browser.find_element(By.ID, "node-observation").text == PLANT, "shown as text"
    assert browser.execute_script("return window.__pwned === undefined"), "the planted script never ran"
    assert not browser.find_elements(By.ID, "bold"), "no markup from the dump reached the DOM"
    assert browser.find_element(By.ID, "node-action").text == turn["action"]
    shot = Path(os.environ.get("TRACE_VIEW_SCREENSHOT") or tmp_path / "trace_view.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    browser.get((tmp_path / "view" / "index.html").as_uri())
    assert browser.find_elements(By.CSS_SELECTOR, "#steps a")[0].text == "0"
