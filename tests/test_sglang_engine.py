"""EngineClient against two real SGLang 0.5.23 servers on the tiny model: the `sglang` tier.

Run by `tools/sglang-cpu/run-tests` (venv, CPU switches, a skip counts as a failure there). In the default suite
the module is skipped unless sglang is importable and either CUDA works or SGLang's CPU engine is switched on
(`SGLANG_USE_CPU_ENGINE=1` with an empty `common_ops` module on PYTHONPATH, ../shared/SGLANG_CPU.md says why).

Two servers are started once for the module (35-75 s each on 2 CPU cores), both serving the tiny model in float32
so that the trainer's float32 forward (`trainer.learner.loss.sequence_logprobs`) is the reference for their logprobs.
Every test opens its own `EngineClient`, so route pins start fresh; a test that needs cold caches flushes them,
and the weight update restores the served weights before it returns. Checked:
- a round trip: ids in, ids and one logprob per id out, finish "length", `prompt_tokens`, the weight version;
- stops: a stop token id (finish "stop", the id as `finish_matched`, kept in `output_ids`) and a multi-token stop
  string (finish "stop", the string as `finish_matched`, `output_ids` up to the token that completes it);
- sampled-token logprobs equal the trainer's forward on the same weights at temperature 1 and 0.7 (SGLang returns
  log softmax(logits / T), the distribution it sampled from), within `LOGPROB_ATOL`;
- the prefix cache: turn 2 of a tree reports `cached_tokens` covering turn 1's prompt; a batch of branches too;
  after `flush_cache`, nothing;
- sticky routing: a route key stays on its server; the other server has nothing of that tree cached;
- pause/continue: a request sent while paused completes after continue; one running when paused with mode
  "abort" comes back aborted (counted, partial tokens); with mode "retract" it finishes after continue;
- top logprobs (`top_logprobs_num`): SGLang and our CPU engine answer alike (shape, ids, values), from the tempered
  distribution;
- `update_weights_from_disk` on both servers: the new version on later answers, the cache flushed, logprobs equal
  the trainer's forward on the new weights (and far from the old ones'); restoring the old weights restores them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import ON_SGLANG_CPU, assert_top_logprobs, server_args, sglang_skip_reason

from shared.engine_protocol import SamplingParams
from trainer.engines.client import EngineClient, Generation
from trainer.engines.launcher import SGLangServer, free_port

_REASON = sglang_skip_reason()
pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),  # the first test also waits for both servers to start
]

# Float32 on both sides; what may differ is the kernels' summation order (SGLang's torch_native paged attention
# and native RMSNorm/rotary on CPU, triton on CUDA, vs Hugging Face's forward). Measured on CPU (6 prompts x 32
# sampled tokens, T = 1 and 0.7, before and after a weight update): at most 9.5e-7 apart. CUDA is not measured
# here, hence the margin. Wrong inputs are far off: the T = 1 logprobs of tokens sampled at T = 0.7 differ by
# 0.28 or more per 32 tokens, the old weights' logprobs of tokens sampled after the update by 0.91 or more.
LOGPROB_ATOL = 1e-3
CLIENT = {"max_concurrency": 32, "timeout_s": 300, "retries": 2, "backoff_s": 0.5}
FOUR = SamplingParams(max_new_tokens=4, ignore_eos=True)
# Tokens a request needs to still be decoding ~4 s after it was sent: ~0.1 s a decode step on 2 loaded CPU cores
# (../shared/SGLANG_CPU.md), a few ms on a GPU. 40 was too few on an idle machine: the request finished before the
# pause it was meant to be caught by (2026-12-06).
STILL_RUNNING_TOKENS = 300 if ON_SGLANG_CPU else 1500


@dataclass
class Served:
    """The module's servers and the weights they serve."""

    urls: list[str]
    model_dir: Path  # what the servers loaded at start
    tok: Any  # the tiny model's tokenizer
    model: Any  # the same weights, float32 on CPU, eval mode: the trainer's reference


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("sglang-tiny") / "model", seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs = tmp_path_factory.mktemp("sglang-logs")
    servers = [
        SGLangServer(tiny_dir, port=free_port(), extra_args=server_args(), log_path=logs / f"sglang-{i}.log")
        for i in range(2)
    ]
    started = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
    try:
        for r in started:
            if isinstance(r, BaseException):
                raise r
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        yield Served([s.url for s in servers], tiny_dir, AutoTokenizer.from_pretrained(tiny_dir), model)
    finally:
        await asyncio.gather(*(s.stop() for s in servers))


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def trainer_logprobs(model: Any, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """The trainer's logprob of each of `output`'s tokens after `prompt` (`trainer.learner.loss.sequence_logprobs`)."""
    import torch

    from trainer.learner.loss import sequence_logprobs

    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, torch.ones_like(ids), temperature=temperature)
    return lp[0, len(prompt) :].tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def prompt_of(tok: Any, tag: str, repeat: int = 2) -> list[int]:
    """A prompt no other test sends (`tag` first), > 32 tokens."""
    text = f"[{tag}] Question: who founded the city of Varnholt? Search, then answer with <answer> and </answer>. "
    ids = encode(tok, text * repeat)
    assert len(ids) > 32, len(ids)
    return ids


