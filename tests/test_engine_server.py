"""The CPU engine server on loopback, on a tiny model built once per session (engine/).

Checks SGLang's /generate semantics (greedy = argmax of the model, logprobs = log_softmax at the sampled token,
stop tokens/strings, length), batching (a request's tokens do not depend on its batch), the radix prefix cache
(cached_tokens is the true shared-prefix length; branches hit it; flush resets it), weight updates, pause/abort,
and that malformed input answers 400 without hurting the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from conftest import assert_top_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.app import ServerConfig, init_app
from engine.engine import Engine, EngineConfig
from engine.radix_cache import RadixKVCache
from engine.sampling import sample_tokens
from shared.engine_protocol import SamplingParams
from tools.tiny_model import build_tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("engine") / "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Iterator[Engine]:
    """One engine for the session. Single-threaded torch (as `trace-engine serve` on 2 cores): with 2 threads on a
    loaded 2-core machine the tests ran 5-10x slower. The process-wide setting is restored afterwards."""
    threads = torch.get_num_threads()
    yield Engine(EngineConfig(model_path=model_dir, max_batch=8, cache_tokens=4096, threads=1))
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ref_model(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[TestClient]:
    app = init_app(ServerConfig(engine=engine.cfg, batch_window_ms=2.0), engine=engine)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c
    assert not engine.running and not engine.waiting


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(11, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def gen(client: TestClient, ids: Any, status: int = 200, **body: Any) -> Any:
    sp = body.pop("sampling_params", {})
    resp = await client.post("/generate", json={"input_ids": ids, "sampling_params": sp, **body})
    data = await resp.json()
    assert resp.status == status, data
    return data


async def wait_running(client: TestClient) -> None:
    """Until the engine is decoding something (polls the server, up to ~10 s on a loaded machine)."""
    for _ in range(1000):
        if (await (await client.get("/get_server_info")).json())["running"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no request started running")


@torch.no_grad()
def greedy_reference(model: Any, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Argmax loop recomputing the whole sequence each step (no KV cache), and log_softmax at each token."""
    ids, out, lps = list(ids), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        ids.append(tok)
    return out, lps


@torch.no_grad()
def logprobs_of(model: Any, ids: list[int], out: list[int], temperature: float = 1.0) -> list[float]:
    logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None]).squeeze(1).tolist()


async def test_health_says_what_it_is(client: TestClient) -> None:
    h = await (await client.get("/health")).json()
    assert h["engine"] == "trace-cpu-engine" and "not SGLang" in h["note"]
    assert (await client.get("/health_generate")).status == 200
    info = await (await client.get("/get_server_info")).json()
    assert info["vocab_size"] == 2048 and info["eos_token_ids"] == [2] and info["weight_version"] == "default"


