"""What one GPU can show about the trainer's GPU path, in one short run (`tools/gpu-check` runs it; issue 23).

    tools/gpu-check [OUT_DIR]                    # on the GPU machine: the stages below, ~3-5 min, a table at the end
    python tools/gpu_check.py --device cpu --small --out DIR    # the same code on CPU, to check the script itself

Model: built here from a config (no download; `tools.tiny_model.build_shaped_model`, with the tiny model's tokenizer):
a Qwen3-shaped "medium" model stored in bf16 (hidden 1024, 28 layers, MLP 3072, 16/8 heads of 128 as at 8B, vocabulary 151,936, untied
head: ~0.75B parameters; `--small`: 4 layers, vocabulary 32,768).

Stages (each prints `MEASURE name value` and `CHECK ok|FAIL what`; the table and OUT_DIR/gpu_check.json collect
them):
- `rank0`: the rank-0 code on the device, one process, bf16 autocast (CUDA) with gradient checkpointing: an RL
  update at a token budget (peak device memory), the streamed hand-off (`Policy.save`: seconds, GB/s, rank 0's
  extra host memory), the feature copy (`FeatureModel`) against `Policy.hidden_at` on the same weights, and the
  chunked LM-head logprobs (`LogprobHead`) against the whole-logits computation on the device.
- `packed`: prefix-shared updates (`optim.share_prefixes`, off by default): the masked attention's logprobs against the
  causal batch's on the device, then an RL update's seconds and peak memory, unpacked and prefix-shared, on the
  shipped trees' shapes of GRPO and TRACE (bench/data/trees/, `tools.tree_samples`): whether the option should be on
  by default on a GPU, where the masked attention cannot take the flash kernel.
- `fsdp1`: `configs/accelerate/fsdp2.yaml` through `accelerate launch --num_processes 1`. With one process the trainer
  does not shard (`_accelerator` asks for FSDP only when several ranks are launched), so this stage takes the
  launched ranks as 2 for that question alone and the trainer's own FSDP2 preparation then runs on one GPU (the CPU
  dry run uses 2 gloo ranks instead): the bf16 MixedPrecisionPolicy
  with float32 reduce, an RL update through the accumulation path (reduce-scatter every micro-batch), the weight
  stream's all-gathers (`DTensor.full_tensor`), and a sharded checkpoint round trip (`save_state` then `load_state`:
  the same next update).
What one GPU cannot check, said in the table: anything with two or more NCCL ranks (FSDP2 collectives across
ranks, the NCCL weight group with SGLang's workers, the follower protocol under NCCL, per-rank memory at 6 or 8
ranks), and SGLang itself (not in the image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.procmem import PeakRSS  # noqa: E402
from trainer.learner.distributed import FSDP2_ENV  # noqa: E402

RESULTS: dict[str, Any] = {}


def say(tag: str, name: str, value: Any = "") -> None:
    print(f"{tag} {name} {value}".rstrip(), flush=True)


def measure(name: str, value: float, unit: str = "") -> None:
    RESULTS[name] = value
    say("MEASURE", name, f"{value:.4g} {unit}".rstrip())


def check(ok: bool, what: str) -> None:
    RESULTS.setdefault("checks", []).append({"ok": bool(ok), "what": what})
    say("CHECK", "ok" if ok else "FAIL", what)


def build_models(root: Path, small: bool) -> Path:
    from tools.tiny_model import build_shaped_model

    cfg = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    cfg |= dict(num_hidden_layers=4, vocab_size=32768) if small else dict(num_hidden_layers=28, vocab_size=151936)
    medium, n = build_shaped_model(root / "medium", dtype="bfloat16", tie_word_embeddings=False, **cfg)
    measure("medium_parameters_b", n / 1e9, "B")
    return medium


def samples(n: int, length: int, vocab: int, seed: int = 0) -> list:
    import torch

    from trainer.learner.samples import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        k = length // 4  # the last quarter trained, as an agent's turns between observations
        mask = [0] * (length - k) + [1] * k
        adv = [0.0] * (length - k) + [0.5 if i % 2 else -0.5] * k
        out.append(TrainSample(ids, mask, adv, [float(m) for m in mask], [-2.0 * m for m in mask],
                               prompt_id=f"p{i}", tree_index=i, leaf_id=1))  # fmt: skip
    return out


def host_peak(fn: Any) -> tuple[float, float]:
    """(seconds, peak host RSS above the start in bytes) of fn()."""
    with PeakRSS() as p:
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
    return secs, p.above


def stage_rank0(medium: Path, device: str, out: Path) -> None:
    import torch

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.loss import sequence_logprobs
    from trainer.learner.policy import FeatureModel, Policy

    cuda = device == "cuda"
    mcfg = ModelConfig(device=device, mixed_precision="bf16" if cuda else "no", gradient_checkpointing=True)
    ocfg = OptimConfig(lr=1e-6, micro_batch_size=8, micro_batch_tokens=4096, kl_coef=0.0)
    policy = Policy(medium, mcfg, ocfg)
    vocab = policy.model.config.vocab_size
    batch = samples(8, 1024, vocab)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = policy.rl_update(batch)
    if cuda:
        torch.cuda.synchronize()
        measure("rank0_update_peak_gb", torch.cuda.max_memory_allocated() / 1e9, "GB")
    measure("rank0_update_s", time.perf_counter() - t0, "s")
    check(m["trained_tokens"] == 8 * 256 and m["loss"] == m["loss"], "an RL update at a token budget ran (finite loss)")

    gb = sum(p.numel() for p in policy.model.parameters()) * 2 / 1e9
    secs, extra = host_peak(lambda: policy.save(out / "weights"))
    measure("save_s_per_gb", secs / gb, "s/GB")
    measure("save_extra_host_gb", extra / 1e9, "GB")
    check(extra <= 2 * policy.bucket_bytes + (64 << 20), "the streamed save held at most ~one bucket on the host")

    seqs = [s.input_ids[: 64 + 32 * i] for i, s in enumerate(batch[:4])]
    positions = [[len(s) // 2, len(s) - 1] for s in seqs]
    a = policy.hidden_at(seqs, positions)
    copy = FeatureModel(policy)
    b = copy.hidden_at(seqs, positions)
    rel = max(float((x - y).norm() / x.norm()) for x, y in zip(a, b, strict=True))
    measure("feature_copy_rel_gap", rel)
    check(rel < 1e-5, "the feature copy (own CUDA stream) equals Policy.hidden_at on the same weights")

    model = policy.accelerator.unwrap_model(policy.model)
    ids = torch.tensor([s.input_ids[:512] for s in batch[:2]], device=policy.device)
    att = torch.ones_like(ids)
    with torch.no_grad(), policy.accelerator.autocast():
        chunked = sequence_logprobs(model, ids, att, chunk=256)
        logits = model(input_ids=ids).logits  # outside sequence_logprobs the head returns logits: the whole matrix
        full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    gap = float((chunked[:, 1:] - full).abs().max() / full.abs().max())
    measure("chunked_logprobs_rel_gap", gap)
    check(gap < 1e-2 if cuda else gap < 1e-5, "chunked LM-head logprobs equal the whole-logits ones (bf16 on CUDA)")
    policy.save_state(out / "state")
    before = [p.detach().clone() for p in policy.model.parameters()]
    policy.rl_update(batch)
    after = [p.detach().clone() for p in policy.model.parameters()]
    policy.load_state(out / "state")
    back = max(float((p.detach() - q).abs().max()) for p, q in zip(policy.model.parameters(), before, strict=True))
    policy.rl_update(batch)
    again = max(float((p.detach() - q).abs().max()) for p, q in zip(policy.model.parameters(), after, strict=True))
    moved = max(float((q - p).abs().max()) for p, q in zip(before, after, strict=True))
    measure("checkpoint_roundtrip_gap", again / max(moved, 1e-30))
    check(back == 0.0 and again <= 1e-3 * moved, "save_state/load_state: the same weights and the same next update")


def stage_fsdp1(medium: Path, device: str, out: Path) -> None:
    """Under `accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1` on a GPU (the CPU dry
    run: torchrun with 2 gloo ranks, the second following rank 0 as in training)."""

    import trainer.learner.policy as pol
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.distributed import Ranks, follow, launched_ranks

    if launched_ranks() == 1:  # one process: a process group of one, and the FSDP2 preparation asked for anyway
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
        pol.launched_ranks = lambda: 2
    ranks = Ranks.start(cpu=device == "cpu")
    if not ranks.leader:
        follow(ranks)
        return
    cuda = device == "cuda"
    mcfg = ModelConfig(device=device, mixed_precision="bf16" if cuda else "no", gradient_checkpointing=True)
    ocfg = OptimConfig(lr=1e-6, micro_batch_size=4, micro_batch_tokens=4096, kl_coef=0.0)
    policy = pol.Policy(medium, mcfg, ocfg)
    _fsdp1(policy, cuda, out)
    ranks.stop()  # only after a clean run (it waits for the followers): a failed rank 0 exits and the launcher stops them


def _fsdp1(policy: Any, cuda: bool, out: Path) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    check(policy.sharded and policy.accelerator.is_fsdp2, "accelerate prepared FSDP2 (fully_shard)")
    check(any(isinstance(p, DTensor) for p in policy.model.parameters()), "the parameters are DTensors")
    mp = policy.accelerator.state.fsdp_plugin.mixed_precision_policy
    if cuda:
        check(mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32, "bf16 compute, float32 reduce")
    batch = samples(8, 1024, policy.model.config.vocab_size, seed=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = policy.rl_update(batch)
    measure("fsdp1_update_s", time.perf_counter() - t0, "s")
    if cuda:
        measure("fsdp1_update_peak_gb", torch.cuda.max_memory_allocated() / 1e9, "GB")
    check(m["loss"] == m["loss"], "an RL update through FSDP2's accumulation path (several micro-batches) ran")
    t0 = time.perf_counter()
    weights = policy.engine_weights(torch.float32)  # the weight stream, each tensor gathered (full_tensor)
    measure("fsdp1_stream_s", time.perf_counter() - t0, "s")
    check(len(weights) == len(policy._engine_tensors()), "the weight stream gathered every tensor")
    policy.save_state(out / "fsdp-state")
    policy.rl_update(batch)
    after = policy.engine_weights(torch.float32)
    policy.load_state(out / "fsdp-state")
    back = max(float((v - weights[k]).abs().max()) for k, v in policy.engine_weights(torch.float32).items())
    policy.rl_update(batch)
    again = max(float((v - after[k]).abs().max()) for k, v in policy.engine_weights(torch.float32).items())
    moved = max(float((after[k] - weights[k]).abs().max()) for k in after)
    measure("fsdp1_checkpoint_roundtrip_gap", again / max(moved, 1e-30))
    check(back == 0.0 and again <= 1e-3 * moved, "a sharded checkpoint round trip under FSDP2: the same next update")


def stage_packed(medium: Path, device: str, out: Path) -> None:
    """Prefix-shared updates (`optim.share_prefixes`) on the device: the masked attention's logprobs against the
    causal batch's, then an update's seconds and peak memory, unpacked and prefix-shared, on two shipped trees'
    shapes (GRPO's groups and TRACE's trees, bench/data/trees/). What decides whether the option should be on by
    default: on the CPU it wins on trees and loses on the tiny model's groups (bench/bench_packed_update.py), and on a
    GPU the masked attention cannot take the flash kernel."""
    import dataclasses
    import statistics

    import torch

    from tools.tree_samples import TREES, samples_from_dump
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.loss import sequence_logprobs
    from trainer.learner.packing import forest_logprobs, pack_prefixes
    from trainer.learner.policy import Policy, pad_rows

    cuda = device == "cuda"
    mcfg = ModelConfig(device=device, mixed_precision="bf16" if cuda else "no", gradient_checkpointing=True)
    ocfg = OptimConfig(lr=1e-6, micro_batch_size=8, micro_batch_tokens=16384, kl_coef=0.0)
    policy = Policy(medium, mcfg, ocfg)
    vocab = (11, policy.model.config.vocab_size)
    keep = None if cuda else 12  # the CPU dry run: each dump's first samples only
    dumps = {name: samples_from_dump(TREES / f"epochs-{name}-step50.jsonl.gz", vocab=vocab)[:keep]
             for name in ("uniform", "trace")}  # fmt: skip

    model = policy.accelerator.unwrap_model(policy.model)
    batch = dumps["trace"][:8]
    ids, needed, att = (
        pad_rows(rows, 0, torch.long, policy.device)
        for rows in ([s.input_ids for s in batch], [s.loss_mask for s in batch], [[1] * len(s) for s in batch])
    )
    packed = pack_prefixes([s.input_ids for s in batch], [s.prompt_id for s in batch])
    with torch.no_grad(), policy.accelerator.autocast():
        causal = sequence_logprobs(model, ids, att, needed=needed)
        forest = forest_logprobs(model, packed, needed)
    where = needed.bool()
    where[:, 0] = False
    gap = float((causal - forest)[where].abs().max() / causal[where].abs().max())
    measure("packed_logprobs_rel_gap", gap)
    measure("packed_logprobs_mean_abs_gap", float((causal - forest)[where].abs().mean()))
    check(gap < 2e-2 if cuda else gap < 1e-5, "prefix-shared logprobs (masked attention) equal the causal batch's")

    repeats = 2 if cuda else 1
    for name, smp in dumps.items():
        secs: dict[bool, list[float]] = {False: [], True: []}
        peak: dict[bool, float] = {False: 0.0, True: 0.0}
        finite = True
        for rep in range(repeats + 1):  # one warm-up a side, then alternating
            for share in (False, True) if rep % 2 == 0 else (True, False):
                policy.ocfg = dataclasses.replace(ocfg, share_prefixes=share)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                m = policy.rl_update(smp)
                if cuda:
                    torch.cuda.synchronize()
                if rep > 0:  # the warm-up's one-off allocations and times left out
                    secs[share].append(time.perf_counter() - t0)
                    if cuda:
                        peak[share] = max(peak[share], torch.cuda.max_memory_allocated() / 1e9)
                finite = finite and math.isfinite(m["loss"])
        check(finite, f"{name}'s trees: unpacked and prefix-shared updates ran (finite losses)")
        plain, shared = statistics.median(secs[False]), statistics.median(secs[True])
        measure(f"packed_{name}_update_s_unpacked", plain, "s")
        measure(f"packed_{name}_update_s_shared", shared, "s")
        measure(f"packed_{name}_speedup", plain / shared, "x")
        if cuda:
            measure(f"packed_{name}_peak_gb_unpacked", peak[False], "GB")
            measure(f"packed_{name}_peak_gb_shared", peak[True], "GB")


CANNOT = [
    "FSDP2's all-gather / reduce-scatter across 2+ NCCL ranks (one device cannot hold two ranks of a communicator)",
    "the NCCL weight group between the trainer and SGLang's workers (engine.weight_sync = group on GPUs)",
    "the follower protocol (rank 0 announcing, the others joining) under NCCL",
    "per-rank memory at 6 or 8 ranks for Qwen3-8B/14B (docs/scaling.md's plan stays on paper)",
    "SGLang on CUDA (not in the image)",
]


def table(results: dict[str, Any]) -> str:
    lines = ["| measured | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in results.items() if isinstance(v, (int, float))]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {c['what']} | {'ok' if c['ok'] else 'FAIL'} |" for c in results.get("checks", [])]
    lines += ["", "What one GPU cannot check:"] + [f"- {x}" for x in CANNOT]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gpu_check")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="a 4-layer medium model (a dry run of the script)")
    ap.add_argument("--stage", default="all", choices=["all", "rank0", "packed", "fsdp1"])
    ap.add_argument("--models", default=None, help="(internal) the built models' folder")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage != "all":  # one stage, in this process (fsdp1 runs under accelerate launch)
        medium = Path(args.models) / "medium"
        try:
            {"rank0": stage_rank0, "packed": stage_packed, "fsdp1": stage_fsdp1}[args.stage](medium, args.device, out)
        finally:
            (out / f"{args.stage}.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        return 0 if all(c["ok"] for c in RESULTS.get("checks", [])) else 1
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    build_models(work, args.small)
    measure("build_s", time.perf_counter() - t0, "s")
    base = [sys.executable, __file__, "--out", str(out), "--device", args.device, "--models", str(work)]
    base += ["--small"] if args.small else []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rcs = {name: subprocess.run([*base, "--stage", name], env=env).returncode for name in ("rank0", "packed")}
    if args.device == "cuda":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/fsdp2.yaml"), "--num_processes", "1"]  # fmt: skip
    else:  # the dry run: 2 gloo ranks, FSDP2 asked for as the CPU tests ask for it
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        env |= FSDP2_ENV
    rcs["fsdp1"] = subprocess.run([*launch, *base[1:], "--stage", "fsdp1"], env=env).returncode
    for name in rcs:
        f = out / f"{name}.json"
        part = json.loads(f.read_text()) if f.exists() else {}
        RESULTS.setdefault("checks", []).extend(part.pop("checks", []))
        RESULTS.update(part)
        if rcs[name] != 0 and not any(not c["ok"] for c in RESULTS["checks"]):
            check(False, f"stage {name} exited {rcs[name]} (see its output above)")
    measure("total_s", time.perf_counter() - t0, "s")
    md = table(RESULTS)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    (out / "gpu_check.md").write_text(md + "\n")
    print(md)
    return 0 if all(c["ok"] for c in RESULTS.get("checks", [])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
