"""EngineClient and the engine launcher, against real servers on loopback.

Two peers:
- `ScriptedEngine`, a small aiohttp app inside this file that answers SGLang-shaped JSON (the
  shapes of SGLang 0.5.23's `/generate`, `/flush_cache`, `/pause_generation`, ...). It is here
  for fault injection only: 5xx then OK, abort finish reasons, malformed answers, logprob/id
  mismatches, 4xx, slow answers, a busy `/flush_cache`.
- The project's CPU engine (`engine`, in-process on loopback, on a 130k-parameter
  tiny model), the real peer: round trip, sticky routing over two servers with the prefix cache,
  cache flush, weight update (pause -> update -> continue) with an in-flight generation aborted.

Backoffs are milliseconds. The file takes ~20 s on 2 cores, most of it importing torch and
transformers for the CPU engine; the scripted-engine and launcher tests alone take ~5 s.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.engine_protocol import SamplingParams
from trainer.engines.client import (
    EngineClient,
    EngineProtocolError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
    Generation,
    sampling_dict,
)
from trainer.engines.launcher import (
    EngineLaunchError,
    SGLangServer,
    _group_alive,
    free_port,
    launch_engine,
    sglang_available,
)

FAST = {"retries": 2, "backoff_s": 0.005, "timeout_s": 5.0}
PARAMS = SamplingParams(max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=[6])

Action = Callable[[dict[str, Any]], Awaitable[web.StreamResponse | None]]


class ScriptedEngine:
    """SGLang-shaped fake engine. `script` holds one-shot actions for the next `/generate` calls
    (an action returns a response, or None to fall through to the normal answer)."""

    def __init__(self, *, pause_routes: bool = True) -> None:
        self.script: list[Action] = []
        self.bodies: list[dict[str, Any]] = []  # /generate bodies, in arrival order
        self.calls: list[str] = []  # every control route hit, in order
        self.aborted: list[str] = []
        self.weight_version = "default"
        self.flush_busy = 0  # answer /flush_cache with 400 this many more times
        self.update_ok = True
        self.seen: list[list[int]] = []  # token sequences in the "prefix cache"
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health_generate", self.health)
        app.router.add_post("/flush_cache", self.flush)
        app.router.add_post("/update_weights_from_disk", self.update)
        app.router.add_post("/abort_request", self.abort)
        if pause_routes:
            app.router.add_post("/pause_generation", self.control)
            app.router.add_post("/continue_generation", self.control)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def item(self, prompt: list[int], sp: dict[str, Any], rid: str) -> dict[str, Any]:
        out = [(prompt[-1] + k + 1) % 1000 for k in range(sp["max_new_tokens"])]
        cached = max((_common_prefix(prompt, s) for s in self.seen), default=0)
        cached = min(cached, len(prompt) - 1)
        self.seen.append(prompt + out)
        return {
            "output_ids": out,
            "meta_info": {
                "id": rid,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(out),
                "cached_tokens": cached,
                "finish_reason": {"type": "length", "length": len(out)},
                "output_token_logprobs": [[-0.25, t, None] for t in out],
                "weight_version": self.weight_version,
                "e2e_latency": 0.001,
            },
        }

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.script:
            resp = await self.script.pop(0)(body)
            if resp is not None:
                return resp
        ids, sp, rid = body["input_ids"], body["sampling_params"], body["rid"]
        if isinstance(ids[0], int):
            return web.json_response(self.item(ids, sp, rid))
        sps = sp if isinstance(sp, list) else [sp] * len(ids)
        return web.json_response([self.item(p, s, r) for p, s, r in zip(ids, sps, rid, strict=True)])

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def flush(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("flush_cache")
        if self.flush_busy:
            self.flush_busy -= 1
            return web.Response(status=400, text="Cache not flushed: there are running requests.\n")
        self.seen.clear()
        return web.Response(text="Cache flushed.\n")

    async def update(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(f"update:{body['model_path']}:{body['weight_version']}:{body['flush_cache']}")
        if not self.update_ok:
            return web.json_response(
                {"success": False, "message": "no such checkpoint", "num_paused_requests": 0}, status=400
            )
        self.weight_version = body["weight_version"]
        self.seen.clear()
        return web.json_response(
            {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        )

    async def abort(self, request: web.Request) -> web.StreamResponse:
        self.aborted.append((await request.json())["rid"])
        return web.Response(status=200)

    async def control(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(request.path.strip("/") + (f":{body['mode']}" if "mode" in body else ""))
        return web.json_response({"message": "ok", "status": "ok"})


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def answer(status: int = 200, payload: Any = None, *, text: str | None = None, delay: float = 0.0) -> Action:
    async def act(body: dict[str, Any]) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        if text is not None:
            return web.Response(status=status, text=text)
        return web.json_response(payload, status=status)

    return act


def edit(fn: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[[ScriptedEngine], Action]:
    """An action that answers normally and then lets `fn(body, answer)` corrupt the answer."""

    def bind(engine: ScriptedEngine) -> Action:
        async def act(body: dict[str, Any]) -> web.StreamResponse:
            ans = engine.item(body["input_ids"], body["sampling_params"], body["rid"])
            fn(body, ans)
            return web.json_response(ans)

        return act

    return bind


@pytest.fixture
async def fake() -> AsyncIterator[ScriptedEngine]:
    engine = ScriptedEngine()
    await engine.server.start_server()
    yield engine
    await engine.server.close()


@pytest.fixture
async def fake2() -> AsyncIterator[list[ScriptedEngine]]:
    engines = [ScriptedEngine(), ScriptedEngine()]
    for e in engines:
        await e.server.start_server()
    yield engines
    for e in engines:
        await e.server.close()


# ---- generation against the scripted engine -------------------------------------------------


async def test_generate_sends_everything_explicitly_and_checks_the_answer(fake: ScriptedEngine) -> None:
    async with EngineClient([fake.url], **FAST) as engine:
        gen = await engine.generate([1, 2, 3], PARAMS, route_key="tree-0", rid="r1")
    body = fake.bodies[0]
    assert body["input_ids"] == [1, 2, 3] and body["rid"] == "r1" and body["stream"] is False
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1
    # defaults are sent too: the server's own defaults may come from generation_config.json
    assert body["sampling_params"] == sampling_dict(PARAMS)
    for key in ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop_token_ids", "ignore_eos"):
        assert key in body["sampling_params"], key
    assert "stop" not in body["sampling_params"]  # None fields are left out
    assert isinstance(gen, Generation)
    assert gen.output_ids == [4, 5, 6] and gen.logprobs == [-0.25] * 3
    assert (gen.finish_type, gen.aborted, gen.prompt_tokens, gen.completion_tokens) == ("length", False, 3, 3)
    assert gen.server == fake.url and gen.rid == "r1" and gen.weight_version == "default" and gen.latency_s > 0
    assert (engine.stats.calls, engine.stats.sequences, engine.stats.retries) == (1, 1, 0)


async def test_n_above_one_is_refused_before_sending(fake: ScriptedEngine) -> None:
    async with EngineClient([fake.url], **FAST) as engine:
        with pytest.raises(ValueError, match="n must be 1"):
            await engine.generate([1], SamplingParams(n=2), route_key="k")
        with pytest.raises(ValueError, match="no input_ids"):
            await engine.generate([], PARAMS, route_key="k")
    assert fake.bodies == []


async def test_5xx_then_ok_is_retried(fake: ScriptedEngine) -> None:
    fake.script = [answer(500, {"error": {"message": "boom"}}), answer(503, text="busy")]
    async with EngineClient([fake.url], **FAST) as engine:
        gen = await engine.generate([7], PARAMS, route_key="k")
        assert gen.output_ids == [8, 9, 10]
        assert engine.stats.retries == 2
    assert len(fake.bodies) == 3


async def test_4xx_is_not_retried_and_carries_the_message(fake: ScriptedEngine) -> None:
    msg = "stop=['</search>'] is unavailable when skip_tokenizer_init=True (requires tokenizer ...)."
    fake.script = [answer(400, {"error": {"message": msg}})]
    async with EngineClient([fake.url], **FAST) as engine:
        with pytest.raises(EngineRequestError) as ei:
            await engine.generate([1], PARAMS, route_key="k")
        assert engine.stats.retries == 0
    assert ei.value.status == 400 and ei.value.message == msg and fake.url in str(ei.value)
    assert len(fake.bodies) == 1


async def test_abort_is_returned_not_dropped(fake: ScriptedEngine) -> None:
    def aborted(body: dict[str, Any], ans: dict[str, Any]) -> None:
        ans["output_ids"] = ans["output_ids"][:1]
        ans["meta_info"]["output_token_logprobs"] = ans["meta_info"]["output_token_logprobs"][:1]
        ans["meta_info"]["finish_reason"] = {"type": "abort", "message": "Abort before weight update"}

    fake.script = [edit(aborted)(fake)]
    async with EngineClient([fake.url], **FAST) as engine:
        gen = await engine.generate([1, 2], PARAMS, route_key="k")
        assert gen.aborted and gen.finish_type == "abort" and gen.finish_message == "Abort before weight update"
        assert gen.output_ids == [3] and gen.logprobs == [-0.25]
        assert engine.stats.aborts == 1 and engine.stats.sequences == 1


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b, a: a.pop("output_ids"), "does not match GenerateResponse"),
        (lambda b, a: a["meta_info"].pop("finish_reason"), "finish_reason is missing"),
        (lambda b, a: a["meta_info"].update(finish_reason={"type": "eos"}), "'eos' is not one of"),
        (lambda b, a: a["meta_info"]["output_token_logprobs"].pop(), "has 2 entries for 3 output_ids"),
        (lambda b, a: a["meta_info"]["output_token_logprobs"][1].__setitem__(1, 999), r"\[1\] is for token 999"),
        (lambda b, a: a["meta_info"]["output_token_logprobs"][0].__setitem__(0, 0.5), "need a float <= 0"),
        (lambda b, a: a["meta_info"].pop("output_token_logprobs"), "output_token_logprobs is missing"),
        (lambda b, a: a["meta_info"].update(prompt_tokens=1), "prompt_tokens=1 but 2 input_ids"),
        (lambda b, a: a["meta_info"].update(cached_tokens=5), r"cached_tokens=5 outside \[0, 2\]"),
        (lambda b, a: a["meta_info"].update(id="someone-else"), "answer is for rid 'someone-else'"),
    ],
)
async def test_answers_that_break_the_contract_raise_protocol_errors(
    fake: ScriptedEngine, corrupt: Callable[[dict[str, Any], dict[str, Any]], Any], match: str
) -> None:
    fake.script = [edit(corrupt)(fake)]
    async with EngineClient([fake.url], **FAST) as engine:
        with pytest.raises(EngineProtocolError, match=match):
            await engine.generate([1, 2], PARAMS, route_key="k")


def _tops(body: dict[str, Any], ans: dict[str, Any]) -> None:
    """Answer top logprobs as SGLang does: per output token [logprob, token_id, null], largest first."""
    n = body["top_logprobs_num"]
    ans["meta_info"]["output_top_logprobs"] = [[[-0.1 * (j + 1), j, None] for j in range(n)] for _ in ans["output_ids"]]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b, a: None, None),
        (lambda b, a: a["meta_info"].pop("output_top_logprobs"), "output_top_logprobs is missing"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"].pop(), "has 2 rows for 3 output_ids"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][1].reverse(), "largest first"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][0][0].__setitem__(0, 0.5), "logprob <= 0"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][2].append([-9.0, 7, None]), "need 3"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][2].pop(), "need 3"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"].__setitem__(1, None), "null row"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][2].__setitem__(0, "x"), "does not match GenerateResponse"),
        (lambda b, a: a["meta_info"]["output_top_logprobs"][2].__setitem__(0, [None, 3]), "logprob <= 0"),
    ],
)
async def test_top_logprobs_are_sent_and_checked(
    fake: ScriptedEngine, corrupt: Callable[[dict[str, Any], dict[str, Any]], Any], match: str | None
) -> None:
    fake.script = [edit(lambda b, a: (_tops(b, a), corrupt(b, a)))(fake)]
    async with EngineClient([fake.url], **FAST) as engine:
        if match is None:
            gen = await engine.generate([1, 2], PARAMS, route_key="k", top_logprobs=3)
            assert fake.bodies[0]["top_logprobs_num"] == 3
            assert gen.top_logprobs == [[-0.1, -0.2, -0.30000000000000004]] * 3
        elif match == "null row":  # SGLang's null for a token without top logprobs: an empty row, not an error
            gen = await engine.generate([1, 2], PARAMS, route_key="k", top_logprobs=3)
            assert [len(r) for r in gen.top_logprobs] == [3, 0, 3]
        else:
            with pytest.raises(EngineProtocolError, match=match):
                await engine.generate([1, 2], PARAMS, route_key="k", top_logprobs=3)
        with pytest.raises(ValueError, match="only with return_logprob"):
            await engine.generate([1, 2], PARAMS, route_key="k", top_logprobs=3, return_logprob=False)


async def test_non_json_answer_is_a_protocol_error(fake: ScriptedEngine) -> None:
    fake.script = [answer(200, text="<html>proxy error</html>")]
    async with EngineClient([fake.url], **FAST) as engine:
        with pytest.raises(EngineProtocolError, match="proxy error"):
            await engine.generate([1], PARAMS, route_key="k")


async def test_dead_port_raises_unavailable_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with EngineClient([url], **FAST) as engine:
        with pytest.raises(EngineUnavailable) as ei:
            await engine.generate([1], PARAMS, route_key="k")
        assert engine.stats.retries == 2
    assert ei.value.url == url and ei.value.attempts == 3 and "ClientConnectorError" in ei.value.last_error


async def test_timeout_is_not_retried_and_aborts_the_request(fake: ScriptedEngine) -> None:
    fake.script = [answer(200, {}, delay=2.0)]
    async with EngineClient([fake.url], retries=3, backoff_s=0.005, timeout_s=0.2) as engine:
        with pytest.raises(EngineTimeout, match=r"timed out after 0\.2s"):
            await engine.generate([1], PARAMS, route_key="k", rid="slow-1")
        assert engine.stats.timeouts == 1 and engine.stats.retries == 0
        assert engine.load() == {fake.url: 0}
    assert len(fake.bodies) == 1 and fake.aborted == ["slow-1"]


async def test_generate_many_is_one_call_in_prompt_order(fake: ScriptedEngine) -> None:
    prompts = [[1, 2], [10, 20, 30], [5]]
    per_prompt = [SamplingParams(max_new_tokens=k) for k in (1, 2, 3)]
    async with EngineClient([fake.url], **FAST) as engine:
        gens = await engine.generate_many(prompts, per_prompt, route_key="tree", rids=["a", "b", "c"])
        shared = await engine.generate_many(prompts, PARAMS, route_key="tree")
        with pytest.raises(ValueError, match="3 distinct rids"):
            await engine.generate_many(prompts, PARAMS, route_key="tree", rids=["x", "x", "y"])
    assert len(fake.bodies) == 2
    assert fake.bodies[0]["input_ids"] == prompts and fake.bodies[0]["rid"] == ["a", "b", "c"]
    assert [g.output_ids for g in gens] == [[3], [31, 32], [6, 7, 8]]
    assert [g.rid for g in gens] == ["a", "b", "c"]
    assert isinstance(fake.bodies[1]["sampling_params"], dict) and len(shared) == 3


async def test_batch_with_a_missing_item_is_a_protocol_error(fake: ScriptedEngine) -> None:
    async def short(body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response([fake.item(body["input_ids"][0], body["sampling_params"], body["rid"][0])])

    fake.script = [short]
    async with EngineClient([fake.url], **FAST) as engine:
        with pytest.raises(EngineProtocolError, match="1 answers for 2 prompts"):
            await engine.generate_many([[1], [2]], PARAMS, route_key="k")


# ---- routing --------------------------------------------------------------------------------


async def test_route_keys_stick_and_new_keys_go_to_the_least_loaded(fake2: list[ScriptedEngine]) -> None:
    s0, s1 = (e.url for e in fake2)
    go = asyncio.Event()

    async def held(body: dict[str, Any]) -> None:  # the first call to s0 answers only once the test says so
        await go.wait()

    fake2[0].script = [held]  # (a fixed delay raced the routing below on a loaded machine)

    async with EngineClient([s0, s1], **FAST) as engine:
        slow = asyncio.ensure_future(engine.generate([1, 2, 3], PARAMS, route_key="A"))
        for _ in range(1000):  # until the held call is in flight (10 s at most)
            if engine.load() == {s0: 1, s1: 0}:
                break
            await asyncio.sleep(0.01)
        assert engine.route_of("A") == s0
        engine.release("A")  # s0: no keys but one sequence in flight; s1: idle
        assert (await engine.generate([9], PARAMS, route_key="C")).server == s1
        go.set()
        await asyncio.wait_for(slow, 5)
        # idle again: s1 holds key C, s0 none -> a new key goes to s0
        assert (await engine.generate([9], PARAMS, route_key="D")).server == s0
        # every turn of a tree stays on its server, and the server's prefix cache sees it
        turn1 = await engine.generate([4, 5, 6], PARAMS, route_key="D")
        turn2 = await engine.generate([4, 5, 6, *turn1.output_ids, 7], PARAMS, route_key="D")
        assert turn1.server == turn2.server == s0 and turn2.cached_tokens >= 6
        assert engine.route_of("C") == s1 and engine.route_of("A") is None


async def test_route_map_is_a_bounded_lru(fake2: list[ScriptedEngine]) -> None:
    urls = [e.url for e in fake2]
    async with EngineClient(urls, max_route_keys=2, **FAST) as engine:
        for key in ("a", "b"):
            await engine.generate([1], PARAMS, route_key=key)
        await engine.generate([1], PARAMS, route_key="a")  # a is now most recent
        await engine.generate([1], PARAMS, route_key="c")  # evicts b
        assert engine.route_of("b") is None and engine.route_of("a") and engine.route_of("c")
        assert sorted(s.keys for s in engine._servers) == [1, 1]


async def test_concurrency_is_bounded(fake: ScriptedEngine) -> None:
    active = 0
    peak = 0

    async def slow(body: dict[str, Any]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return None

    fake.script = [slow] * 12
    async with EngineClient([fake.url], max_concurrency=3, **FAST) as engine:
        gens = await asyncio.gather(*(engine.generate([i + 1], PARAMS, route_key=f"k{i}") for i in range(12)))
    assert len(gens) == 12 and peak == 3


# ---- control routes -------------------------------------------------------------------------


async def test_flush_cache_retries_while_busy(fake: ScriptedEngine) -> None:
    fake.flush_busy = 2
    async with EngineClient([fake.url], **FAST) as engine:
        await engine.flush_cache(timeout_s=5, poll_s=0.01)
        assert fake.calls == ["flush_cache"] * 3
        fake.flush_busy = 10**6
        with pytest.raises(EngineRequestError, match=r"still refused after \d+ tries"):
            await engine.flush_cache(timeout_s=0.1, poll_s=0.01)


async def test_update_weights_pauses_updates_and_continues(fake2: list[ScriptedEngine]) -> None:
    plain = ScriptedEngine(pause_routes=False)  # like a server without /pause_generation
    await plain.server.start_server()
    try:
        engines = [*fake2, plain]
        async with EngineClient([e.url for e in engines], **FAST) as engine:
            results = await engine.update_weights_from_disk("/ckpt/step-1", "step-1")
            assert all(r.success for r in results.values()) and len(results) == 3
            for e in fake2:
                assert e.calls == ["pause_generation:abort", "update:/ckpt/step-1:step-1:True", "continue_generation"]
            assert plain.calls == ["update:/ckpt/step-1:step-1:True"]
            gen = await engine.generate([1], PARAMS, route_key="k")
            assert gen.weight_version == "step-1"

            fake2[1].update_ok = False
            with pytest.raises(EngineRequestError, match="no such checkpoint"):
                await engine.update_weights_from_disk("/ckpt/missing", "step-2", pause_mode="retract")
            assert fake2[1].calls[-3:] == [
                "pause_generation:retract",
                "update:/ckpt/missing:step-2:True",
                "continue_generation",  # resumed even though the update failed
            ]
            with pytest.raises(ValueError, match="pause_mode"):
                await engine.update_weights_from_disk("/x", "v", pause_mode="later")
    finally:
        await plain.server.close()


async def test_health_and_wait_ready(fake: ScriptedEngine) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EngineClient([fake.url], **FAST) as engine:
        assert await engine.health() == {fake.url: True}
        await engine.wait_ready(timeout_s=2)
    async with EngineClient([fake.url, dead], **FAST) as engine:
        assert await engine.health() == {fake.url: True, dead: False}
        with pytest.raises(EngineUnavailable, match=dead):
            await engine.wait_ready(timeout_s=0.3, poll_s=0.05)


async def test_wait_ready_says_which_engines_it_still_waits_for(
    fake: ScriptedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong --engine-url was a silent wait of engine.startup_timeout_s (10 minutes); now a warning every
    WAIT_SAY_S names the servers not ready, and none while they answer."""
    from structlog.testing import capture_logs

    from trainer.engines import client as client_mod

    monkeypatch.setattr(client_mod, "WAIT_SAY_S", 0.1)
    dead = f"http://127.0.0.1:{free_port()}"
    async with EngineClient([fake.url, dead], **FAST) as engine:
        with capture_logs() as logs, pytest.raises(EngineUnavailable):
            await engine.wait_ready(timeout_s=0.5, poll_s=0.05)
    said = [e for e in logs if e["event"] == "engine_not_ready"]
    assert said and all(e["waiting_for"] == [dead] for e in said), logs
    async with EngineClient([fake.url], **FAST) as engine:
        with capture_logs() as logs:
            await engine.wait_ready(timeout_s=2)
    assert not [e for e in logs if e["event"] == "engine_not_ready"]