async def test_round_trip(served: Served) -> None:
    prompt = prompt_of(served.tok, "round trip")
    async with EngineClient(served.urls, **CLIENT) as engine:
        assert await engine.health() == dict.fromkeys(served.urls, True)
        gen = await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), route_key="rt")
        assert gen.server == served.urls[0], "the first key goes to the first of equally loaded servers"
        assert gen.finish_type == "length" and not gen.aborted, gen
        assert len(gen.output_ids) == 8 and len(gen.logprobs) == 8, gen
        assert all(0 <= t < len(served.tok) for t in gen.output_ids), gen.output_ids
        assert all(lp <= 0 for lp in gen.logprobs), gen.logprobs
        assert gen.prompt_tokens == len(prompt) and gen.completion_tokens == 8, gen
        assert gen.weight_version == "default", gen.weight_version
        # one batched call: one answer per prompt, in order
        many = await engine.generate_many(
            [prompt, prompt[:20]], [FOUR, SamplingParams(max_new_tokens=2)], route_key="rt"
        )
        assert [len(g.output_ids) for g in many] == [4, 2] and [g.prompt_tokens for g in many] == [len(prompt), 20]
        assert engine.stats.sequences == 3 and engine.stats.aborts == 0


async def test_stop_token_and_stop_string(served: Served) -> None:
    tok = served.tok
    prompt = prompt_of(tok, "stops")
    async with EngineClient(served.urls, **CLIENT) as engine:
        # every id is a stop token: the first token stops, is kept, and is reported as the match
        stop = await engine.generate(
            prompt, SamplingParams(max_new_tokens=8, stop_token_ids=list(range(len(tok)))), route_key="s"
        )
        assert stop.finish_type == "stop" and len(stop.output_ids) == 1, stop
        assert stop.finish_matched == stop.output_ids[0], stop

        greedy = await engine.generate(
            prompt, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True), route_key="s"
        )
        ids = greedy.output_ids
        # a stop string of two generated tokens whose text is plain ASCII and first complete at that position (a
        # random tiny model's greedy output may repeat one token: then its first two)
        for i in range(len(ids) - 1):
            text = tok.decode(ids[i : i + 2])
            if text.strip() and text.isascii() and "\ufffd" not in text and text not in tok.decode(ids[: i + 1]):
                break
        else:
            pytest.fail(f"no usable two-token stop string in {ids} ({tok.decode(ids)!r})")
        assert len(encode(tok, text)) >= 2, f"{text!r} is one token: not a multi-token stop string"
        end = i + 2
        s = await engine.generate(
            prompt, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=[text]), route_key="s"
        )
        assert s.finish_type == "stop" and s.finish_matched == text, (s, text)
        assert s.output_ids == ids[:end], (s.output_ids, ids, end, text)
        assert tok.decode(s.output_ids).endswith(text), (tok.decode(s.output_ids), text)


async def test_logprobs_equal_the_trainers_forward(served: Served) -> None:
    prompts = [prompt_of(served.tok, f"logprobs {i}", repeat=i + 1) for i in range(3)]
    async with EngineClient(served.urls, **CLIENT) as engine:
        for temperature in (1.0, 0.7):
            params = SamplingParams(max_new_tokens=16, temperature=temperature, ignore_eos=True)
            gens = await engine.generate_many(prompts, params, route_key=f"lp{temperature}")
            for p, g in zip(prompts, gens, strict=True):
                ref = trainer_logprobs(served.model, p, g.output_ids, temperature)
                assert max_diff(g.logprobs, ref) < LOGPROB_ATOL, (temperature, g.logprobs, ref)
            if temperature != 1.0:  # the temperature matters: T=1 logprobs of the same tokens are far off
                off = [
                    max_diff(g.logprobs, trainer_logprobs(served.model, p, g.output_ids))
                    for p, g in zip(prompts, gens, strict=True)
                ]
                assert max(off) > 100 * LOGPROB_ATOL, off


