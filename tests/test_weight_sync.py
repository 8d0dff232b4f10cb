"""Weight sync over a process group (`trainer.engines.weight_sync`) against the real CPU engine, over real gloo groups.

Every engine is the project's CPU engine in-process on loopback (`engine.app`, the tiny model in float32); the
trainer's rank 0 and the engines' ranks are real torch gloo groups on 127.0.0.1. "New weights" are the tiny model
plus seeded noise, saved with `save_pretrained` so a fresh engine can load the same weights from disk: that fresh
engine's greedy generation is the reference a push must reproduce: the same tokens, and logprobs to within 1e-3 of
how far the push moved them (`assert_generates`: not to the bit, as float32 kernels may sum in another order when a
tensor's memory differs, on some x86 machines).
Checked: a push equals the disk load and reports its weight version with the cache flushed; small buckets (many
calls) give the same; two engines in one group (world size 3); generations in flight come back aborted and
generation resumes after the push; SGLang's bracket rule (400 outside begin/end); a bad bucket (wrong shape,
unknown name) is a clear error that leaves the old weights serving and the group usable; an engine without the
routes fails the group's creation with its URL in the error. The file takes ~20 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.app import ServerConfig, init_app
from engine.engine import EngineConfig
from shared.engine_protocol import OUTSIDE_BRACKET, SamplingParams, UpdateWeightsFromDistributed
from trainer.engines.client import EngineClient, EngineRequestError
from trainer.engines.weight_sync import WeightSync, WeightSyncError, named_for_push, plan_buckets

PROMPT = [5, 20, 31, 47, 300, 12, 9]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
FAST = {"timeout_s": 60.0, "retries": 0}

State = dict[str, torch.Tensor]
MakeEngine = Callable[[Path], Awaitable[str]]


@pytest.fixture(scope="module")
def new_weights(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[State, Path]:
    """The tiny model plus seeded noise: its state dict (tied head included) and its save_pretrained folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("new-weights") / "model"
    model.save_pretrained(out)
    return model.state_dict(), out


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    servers: list[TestServer] = []

    async def make(model_path: Path) -> str:
        app = init_app(ServerConfig(engine=EngineConfig(model_path=model_path, seed=0), group_timeout_s=60))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield make
    for server in reversed(servers):
        await server.close()


async def greedy(client: EngineClient, route_key: str = "tree") -> tuple[list[int], list[float], str | None, int]:
    g = await client.generate(PROMPT, GREEDY, route_key=route_key)
    assert g.finish_type == "length" and len(g.logprobs) == GREEDY.max_new_tokens
    return g.output_ids, g.logprobs, g.weight_version, g.cached_tokens


def assert_generates(
    got: tuple[list[int], list[float]], want: tuple[list[int], list[float]], old: tuple[list[int], list[float]]
) -> None:
    """`got` is `want`'s greedy generation: the same tokens, and logprobs within 1e-3 of how far the new weights moved
    them from `old`'s (the old weights' generation). Not to the bit: the float32 kernels may sum in another order when
    a tensor's memory differs (loaded from disk, or written in place by a push): a few ulps, ~1e-6 of logprobs ~5 on
    one x86 machine here, while a missing or wrong tensor moves them as far as a push does."""
    assert got[0] == want[0], "the same greedy tokens"
    moved = max(abs(a - b) for a, b in zip(old[1], want[1], strict=True))
    assert moved > 1e-2, f"the new weights move the logprobs by only {moved}: this check could not tell"
    off = max(abs(a - b) for a, b in zip(got[1], want[1], strict=True))
    assert off <= 1e-3 * moved, f"logprobs {off} from the reference's, the push moved them {moved}"


async def reference(make_engine: MakeEngine, model_dir: Path) -> tuple[list[int], list[float]]:
    """Greedy ids and logprobs of a fresh engine that loaded `model_dir` from disk."""
    async with EngineClient([await make_engine(model_dir)], **FAST) as client:
        ids, lps, _, _ = await greedy(client)
    return ids, lps


async def test_push_equals_a_fresh_engine_loading_the_same_weights_from_disk(
    tiny_model: Path, new_weights: tuple[State, Path], make_engine: MakeEngine
) -> None:
    state, new_dir = new_weights
    url = await make_engine(tiny_model)
    want = await reference(make_engine, new_dir)
    async with EngineClient([url], **FAST) as client:
        before = await greedy(client)
        assert before[2] == "default" and (before[0], before[1]) != want
        async with WeightSync.open(client, timeout_s=60) as sync:
            assert sync.backend == "gloo" and sync.world_size == 2 and sync.ranks == {url: 1}
            timings = await sync.push(state, version="7")
            group = sync.group_name
        # the tied head is the embedding's tensor: not sent; one bucket at the default size
        assert "lm_head.weight" in state and timings.skipped == 1 and timings.tensors == len(state) - 1
        assert timings.buckets == 1 and timings.bytes == sum(
            t.numel() * t.element_size() for k, t in state.items() if k != "lm_head.weight"
        )
        ids, lps, version, cached = await greedy(client)
        assert_generates((ids, lps), want, before[:2])
        assert version == "7" and cached == 0  # the prompt cached before the push was flushed
        assert (await client.server_info())[url]["weight_version"] == "7"
        # close() destroyed the group on the engine
        with pytest.raises(EngineRequestError, match="does not exist"):
            await client.destroy_weights_update_group(url, group)


