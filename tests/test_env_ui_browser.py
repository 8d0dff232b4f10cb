"""The env server's page (`GET /`, issue 26) in a real browser (the `browser` tier, tools/browser/run-tests; skipped
elsewhere): headless Debian chromium driven by Selenium, against `trace-env serve` started as a process on loopback
with a bearer token, the built-in world's corpus plus a planted passage, and a planted question.

Checked: the page asks for the token and keeps it in memory only (no storage, no cookie; a reload asks again); it
lists the datasets and tools; a question and a passage carrying `<script>` and markup show as text and nothing of
them runs or reaches the DOM; an episode is played to its answer (the oracle's reward 1); a fork after turn 1
continues on both branches independently (the fork's wrong answer 0, the original's right one 1); starting a new
question deletes the previous tree's episodes; an exported snapshot is the server's blob, and the page continues
it (a garbage file refused, the tree kept). A screenshot is written ($TRACE_ENV_UI_SCREENSHOT, else the test's folder)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import start_server_process, stop_process

from env_server.config import BUILTIN_WORLD

pytestmark = pytest.mark.browser
TOKEN = "t0ken-for-the-page"
PLANT = "<script>window.__pwned = 1</script><img id='evil' src=x onerror='window.__pwned = 2'> & <b id='bold'>b</b>"
QUESTION = "Who keeps the <b id='qbold'>Zorvik</b> Lantern? <script>window.__pwned = 3</script>"


def _world(tmp: Path) -> list[str]:
    corpus = tmp / "corpus.jsonl"
    lines = (BUILTIN_WORLD / "corpus.jsonl").read_text().splitlines()
    lines.append(
        json.dumps({"id": "planted", "contents": f'"Zorvik Lantern"\nThe Zorvik Lantern is kept by Ada. {PLANT}'})
    )
    corpus.write_text("\n".join(lines) + "\n")
    planted = tmp / "planted.jsonl"
    planted.write_text(json.dumps({"id": "q0", "question": QUESTION, "golden_answers": ["Ada"]}) + "\n")
    data = ["--data", "synthetic:dev", str(BUILTIN_WORLD / "dev.jsonl"), "--data", "planted:test", str(planted)]
    return [*data, "--corpus", str(corpus), "--index-dir", str(tmp / "index"), "--auth-token", TOKEN]


def _status(url: str, method: str, path: str) -> int:
    req = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait(browser: Any, css: str, count: int = 1, timeout_s: float = 15.0) -> list[Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout_s).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, css)) >= count)
    return browser.find_elements(By.CSS_SELECTOR, css)


def _step(browser: Any, branch: int, action: str) -> Any:
    """Type `action` into branch `branch`'s box, step it, and return the branch's last turn once it shows."""
    card = _wait(browser, f'.branch[data-branch="{branch}"]')[0]
    turns = len(card.find_elements("css selector", ".turn"))
    box = card.find_element("css selector", "textarea.action-input")
    box.clear()
    box.send_keys(action)
    card.find_element("css selector", "button.step").click()
    _wait(browser, f'.branch[data-branch="{branch}"] .turn', turns + 1)
    return browser.find_elements("css selector", f'.branch[data-branch="{branch}"] .turn')[-1]


def test_a_person_plays_forks_and_exports_an_episode(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    proc, url = start_server_process([*_world(tmp_path), "--log-level", "warning"], timeout_s=60)
    try:
        browser.get(url + "/")
        token_box = _wait(browser, "#auth:not([hidden]) #token")[0]  # /v1/info answered 401: the page asks
        token_box.send_keys(TOKEN)
        browser.find_element(By.ID, "token-go").click()
        _wait(browser, "#datasets tbody tr", 2)
        assert "planted" in browser.find_element(By.ID, "datasets").text
        assert {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#tools code")} == {"search", "answer"}
        held = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        assert held == [0, 0, ""], "the token is kept in the page's memory only"

        # A planted question and passage show as text; nothing of them runs or reaches the DOM.
        Select(browser.find_element(By.ID, "dataset")).select_by_value("planted")
        browser.find_element(By.ID, "create").click()
        prompt = _wait(browser, "#episode:not([hidden]) #prompt")[0]
        assert QUESTION in prompt.text
        turn = _step(browser, 1, "<search> Zorvik Lantern </search>")
        assert PLANT in turn.find_element(By.CSS_SELECTOR, "pre.observation").text
        assert browser.execute_script("return window.__pwned === undefined"), "a planted script ran"
        assert not browser.find_elements(By.CSS_SELECTOR, "#bold, #qbold, #evil"), (
            "markup from the data reached the DOM"
        )

        planted_episode = browser.find_element(By.CSS_SELECTOR, '.branch[data-branch="1"] .episode-id').text

        # The built-in world's 3-hop dev question 1, played by its oracle; forked after turn 1, the fork answers wrong.
        oracle = json.loads((BUILTIN_WORLD / "dev.jsonl").read_text().splitlines()[1])["metadata"]["oracle"]
        Select(browser.find_element(By.ID, "dataset")).select_by_value("synthetic")
        Select(browser.find_element(By.ID, "split")).select_by_value("dev")
        index = browser.find_element(By.ID, "index")
        index.clear()
        index.send_keys("1")
        browser.find_element(By.ID, "create").click()
        _wait(browser, '.branch[data-branch="1"] .turn', 1)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".branch")) == 1, "a new episode starts a new tree"
        gone = f"/v1/episodes/{planted_episode}/snapshot"  # 404 once the page has deleted the old tree's episode
        deadline = time.monotonic() + 10
        while _status(url, "POST", gone) != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(url, "POST", gone) == 404, "the old tree's episode was released"
        first = _step(browser, 1, f"<search> {oracle[0]['text']} </search>")
        first.find_element(By.CSS_SELECTOR, "button.fork").click()
        fork = _wait(browser, '.branch[data-branch="2"]')[0]
        assert "forked from branch 1 after turn 1" in fork.text
        assert len(fork.find_elements(By.CSS_SELECTOR, ".turn.inherited")) == 1
        wrong = _step(browser, 2, "<answer> Nobody Knows </answer>")
        assert "reward 0" in wrong.text and "gold:" in wrong.text
        for st in oracle[1:]:
            tag = "search" if st["kind"] == "search" else "answer"
            last = _step(browser, 1, f"<{tag}> {st['text']} </{tag}>")
        assert "reward 1" in last.text, last.text
        for b in (1, 2):  # both branches played to their ends
            assert _wait(browser, f'.branch[data-branch="{b}"] .done')

        # Export the state after turn 1: the link holds the server's blob for that snapshot.
        first = browser.find_elements(By.CSS_SELECTOR, '.branch[data-branch="1"] .turn')[1]
        first.find_element(By.CSS_SELECTOR, "button.export").click()
        link = _wait(browser, '.branch[data-branch="1"] a.download')[0]
        sid = link.get_attribute("data-snapshot")
        req = urllib.request.Request(f"{url}/v1/snapshots/{sid}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            blob = r.read()
        assert int(link.get_attribute("data-bytes")) == len(blob) > 0

        browser.execute_script("window.scrollTo(0, 0)")
        shot = Path(os.environ.get("TRACE_ENV_UI_SCREENSHOT") or tmp_path / "env_server_ui.png")
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # Continue that exported state on the page: a garbage file is refused with the server's error and the tree
        # stays; the blob becomes a new tree whose turn 1 is the export's, played on to the oracle's answer, with a
        # fork at its start (the page imported each prefix of the state).
        bad = tmp_path / "garbage.msgpack"
        bad.write_bytes(b"\xc1 not a snapshot")
        before = len(browser.find_elements(By.CSS_SELECTOR, ".branch"))
        browser.find_element(By.ID, "import-file").send_keys(str(bad))
        WebDriverWait(browser, 15).until(lambda b: "422" in b.find_element(By.ID, "error").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".branch")) == before
        exported = tmp_path / f"snapshot-{sid}.msgpack"
        exported.write_bytes(blob)
        browser.find_element(By.ID, "import-file").send_keys(str(exported))
        WebDriverWait(browser, 15).until(lambda b: "continued from" in b.find_element(By.ID, "branches").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".branch")) == 1, "an imported state starts a new tree"
        assert browser.find_element(By.ID, "error").text == ""
        card = browser.find_element(By.CSS_SELECTOR, '.branch[data-branch="1"]')
        assert f"continued from snapshot-{sid}.msgpack" in card.text
        turns = card.find_elements(By.CSS_SELECTOR, ".turn")
        assert [t.get_attribute("data-turn") for t in turns] == ["0", "1"]
        assert oracle[0]["text"] in turns[1].find_element(By.CSS_SELECTOR, "pre.action").text
        question = json.loads((BUILTIN_WORLD / "dev.jsonl").read_text().splitlines()[1])["question"]
        assert browser.find_element(By.ID, "prompt").text == question.strip()
        turns[0].find_element(By.CSS_SELECTOR, "button.export").click()  # the start: a state the page imported
        start_sid = _wait(browser, '.branch[data-branch="1"] .turn[data-turn="0"] a.download')[0].get_attribute(
            "data-snapshot"
        )
        assert start_sid != sid and _status(url, "GET", f"/v1/snapshots/{start_sid}") == 200
        turns[0].find_element(By.CSS_SELECTOR, "button.fork").click()
        assert "forked from branch 1 after turn 0" in _wait(browser, '.branch[data-branch="2"]')[0].text
        for st in oracle[1:]:
            tag = "search" if st["kind"] == "search" else "answer"
            last = _step(browser, 1, f"<{tag}> {st['text']} </{tag}>")
        assert "reward 1" in last.text, last.text
        browser.find_element(By.ID, "create").click()  # a new tree releases the snapshots the import made
        deadline = time.monotonic() + 10
        while _status(url, "GET", f"/v1/snapshots/{start_sid}") != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(url, "GET", f"/v1/snapshots/{start_sid}") == 404, "the import's snapshots were released"

        browser.refresh()
        _wait(browser, "#auth:not([hidden]) #token")  # a reload forgets the token
    finally:
        _, err = stop_process(proc)
    assert "Traceback" not in err, err[-3000:]
