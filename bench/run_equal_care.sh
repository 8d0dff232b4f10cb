#!/usr/bin/env bash
# Issue 22's powered LM comparison under the equal-care protocol, both regimes in turn, from a frozen worktree of
# COMMIT (default: HEAD), so that work in this checkout cannot change the code mid-comparison (the runs start child
# processes that import the code anew). Resumable: run it again and every finished run is kept
# (bench/compare_allocators.py's result.json per run). Hours on 2 CPU cores; outputs in runs/compare_equal_care*.
#
#   setsid nohup bench/run_equal_care.sh [COMMIT] > runs/equal_care.log 2>&1 &
#
# $TRACE_CMP_TREE: the worktree's path (default runs/worktree-COMMIT). A finished run is kept only when its settings
# (the config's path included) are the same, so resume a comparison with the tree path it started with.
#
# Regime 1: today's testbed (configs/compare.toml, sft.flawed_frac 0.7), rates 2e-5, 5e-5, 1e-4.
# Regime 2: the paper's (GRPO's effective ratio near 0.27: sft.flawed_frac 0.95), rates 1e-4, 2e-4, 4e-4, with the
# calibration probe (predictor.probe_prompts 8). Arms: GRPO (uniform), TRACE as in the paper, and the simulator's best
# variant (stage2_share unmixed + process_baseline fresh); 2 tuning seeds, 8 reported seeds, 20 steps, dev EM every 2.
# Regime 1-final: regime 1 with each arm's rate tuned on the tuning runs' final dev EM (--tune-on final) instead of
# the mean over the run (the tuning runs of regime 1 hinted that TRACE ends ahead at its final-tuned rate).
# $EQUAL_CARE_REGIMES: which, in order (default "1 2"), e.g. EQUAL_CARE_REGIMES=1-final.
# The body is one brace group: bash reads all of it before it runs any, so editing this file while a comparison
# runs (hours) cannot change what the running one does next.
{
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMIT="$(git -C "$REPO" rev-parse --short "${1:-HEAD}")"
TREE="${TRACE_CMP_TREE:-$REPO/runs/worktree-$COMMIT}"  # a run keeps its results only under the same tree path
[ -d "$TREE" ] || git -C "$REPO" worktree add --detach "$TREE" "$COMMIT"
PY="${PY:-$REPO/.venv/bin/python}"
cd "$TREE"
export PYTHONPATH="$TREE"
# Idle OpenMP threads sleep instead of spinning (shared/cpu_threads.py sets it too; a frozen tree from before it
# does not): otherwise anything else on the cores makes each policy update 10-20x slower. Numerics unchanged.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
echo "equal-care comparison at $COMMIT, from $TREE; $(date)"
ARM='trace-fixed=trace|allocation.stage2_share="unmixed"|advantage.process_baseline="fresh"'
for regime in ${EQUAL_CARE_REGIMES:-1 2}; do
  case "$regime" in
    1) "$PY" bench/compare_allocators.py --steps 20 --seeds 8 --eval-every 2 --out "$REPO/runs/compare_equal_care.json" \
         --allocators uniform,trace,trace-fixed --arm "$ARM" --sweep-lrs 2e-5,5e-5,1e-4 --tune-seeds 2 ;;
    2) "$PY" bench/compare_allocators.py --steps 20 --seeds 8 --eval-every 2 \
         --out "$REPO/runs/compare_equal_care_f95.json" --allocators uniform,trace,trace-fixed --arm "$ARM" \
         --set sft.flawed_frac=0.95 --set predictor.probe_prompts=8 --sweep-lrs 1e-4,2e-4,4e-4 --tune-seeds 2 ;;
    1-final) "$PY" bench/compare_allocators.py --steps 20 --seeds 8 --eval-every 2 \
         --out "$REPO/runs/compare_equal_care_final.json" --allocators uniform,trace,trace-fixed --arm "$ARM" \
         --sweep-lrs 2e-5,5e-5,1e-4 --tune-seeds 2 --tune-on final ;;
    *) echo "unknown regime $regime (1, 2, 1-final)"; exit 2 ;;
  esac
  echo "regime $regime done $(date)"
done
exit
}
