"""What OpenMP's wait policy does to an update-shaped CPU step when the cores are shared (a second torch process).

    python bench/bench_cpu_threads.py [--reps 4] [--rounds 2] --out runs/bench_cpu_threads.json

torch's CPU kernels run on an OpenMP team per thread. By default a team's threads spin (GNU libgomp: up to
GOMP_SPINCOUNT iterations) waiting for the next parallel region; when another busy process holds a core, a
spinning thread burns the slice the thread it waits for needs, and every small op pays. `OMP_WAIT_POLICY=PASSIVE`
makes them sleep instead. `trainer`, `engine` and `tools` set it (if unset) when first imported, before torch
loads (`shared.cpu_threads`).

This times an update-shaped step of the tiny model (not the trainer's loss: 64 random sequences x 400 tokens in
micro-batches of 8, forward, backward of a stand-in loss (the logits' mean logsumexp), AdamW step; float32) in fresh
processes, under each policy (the libgomp default, i.e. OMP_WAIT_POLICY unset, and PASSIVE), alone and beside a
competitor process that runs 2-thread matmuls without pause (as an engine or another run would). Rounds interleave the
four settings; each setting's figure is the median of its reps over rounds.
Prints the seconds and the ratios (beside / alone under each policy; PASSIVE / default in each condition) and writes
JSON. The tiny model is built here (tools.tiny_model), no download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"default": None, "passive": "PASSIVE"}


def worker(model_dir: str, reps: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (64, 400), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        for i in range(0, 64, 8):
            model(input_ids=ids[i : i + 8]).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times[1:]


def competitor() -> None:
    import torch

    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a.T / 512.0)


def _env(policy: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return env if policy is None else {**env, "OMP_WAIT_POLICY": policy}


def run_setting(model_dir: str, policy: str | None, busy: bool, reps: int) -> list[float]:
    comp = None
    if busy:
        comp = subprocess.Popen([sys.executable, __file__, "--competitor"], env=_env(None))
        time.sleep(2.0)  # let it load torch and start
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", model_dir, "--reps", str(reps)],
            env=_env(policy),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="runs/bench_cpu_threads.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.competitor:
        competitor()
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.reps)))
        return 0
    from tools.tiny_model import build_tiny_model

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny"))
        for r in range(args.rounds):
            settings = [(name, busy) for name in POLICIES for busy in (False, True)]
            for name, busy in settings if r % 2 == 0 else settings[::-1]:
                key = f"{name}_{'beside' if busy else 'alone'}"
                times.setdefault(key, []).extend(run_setting(model_dir, POLICIES[name], busy, args.reps))
                print(f"round {r}: {key}: {[round(t, 2) for t in times[key][-args.reps :]]}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "default_beside_over_alone": med["default_beside"] / med["default_alone"],
        "passive_beside_over_alone": med["passive_beside"] / med["passive_alone"],
        "passive_over_default_alone": med["passive_alone"] / med["default_alone"],
        "passive_over_default_beside": med["passive_beside"] / med["default_beside"],
    }
    print("median update seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"median_s": med, "ratios": ratios, "times_s": times, "cores": os.cpu_count()}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
