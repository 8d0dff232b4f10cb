"""EngineClient against real SGLang (on a GPU, or on CPU): the same client and assertions as the CPU tests.

Skipped unless sglang is importable (`pip install 'trace-rl[sglang]'`) and either CUDA works or SGLang's CPU
engine is switched on (`SGLANG_USE_CPU_ENGINE=1` with the `common_ops` shim on PYTHONPATH: `bash .ci/sglang-tier`
sets both, ../shared/SGLANG_CPU.md says why). One test,
because starting SGLang takes a minute or more: it builds the tiny model, launches two SGLang
servers with `SGLangServer` (small memory fraction each, so both fit on one GPU) and checks
- a round trip: ids in, ids and one logprob per id out, finish reasons "length" and "stop";
- the prefix cache and sticky routing: the second turn of a tree on its pinned server reports
  `cached_tokens` covering the first turn's prompt, while the other server has none of it;
- a batched `generate_many`, `health`, `flush_cache`;
- `update_weights_from_disk`: pause -> update -> continue on both servers, the new
  `weight_version` on later answers, the cache flushed, and the new weights in use (they make the
  output distribution much sharper, so the sampled tokens' logprobs rise).
The server flags favour a fast start over speed: triton attention, torch sampling, no CUDA graphs
(all checked against sglang 0.5.23's own argument parser).
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import pytest

from shared.engine_protocol import SamplingParams
from trainer.engine_client import EngineClient
from trainer.sglang_launcher import SGLangServer, free_port, sglang_available


def _why_skip() -> str | None:
    if not sglang_available():  # checked first: it does not import torch
        return "sglang is not installed (pip install 'trace-rl[sglang]')"
    import torch

    if not torch.cuda.is_available() and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return "no CUDA device (on CPU: bash .ci/sglang-tier)"
    return None


_REASON = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

FOUR = SamplingParams(max_new_tokens=4, ignore_eos=True)
SERVER_ARGS = [
    "--dtype",
    "bfloat16",
    "--mem-fraction-static",
    "0.15",
    "--context-length",
    "4096",
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--disable-prefill-cuda-graph",  # 0.5.23 deprecates --disable-cuda-graph
    "--disable-decode-cuda-graph",
    "--random-seed",
    "0",
]
# SGLang's CPU engine (../shared/SGLANG_CPU.md): torch attention, a bounded KV pool (else sized from RAM).
CPU_SERVER_ARGS = [
    "--device",
    "cpu",
    "--dtype",
    "bfloat16",
    "--attention-backend",
    "torch_native",
    "--max-total-tokens",
    "65536",
    "--context-length",
    "4096",
    "--disable-overlap-schedule",
    "--sampling-backend",
    "pytorch",
    "--random-seed",
    "0",
]


def _sharpened_copy(src: Path, dst: Path) -> Path:
    """`src` with its final norm scaled x50: same shapes, much sharper next-token distributions."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(50.0)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


@pytest.mark.timeout(1800)
async def test_real_sglang_round_trip_prefix_cache_routing_and_weight_update(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tools.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny")
    new_dir = _sharpened_copy(model_dir, tmp_path / "tiny-step-1")
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    text = "Question: who founded the city of Varnholt? Answer with <answer> and </answer> after searching. " * 3
    prompt = tok.encode(text, add_special_tokens=False)
    assert len(prompt) > 32, len(prompt)

    args = CPU_SERVER_ARGS if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" else SERVER_ARGS
    servers = [
        SGLangServer(model_dir, port=free_port(), extra_args=args, log_path=tmp_path / f"sglang-{i}.log")
        for i in range(2)
    ]
    async with servers[0], servers[1]:
        urls = [s.url for s in servers]
        async with EngineClient(urls, max_concurrency=32, timeout_s=120, retries=2, backoff_s=0.5) as engine:
            await engine.wait_ready(timeout_s=120)
            assert await engine.health() == dict.fromkeys(urls, True)

            # round trip: length finish, one logprob per output id (the client checks ids match)
            gen = await engine.generate(
                prompt, SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True), route_key="A"
            )
            assert gen.server == urls[0] and gen.finish_type == "length" and len(gen.output_ids) == 8
            assert len(gen.logprobs) == 8 and all(lp <= 0 for lp in gen.logprobs)
            assert gen.prompt_tokens == len(prompt) and gen.weight_version == "default"

            # stop finish: every token is a stop token, so the first one stops and is kept
            stop = await engine.generate(
                prompt, SamplingParams(max_new_tokens=8, stop_token_ids=list(range(vocab))), route_key="A"
            )
            assert stop.finish_type == "stop" and len(stop.output_ids) == 1
            assert stop.finish_matched == stop.output_ids[0]

            # sticky routing + prefix cache: turn 2 of tree A reuses turn 1 on its server ...
            turn2 = (
                prompt + gen.output_ids + tok.encode(" <information> Doc 1 </information>", add_special_tokens=False)
            )
            g2 = await engine.generate(turn2, FOUR, route_key="A")
            assert g2.server == urls[0] and g2.cached_tokens >= len(prompt), (g2.cached_tokens, len(prompt))
            # ... while tree B, pinned to the other server, has none of it cached
            gb = await engine.generate(turn2, FOUR, route_key="B")
            assert gb.server == urls[1] and gb.cached_tokens < len(prompt), (gb.cached_tokens, len(prompt))

            # a batch of branches goes to the tree's server as one call
            branches = [[*prompt, t] for t in gen.output_ids[:3]]
            many = await engine.generate_many(branches, FOUR, route_key="A")
            assert [g.server for g in many] == [urls[0]] * 3 and all(len(g.output_ids) == 4 for g in many)
            assert all(g.cached_tokens >= len(prompt) for g in many)

            # flush: the same prompt is no longer cached
            await engine.flush_cache(timeout_s=60)
            again = await engine.generate(prompt, SamplingParams(max_new_tokens=2), route_key="A")
            assert again.cached_tokens == 0, again.cached_tokens

            # weight update on both servers
            before = statistics.fmean(gen.logprobs)
            results = await engine.update_weights_from_disk(str(new_dir), "1")
            assert set(results) == set(urls) and all(r.success for r in results.values())
            after = await engine.generate(
                prompt, SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True), route_key="A"
            )
            assert after.weight_version == "1" and after.cached_tokens == 0
            assert statistics.fmean(after.logprobs) > before + 1.0, (before, after.logprobs)
            other = await engine.generate(prompt, SamplingParams(max_new_tokens=2), route_key="B")
            assert other.weight_version == "1"
            assert engine.stats.aborts == 0 and engine.stats.sequences == 10