async def test_closed_client_refuses_work(fake: ScriptedEngine) -> None:
    engine = EngineClient([fake.url], **FAST)
    await engine.aclose()
    with pytest.raises(Exception, match="closed"):
        await engine.generate([1], PARAMS, route_key="k")


def test_constructor_checks_urls() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EngineClient([])
    with pytest.raises(ValueError, match="http://"):
        EngineClient(["localhost:30000"])
    with pytest.raises(ValueError, match="distinct"):
        EngineClient(["http://a:1", "http://a:1/"])


# ---- the real peer: the project's CPU engine (engine) -----------------------

TINY_TEXTS = [
    f"Doc {i} (Title: City {i}) The city of Varnholt was founded by Ada {i} in {1000 + i}." for i in range(200)
]
TINY_SIZES = {"vocab_size": 512, "hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "max_position": 1024}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models with the same tokenizer and shapes but different weights (seeds 0 and 1)."""
    from tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("engine-client")
    return tuple(  # type: ignore[return-value]
        build_tiny_model(root / f"seed{seed}", seed=seed, texts=TINY_TEXTS, **TINY_SIZES) for seed in (0, 1)
    )


@pytest.fixture
async def cpu_engines(tiny_models: tuple[Path, Path]) -> AsyncIterator[list[str]]:
    """Two CPU engine servers on loopback, each with its own engine (own prefix cache), serving model seed 0."""
    from engine.app import ServerConfig, init_app
    from engine.engine import Engine, EngineConfig

    servers = []
    for _ in range(2):
        engine = Engine(EngineConfig(model_path=tiny_models[0], max_batch=8, cache_tokens=8192))
        app = init_app(ServerConfig(engine=engine.cfg, batch_window_ms=1.0), engine=engine)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
    yield [str(s.make_url("")).rstrip("/") for s in servers]
    for server in servers:
        await server.close()


GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = list(range(20, 60))


async def test_cpu_engine_round_trip(cpu_engines: list[str]) -> None:
    async with EngineClient(cpu_engines[:1], **FAST) as engine:
        await engine.wait_ready(timeout_s=30)
        gen = await engine.generate(PROMPT, GREEDY, route_key="A")
        again = await engine.generate(PROMPT, GREEDY, route_key="A")
        stop = await engine.generate(
            PROMPT, SamplingParams(max_new_tokens=6, stop_token_ids=list(range(512))), route_key="A"
        )
        batch = await engine.generate_many([PROMPT, PROMPT[:30]], GREEDY, route_key="A")
        top = await engine.generate(PROMPT, GREEDY, route_key="A", top_logprobs=4)
    # greedy: each token is its row's best, and the row is the token's own distribution
    assert top.output_ids == gen.output_ids and [len(r) for r in top.top_logprobs] == [4] * 6
    assert [r[0] for r in top.top_logprobs] == pytest.approx(top.logprobs, abs=1e-6) and gen.top_logprobs == []
    assert gen.finish_type == "length" and len(gen.output_ids) == 6 and len(gen.logprobs) == 6
    assert all(lp <= 0 for lp in gen.logprobs) and gen.prompt_tokens == len(PROMPT)
    assert again.output_ids == gen.output_ids  # greedy is deterministic, cached prefix or not
    assert again.cached_tokens == len(PROMPT) - 1  # SGLang's cap: the last prompt token is recomputed
    assert stop.finish_type == "stop" and len(stop.output_ids) == 1 and stop.finish_matched == stop.output_ids[0]
    assert batch[0].output_ids == gen.output_ids and len(batch[1].output_ids) == 6
    assert engine.stats.sequences == 6 and engine.stats.cached_tokens >= len(PROMPT) - 1


async def test_cpu_engines_sticky_routing_reuses_the_prefix_cache(cpu_engines: list[str]) -> None:
    async with EngineClient(cpu_engines, **FAST) as engine:
        t1 = await engine.generate(PROMPT, GREEDY, route_key="A")
        turn2 = [*PROMPT, *t1.output_ids, 7, 8, 9]  # history + an observation
        t2 = await engine.generate(turn2, GREEDY, route_key="A")
        # the same history on the other server (tree B) finds nothing cached there
        other = await engine.generate(turn2, GREEDY, route_key="B")
    assert t1.server == t2.server == cpu_engines[0] and other.server == cpu_engines[1]
    assert t1.cached_tokens == 0 and t2.cached_tokens >= len(PROMPT) + len(t1.output_ids) - 1
    assert other.cached_tokens == 0 and other.output_ids == t2.output_ids


async def test_cpu_engines_weight_update_and_flush(cpu_engines: list[str], tiny_models: tuple[Path, Path]) -> None:
    async with EngineClient(cpu_engines, **FAST) as engine:
        before = {key: await engine.generate(PROMPT, GREEDY, route_key=key) for key in ("A", "B")}
        assert {g.server for g in before.values()} == set(cpu_engines)
        await engine.flush_cache(timeout_s=10)
        assert (await engine.generate(PROMPT, GREEDY, route_key="A")).cached_tokens == 0

        # a long generation in flight is returned as aborted when the update pauses with mode "abort"
        long = asyncio.ensure_future(
            engine.generate(PROMPT, SamplingParams(max_new_tokens=900, ignore_eos=True), route_key="A")
        )
        await asyncio.sleep(0.1)  # on the server and decoding (900 tokens take seconds on this CPU model)
        results = await engine.update_weights_from_disk(str(tiny_models[1]), "1")
        cut = await asyncio.wait_for(long, 30)
        assert cut.aborted and len(cut.output_ids) < 900 and len(cut.logprobs) == len(cut.output_ids)
        assert set(results) == set(cpu_engines) and all(r.success for r in results.values())
        after = {key: await engine.generate(PROMPT, GREEDY, route_key=key) for key in ("A", "B")}
        for key in ("A", "B"):
            assert after[key].weight_version == "1" and after[key].cached_tokens == 0
            # the new weights are in use (random-init greedy often repeats a token, so compare logprobs)
            diff = max(abs(x - y) for x, y in zip(after[key].logprobs, before[key].logprobs, strict=True))
            assert diff > 1e-3, (after[key].logprobs, before[key].logprobs)
        assert engine.stats.aborts == 1


# ---- launcher -------------------------------------------------------------------------------

HEALTH_SERVER = textwrap.dedent(
    """
    import http.server, signal, sys
    status = int(sys.argv[2])
    if sys.argv[3] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health_generate" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("serving", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def _server_cmd(port: int, status: int = 200, mode: str = "normal") -> list[str]:
    return [sys.executable, "-c", HEALTH_SERVER, str(port), str(status), mode]


async def test_launch_engine_waits_until_ready_and_stops_the_group(tmp_path: Any) -> None:
    port = free_port()
    proc = launch_engine(_server_cmd(port), f"http://127.0.0.1:{port}", log_path=tmp_path / "e.log", stop_timeout_s=5)
    async with proc:
        async with EngineClient([proc.url], **FAST) as engine:
            assert await engine.health() == {proc.url: True}
        pid = proc.pid
        assert pid is not None and _group_alive(pid)
    assert proc.returncode is not None and not _group_alive(pid)
    assert "serving" in proc.log_tail()
    await proc.stop()  # idempotent


async def test_launch_engine_fails_fast_with_the_log_tail() -> None:
    cmd = [sys.executable, "-c", "import sys; print('model dir has no config.json'); sys.exit(3)"]
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(EngineLaunchError, match=r"(?s)exited with code 3.*model dir has no config.json"):
        await launch_engine(cmd, f"http://127.0.0.1:{free_port()}", startup_timeout_s=60).start()
    assert asyncio.get_running_loop().time() - t0 < 10


async def test_launch_engine_times_out_and_kills_a_stubborn_process() -> None:
    port = free_port()
    proc = launch_engine(
        _server_cmd(port, status=503, mode="ignore-term"), f"http://127.0.0.1:{port}", startup_timeout_s=1.0
    )
    proc.stop_timeout_s = 0.3  # it ignores SIGTERM: SIGKILL after 0.3 s
    with pytest.raises(EngineLaunchError, match=r"not ready within 1s \(last: HTTP 503"):
        await proc.start()
    assert proc.returncode == -9 and proc.pid is not None and not _group_alive(proc.pid)


async def test_launch_engine_reports_a_missing_program() -> None:
    with pytest.raises(EngineLaunchError, match="cannot run"):
        await launch_engine(["/nonexistent/trace-engine"], "http://127.0.0.1:1").start()


@pytest.mark.skipif(sglang_available(), reason="sglang is installed here")
async def test_sglang_server_without_sglang_says_how_to_install(tmp_path: Any) -> None:
    server = SGLangServer(tmp_path, port=free_port(), extra_args=["--dtype", "bfloat16"])
    assert server.cmd[1:3] == ["-m", "sglang.launch_server"] and "--enable-metrics" in server.cmd
    assert "--skip-tokenizer-init" not in server.cmd and server.cmd[-2:] == ["--dtype", "bfloat16"]
    with pytest.raises(EngineLaunchError, match=r"pip install 'trace-rl\[sglang\]'"):
        async with server:
            pass
    assert server.pid is None


if os.name != "posix":  # process groups and /proc
    pytestmark = pytest.mark.skip(reason="POSIX only")
