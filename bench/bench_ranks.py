"""Step time of `trace-train` on 1 vs 2 training ranks (torchrun, gloo on CPU), same config, same cache.

    python bench/bench_ranks.py [--config configs/debug.toml] [--steps 4] [--repeats 2] [--out FILE.json]

Each run is `torchrun --standalone --nproc-per-node N -m trainer.cli --config C --steps S` with evaluation off,
in a fresh output folder and one shared TRACE_CACHE_DIR (the SFT warm start is built, on 1 rank, before the timed
runs). Every rank gets OMP_NUM_THREADS=1 (torchrun sets it only for more than one process), so 1 rank uses one
core for its torch work and 2 ranks two (the env server and the engine are child processes besides). Runs alternate
(1, 2, 1, 2, ...) so the machine's drift hits both; the figures are medians over the steps after the first of
every run of: `update_s` (the update: the only part the ranks share), `sync_s` (gather + save + push),
`step_time_s`, and the 2-rank / 1-rank ratios. A benchmark, not a test: it prints and writes JSON.
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

REPO = Path(__file__).resolve().parents[1]
KEYS = ("update_s", "sync_s", "rollout_s", "step_time_s")


def run(nproc: int, config: str, steps: int, out: Path, cache: Path, extra: list[str]) -> list[dict]:
    # One thread a rank, set here: torchrun sets OMP_NUM_THREADS=1 only when it starts more than one process.
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "trainer.cli", "--config", config, "--steps", str(steps), "--output-dir", str(out)]
    cmd += ["--run.eval-every", "0", "--set", "run.eval_before_train=false", "--set", "run.save_every=0", *extra]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    path = out / "metrics.jsonl"  # none after --steps 0
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "debug.toml"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], help="section.field=value, passed to every run")
    args = ap.parse_args()
    extra = [x for s in args.set for x in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(os.environ.get("TRACE_CACHE_DIR") or Path(tmp) / "cache")
        run(1, args.config, 0, Path(tmp) / "warm", cache, extra)  # builds the world, tiny model, SFT warm start
        rows: dict[int, list[dict]] = {1: [], 2: []}
        t0 = time.perf_counter()
        for k in range(args.repeats):
            for n in (1, 2):
                got = run(n, args.config, args.steps, Path(tmp) / f"r{n}-{k}", cache, extra)
                assert all(r["world_size"] == n for r in got)
                rows[n] += got[1:]  # the first step of a run pays for warm-up
        wall = time.perf_counter() - t0
    result: dict = {"config": args.config, "steps": args.steps, "repeats": args.repeats, "sets": args.set}
    for n, rs in rows.items():
        result[f"ranks_{n}"] = {k: statistics.median(r[k] for r in rs) for k in KEYS}
    result["ratio_2_over_1"] = {k: result["ranks_2"][k] / result["ranks_1"][k] for k in KEYS}
    result["wall_s"] = wall
    print(f"{'median s':<14}{'1 rank':>10}{'2 ranks':>10}{'2 / 1':>8}")
    for k in KEYS:
        r1, r2 = result["ranks_1"][k], result["ranks_2"][k]
        print(f"{k:<14}{r1:>10.2f}{r2:>10.2f}{r2 / r1:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
