"""`trace-eval` against a real SGLang 0.5.23 server on the tiny model: the `sglang` tier.

tests/test_eval.py plays the model-backed agents against scripted OpenAI-compatible servers (a fixed
conversation, 400 to any request that breaks the protocol). Here the same agents talk to what users run: SGLang's
OpenAI-compatible routes (`/v1/chat/completions` with tools, through `--tool-call-parser qwen25`, and
`/v1/completions`) and its native API (`--agent policy`), against a real env server on loopback. The tiny model is
untrained, so its turns are mostly invalid and no answer is expected to be right; what is checked is that every
question's episode runs to its end through the real server's answers: no row with an error, the token counts the
server reported summed on each row (null if any call lacked them), no more completion tokens than asked for, the turn
cap kept.

Run by `tools/sglang-cpu/run-tests`; skipped in the default suite unless sglang is importable and CUDA works or
SGLang's CPU engine is switched on (as tests/test_sglang_engine.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import LiveServer, server_args, sglang_skip_reason

from tools.eval.cli import main
from trainer.engines.launcher import SGLangServer, free_port

_REASON = sglang_skip_reason()
pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.timeout(900),  # the server's start (35-75 s on 2 CPU cores) and three agents' runs
]

SERVED_NAME = "tiny"
MAX_TOKENS = 16
MAX_TURNS = 2
QUESTIONS = 2


async def test_trace_eval_runs_each_model_agent_against_real_sglang(
    env_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tools.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", seed=0)
    extra = [*server_args(), "--served-model-name", SERVED_NAME, "--tool-call-parser", "qwen25"]
    server = SGLangServer(model, port=free_port(), extra_args=extra, log_path=tmp_path / "sglang.log")
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")  # SGLang ignores the key; the openai client wants one set
    await server.start()
    try:
        runs = {
            "openai-tools": (server.url + "/v1", SERVED_NAME),
            "react-text": (server.url + "/v1", SERVED_NAME),
            "policy": (server.url, str(model)),  # SGLang's native API; --model is the checkpoint's folder
        }
        for agent, (base_url, name) in runs.items():
            out = tmp_path / f"{agent}.jsonl"
            argv = [
                "--env-url", env_server.url, "--dataset", "synthetic", "--split", "dev", "--limit", str(QUESTIONS),
                "--concurrency", "2", "--max-turns", str(MAX_TURNS), "--max-tokens", str(MAX_TOKENS),
                "--agent", agent, "--base-url", base_url, "--model", name, "--out", str(out), "--no-progress",
            ]  # fmt: skip
            code = await asyncio.to_thread(main, argv)
            assert code == 0, (agent, (tmp_path / "sglang.log").read_text()[-2000:])
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(rows) == QUESTIONS, (agent, rows)
            for r in rows:
                assert r["error"] is None, (agent, r)
                assert r["agent"] == agent and r["model"] == name, r
                assert 1 <= r["turns"] <= MAX_TURNS and r["em"] in (0.0, 1.0), r
                # the token counts SGLang reported (OpenAI usage on every call, else the row's counts are null; the
                # native API's per request), summed over the turns: no more completion tokens than asked for
                assert r["prompt_tokens"] > 0 and r["tokens"] == r["prompt_tokens"] + r["completion_tokens"], r
                assert r["turns"] <= r["completion_tokens"] <= MAX_TOKENS * r["turns"], r
    finally:
        await server.stop()
