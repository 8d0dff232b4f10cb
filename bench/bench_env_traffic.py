"""The trainer's env traffic with and without coalescing (`env.coalesce`): HTTP requests per step and rollout time.

Runs `trace-train --config configs/debug.toml` (the smoke run: 12 leaves a step, a 16-prompt pool, the tiny model on
the CPU engine) `--reps` times with `env.coalesce=true` and as many with `false`, alternating (so that the noise of a
shared machine falls on both), each with its own output folder and one warm-start cache, no evals. Reads each run's
metrics.jsonl and prints, per setting, the median over runs and steps of `env_requests` (HTTP requests to the env
server), `env_calls` (the calls of the step's funded trees, from their ledgers) and `rollout_time_s`, and the ratios
on/off; writes them as JSON.

    .venv/bin/python bench/bench_env_traffic.py                    # 2 reps of each, ~6 min on 2 cores
    .venv/bin/python bench/bench_env_traffic.py --reps 3 --out runs/bench_env_traffic.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("env_requests", "env_calls", "rollout_time_s")


def run(out: Path, coalesce: bool, cache: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "trainer.cli",
        "--config",
        str(REPO / "configs" / "debug.toml"),
        "--output-dir",
        str(out),
    ]
    cmd += ["--set", "run.eval_every=0", "--set", "run.eval_before_train=false"]
    cmd += ["--set", f"env.coalesce={'true' if coalesce else 'false'}"]
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="TRACE_CACHE_DIR (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache or Path(tmp) / "cache"
        rows: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(a.reps):
            for coalesce in (True, False):
                rows[coalesce] += run(Path(tmp) / f"run-{rep}-{coalesce}", coalesce, cache)
    med = {c: {k: statistics.median(r[k] for r in rows[c]) for k in FIGURES} for c in (True, False)}
    result = {
        "reps": a.reps,
        "steps": {str(c).lower(): len(rows[c]) for c in rows},
        "coalesce_on": med[True],
        "coalesce_off": med[False],
        "requests_ratio_on_off": med[True]["env_requests"] / med[False]["env_requests"],
        "rollout_time_ratio_on_off": med[True]["rollout_time_s"] / med[False]["rollout_time_s"],
    }
    print(f"{'':14}{'env_requests':>14}{'env_calls':>12}{'rollout_s':>12}   (medians over {a.reps} runs x 2 steps)")
    for name, c in (("coalesce on", True), ("coalesce off", False)):
        m = med[c]
        print(f"{name:14}{m['env_requests']:>14.1f}{m['env_calls']:>12.1f}{m['rollout_time_s']:>12.2f}")
    print(
        f"on/off: requests x{result['requests_ratio_on_off']:.2f}, rollout time x{result['rollout_time_ratio_on_off']:.2f}"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
