#!/usr/bin/env bash
# Runs at once on this machine's cores: two short trace-train runs of the epochs regime's testbed (8 steps, dev EM at
# the end), one after the other and then both at once, the second pair with $OMP_NUM_THREADS=1 and $TRACE_CPU_SHARE=1
# as `bench/compare_allocators.py --jobs 2` gives each run on 2 cores. Prints each run's wall time and the throughput
# ratio (the pair's sequential time over its concurrent time), and writes runs/bench_jobs/bench_jobs.json.
# Run it on an otherwise idle machine (a comparison running beside it makes both figures meaningless).
#   bench/bench_jobs.sh            # ~5 min on 2 cores, after a first run has built the SFT warm start (~8 min)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T="${TRACE_TRAIN:-.venv/bin/trace-train}"
OUT=runs/bench_jobs
mkdir -p "$OUT"
now() { date +%s.%N; }
one() {  # NAME ALLOCATOR SEED: one run, logged to $OUT/NAME.log
    "$T" --config configs/compare-epochs.toml --set run.steps=8 --set run.eval_every=8 --set run.save_every=0 \
        --set run.plot=false --set "allocation.type=\"$2\"" --set "run.seed=$3" \
        --set "run.output_dir=\"$OUT/$1\"" > "$OUT/$1.log" 2>&1
}
one warm uniform 5  # the caches (world, tiny model, SFT warm start), not timed
a=$(now); one seq-u uniform 0; one seq-t trace 0
both() {  # PREFIX: the two runs side by side; fails if either does (a bare `wait` would not say)
    one "$1-u" uniform 0 & local u=$!
    one "$1-t" trace 0 & local t=$!
    wait "$u" && wait "$t"
}
b=$(now); both par
c=$(now); (export OMP_NUM_THREADS=1 TRACE_CPU_SHARE=1; both par1)  # what --jobs 2 gives each run on 2 cores
d=$(now)
python3 - "$OUT" "$a" "$b" "$c" "$d" <<'PY'
import json, sys
out, (a, b, c, d) = sys.argv[1], map(float, sys.argv[2:])
seq, par, par1 = b - a, c - b, d - c
res = {"sequential_s": seq, "concurrent_s": par, "concurrent_1_thread_s": par1,
       "throughput_concurrent": seq / par, "throughput_concurrent_1_thread": seq / par1}
print(json.dumps(res, indent=2))
open(f"{out}/bench_jobs.json", "w").write(json.dumps(res, indent=2))
PY
