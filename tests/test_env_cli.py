"""`trace-env` as a process: serve with a TOML config and real data files, index then serve the index, bad flags,
and graceful shutdown on SIGTERM with a request in flight.

Servers here are real subprocesses (`python -m env_server serve --port 0`); they read the session's synthetic
world from `TRACE_CACHE_DIR` so none of them rebuilds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, RawHTTP, SlowRetriever, start_server_process, stop_process

from env_server.cli import main
from shared.client import EnvClient

pytestmark = pytest.mark.timeout(60)

CORPUS = [
    {"id": "d1", "contents": '"Varo Tessin"\nVaro Tessin was a painter born in Kelmar in 1861.'},
    {"id": "d2", "contents": '"Kelmar"\nKelmar is a city in Norvia, founded in 1204.'},
    {"id": "d3", "contents": '"Kelmar Press"\nKelmar Press is a publishing house founded in 1901 by Varo Tessin.'},
    {"id": "d4", "contents": '"Orlan"\nOrlan is a city in Vulkes, founded in 1350.'},
    {"id": "d5", "contents": '"Norvia"\nNorvia is a country. Its capital is Kelmar.'},
]
QUESTIONS = [
    {"id": "q0", "question": "Who founded Kelmar Press?", "golden_answers": ["Varo Tessin"]},
    {"id": "q1", "question": "When was Orlan founded?", "golden_answers": ["1350"]},
    {"id": "q2", "question": "What is the capital of Norvia?", "golden_answers": "Kelmar"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "corpus.jsonl", CORPUS), write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


async def test_serve_with_toml_config_data_and_corpus(tmp_path: Path, tiny_data: tuple[Path, Path]) -> None:
    corpus, questions = tiny_data
    toml = tmp_path / "server.toml"
    toml.write_text(
        '[server]\nmax_turns = 3\ntopk = 2\nreward_metric = "f1"\nmax_episodes = 5\nlog_level = "warning"\n'
    )
    proc, url = start_server_process(
        ["--config", str(toml), "--data", f"tiny={questions}", "--corpus", str(corpus), "--max-turns", "2"]
    )
    try:
        async with EnvClient(url) as env:
            info = await env.info()
            assert [(d.name, d.splits) for d in info.datasets] == [("tiny", {"test": 3})]
            assert info.limits.max_turns == 2  # the flag beats the file
            assert info.reward_metric == "f1" and info.limits.max_episodes == 5  # from the file
            ep = await env.create(dataset="tiny", split="test", index=0)
            assert ep.prompt.endswith("Question: Who founded Kelmar Press?")
            r = await env.step(ep.episode_id, action="<search> Kelmar Press </search>")
            assert r.info["num_hits"] == 2 and r.observation.startswith('\n\n<information>Doc 1(Title: "Kelmar Press")')
            r = await env.step(ep.episode_id, action="<answer> Varo Tessin, painter </answer>")
            assert r.done and r.reward == pytest.approx(0.8) and r.info["em"] == 0.0
            ep = await env.create(dataset="tiny", split="test", index=2)
            r = await env.step(ep.episode_id, tool_call={"name": "answer", "arguments": {"answer": "kelmar"}})
            assert r.reward == 1.0
        assert (corpus.parent / "corpus.jsonl.index" / "trace_index.json").is_file()  # the default index dir
    finally:
        _, err = stop_process(proc)
    assert proc.returncode == 0, err[-2000:]


async def test_index_then_serve_the_index(tmp_path: Path, tiny_data: tuple[Path, Path]) -> None:
    corpus, questions = tiny_data
    index_dir = tmp_path / "idx"
    exe = REPO / ".venv/bin/trace-env"  # the installed console script, as the image runs it
    cmd = [str(exe) if exe.exists() else "trace-env", "index", "--corpus", str(corpus), "--index-dir", str(index_dir)]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"index ready at {index_dir}" in done.stdout
    corpus_id = done.stdout.split("corpus_id ")[1].split(")")[0]
    meta_before = (index_dir / "trace_index.json").read_text()
    proc, url = start_server_process(
        ["--index-dir", str(index_dir), "--data", f"tiny:dev={questions}", "--log-level", "warning"]
    )
    try:
        async with EnvClient(url, msgpack=False) as env:
            info = await env.info()
            assert info.corpus_id == corpus_id and [(d.name, d.splits) for d in info.datasets] == [("tiny", {"dev": 3})]
            hits = await env.retrieve(["Orlan founded"], topk=1)
            assert hits[0][0]["document"]["id"] == "d4"
            assert (await env.health())["num_docs"] == len(CORPUS)
    finally:
        _, err = stop_process(proc)
    assert proc.returncode == 0, err[-2000:]
    assert (index_dir / "trace_index.json").read_text() == meta_before  # served, not rebuilt


def test_bad_flags_exit_2_with_a_clear_message(
    tmp_path: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, questions = tiny_data
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('max_turns = "three"\n')
    unknown_toml = tmp_path / "unknown.toml"
    unknown_toml.write_text("max_turnz = 3\n")
    broken_toml = tmp_path / "broken.toml"
    broken_toml.write_text("max_turns = \n")
    cases: list[tuple[list[str], str]] = [
        ([], "usage: trace-env {serve,index,demo}"),
        (["serve", "--port", "eighty"], "Error parsing --port"),
        (["serve", "--data", "no-equals-sign"], "Missing value for argument '--data'"),
        (["serve", "--reward-metric", "bleu"], "reward_metric must be one of"),
        (["serve", "--bogus"], "Unrecognized options: --bogus"),
        (["demo", "--bogus"], "Unrecognized options: --bogus"),
        (["serve", "--data", f"tiny={questions}"], "--data needs something to search"),
        (["serve", "--data", f"tiny={tmp_path / 'nope.jsonl'}", "--corpus", str(corpus)], "no such file"),
        (["serve", "--corpus", str(tmp_path / "missing.jsonl")], "no such file"),
        (["serve", "--corpus", str(corpus), "--retriever-url", "http://127.0.0.1:9"], "not both"),
        (["serve", "--topk", "50", "--max-topk", "20"], "topk (50) must be <= max_topk (20)"),
        (["serve", "--max-turns", "0"], "max_turns must be >= 1"),
        (["serve", "--port", "70000"], "port must be in"),
        (["serve", "--config", str(tmp_path / "missing.toml")], "No such file"),
        (["serve", "--config", str(bad_toml)], "Expected `int`, got `str` - at `$.max_turns`"),
        (["serve", "--config", str(unknown_toml)], "unknown key 'max_turnz'"),
        (["serve", "--config", str(broken_toml)], "broken.toml"),
    ]
    for argv, needle in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, rc, err)
        assert needle in err, (argv, err)


def test_bad_input_through_the_real_entry_point_exits_2(tmp_path: Path) -> None:
    """Regression: a bad question file, corpus or index, or a busy port, found at start-up, ended `serve` with a
    traceback and exit 1 (cli.py main). Subprocesses, also because `index` sets up process-wide logging bound to
    the current stderr, which must not leak into the other tests of this process."""
    bad_corpus = tmp_path / "bad.jsonl"
    bad_corpus.write_text('{"id": "a", "contents": "x"}\nnot json\n')
    good_corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    good_questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    bad_questions = tmp_path / "badq.jsonl"
    bad_questions.write_text('{"question": "q", "golden_answers": ["a"]}\n{"question": "q2"}\n')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    serve = ["serve", "--log-level", "warning", "--port"]
    cases = [
        # found only at start-up, while loading data and opening the index: still exit 2 and a message
        ([*serve, "0", "--data", f"x={bad_questions}", "--corpus", str(good_corpus)], "badq.jsonl:2: 'golden_answers'"),
        ([*serve, "0", "--data", f"x={good_questions}", "--corpus", str(bad_corpus)], "bad.jsonl:2: not valid JSON"),
        ([*serve, "0", "--data", f"x={good_questions}", "--index-dir", str(tmp_path)], "trace_index.json"),
        ([*serve, port, "--data", f"x={good_questions}", "--corpus", str(good_corpus)], "address already in use"),
        (["index", "--corpus", str(tmp_path / "missing.jsonl"), "--index-dir", str(tmp_path / "i")], "no such"),
        (["index", "--corpus", str(bad_corpus), "--index-dir", str(tmp_path / "i")], "bad.jsonl:2: not valid JSON"),
        (["serve", "--max-episodes", "-1"], "max_episodes must be >= 1"),
    ]
    for argv, needle in cases:
        done = subprocess.run([PYTHON, "-m", "env_server", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and needle in done.stderr, (argv, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
    busy.close()
    assert not (tmp_path / "i").exists()


def test_demo_help_prints_its_options_and_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """`trace-env demo --help` ran the demo (its arguments were not parsed)."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: trace-env demo" in out and "--port" in out
    assert "listening" not in out


