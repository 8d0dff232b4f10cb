"""`trace-eval` end to end, and the runnable snippets of docs/env-server.md.

Everything real on loopback: the env server (conftest's in-process server over the synthetic world) and
scripted OpenAI-compatible model servers (small aiohttp apps below that play a fixed conversation: search the
question, then answer the gold answer they look up in the world's question files; they answer 400 to any
request that breaks the protocol, so a protocol bug shows as a failed question). The hosted API is never used.

`trace-eval` runs in-process (`tools.eval.cli.main` on a worker thread, since it runs its own event loop while
this test's loop serves), except where a run must be killed midway (a subprocess).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import REPO, LiveServer

from env_server.config import BUILTIN_WORLD
from env_server.service import Resources
from tools.eval.agents import (
    NO_TOOL_CALL_HINT,
    UNPARSED_TOOL_CALL,
    close_action,
    first_title,
    looks_like_unparsed_tool_call,
)
from tools.eval.cli import main

pytestmark = pytest.mark.timeout(120)

Make = Callable[..., Awaitable[LiveServer]]
DEV = ("--dataset", "synthetic", "--split", "dev")
ROW_FIELDS = {
    "id", "dataset", "split", "index", "question", "golden_answers", "prediction", "em", "f1", "cover_em",
    "reward", "turns", "searches", "tokens", "latency_s", "error", "hops", "kind",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
async def trace_eval(*argv: str) -> int:
    """`trace-eval ARGV --no-progress`, in-process on a worker thread; returns the exit code."""
    return await asyncio.to_thread(main, [*argv, "--no-progress"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def gold(env_cache_dir: Path, env_resources: Resources) -> dict[str, str]:
    """Question text -> first gold answer, for every question of the synthetic world."""
    world = BUILTIN_WORLD
    out: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        for line in (world / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out[row["question"]] = row["golden_answers"][0]
    return out


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# ---------------------------------------------------------------------------------------------- scripted model servers
@dataclass
class ScriptedLLM:
    """An OpenAI-compatible server on loopback: `/v1/chat/completions` and `/v1/completions`.

    mode "ok": chat plays `search(question)` then `answer(gold)` as tool calls; completions writes
    `<search> question ` then `<answer> gold ` (the stop strings stripped, as real servers do). Usage 100 + 10
    tokens a call. "slow": the same after `delay_s`. "500": HTTP 500. "garbage": 200 with an HTML page. "unparsed":
    chat writes its search call as Qwen's `<tool_call>` text, as a server started without a tool-call parser does."""

    gold: dict[str, str]
    mode: str = "ok"
    delay_s: float = 0.0
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def _usage() -> dict[str, int]:
        return {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}

    async def _common(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await request.json()
        self.requests.append(body)
        await asyncio.sleep(self.delay_s)
        if self.mode == "500":
            return web.json_response({"error": {"message": "scripted failure"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>I am a teapot</html>", content_type="text/html")
        return body

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._common(request)
        if isinstance(body, web.Response):
            return body
        tools = {t["function"]["name"] for t in body.get("tools", [])}
        if tools != {"search", "answer"}:
            return web.json_response({"error": {"message": f"expected the env's tools, got {tools}"}}, status=400)
        msgs = body["messages"]
        question = next(m["content"] for m in msgs if m["role"] == "user")
        if self.mode == "unparsed":  # a server without a tool-call parser: the model's call comes back as text
            call = json.dumps({"name": "search", "arguments": {"query": question}})
            return self._chat_answer(body, {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"})
        if self.mode == "chatty" and not any(m["role"] == "assistant" for m in msgs):
            return self._chat_answer(body, {"role": "assistant", "content": "Let me think about that first."})
        tool_msgs = [m for m in msgs if m["role"] == "tool"]
        if not tool_msgs:
            name, args = "search", {"query": question}
        else:
            asked = [c["id"] for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls") or []]
            if tool_msgs[-1]["tool_call_id"] != asked[-1] or "Doc 1(Title:" not in tool_msgs[-1]["content"]:
                return web.json_response({"error": {"message": f"bad tool message {tool_msgs[-1]}"}}, status=400)
            name, args = "answer", {"answer": self.gold[question]}
        if self.mode == "chatty" and msgs[2:4] != [
            {"role": "assistant", "content": "Let me think about that first."},
            {"role": "user", "content": NO_TOOL_CALL_HINT},
        ]:
            return web.json_response({"error": {"message": f"expected the no-tool-call hint: {msgs}"}}, status=400)
        call = {
            "id": f"call_{len(tool_msgs)}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        return self._chat_answer(body, {"role": "assistant", "content": None, "tool_calls": [call]})

    def _chat_answer(self, body: dict[str, Any], message: dict[str, Any]) -> web.Response:
        return web.json_response(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": self._usage(),
            }
        )

    async def completions(self, request: web.Request) -> web.Response:
        body = await self._common(request)
        if isinstance(body, web.Response):
            return body
        prompt = body["prompt"]
        m = re.search(r"Question: (.*)", prompt)
        if body.get("stop") != ["</search>", "</answer>"] or m is None:
            return web.json_response({"error": {"message": "expected the Search-R1 prompt and stops"}}, status=400)
        question, turns = m.group(1).strip(), prompt[m.end() :]  # the running text after the server's prompt
        if not turns.strip():
            text = f"<think>I should look this up.</think>\n<search> {question} "
        elif turns.count("</search>") == 1 and turns.rstrip().endswith("</information>"):
            text = f"<think>Found it.</think>\n<answer> {self.gold[question]} "
        else:
            return web.json_response({"error": {"message": f"bad running text: {prompt[-300:]!r}"}}, status=400)
        return web.json_response(
            {
                "id": "cmpl-scripted",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": self._usage(),
            }
        )


@pytest.fixture
async def make_llm(gold: dict[str, str]) -> AsyncIterator[Callable[..., Awaitable[ScriptedLLM]]]:
    runners: list[web.AppRunner] = []

    async def make(mode: str = "ok", delay_s: float = 0.0) -> ScriptedLLM:
        llm = ScriptedLLM(gold, mode, delay_s)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", llm.chat)
        app.router.add_post("/v1/completions", llm.completions)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        llm.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        return llm

    yield make
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------- parsing helpers
def test_close_action_restores_the_stripped_stop_string() -> None:
    assert close_action("<think>x</think>\n<search> Kelmar ") == "<think>x</think>\n<search> Kelmar </search>"
    assert close_action("<think>x</think><answer> Orlan") == "<think>x</think><answer> Orlan</answer>"
    assert close_action("<search> a </search>") == "<search> a </search>"  # servers that keep the stop string
    assert close_action("<search> a </search> then <answer> b") == "<search> a </search> then <answer> b</answer>"
    assert close_action("no tags at all") == "no tags at all"


def test_first_title_reads_the_top_passage_title() -> None:
    assert first_title('Doc 1(Title: "Foo (band)") Foo is a band.\nDoc 2(Title: "B") b\n') == "Foo (band)"
    assert first_title("Doc 1(Title: Plain) text\n") == "Plain"
    assert first_title("No results found.") is None


# ---------------------------------------------------------------------------------------------- reference agents
async def test_oracle_scores_em_1_and_writes_rows_and_summaries(
    env_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "oracle.jsonl"
    assert await trace_eval("--env-url", env_server.url, "--agent", "oracle", *DEV, "--limit", "24", "--out", str(out), "--concurrency", "8") == 0  # fmt: skip
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(24))  # sorted once the run completes
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["error"] is None and r["em"] == r["f1"] == r["reward"] == 1.0, r
        assert r["prediction"] in r["golden_answers"] and r["id"] == f"dev-{r['index']:06d}"
        assert r["turns"] == r["searches"] + 1 == r["hops"] + 1 and r["kind"] and r["question"]
        assert r["tokens"] is None and r["agent"] == "oracle" and r["latency_s"] > 0
    assert not env_server.service.store.episodes, "every episode is released"
    stdout = capsys.readouterr().out
    assert "| synthetic | dev | all | 24 | 1.000 | 1.000 | 1.000 | 0 |" in stdout
    md, csv = tmp_path / "oracle.summary.md", tmp_path / "oracle.summary.csv"
    assert "| synthetic | dev | all | 24 | 1.000" in md.read_text()
    lines = csv.read_text().splitlines()
    assert lines[0] == "dataset,split,hops,n,em,f1,cover_em,errors,truncated,mean_turns,mean_searches"
    assert [ln.split(",")[2] for ln in lines[1:]] == ["1", "2", "3", "all"]
    assert sum(int(ln.split(",")[3]) for ln in lines[1:-1]) == 24


async def test_first_hit_is_deterministic_and_scores_below_the_oracle(env_server: LiveServer, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert await trace_eval("--env-url", env_server.url, "--agent", "first-hit", *DEV, "--limit", "40", "--out", str(out)) == 0  # fmt: skip
        runs.append([{k: v for k, v in r.items() if k != "latency_s"} for r in read_rows(out)])
    assert runs[0] == runs[1]
    rows = runs[0]
    assert all(r["error"] is None and r["turns"] == 2 and r["searches"] == 1 for r in rows)
    em = sum(r["em"] for r in rows) / len(rows)
    assert em < 0.5, em


# ---------------------------------------------------------------------------------------------- model-backed agents
@pytest.mark.parametrize(
    ("agent", "mode", "calls"),
    [("openai-tools", "ok", 2), ("react-text", "ok", 2), ("openai-tools", "chatty", 3)],
    ids=["openai-tools", "react-text", "openai-tools-text-reply-first"],
)
async def test_model_agents_play_a_scripted_endpoint(
    env_server: LiveServer,
    make_llm: Callable[..., Awaitable[ScriptedLLM]],
    tmp_path: Path,
    api_key: None,
    agent: str,
    mode: str,
    calls: int,
) -> None:
    """`chatty`: the model first replies in plain text; that is an (invalid) turn and the model is told to use a tool."""
    llm = await make_llm(mode)
    out = tmp_path / "run.jsonl"
    args = ("--agent", agent, "--base-url", llm.url, "--model", "scripted", "--limit", "5", "--concurrency", "3")
    assert await trace_eval("--env-url", env_server.url, *args, *DEV, "--out", str(out)) == 0
    rows = read_rows(out)
    assert len(rows) == 5 and len(llm.requests) == 5 * calls
    for r in rows:
        assert r["error"] is None and r["em"] == 1.0, r
        assert (r["turns"], r["searches"], r["agent"], r["model"]) == (calls, 1, agent, "scripted")
        assert (r["prompt_tokens"], r["completion_tokens"], r["tokens"]) == (100 * calls, 10 * calls, 110 * calls)
    if agent == "openai-tools":
        assert all(req["temperature"] == 0.0 and req["max_tokens"] == 512 for req in llm.requests)


@pytest.mark.parametrize(
    ("text", "unparsed"),
    [
        ('<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>', True),  # Qwen, Hermes
        ('{"name": "answer", "arguments": {"answer": "Paris"}}', True),
        ("[TOOL_CALLS] [...]", True),  # Mistral
        ("<|python_tag|>search(query='x')", True),  # Llama 3
        ('{"name": "search", "parameters": {"query": "x"}}', True),  # Llama 3's JSON form
        ("<answer> Paris </answer>", False),
        ("I should search for the name of the city first.", False),
        ('The "name" of the city; no arguments here.', False),
    ],
)
def test_looks_like_unparsed_tool_call(text: str, unparsed: bool) -> None:
    assert looks_like_unparsed_tool_call(text) is unparsed


async def test_a_tool_call_left_as_text_is_an_invalid_turn_and_says_how_to_serve_the_model(
    env_server: LiveServer, make_llm: Callable[..., Awaitable[ScriptedLLM]], tmp_path: Path, api_key: None
) -> None:
    """A model server started without a tool-call parser returns the model's call as text: each such turn is an
    invalid action (the episode goes on to its turn cap, no row fails), and the run says once what to start the
    server with."""
    from structlog.testing import capture_logs

    llm = await make_llm("unparsed")
    out = tmp_path / "run.jsonl"
    args = ("--agent", "openai-tools", "--base-url", llm.url, "--model", "scripted", "--limit", "3", "--max-turns", "2")
    with capture_logs() as logs:
        assert await trace_eval("--env-url", env_server.url, *args, *DEV, "--out", str(out)) == 0
    rows = read_rows(out)
    assert len(rows) == 3 and len(llm.requests) == 3 * 2
    assert all(r["error"] is None and r["truncated"] and (r["turns"], r["searches"]) == (2, 0) for r in rows), rows
    said = [e for e in logs if e["event"] == UNPARSED_TOOL_CALL]
    assert len(said) == 1 and said[0]["log_level"] == "warning" and "<tool_call>" in said[0]["reply"], logs


async def test_dead_500_and_garbage_endpoints_are_recorded_per_question(
    env_server: LiveServer,
    make_llm: Callable[..., Awaitable[ScriptedLLM]],
    tmp_path: Path,
    api_key: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ("--env-url", env_server.url, *DEV, "--limit", "3", "--model", "scripted", "--agent-retries", "0")
    failing = await make_llm("500")
    garbage = await make_llm("garbage")
    cases = [
        ("openai-tools", closed_port_url() + "/v1", "unreachable"),
        ("openai-tools", failing.url, "answered HTTP 500"),
        ("react-text", failing.url, "answered HTTP 500"),
        ("openai-tools", garbage.url, "answered garbage"),
        ("react-text", garbage.url, "answered garbage"),
    ]
    for i, (agent, url, needle) in enumerate(cases):
        out = tmp_path / f"{i}.jsonl"
        assert await trace_eval(*common, "--agent", agent, "--base-url", url, "--out", str(out)) == 0
        rows = read_rows(out)
        assert len(rows) == 3, (agent, url)
        for r in rows:
            assert r["error"] and needle in r["error"] and url in r["error"], (needle, r["error"])
            assert r["em"] == 0.0 and r["prediction"] is None and r["question"] and r["golden_answers"]
        assert "3 questions run (3 with errors)" in capsys.readouterr().out
    assert not env_server.service.store.episodes, "failed episodes are released too"
    # The endpoint recovers: --retry-errors runs exactly the failed questions again.
    ok = await make_llm()
    out = tmp_path / "1.jsonl"
    assert await trace_eval(*common, "--agent", "openai-tools", "--base-url", ok.url, "--out", str(out), "--retry-errors") == 0  # fmt: skip
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2] and all(r["error"] is None and r["em"] == 1.0 for r in rows)


# ---------------------------------------------------------------------------------------------- resume
async def test_resume_skips_finished_questions(
    env_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.jsonl"
    base = ("--env-url", env_server.url, "--agent", "oracle", *DEV, "--out", str(out))
    assert await trace_eval(*base, "--limit", "3") == 0
    assert len(read_rows(out)) == 3
    out.write_bytes(out.read_bytes() + b'{"id": "dev-000003", "dataset": "synth')  # what a killed writer leaves
    assert await trace_eval(*base, "--limit", "6") == 0
    captured = capsys.readouterr()
    assert "incomplete last line" in captured.err
    assert "3 questions run (0 with errors), 3 already done, 6 in all" in captured.out
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(6)) and all(r["em"] == 1.0 for r in rows)
    assert await trace_eval(*base, "--limit", "6") == 0
    assert "0 questions run (0 with errors), 6 already done" in capsys.readouterr().out
    assert len(read_rows(out)) == 6


async def test_a_run_killed_midway_finishes_the_rest_without_duplicates(
    env_server: LiveServer, make_llm: Callable[..., Awaitable[ScriptedLLM]], tmp_path: Path, api_key: None
) -> None:
    llm = await make_llm("slow", delay_s=0.1)
    out = tmp_path / "killed.jsonl"
    argv = ["--env-url", env_server.url, "--agent", "openai-tools", "--base-url", llm.url, "--model", "scripted"]
    argv += [*DEV, "--limit", "12", "--out", str(out), "--no-progress"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.eval.cli", *argv, "--concurrency", "2", cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(400):
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the subprocess wrote no rows in 20 s")
    finally:
        proc.kill()
        await proc.wait()
    done_before = out.read_bytes().count(b"\n")  # complete rows; a cut last line is repaired on resume
    assert 3 <= done_before < 12
    assert await asyncio.to_thread(main, [*argv, "--concurrency", "4"]) == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(12))
    assert all(r["error"] is None and r["em"] == 1.0 for r in rows)


async def test_env_server_going_away_stops_the_run_with_exit_3(
    make_env_server: Make,
    make_llm: Callable[..., Awaitable[ScriptedLLM]],
    tmp_path: Path,
    api_key: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not a per-question error: the run stops, keeps what finished, and says how to resume."""
    srv = await make_env_server()
    llm = await make_llm("slow", delay_s=0.05)
    out = tmp_path / "gone.jsonl"
    argv = ("--env-url", srv.url, "--agent", "openai-tools", "--base-url", llm.url, "--model", "scripted", *DEV)
    run = asyncio.create_task(trace_eval(*argv, "--limit", "40", "--concurrency", "2", "--out", str(out)))
    for _ in range(400):
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        await asyncio.sleep(0.02)
    await srv.app.shutdown()  # from now on the server answers 503, as when it drains on SIGTERM
    assert await run == 3
    err = capsys.readouterr().err
    assert "went away" in err and "rerun the same command to resume" in err, err
    rows = read_rows(out)
    assert 2 <= len(rows) < 40 and all(r["error"] is None for r in rows)


# ---------------------------------------------------------------------------------------------- usage errors
async def test_bad_arguments_exit_2_and_an_unreachable_env_server_exits_3(
    env_server: LiveServer,
    make_env_server: Make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "x.jsonl")

    async def expect(code: int, needle: str, *argv: str, url: str = env_server.url) -> None:
        assert await trace_eval("--env-url", url, "--out", out, *argv) == code, argv
        err = capsys.readouterr().err
        assert needle in err, err

    await expect(3, "cannot reach the env server", "--agent", "oracle", *DEV, url=closed_port_url())
    secured = await make_env_server(auth_token="s3cret")
    await expect(3, "--env-token", "--agent", "oracle", *DEV, url=secured.url)
    await expect(2, "no dataset 'nq'", "--agent", "oracle", "--dataset", "nq", "--split", "dev")
    await expect(2, "no split 'validation'", "--agent", "oracle", "--dataset", "synthetic", "--split", "validation")
    await expect(2, "needs --base-url", "--agent", "policy", *DEV)
    await expect(2, "needs --model", "--agent", "openai-tools", *DEV)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    await expect(2, "$OPENAI_API_KEY", "--agent", "react-text", "--model", "m", *DEV)
    await expect(2, "--max-turns must be in", "--agent", "oracle", *DEV, "--max-turns", "99")
    with monkeypatch.context() as m:  # the openai client missing (no `eval` extra): what to install, not a traceback
        m.setitem(sys.modules, "openai", None)
        await expect(2, "pip install 'trace-rl[eval]'", "--agent", "openai-tools", "--model", "m", *DEV)
    assert await trace_eval("--env-url", secured.url, "--env-token", "s3cret", "--agent", "oracle", *DEV, "--limit", "2", "--out", out) == 0  # fmt: skip
    await expect(2, "already holds results of agent/model", "--agent", "first-hit", *DEV, "--limit", "2")
    with pytest.raises(SystemExit) as exc:
        await trace_eval("--env-url", env_server.url, "--agent", "nope", *DEV, "--out", out)
    assert exc.value.code == 2


async def test_datasets_without_oracles_or_hops(make_env_server: Make, tmp_path: Path) -> None:
    """A user dataset (FlashRAG jsonl + corpus): oracle refuses up front; first-hit runs, hops group as '-'."""
    corpus = tmp_path / "corpus.jsonl"
    docs = [("d1", '"Kelmar"\nKelmar is a city in Norvia.'), ("d2", '"Orlan"\nOrlan is a city in Vulkes.')]
    corpus.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in docs))
    questions = tmp_path / "test.jsonl"
    qs = [("q1", "Which city is in Norvia?", ["Kelmar"]), ("q2", "Which city is in Vulkes?", ["Orlan"])]
    questions.write_text("".join(json.dumps({"id": i, "question": q, "golden_answers": a}) + "\n" for i, q, a in qs))
    srv = await make_env_server(
        resources=None, data={"tiny": str(questions)}, corpus=str(corpus), index_dir=str(tmp_path / "idx")
    )
    base = ("--env-url", srv.url, "--dataset", "tiny", "--split", "test")
    assert await trace_eval(*base, "--agent", "oracle", "--out", str(tmp_path / "o.jsonl")) == 2
    out = tmp_path / "f.jsonl"
    assert await trace_eval(*base, "--agent", "first-hit", "--out", str(out)) == 0
    rows = read_rows(out)
    assert [(r["id"], r["prediction"], r["em"], r["hops"]) for r in rows] == [
        ("q1", "Kelmar", 1.0, None),
        ("q2", "Orlan", 1.0, None),
    ]
    assert "| tiny | test | - | 2 | 1.000" in (tmp_path / "f.summary.md").read_text()


# ---------------------------------------------------------------------------------------------- docs
def _snippets(lang: str) -> list[str]:
    text = (REPO / "docs" / "env-server.md").read_text()
    return re.findall(rf"```{lang} runnable\n(.*?)```", text, re.DOTALL)


async def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_docs_python_snippets_run(
    env_server: LiveServer, make_llm: Callable[..., Awaitable[ScriptedLLM]]
) -> None:
    llm = await make_llm()
    env = {
        "TRACE_ENV_URL": env_server.url,
        "OPENAI_BASE_URL": llm.url,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_MODEL": "scripted",
    }
    client_snippet, openai_snippet = _snippets("python")
    code, out, err = await _run([sys.executable, "-c", client_snippet], env)
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "rewards: 1.0 0.0 gold: ['Sosgu Press']",
        "from the imported snapshot: turn 2 reward 1.0",
    ]
    code, out, err = await _run([sys.executable, "-c", openai_snippet], env)
    assert code == 0, err
    assert out.strip() == "answer: Sosgu Press reward: 1.0 turns: 2" and len(llm.requests) == 2


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
async def test_docs_shell_snippets_run(env_server: LiveServer, tmp_path: Path) -> None:
    curl_snippet, eval_snippet = _snippets("bash")
    env = {"TRACE_ENV_URL": env_server.url, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    code, out, err = await _run(["bash", "-euo", "pipefail", "-c", curl_snippet], env)
    assert code == 0, err
    assert '"reward":1,' in out and '{"done":true,"reward":0}' in out and "<information>Doc 1" in out
    code, out, err = await _run(["bash", "-euo", "pipefail", "-c", eval_snippet], {**env, "TMPDIR": str(tmp_path)})
    assert code == 0, err
    assert "synthetic,dev,all,20,1.0,1.0,1.0,0,0" in out


async def test_policy_agent_plays_a_checkpoint_through_the_engine(
    env_server: LiveServer, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """`--agent policy`: our tiny checkpoint through the trainer's agent loop and the real CPU engine."""
    out = tmp_path / "policy.jsonl"
    code = await trace_eval(
        "--env-url", env_server.url, "--agent", "policy", *DEV, "--limit", "3", "--out", str(out),
        "--base-url", engine_url, "--model", str(tiny_model), "--max-tokens", "24", "--no-progress",
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["model"] == str(tiny_model)
        assert r["error"] is None, r["error"]
        assert r["em"] in (0.0, 1.0) and r["turns"] >= 1
        assert r["tokens"] is None or r["tokens"] > 0


# ---------------------------------------------------------------------------------------------- replicas
async def test_replicas_one_dies_mid_run_and_its_questions_are_played_again(tmp_path: Path) -> None:
    """`--env-url A --env-url B`: episodes spread over both real servers; SIGKILL one mid-run, and the questions it
    held are played again on the other: every row ends, none with an error, and the summary counts each once."""
    import contextlib
    import signal as sig

    from conftest import start_server_process, stop_process
    from structlog.testing import capture_logs

    procs = [start_server_process([]) for _ in range(2)]
    out = tmp_path / "replicas.jsonl"
    stack = contextlib.ExitStack()
    try:
        argv = ["--agent", "oracle", *DEV, "--limit", "200", "--concurrency", "4", "--out", str(out)]
        logs = stack.enter_context(capture_logs())
        run = asyncio.create_task(trace_eval("--env-url", procs[0][1], "--env-url", procs[1][1], *argv))
        async with aiohttp.ClientSession() as http:
            for _ in range(2000):  # until the second replica has played a few steps
                async with http.get(procs[1][1] + "/metrics") as r:
                    text = await r.text()
                if (
                    sum(
                        float(line.split()[-1])
                        for line in text.splitlines()
                        if line.startswith("trace_env_steps_total")
                    )
                    >= 5
                ):
                    break
                await asyncio.sleep(0.01)
        procs[1][0].send_signal(sig.SIGKILL)
        written = len(out.read_text().splitlines()) if out.exists() else 0
        assert written < 200, "the replica died while questions were still running"
        assert await run == 0
        rows = read_rows(out)
        assert [r["index"] for r in rows] == list(range(200))
        assert [(r["index"], r["error"]) for r in rows if r["error"] is not None or r["em"] != 1.0] == []
        replayed = [x for x in logs if x["event"] == "a question lost its env replica; playing it again"]
        assert replayed, "some questions were on the replica that died"
    finally:
        stack.close()
        for p, _ in procs:
            stop_process(p, sig.SIGKILL)