async def test_small_buckets_send_the_same_weights_in_many_calls(
    tiny_model: Path, new_weights: tuple[State, Path], make_engine: MakeEngine
) -> None:
    state, new_dir = new_weights
    url = await make_engine(tiny_model)
    want = await reference(make_engine, new_dir)
    async with EngineClient([url], **FAST) as client, WeightSync.open(client, bucket_bytes=256 << 10) as sync:
        old = await greedy(client)
        timings = await sync.push(state, version="small")
        assert timings.buckets >= 10, timings
        ids, lps, version, _ = await greedy(client)
    assert_generates((ids, lps), want, old[:2])
    assert version == "small"


async def test_two_engines_in_one_group(
    tiny_model: Path, new_weights: tuple[State, Path], make_engine: MakeEngine
) -> None:
    state, new_dir = new_weights
    urls = [await make_engine(tiny_model), await make_engine(tiny_model)]
    want = await reference(make_engine, new_dir)
    old = await reference(make_engine, tiny_model)
    async with EngineClient(urls, **FAST) as client:
        async with WeightSync.open(client, bucket_bytes=2 << 20) as sync:
            assert sync.world_size == 3 and sync.ranks == {urls[0]: 1, urls[1]: 2}
            await sync.push(state, version="3")
        for key, url in (("a", urls[0]), ("b", urls[1])):  # new keys go to the least-loaded server, then list order
            g = await client.generate(PROMPT, GREEDY, route_key=key)
            assert g.server == url and g.weight_version == "3"
            assert_generates((g.output_ids, g.logprobs), want, old)


async def test_a_push_aborts_generations_in_flight_and_resumes_generation(
    tiny_model: Path, new_weights: tuple[State, Path], make_engine: MakeEngine
) -> None:
    state, new_dir = new_weights
    url = await make_engine(tiny_model)
    want = await reference(make_engine, new_dir)
    long = SamplingParams(max_new_tokens=3000, temperature=1.0, ignore_eos=True)  # ~10 s of decoding
    async with EngineClient([url], **FAST) as client, WeightSync.open(client) as sync:
        old = await greedy(client)
        task = asyncio.create_task(client.generate(PROMPT, long, route_key="long"))
        for _ in range(500):
            if (await client.server_info())[url]["running"]:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the long generation never started")
        await sync.push(state, version="9")
        g = await task
        assert g.aborted and len(g.output_ids) < long.max_new_tokens and g.weight_version != "9"
        ids, lps, version, _ = await greedy(client)  # generation resumed, on the new weights
        assert_generates((ids, lps), want, old[:2])
        assert version == "9"


async def test_update_outside_the_bracket_answers_400_as_sglang(tiny_model: Path, make_engine: MakeEngine) -> None:
    url = await make_engine(tiny_model)
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[256]], "group_name": "g"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/update_weights_from_distributed", json=body) as resp:
            assert resp.status == 400
            assert await resp.json() == {"success": False, "message": OUTSIDE_BRACKET}
        async with http.post(url + "/end_weight_update", json={}) as resp:
            assert resp.status == 400 and "no weight-update session is open" in (await resp.json())["message"]
    async with EngineClient([url], **FAST) as client:
        req = UpdateWeightsFromDistributed(names=["model.norm.weight"], dtypes=["float32"], shapes=[[256]])
        with pytest.raises(EngineRequestError, match="must run between begin_weight_update") as err:
            await client.update_weights_from_distributed(url, req)
        assert err.value.status == 400 and err.value.url == url
        assert (await client.begin_weight_update(url)).success
        with pytest.raises(EngineRequestError, match="already open"):
            await client.begin_weight_update(url)
        # inside the bracket, an unknown group is refused without receiving anything
        with pytest.raises(EngineRequestError, match="Group weight_update_group not in"):
            await client.update_weights_from_distributed(url, req)
        assert (await client.end_weight_update(url)).success
        ids, lps, version, _ = await greedy(client)  # still serving
        assert version == "default" and len(ids) == len(lps) == GREEDY.max_new_tokens