def test_demo_runs(env_cache_dir: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "env_server", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRACE_CACHE_DIR": str(env_cache_dir)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward 1.0" in done.stdout and "reward 0.0" in done.stdout and "re-imported" in done.stdout


async def test_sigterm_finishes_the_in_flight_step_then_exits_0(
    make_slow_retriever: Callable[[float], Awaitable[SlowRetriever]],
) -> None:
    slow = await make_slow_retriever(1.0)
    proc, url = await asyncio.to_thread(
        start_server_process, ["--retriever-url", slow.url, "--log-level", "warning", "--shutdown-timeout", "10"]
    )
    try:
        async with EnvClient(url, retries=0) as env:
            ep = await env.create(question="q", answers=["a"])
            in_flight = asyncio.create_task(env.step(ep.episode_id, action="<search> slow search </search>"))
            for _ in range(500):  # until the step is inside the server, waiting on the retriever
                if slow.calls:
                    break
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert proc.poll() is None and not in_flight.done()  # still draining
            late = RawHTTP(url)
            try:  # still listening while draining (issue 14: it used to refuse connections here)
                r = await late.call("POST", "/v1/episodes", {"question": "q", "answers": ["a"]})
                assert r.status == 503 and r.error_code() == "shutting_down"
            finally:
                await late.aclose()
            res = await in_flight
            assert res.turn == 1 and "slow search" in res.observation
        rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0
    finally:
        _, err = stop_process(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_a_world_folder_serves_its_splits_not_its_corpus(tmp_path: Path) -> None:
    """`trace-world --out DIR` writes corpus.jsonl beside the splits; `--data synthetic=DIR` must not read the corpus
    as a split named 'corpus' (its rows have no question and would fail to load)."""
    from env_server.datasets import DatasetRegistry
    from tools.synthetic import main as trace_world

    assert trace_world(["--out", str(tmp_path / "w"), "--size", "40"]) == 0
    reg = DatasetRegistry()
    reg.add_spec("synthetic", tmp_path / "w")
    assert sorted(reg.sets["synthetic"]) == ["dev", "test", "train"]
