"""Prefix-shared updates (`optim.share_prefixes`) against the unpacked update, on real trees' shapes.

Each tree dump in bench/data/trees/ is one step (step 50) of a tuning run of the epochs comparison at 37bb559
(`configs/compare-epochs.toml`, lr 1e-4, seed 10000; lr 5e-5 for entropy), one per allocator. The dumps hold each
node's token count and how many of them the policy generated, not the token ids (`trainer.dumps`); this bench
rebuilds every trained leaf's sample with the same tree shape (random token ids, each node's generated tokens
trained) and times `Policy.rl_update` on the tiny model (float32, CPU), unpacked and prefix-shared, alternating,
in one process, on one torch thread (--threads): the process's CPU time is then the work done, whatever else runs
on the machine, where wall time moves with it. Prints, per dump, the tokens each update ran and the median CPU and
wall time of an update, and the ratios; writes JSON.

    python bench/bench_packed_update.py --repeats 3 --out runs/bench_packed_update.json
    python bench/bench_packed_update.py --repeats 2 --shape 1024,3072,2 --samples 24 \
        --dumps bench/data/trees/epochs-uniform-step50.jsonl.gz bench/data/trees/epochs-trace-step50.jsonl.gz \
        --out runs/bench_packed_wide.json

--shape HIDDEN,INTERMEDIATE,LAYERS times a wider Qwen3 (random weights, 8 heads of 128, 4 KV heads, the tiny
vocabulary) instead of the tiny model (hidden 256: its attention is a large share of its cost, where a Qwen3-8B's
projections dominate); --samples keeps each dump's first N samples (whole prompts first) to bound the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dumps", nargs="*", type=Path, default=None, help="tree dumps (default: bench/data/trees/*)")
    ap.add_argument("--repeats", type=int, default=3, help="updates timed a side, per dump (after one warm-up each)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="optim.micro_batch_size (the configs' 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work)")
    ap.add_argument("--shape", default="", help="HIDDEN,INTERMEDIATE,LAYERS of a wider model (default: the tiny one)")
    ap.add_argument("--samples", type=int, default=0, help="each dump's first N samples (0: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_packed_update.json"))
    args = ap.parse_args(argv)
    import torch

    from tools.tiny_model import build_tiny_model
    from tools.tree_samples import TREES, samples_from_dump
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.packing import pack_prefixes, packed_plan
    from trainer.learner.policy import Policy

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    if args.shape:
        from tools.tiny_model import build_shaped_model

        hidden, inter, layers = (int(x) for x in args.shape.split(","))
        model, params = build_shaped_model(
            folder / "model", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=2048, tie_word_embeddings=True,
        )  # fmt: skip
        print(f"model: hidden {hidden}, intermediate {inter}, {layers} layers, {params / 1e6:.1f}M parameters")
    else:
        model = build_tiny_model(folder / "model", seed=0)
    policies = {
        share: Policy(model, ModelConfig(device="cpu"), OptimConfig(micro_batch_size=args.micro_batch_size,
                                                                    share_prefixes=share))
        for share in (False, True)
    }  # fmt: skip
    rows = []
    for dump in args.dumps or sorted(TREES.glob("*.jsonl.gz")):
        samples = samples_from_dump(dump)[: args.samples or None]
        mbs = args.micro_batch_size
        plain_plan = policies[False]._micro_batch_plan([len(s) for s in samples])[0][0]
        padded = sum(len(mb) * max(len(samples[i]) for i in mb) for mb in plain_plan)
        seqs, groups = [s.input_ids for s in samples], [s.prompt_id for s in samples]
        plan = packed_plan(seqs, groups, 1, mbs)[0][0]
        packs = [pack_prefixes([seqs[i] for i in mb], [groups[i] for i in mb]) for mb in plan]
        unique, run = sum(len(p) for p in packs), sum(p.padded for p in packs)
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.repeats + 1):
            for share in (False, True) if rep % 2 == 0 else (True, False):
                t0, c0 = time.perf_counter(), time.process_time()
                policies[share].rl_update(samples)
                if rep > 0:
                    times[share].append(time.perf_counter() - t0)
                    cpu[share].append(time.process_time() - c0)
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        cplain, cshared = statistics.median(cpu[False]), statistics.median(cpu[True])
        row = {
            "dump": dump.name,
            "samples": len(samples),
            "tokens": sum(len(s) for s in samples),
            "padded_tokens_run": padded,
            "unique_tokens": unique,
            "packed_tokens_run": run,
            "update_s_unpacked": plain,
            "update_s_shared": shared,
            "speedup": plain / shared,
            "cpu_s_unpacked": cplain,
            "cpu_s_shared": cshared,
            "cpu_speedup": cplain / cshared,
            "times": {"unpacked": times[False], "shared": times[True]},
            "cpu_times": {"unpacked": cpu[False], "shared": cpu[True]},
        }
        rows.append(row)
        print(
            f"{dump.name}: {len(samples)} samples, tokens run {padded} -> {run} ({padded / run:.2f}x fewer; {unique} "
            "unique); "
            f"update CPU {cplain:.2f} s -> {cshared:.2f} s ({cplain / cshared:.2f}x), wall {plain:.2f} s -> {shared:.2f} s "
            f"({plain / shared:.2f}x)"
        )
    result = {"micro_batch_size": args.micro_batch_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "shape": args.shape or "tiny", "samples": args.samples, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
