"""`trainer.engines.weight_sync` against a real SGLang 0.5.23 server: the same push as tests/test_weight_sync.py.

Skipped unless sglang is importable and either CUDA works or SGLang's CPU engine is switched on
(`SGLANG_USE_CPU_ENGINE=1` with the empty `common_ops` shim on PYTHONPATH, ../shared/SGLANG_CPU.md); marked `sglang`.
On CPU, from the repository root:

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=.venv-sglang/trace-shim \\
        .venv-sglang/bin/pytest -q -m sglang -p no:cacheprovider tests/test_sglang_weight_sync.py

One test, because SGLang takes a minute to start on 2 cores: it launches one server on the tiny model (bfloat16),
checks SGLang's bracket rule (400 outside begin/end), forms a group (gloo on CPU, nccl on CUDA: chosen from the
server's reported device; on CUDA the server runs on GPU 1, since NCCL refuses two ranks on one GPU), pushes new weights in bfloat16 in several buckets, and checks the new weight version,
the flushed cache and new logprobs; then it loads the same weights from disk with `/update_weights_from_disk` and
checks that the greedy ids and logprobs are exactly those after the push.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared.engine_protocol import SamplingParams, UpdateWeightsFromDistributed
from trainer.engines.client import EngineClient, EngineRequestError
from trainer.engines.launcher import SGLangServer, free_port, sglang_available


def _why_skip() -> str | None:
    if not sglang_available():  # checked first: it does not import torch
        return "sglang is not installed (pip install 'trace-rl[sglang]')"
    import torch

    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (on CPU: SGLANG_USE_CPU_ENGINE=1 and the common_ops shim, ../shared/SGLANG_CPU.md)"
    if torch.cuda.device_count() < 2:
        return "nccl needs the trainer (GPU 0) and the server (GPU 1) on different GPUs; one GPU here"
    return None


_REASON = _why_skip()
pytestmark = [pytest.mark.sglang, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

ON_CPU = os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"
# ../shared/SGLANG_CPU.md: torch attention, a bounded KV pool (else it is sized from RAM), no overlap scheduler.
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--max-total-tokens", "65536"]
CPU_ARGS += ["--disable-overlap-schedule"]
GPU_ARGS = ["--base-gpu-id", "1", "--mem-fraction-static", "0.15", "--attention-backend", "triton"]
GPU_ARGS += ["--disable-prefill-cuda-graph", "--disable-decode-cuda-graph"]
COMMON_ARGS = ["--dtype", "bfloat16", "--context-length", "4096", "--sampling-backend", "pytorch"]
COMMON_ARGS += ["--random-seed", "0"]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


def _new_weights(src: Path, dst: Path) -> dict:
    """`src` plus seeded noise, in bfloat16: saved to `dst` (with src's tokenizer) and returned as a state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model = model.to(torch.bfloat16)
    model.save_pretrained(dst)
    return model.state_dict()


@pytest.mark.timeout(1800)
async def test_push_to_real_sglang_equals_loading_the_same_weights_from_disk(tmp_path: Path) -> None:
    from tools.tiny_model import build_tiny_model
    from trainer.engines.weight_sync import WeightSync

    model_dir = build_tiny_model(tmp_path / "tiny")
    new_dir = tmp_path / "tiny-new"
    state = _new_weights(model_dir, new_dir)
    prompt = [5, 20, 31, 47, 300, 12, 9] * 4
    server = SGLangServer(
        model_dir,
        port=free_port(),
        extra_args=(CPU_ARGS if ON_CPU else GPU_ARGS) + COMMON_ARGS,
        log_path=tmp_path / "sglang.log",
    )
    async with server, EngineClient([server.url], timeout_s=300, retries=1, backoff_s=0.5) as client:
        url = server.url
        await client.wait_ready(timeout_s=300)
        info = (await client.server_info())[url]
        assert info["tp_size"] == 1 and info["dp_size"] == 1, {k: info.get(k) for k in ("tp_size", "dp_size")}

        async def greedy() -> tuple[list[int], list[float], str | None, int]:
            g = await client.generate(prompt, GREEDY, route_key="tree")
            return g.output_ids, g.logprobs, g.weight_version, g.cached_tokens

        before = await greedy()

        # SGLang 0.5.23's bracket: refused outside begin/end, before anything is received
        req = UpdateWeightsFromDistributed(names=["model.norm.weight"], dtypes=["bfloat16"], shapes=[[256]])
        with pytest.raises(EngineRequestError, match="must run between begin_weight_update") as err:
            await client.update_weights_from_distributed(url, req)
        assert err.value.status == 400

        async with WeightSync.open(client, bucket_bytes=2 << 20, timeout_s=300) as sync:
            assert sync.backend == ("gloo" if ON_CPU else "nccl") and sync.world_size == 2
            timings = await sync.push(state, version="1")
        assert timings.buckets >= 3 and timings.skipped == 1, timings  # the tied head is not sent
        pushed = await greedy()
        assert pushed[2] == "1" and pushed[3] == 0, pushed  # new version, the cache flushed
        assert pushed[:2] != before[:2]

        results = await client.update_weights_from_disk(str(new_dir), "disk")
        assert results[url].success
        from_disk = await greedy()
        assert from_disk[2] == "disk" and from_disk[3] == 0
        assert from_disk[:2] == pushed[:2]  # ids and logprobs, exactly