async def test_top_logprobs_answer_alike_on_both_engines(served: Served) -> None:
    """Issue 25: `top_logprobs_num` on real SGLang and on our CPU engine (in this process, same weights): the same
    answer shape (`meta_info.output_top_logprobs`, per output token n x [logprob, token_id, null], largest first;
    absent without return_logprob), and each engine's rows are the trainer's forward's top n on its own output
    (`assert_top_logprobs`: values within LOGPROB_ATOL, near-tied tokens in either order), greedy and at T = 0.7
    (the tempered distribution it sampled from, as for the token's own logprob). Greedy outputs are not compared
    across engines: the tiny model's top tokens are ~1e-4 apart, within what their kernels' rounding may flip."""
    import aiohttp
    import torch
    from aiohttp.test_utils import TestServer

    from engine.app import ServerConfig, init_app
    from engine.engine import EngineConfig

    prompt = prompt_of(served.tok, "top logprobs")
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}}
    cpu = TestServer(init_app(ServerConfig(engine=EngineConfig(model_path=served.model_dir, seed=0))), host="127.0.0.1")
    await cpu.start_server()
    urls = {"sglang": served.urls[0], "cpu": str(cpu.make_url("")).rstrip("/")}
    try:
        answers = {}
        async with aiohttp.ClientSession() as http:
            for name, url in urls.items():
                async with http.post(
                    f"{url}/generate", json={**body, "return_logprob": True, "top_logprobs_num": 5}
                ) as r:
                    assert r.status == 200, await r.text()
                    answers[name] = await r.json()
                async with http.post(f"{url}/generate", json={**body, "top_logprobs_num": 5}) as r:
                    plain = await r.json()
                    assert r.status == 200 and "output_top_logprobs" not in plain["meta_info"], (name, plain)
        sampled = {}
        for name, url in urls.items():
            async with EngineClient([url], **CLIENT) as engine:
                params = SamplingParams(max_new_tokens=8, temperature=0.7, ignore_eos=True)
                sampled[name] = await engine.generate(prompt, params, route_key="top", top_logprobs=4)
    finally:
        await cpu.close()

    def reference(output: list[int], temperature: float) -> torch.Tensor:
        with torch.no_grad():
            logits = served.model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].double()
        return torch.log_softmax(logits / temperature, -1)

    for name, ans in answers.items():
        rows = ans["meta_info"]["output_top_logprobs"]
        assert len(rows) == len(ans["output_ids"]) == 6, name
        assert all(len(r) == 5 and all(len(e) == 3 and e[2] is None for e in r) for r in rows), (name, rows)
        ref = reference(ans["output_ids"], 1.0)
        for i, r in enumerate(rows):
            assert_top_logprobs([(e[0], e[1]) for e in r], ref[i], LOGPROB_ATOL)
        assert [r[0][1] for r in rows] == ans["output_ids"], name  # greedy: its own top token is the one generated
    for name, gen in sampled.items():
        ref = reference(gen.output_ids, 0.7)
        for i, r in enumerate(gen.top_logprobs):
            assert len(r) == 4 and max_diff(r, ref[i].topk(4).values.tolist()) < LOGPROB_ATOL, (name, i, r)


async def test_prefix_cache_and_flush(served: Served) -> None:
    tok = served.tok
    prompt = prompt_of(tok, "prefix cache")
    async with EngineClient(served.urls, **CLIENT) as engine:
        await engine.flush_cache()
        turn1 = await engine.generate(prompt, FOUR, route_key="pc")
        assert turn1.cached_tokens == 0, turn1.cached_tokens
        turn2 = prompt + turn1.output_ids + encode(tok, " <information> Doc 1 </information>")
        g2 = await engine.generate(turn2, FOUR, route_key="pc")
        assert g2.server == turn1.server and g2.cached_tokens >= len(prompt), (g2.cached_tokens, len(prompt))
        # a batch of branches from turn 1's prompt: each is served from the cache
        many = await engine.generate_many([[*prompt, t] for t in turn1.output_ids[:3]], FOUR, route_key="pc")
        assert all(g.server == turn1.server and g.cached_tokens >= len(prompt) for g in many), many
        await engine.flush_cache()
        again = await engine.generate(prompt, FOUR, route_key="pc")
        assert again.cached_tokens == 0, again.cached_tokens


async def test_sticky_routing_over_two_servers(served: Served) -> None:
    tok = served.tok
    prompt = prompt_of(tok, "sticky routing")
    async with EngineClient(served.urls, **CLIENT) as engine:
        await engine.flush_cache()
        a1 = await engine.generate(prompt, FOUR, route_key="tree-A")
        other = encode(tok, "Unrelated tree B: where was the Orrin bridge built? " * 2)
        assert other[0] != prompt[0], "tree B must share no prefix with tree A"
        b1 = await engine.generate(other, FOUR, route_key="tree-B")
        assert [a1.server, b1.server] == served.urls, "the second key goes to the server with fewer keys"
        assert engine.route_of("tree-A") == served.urls[0] and engine.route_of("tree-B") == served.urls[1]
        turn2 = prompt + a1.output_ids + encode(tok, " <information> Doc 2 </information>")
        for _ in range(3):  # every later turn of tree A stays on its server, with its prefix cached
            g = await engine.generate(turn2, FOUR, route_key="tree-A")
            assert g.server == served.urls[0] and g.cached_tokens >= len(prompt), (g.server, g.cached_tokens)
        # the same ids under tree B's key go to the other server, which has none of tree A cached
        gb = await engine.generate(turn2, FOUR, route_key="tree-B")
        assert gb.server == served.urls[1] and gb.cached_tokens == 0, (gb.server, gb.cached_tokens)