async def test_greedy_matches_model_and_logprobs(client: TestClient, ref_model: Any) -> None:
    ids = prompt(30, 1)
    r = await gen(client, ids, sampling_params={**GREEDY, "max_new_tokens": 12}, return_logprob=True)
    want, want_lp = greedy_reference(ref_model, ids, 12)
    assert r["output_ids"] == want
    lps = r["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == want and all(x is None for *_, x in lps)
    assert [lp for lp, _, _ in lps] == pytest.approx(want_lp, abs=1e-4)
    meta = r["meta_info"]
    assert meta["prompt_tokens"] == 30 and meta["completion_tokens"] == 12
    assert meta["finish_reason"] == {"type": "length", "length": 12}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_sampled_logprobs_are_temperature_scaled_log_softmax(
    client: TestClient, ref_model: Any, temperature: float
) -> None:
    ids = prompt(20, 2)
    sp = {"temperature": temperature, "top_k": 50, "top_p": 0.9, "max_new_tokens": 10, "ignore_eos": True}
    r = await gen(client, ids, sampling_params=sp, return_logprob=True)
    out = r["output_ids"]
    got = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
    # SGLang: log_softmax(logits / T) before top-k/top-p truncation
    assert got == pytest.approx(logprobs_of(ref_model, ids, out, temperature), abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_top_logprobs_answer_as_sglang(client: TestClient, ref_model: Any, temperature: float) -> None:
    """`top_logprobs_num` (SGLang's `output_top_logprobs`): per output token the n largest logprobs of the distribution
    the token's own logprob is from (tempered before truncation; untempered for greedy), largest first, as
    [logprob, token_id, null]; per prompt in a batch; nothing without return_logprob, as SGLang."""
    ids = prompt(24, 7)
    sp = {"temperature": temperature, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True}
    r = await gen(client, ids, sampling_params=sp, return_logprob=True, top_logprobs_num=5)
    out, meta = r["output_ids"], r["meta_info"]
    top = meta["output_top_logprobs"]
    assert len(top) == len(out) == 8 and all(len(row) == 5 and all(x is None for *_, x in row) for row in top)
    with torch.no_grad():
        logits = ref_model(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1].double()
    ref = torch.log_softmax(logits / (temperature or 1.0), -1)
    for i, row in enumerate(top):
        assert_top_logprobs([(lp, t) for lp, t, _ in row], ref[i], 1e-4)
        own = meta["output_token_logprobs"][i]
        hit = [lp for lp, t, _ in row if t == own[1]]
        assert own[0] <= row[0][0] + 1e-6 and (not hit or hit[0] == pytest.approx(own[0], abs=1e-6))
    if temperature == 0.0:
        assert [row[0][1] for row in top] == out  # greedy: the top token is the one generated
    batch = await gen(client, [ids, ids[:10]], sampling_params=sp, return_logprob=True, top_logprobs_num=[3, 0])
    assert [len(row) for row in batch[0]["meta_info"]["output_top_logprobs"]] == [3] * 8
    assert "output_top_logprobs" not in batch[1]["meta_info"]
    plain = await gen(client, ids, sampling_params=sp, top_logprobs_num=5)
    assert "output_top_logprobs" not in plain["meta_info"] and "output_token_logprobs" not in plain["meta_info"]


async def test_stop_token_ids_and_ignore_eos(client: TestClient, ref_model: Any) -> None:
    ids = prompt(25, 3)
    full, _ = greedy_reference(ref_model, ids, 10)
    stop = full[4]
    k = full.index(stop)
    r = await gen(client, ids, sampling_params={"temperature": 0.0, "max_new_tokens": 10, "stop_token_ids": [stop]})
    assert r["output_ids"] == full[: k + 1]  # the matched stop token stays in output_ids
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    sp = {"temperature": 0.0, "max_new_tokens": 10, "stop_token_ids": [stop], "ignore_eos": True}
    r = await gen(client, ids, sampling_params=sp)
    assert r["output_ids"] == full and r["meta_info"]["finish_reason"]["type"] == "length"


async def test_stop_strings(client: TestClient, ref_model: Any, model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = prompt(25, 4)
    full, _ = greedy_reference(ref_model, ids, 10)
    piece = tok.decode(full[5:6]).strip() or tok.decode(full[5:7])
    k = next(i for i in range(len(full)) if piece in tok.decode(full[: i + 1]))
    r = await gen(client, ids, sampling_params={**GREEDY, "max_new_tokens": 10, "stop": [piece]})
    assert r["output_ids"] == full[: k + 1]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": piece}
    text = tok.decode(full[: k + 1])
    assert r["text"] == text[: text.find(piece)]
    r = await gen(client, ids, sampling_params={**GREEDY, "max_new_tokens": 10, "stop": piece, "no_stop_trim": True})
    assert r["text"] == text


async def test_neutral_sglang_sampling_keys_are_accepted(client: TestClient) -> None:
    sp = {**GREEDY, "max_new_tokens": 2, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "regex": None}
    assert len((await gen(client, [5, 6], sampling_params=sp))["output_ids"]) == 2


async def test_batch_answers_in_order_and_matches_singles(client: TestClient) -> None:
    prompts = [prompt(n, 10 + n) for n in (7, 40, 19, 3)]
    sp = {**GREEDY, "max_new_tokens": 8}
    singles = [await gen(client, p, sampling_params=sp, return_logprob=True) for p in prompts]
    batch = await gen(client, prompts, sampling_params=sp, return_logprob=True, rid=["a", "b", "c", "d"])
    assert isinstance(batch, list) and [b["meta_info"]["id"] for b in batch] == ["a", "b", "c", "d"]
    for s, b in zip(singles, batch, strict=True):
        assert b["output_ids"] == s["output_ids"]
        assert [x[0] for x in b["meta_info"]["output_token_logprobs"]] == pytest.approx(
            [x[0] for x in s["meta_info"]["output_token_logprobs"]], abs=1e-4
        )


async def test_concurrent_requests_decode_together_with_identical_results(client: TestClient, engine: Engine) -> None:
    """Rows of different lengths share one left-padded batch, join and leave it at different steps, and wait for a
    slot when more than max_batch (8) arrive; each must equal its run alone."""
    prompts = [prompt(n, 20 + n) for n in (5, 64, 21, 33, 2, 50, 9, 17, 40, 3, 26, 12)]
    lengths = [12, 4, 9, 12, 7, 1, 10, 3, 6, 12, 2, 8]
    alone = [
        await gen(client, p, sampling_params={**GREEDY, "max_new_tokens": m}, return_logprob=True)
        for p, m in zip(prompts, lengths, strict=True)
    ]
    await client.post("/flush_cache")
    before = dict(engine.stats)
    together = await asyncio.gather(
        *(
            gen(client, p, sampling_params={**GREEDY, "max_new_tokens": m}, return_logprob=True)
            for p, m in zip(prompts, lengths, strict=True)
        )
    )
    assert engine.stats["generated_tokens"] - before["generated_tokens"] == sum(lengths)
    rows, steps = (engine.stats[k] - before[k] for k in ("decode_rows", "decode_steps"))
    assert rows / steps > 2, f"{rows} rows in {steps} decode steps: requests were not batched"
    for a, t in zip(alone, together, strict=True):
        assert t["output_ids"] == a["output_ids"]
        lp_t = [x[0] for x in t["meta_info"]["output_token_logprobs"]]
        assert lp_t == pytest.approx([x[0] for x in a["meta_info"]["output_token_logprobs"]], abs=1e-4)


async def test_prefix_cache_reports_true_shared_prefix(client: TestClient) -> None:
    assert (await client.post("/flush_cache")).status == 200
    p = prompt(50, 5)
    a = await gen(client, p, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert a["meta_info"]["cached_tokens"] == 0
    # next turn of the same episode: prompt + output + observation; every token with KV (all but the last output)
    obs = prompt(6, 6)
    b = await gen(client, p + a["output_ids"] + obs, sampling_params={**GREEDY, "max_new_tokens": 4})
    assert b["meta_info"]["cached_tokens"] == len(p) + len(a["output_ids"]) - 1
    # a branch sharing only the first 30 prompt tokens
    other = p[:30] + [t + 1 if t < 2047 else 11 for t in p[30:]]
    c = await gen(client, other, sampling_params={**GREEDY, "max_new_tokens": 2})
    assert c["meta_info"]["cached_tokens"] == 30
    # the same prompt again: all but its last token (whose logits are needed) come from the cache
    d = await gen(client, p, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert d["meta_info"]["cached_tokens"] == len(p) - 1 and d["output_ids"] == a["output_ids"]


async def test_branches_share_the_prefix_and_flush_resets(client: TestClient) -> None:
    assert (await client.post("/flush_cache")).status == 200
    p = prompt(80, 7)
    sp = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True}
    out = await gen(client, [p] * 8, sampling_params=sp)
    cached = sorted(o["meta_info"]["cached_tokens"] for o in out)
    assert cached == [0] + [len(p) - 1] * 7, cached
    info = await (await client.get("/get_server_info")).json()
    assert info["cache_tokens_used"] >= len(p)
    assert (await client.post("/flush_cache")).status == 200
    info = await (await client.get("/get_server_info")).json()
    assert info["cache_tokens_used"] == 0
    again = await gen(client, p, sampling_params=sp)
    assert again["meta_info"]["cached_tokens"] == 0


async def test_abort_and_flush_refused_while_running(client: TestClient) -> None:
    task = asyncio.create_task(
        gen(client, prompt(10, 8), sampling_params={**GREEDY, "max_new_tokens": 2000}, rid="long")
    )
    await wait_running(client)
    resp = await client.post("/flush_cache")
    assert resp.status == 400 and "pending" in await resp.text()
    assert (await client.post("/abort_request", json={"rid": "long"})).status == 200
    r = await task
    assert r["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(r["output_ids"]) < 2000


async def test_pause_retract_continue_gives_the_same_tokens(client: TestClient, engine: Engine) -> None:
    p = prompt(15, 9)
    sp = {**GREEDY, "max_new_tokens": 60}
    plain = await gen(client, p, sampling_params=sp)
    task = asyncio.create_task(gen(client, p, sampling_params=sp))
    await wait_running(client)
    assert (await client.post("/pause_generation", json={"mode": "retract"})).status == 200
    assert not engine.running and any(s.output_ids for s in engine.waiting), "nothing was retracted mid-generation"
    assert (await client.post("/flush_cache")).status == 200  # nothing runs while retracted
    assert (await client.post("/continue_generation", json={})).status == 200
    assert (await task)["output_ids"] == plain["output_ids"]


async def test_pause_abort_then_continue(client: TestClient) -> None:
    running = asyncio.create_task(gen(client, prompt(10, 12), sampling_params={**GREEDY, "max_new_tokens": 2000}))
    await wait_running(client)
    assert (await client.post("/pause_generation", json={"mode": "abort"})).status == 200
    r = await running
    assert r["meta_info"]["finish_reason"]["type"] == "abort" and len(r["output_ids"]) < 2000
    assert (await client.get("/health_generate")).status == 503
    waiting = asyncio.create_task(gen(client, prompt(5, 13), sampling_params={**GREEDY, "max_new_tokens": 3}))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # new requests wait while paused
    assert (await client.post("/continue_generation", json={})).status == 200
    assert len((await waiting)["output_ids"]) == 3


async def test_pause_in_place_keeps_requests_and_abort_answers_while_paused(client: TestClient) -> None:
    task = asyncio.create_task(
        gen(client, prompt(10, 14), sampling_params={**GREEDY, "max_new_tokens": 2000}, rid="held")
    )
    await wait_running(client)
    assert (await client.post("/pause_generation", json={"mode": "in_place"})).status == 200
    assert (await client.post("/flush_cache")).status == 400  # a request still holds its place
    await asyncio.sleep(0.05)
    assert not task.done()
    assert (await client.post("/abort_request", json={"rid": "held"})).status == 200
    r = await asyncio.wait_for(task, 5)  # answered while still paused
    assert r["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await client.post("/continue_generation", json={})).status == 200


async def test_update_weights_from_disk(client: TestClient, model_dir: Path, tmp_path: Path) -> None:
    p = prompt(20, 11)
    sp = {**GREEDY, "max_new_tokens": 8}
    before = await gen(client, p, sampling_params=sp)
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    resp = await client.post("/update_weights_from_disk", json={"model_path": str(other), "weight_version": "v1"})
    assert resp.status == 200 and (await resp.json())["success"] is True
    after = await gen(client, p, sampling_params=sp)
    assert after["output_ids"] != before["output_ids"]
    assert after["meta_info"]["weight_version"] == "v1"
    assert after["meta_info"]["cached_tokens"] == 0  # the update flushed the old weights' KV
    wrong = build_tiny_model(tmp_path / "wide", seed=0, hidden_size=128, heads=2, kv_heads=1)
    resp = await client.post("/update_weights_from_disk", json={"model_path": str(wrong)})
    body = await resp.json()
    assert resp.status == 400 and body["success"] is False and "shape mismatch" in body["message"]
    resp = await client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
    assert resp.status == 400
    assert (await gen(client, p, sampling_params=sp))["output_ids"] == after["output_ids"]  # unchanged by failures
    resp = await client.post("/update_weights_from_disk", json={"model_path": str(model_dir), "weight_version": "v2"})
    assert resp.status == 200
    restored = await gen(client, p, sampling_params=sp)
    assert restored["output_ids"] == before["output_ids"] and restored["meta_info"]["weight_version"] == "v2"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"input_ids": ["a", "b"]}, "must be ints"),
        ({"input_ids": [1.5]}, "must be ints"),
        ({"input_ids": [True]}, "must be ints"),
        ({"input_ids": [3, 999999]}, "[0, 2048)"),
        ({"input_ids": [-1]}, "[0, 2048)"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": [[1, 2], []]}, "empty"),
        ({"input_ids": [[1, 2], 3]}, "mixes"),
        ({"sampling_params": {}}, "input_ids"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": "x"}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 5000}}, "context length"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "batch of 2"),
        ({"input_ids": [1], "sampling_params": {"repetition_penalty": 1.2}}, "not supported"),
        ({"input_ids": [1], "sampling_params": {"bogus": 1}}, "unknown sampling parameter"),
        ({"input_ids": [1], "sampling_params": [1]}, "$.sampling_params[0]"),
        ({"input_ids": [1], "stream": True}, "stream"),
        ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len"),
        ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
        ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": 4096}, "top_logprobs_num"),
        ({"input_ids": [[1], [2]], "return_logprob": True, "top_logprobs_num": [3]}, "batch of 2"),
        ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": "5"}, "top_logprobs_num"),
    ],
)
async def test_malformed_requests_answer_400(client: TestClient, body: dict[str, Any], fragment: str) -> None:
    resp = await client.post("/generate", json=body)
    data = await resp.json()
    assert resp.status == 400, data
    assert fragment in data["error"]["message"], data


async def test_garbage_bodies_answer_400_and_server_survives(client: TestClient) -> None:
    for raw in (b"not json", b"[1, 2]", b'{"input_ids": {"a": 1}}', b""):
        resp = await client.post("/generate", data=raw)
        assert resp.status == 400, raw
        assert "message" in (await resp.json())["error"]
    assert (await client.post("/update_weights_from_disk", data=b"{}")).status == 400
    assert (await client.post("/pause_generation", json={"mode": "bogus"})).status == 400
    assert (await client.get("/health_generate")).status == 200


def test_sample_tokens_semantics() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.1, 0.2, 3.0, 0.0], [1.0, 1.0, 1.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    ps = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=1),
        SamplingParams(temperature=2.0, top_p=0.01),
    ]
    toks, lps, top = sample_tokens(logits, ps, g, top_n=[4, 0, 1])
    assert toks == [0, 2, 3]
    # top logprobs: the same distribution as the token's logprob, largest first; none for a row that asked for none
    assert top[1] is None and [t for _, t in top[0]] == [0, 1, 2, 3] and [t for _, t in top[2]] == [3]
    assert [lp for lp, _ in top[0]] == pytest.approx(torch.log_softmax(logits[0], -1).tolist(), abs=1e-6)
    assert top[2][0][0] == pytest.approx(float(torch.log_softmax(logits[2] / 2.0, -1)[3]), abs=1e-6)
    want = [
        torch.log_softmax(logits[0], -1)[0],  # greedy: untempered
        torch.log_softmax(logits[1] / 0.5, -1)[2],  # tempered, before the top-k cut
        torch.log_softmax(logits[2] / 2.0, -1)[3],
    ]
    assert lps == pytest.approx([float(w) for w in want], abs=1e-6)
    _, orig, _ = sample_tokens(logits, ps, g, original_logprob=True)
    assert orig == pytest.approx([float(torch.log_softmax(logits[i], -1)[t]) for i, t in enumerate(toks)], abs=1e-6)
    # top_k=2 never leaves the two best; min_p=0.9 keeps only near-max tokens
    many = logits[[0]].repeat(400, 1)
    toks = sample_tokens(many, [SamplingParams(top_k=2)] * 400, g).tokens
    assert set(toks) == {0, 1}
    toks = sample_tokens(many, [SamplingParams(min_p=0.9)] * 400, g).tokens
    assert set(toks) == {0}


def test_radix_cache_split_match_evict() -> None:
    def kv_for(ids: list[int]) -> Any:
        t = torch.tensor(ids, dtype=torch.float32)[None, :, None]  # [heads=1, n, dim=1]: value = token id
        return lambda a, b: [(t[:, a:b], -t[:, a:b])]

    c = RadixKVCache(capacity=12)
    c.insert([1, 2, 3, 4, 5], kv_for([1, 2, 3, 4, 5]))
    c.insert([1, 2, 3, 9, 9, 9], kv_for([1, 2, 3, 9, 9, 9]))  # splits after [1, 2, 3]
    assert c.total_tokens == 8 and c.node_count() == 3
    n, segments = c.match([1, 2, 3, 9, 9, 7], limit=6)
    assert n == 5 and len(segments) == 2  # [1, 2, 3] then [9, 9] of the [9, 9, 9] node
    kv = RadixKVCache.concat(segments)
    assert kv[0][0].flatten().tolist() == [1, 2, 3, 9, 9]
    assert kv[0][1].flatten().tolist() == [-1, -2, -3, -9, -9]
    assert c.match([1, 2, 3, 4, 5], limit=4)[0] == 4
    assert c.match([7], limit=1) == (0, [])
    c.match([1, 2, 3, 9], limit=4)  # touch the 9-branch: the 4-branch is now least recently used
    c.insert([5, 5, 5, 5, 5, 5], kv_for([5, 5, 5, 5, 5, 5]))  # 14 tokens > 12: evict LRU leaf [4, 5]
    assert c.total_tokens == 12
    assert c.match([1, 2, 3, 4, 5], limit=5)[0] == 3 and c.match([1, 2, 3, 9, 9, 9], limit=6)[0] == 6
    c.flush()
    assert c.total_tokens == 0 and c.match([1, 2], limit=2) == (0, [])