async def test_a_bad_bucket_is_a_clear_error_and_the_old_weights_keep_serving(
    tiny_model: Path, new_weights: tuple[State, Path], make_engine: MakeEngine
) -> None:
    state, new_dir = new_weights
    url = await make_engine(tiny_model)
    want = await reference(make_engine, new_dir)
    async with EngineClient([url], **FAST) as client, WeightSync.open(client) as sync:
        before = await greedy(client)
        wrong_shape = {**state, "model.norm.weight": state["model.norm.weight"][:-1]}
        with pytest.raises(WeightSyncError) as err:
            await sync.push(wrong_shape, version="bad")
        msg = str(err.value)
        assert url in msg and "bucket 1" in msg and "shape mismatch" in msg and "model.norm.weight" in msg, msg
        assert "out of step" not in msg  # the engine received the bucket before refusing it
        unknown = {**state, "model.extra.weight": torch.zeros(3)}
        with pytest.raises(WeightSyncError, match=r"does not have: \['model.extra.weight'\]"):
            await sync.push(unknown, version="bad")
        # generation was resumed; the refused pushes flushed nothing (the prompt is still cached) ...
        ids, _, version, cached = await greedy(client)
        assert ids == before[0] and version == "default" and cached > 0
        # ... and the old weights are served: from an empty cache, the same logprobs to the bit
        await client.flush_cache()
        ids, lps, version, cached = await greedy(client)
        assert (ids, lps, version, cached) == (*before[:3], 0)
        # the group is still in step: the next push goes through
        await sync.push(state, version="good")
        ids, lps, version, _ = await greedy(client)
        assert_generates((ids, lps), want, before[:2])
        assert version == "good"


async def test_an_engine_that_cannot_join_fails_the_group_with_its_url() -> None:
    """A server that reports a CPU device but has no group routes: the error names it and the route's 404."""

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"tp_size": 1, "dp_size": 1, "device": "cpu"})

    app = web.Application()
    app.router.add_get("/get_server_info", info)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with EngineClient([url], **FAST) as client:
            with pytest.raises(WeightSyncError) as err:
                await WeightSync.create(client, timeout_s=1)
        msg = str(err.value)
        assert "forming weight group" in msg and f"{url}/init_weights_update_group answered 404" in msg, msg
    finally:
        await server.close()
    # rank 0's rendezvous thread waits out its timeout: let it end here, not during interpreter exit (a daemon
    # thread that leaves torch's C++ code after finalisation aborts the process: "terminate called ...")
    for _ in range(100):
        if not any(t.name.startswith("weight-sync-") for t in threading.enumerate()):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("rank 0's rendezvous thread outlived its 1 s timeout by 10 s")


def test_buckets_keep_order_and_size_and_drop_only_a_tied_head() -> None:
    t = {f"w{i}": torch.zeros(n, dtype=torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])}  # 40 B per 10
    buckets = list(plan_buckets(t.items(), bucket_bytes=80))
    assert [b.names for b in buckets] == [["w0", "w1"], ["w2"], ["w3", "w4", "w5"]]  # w2 (120 B) alone
    assert [b.nbytes for b in buckets] == [80, 120, 60]

    embed = torch.ones(4, 2)
    skipped: list[str] = []
    tied = [("lm_head.weight", embed), ("model.embed_tokens.weight", embed), ("model.norm.weight", torch.ones(2))]
    assert [n for n, _ in named_for_push(tied, skipped)] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert skipped == ["lm_head.weight"]
    skipped = []
    untied = [("lm_head.weight", embed.clone()), ("model.embed_tokens.weight", embed)]
    assert [n for n, _ in named_for_push(untied, skipped)] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert skipped == []


async def test_the_loop_streams_a_policy_s_weights_bucket_by_bucket(
    new_weights: tuple[State, Path], make_engine: MakeEngine, tiny_model: Path
) -> None:
    """Issue 23: the loop's group push (`trainer.loop._push_group`) sends `Policy.weight_stream`'s buckets as they
    are gathered, with no whole-model dict: the engine then generates as a fresh engine that loaded the
    policy's own `save` of the same weights, over several buckets (1 MB each)."""
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.policy import Policy
    from trainer.loop import _push_group

    _, new_dir = new_weights
    policy = Policy(new_dir, ModelConfig(device="cpu", weight_bucket_mb=1), OptimConfig())
    saved = policy.save(new_dir.parent / "policy-save")
    want = await reference(make_engine, saved)
    url = await make_engine(tiny_model)
    async with EngineClient([url], **FAST) as client, WeightSync.open(client, bucket_bytes=1 << 20) as sync:
        old = await greedy(client)
        await _push_group(sync, policy, 3)
        ids, lps, version, _ = await greedy(client)
        pushed = sync.pushes
    assert_generates((ids, lps), want, old[:2])
    assert version == "3" and pushed == 1
    assert len(policy.weight_plan(bucket_bytes=1 << 20)) > 2
