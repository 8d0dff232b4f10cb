"""Weight sync, disk path vs process-group path: seconds per GB from the trainer to one CPU engine.

    .venv/bin/python bench/bench_weight_sync.py [--models tiny,qwen3-200m] [--repeats 3] [--dtype bfloat16]
                                                [--bucket-mb 512] [--out runs/bench_weight_sync.json]

The engine is our CPU engine as a child process (`python -m engine.cli serve --threads 1`), so the group path
crosses a real process boundary over loopback TCP, as it would to an engine on the same machine. Per model, built
from a config (no download): `tiny` is tools/tiny_model.py's 3.4M-parameter Qwen3; `qwen3-200m` is a Qwen3 config
of ~213M parameters (hidden 1024, 16 layers, MLP 2816, 16/4 heads, vocabulary 32000, tied embeddings), both with
random weights in `--dtype` (the engines' dtype; bfloat16 as the trainer writes it for Qwen3).
- disk path: `save_pretrained` of the weights into a fresh folder under `--dir` (default: a temporary folder), then
  `EngineClient.update_weights_from_disk` (pause, load, flush, continue): the time of both.
- group path: `WeightSync.push` of the same state dict (pause, begin, buckets of `--bucket-mb` broadcast over gloo,
  end, continue); the group is formed once before (its time is reported apart).
This bench compares the two transports to an engine from a state dict in memory; the trainer's own side of the
hand-off (`Policy.save` / `Policy.weight_stream`: gathering, casting and writing bucket by bucket, rank 0's host
memory) is `bench/bench_policy_weights.py`'s. The two are run alternately, one warm-up round then `--repeats` rounds; medians are reported, per GB of weights
sent (the tied head counted once, as both paths send it once). After the last round each path's greedy logprobs on
a fixed prompt are compared: they must be equal (the same weights arrived). Benchmarks are not tests: expect +-30% run to run on a shared
2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shared.engine_protocol import SamplingParams
from tools.tiny_model import build_tiny_model
from trainer.engines.client import EngineClient
from trainer.engines.launcher import free_port, launch_engine
from trainer.engines.weight_sync import WeightSync

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 20, 31, 47, 300, 12, 9]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def build_model(name: str, folder: Path, dtype: torch.dtype) -> tuple[Path, Any]:
    """Write the model `name` to `folder` and return (folder, the model in `dtype`)."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if name == "tiny":
        path = build_tiny_model(folder, seed=0)
        return path, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if name != "qwen3-200m":
        raise ValueError(f"unknown model {name!r}: tiny or qwen3-200m")
    config = Qwen3Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return folder, model


def unique_bytes(state: dict[str, torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in state.values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


async def greedy(client: EngineClient) -> list[float]:
    await client.flush_cache()
    g = await client.generate(PROMPT, GREEDY, route_key="bench")
    return g.logprobs


async def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model_dir, model = build_model(name, work / f"{name}-init", dtype)
    state = model.state_dict()
    nbytes = unique_bytes(state)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name}: {params / 1e6:.1f}M parameters, {nbytes / 1e9:.3f} GB in {args.dtype} (built in "
        f"{time.perf_counter() - t0:.1f}s)"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--dtype", args.dtype, "--threads", "1", "--log-level", "warning"]
    disk_save: list[float] = []
    disk_load: list[float] = []
    pushes: list[float] = []
    transfers: list[float] = []
    buckets = 0
    async with launch_engine(cmd, url, cwd=REPO, log_path=work / f"{name}-engine.log", startup_timeout_s=600):
        async with EngineClient([url], timeout_s=1200, retries=0) as client:
            t = time.perf_counter()
            async with WeightSync.open(client, bucket_bytes=args.bucket_mb << 20, timeout_s=1200) as sync:
                open_s = time.perf_counter() - t
                for r in range(-1, args.repeats):  # round -1 warms both paths up (first allocations, connections)
                    folder = work / f"{name}-step-{r}"
                    t = time.perf_counter()
                    model.save_pretrained(folder)
                    save_s = time.perf_counter() - t
                    t = time.perf_counter()
                    await client.update_weights_from_disk(str(folder), f"disk-{r}")
                    load_s = time.perf_counter() - t
                    if r < args.repeats - 1:  # the last one is loaded again below
                        shutil.rmtree(folder)
                    timings = await sync.push(state, version=f"group-{r}")
                    buckets = timings.buckets
                    if r < 0:
                        print(f"  warm-up: disk {save_s + load_s:.2f}s, group {timings.total_s:.2f}s (not counted)")
                        continue
                    disk_save.append(save_s)
                    disk_load.append(load_s)
                    pushes.append(timings.total_s)
                    transfers.append(timings.transfer_s)
                    print(
                        f"  round {r}: disk save {disk_save[-1]:.2f}s + load {disk_load[-1]:.2f}s, "
                        f"group push {pushes[-1]:.2f}s ({buckets} buckets)"
                    )
                after_group = await greedy(client)
            await client.update_weights_from_disk(str(work / f"{name}-step-{args.repeats - 1}"), "disk-last")
            after_disk = await greedy(client)
    assert after_group == after_disk, f"{name}: the two paths left different weights: {after_group} {after_disk}"
    disk_total = [s + lo for s, lo in zip(disk_save, disk_load, strict=True)]
    gb = nbytes / 1e9
    row = {
        "model": name,
        "params": params,
        "dtype": args.dtype,
        "bytes": nbytes,
        "disk": {
            "save_s": disk_save,
            "load_s": disk_load,
            "median_s": statistics.median(disk_total),
            "s_per_gb": statistics.median(disk_total) / gb,
        },
        "group": {
            "open_s": open_s,
            "push_s": pushes,
            "transfer_s": transfers,  # of push_s: the buckets (HTTP + broadcast + the engine's load and flush)
            "median_s": statistics.median(pushes),
            "s_per_gb": statistics.median(pushes) / gb,
            "buckets": buckets,
            "bucket_mb": args.bucket_mb,
        },
        "same_logprobs_after_both": True,
    }
    row["group_over_disk"] = row["group"]["median_s"] / row["disk"]["median_s"]
    return row


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            rows.append(await bench_model(name, args, Path(tmp)))
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "load_avg_end": os.getloadavg(),
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,qwen3-200m", help="comma-separated: tiny, qwen3-200m")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per model (each: one disk update, one push)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the engine's dtype")
    ap.add_argument("--bucket-mb", type=int, default=512, help="WeightSync bucket size (MiB)")
    ap.add_argument("--dir", default=None, help="where the disk path writes its folders (default: the temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    report = asyncio.run(run(args))
    print(f"\n{'model':<12} {'GB':>6} {'disk s/GB':>10} {'group s/GB':>11} {'group/disk':>10}")
    for r in report["results"]:
        print(
            f"{r['model']:<12} {r['bytes'] / 1e9:>6.3f} {r['disk']['s_per_gb']:>10.2f} "
            f"{r['group']['s_per_gb']:>11.2f} {r['group_over_disk']:>10.2f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