async def test_pause_and_continue(served: Served) -> None:
    prompt = prompt_of(served.tok, "pause")
    url = served.urls[0]
    async with EngineClient(served.urls, **CLIENT) as engine:
        # a request sent while paused waits, then completes after continue
        assert await engine.pause_generation(url, "abort") is True
        try:
            waiting = asyncio.create_task(engine.generate(prompt, FOUR, route_key="p"))
            await asyncio.sleep(3.0)
            assert not waiting.done(), "a paused server answered"
        finally:
            await engine.continue_generation(url)
        gen = await asyncio.wait_for(waiting, 120)
        assert gen.server == url and gen.finish_type == "length" and len(gen.output_ids) == 4, gen

        # mode "abort": a running request comes back aborted, with the tokens it had, counted
        running = asyncio.create_task(
            engine.generate(prompt, SamplingParams(max_new_tokens=3000, ignore_eos=True), route_key="p")
        )
        await asyncio.sleep(3.0)  # prefill and a few decode steps (~0.1 s each on CPU)
        assert not running.done()
        await engine.pause_generation(url, "abort")
        try:
            aborted = await asyncio.wait_for(running, 60)
        finally:
            await engine.continue_generation(url)
        assert aborted.aborted and aborted.finish_type == "abort", aborted
        assert len(aborted.output_ids) < 3000 and len(aborted.logprobs) == len(aborted.output_ids), aborted
        assert engine.stats.aborts == 1

        # mode "retract": a running request is re-queued and finishes after continue
        long = SamplingParams(max_new_tokens=STILL_RUNNING_TOKENS, ignore_eos=True)
        running = asyncio.create_task(engine.generate(prompt, long, route_key="p"))
        await asyncio.sleep(1.5)
        assert not running.done(), f"finished before the pause (raise STILL_RUNNING_TOKENS?): {_outcome(running)}"
        await engine.pause_generation(url, "retract")
        try:
            await asyncio.sleep(2.0)
            assert not running.done(), "a request finished while its server was paused"
        finally:
            await engine.continue_generation(url)
        done: Generation = await asyncio.wait_for(running, 120)
        assert done.finish_type == "length" and len(done.output_ids) == STILL_RUNNING_TOKENS, done
        assert engine.stats.aborts == 1


def _outcome(task: asyncio.Task) -> str:
    """What a finished task came back with, for an assertion's message."""
    if task.cancelled():
        return "cancelled"
    return repr(task.exception() or task.result())


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """`src` with noise of the init's scale (std 0.02) added to every tensor: every weight differs, so a partial
    load shows in the logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


async def test_update_weights_from_disk(served: Served, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    new_dir = _perturbed_copy(served.model_dir, tmp_path / "step-1")
    new_model = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
    prompt = prompt_of(served.tok, "weights")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    async with EngineClient(served.urls, **CLIENT) as engine:
        for key in ("w0", "w1"):  # one key per server, with this prompt cached on both
            await engine.generate(prompt, FOUR, route_key=key)
        results = await engine.update_weights_from_disk(str(new_dir), "1")
        try:
            assert set(results) == set(served.urls) and all(r.success for r in results.values()), results
            for key in ("w0", "w1"):
                g = await engine.generate(prompt, params, route_key=key)
                assert g.weight_version == "1" and g.cached_tokens == 0, (g.server, g.weight_version, g.cached_tokens)
                ref = trainer_logprobs(new_model, prompt, g.output_ids)
                assert max_diff(g.logprobs, ref) < LOGPROB_ATOL, (g.server, g.logprobs, ref)
                old = trainer_logprobs(served.model, prompt, g.output_ids)
                assert max_diff(g.logprobs, old) > 100 * LOGPROB_ATOL, (g.server, g.logprobs, old)
        finally:  # the module's other tests expect the weights the servers started with
            await engine.update_weights_from_disk(str(served.model_dir), "restored")
        g = await engine.generate(prompt, params, route_key="w0")
        assert g.weight_version == "restored", g.weight_version
        assert max_diff(g.logprobs, trainer_logprobs(served.model, prompt, g.output_ids)) < LOGPROB_ATOL
