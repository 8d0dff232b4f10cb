#!/usr/bin/env bash
# Issue 25's comparison: TRACE beside its peers under the equal-care protocol (issue 22's), in two regimes, from a
# frozen worktree of COMMIT (default: HEAD), so that work in this checkout cannot change the code mid-comparison.
# Resumable: run it again and every finished run is kept (bench/compare_allocators.py's result.json per run).
#
#   setsid nohup bench/run_peers.sh [COMMIT] > runs/peers.log 2>&1 &
#   PEERS_REGIMES=epochs setsid nohup bench/run_peers.sh [COMMIT] > runs/peers.log 2>&1 &   # one regime
#
# $TRACE_CMP_TREE: the worktree's path (default runs/worktree-COMMIT); resume with the tree path it started with.
# How far it has got: a regime's compare_allocators.py command below with --progress appended (runs nothing).
# Each finished run's result.json is also copied into bench/results/ (--keep), which is tracked: runs/ is scratch that
# a new checkout does not have (a session's lost 23 finished runs so), so commit bench/results/ as runs finish
# (bench/commit_kept.sh does it on a timer) and a later checkout resumes from there.
# $PEERS_JOBS: runs at once (--jobs; default 1).
# A kept run is kept only where its key matches. The harness of COMMIT writes the key: from the commit after
# 6260873 on it holds hashes of the resolved config and of the code, with the paths read relative, so a checkout at
# another path resumes and other code runs again; before, it held absolute paths (the worktree's config path stood
# for the code), and such runs (the epochs regime's, from 37bb559: /work/main) resume only from the same path.
#
# Arms, every one at exactly allocation.leaf_budget leaves a step, each at its own rate from a sweep on 2 tuning
# seeds (never reported), 8 reported seeds paired by seed against GRPO:
#   uniform      GRPO
#   trace        TRACE as in the paper
#   trace-fixed  the simulator's best variant (stage 2 among unmixed prompts, fresh-valued process baseline)
#   greso        GRESO (Zheng et al., 2025): GRPO (groups of 4, no tree) behind GRESO's pre-rollout filter, which
#                skips a prompt whose latest visits were all 0 or all 1 with a probability that adapts (epochs only)
#   entropy      entropy branching (ARPO's signal, AT2PO's top-K): GRPO's stage 1, continuations at the anchors
#                where the policy's entropy after a tool result is highest
# Regime "single" (run first: it finishes sooner): today's testbed (configs/compare.toml, 1,500 questions, 20 steps:
#   no prompt seen twice), every arm but greso, which without a history skips nothing and is GRPO exactly (the three
#   of issue 22's regime 1 run again here: a run is not bit-for-bit reproducible, its rollouts' sampling order
#   depends on timing, so arms are compared only within one comparison).
# Regime "epochs": 300 train questions, 5 passes (94 steps of 16 prompts), where a prompt's history has data; dev EM
#   every 10 steps. configs/compare.toml with env.train_limit=300 (= configs/compare-epochs.toml, checked by
#   tests/test_config.py; the command below keeps its --set form so that a resumed comparison keeps its runs).
# Rates: 5e-5, 1e-4, 2e-4 for both (issue 22's regime 1 found every arm best at the top of 2e-5..1e-4).
# Cost: regime "single" is 56 runs of 20 steps (~2.5-3.5 min alone on 2 cores), ~3 h; a 94-step run is ~10-12 min, so
# regime "epochs" (5 arms x (3 rates x 2 tuning + 8) = 70 runs) is ~13 h: several sessions, resumed each time.
# The body is one brace group: bash reads all of it before it runs any, so editing this file while a comparison
# runs (hours) cannot change what the running one does next.
{
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMIT="$(git -C "$REPO" rev-parse --short "${1:-HEAD}")"
TREE="${TRACE_CMP_TREE:-$REPO/runs/worktree-$COMMIT}"
[ -d "$TREE" ] || git -C "$REPO" worktree add --detach "$TREE" "$COMMIT"
PY="${PY:-$REPO/.venv/bin/python}"
cd "$TREE"
export PYTHONPATH="$TREE"
# Idle OpenMP threads sleep instead of spinning (shared/cpu_threads.py sets it too; a frozen tree from before it
# does not): otherwise anything else on the cores makes each policy update 10-20x slower. Numerics unchanged.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
echo "peers comparison at $COMMIT, from $TREE; $(date)"
ARMS=uniform,trace,trace-fixed,greso,entropy
FIXED='trace-fixed=trace|allocation.stage2_share="unmixed"|advantage.process_baseline="fresh"'
GRESO='greso=greso|allocation.group_size=4'
# issue 22's regime 1 found every arm best at 1e-4, the top of 2e-5..1e-4: centred on it here.
LRS=5e-5,1e-4,2e-4
REGIMES="${PEERS_REGIMES:-single epochs}"
JOBS="${PEERS_JOBS:-1}"
KEEP="$REPO/bench/results"
if [[ " $REGIMES " == *" single "* ]]; then
"$PY" bench/compare_allocators.py --steps 20 --seeds 8 --eval-every 2 --out "$REPO/runs/compare_peers_single.json" \
    --keep "$KEEP/compare_peers_single" --jobs "$JOBS" \
    --allocators uniform,trace,trace-fixed,entropy --arm "$FIXED" --sweep-lrs "$LRS" --tune-seeds 2
echo "regime single done $(date)"
fi
if [[ " $REGIMES " == *" epochs "* ]]; then
if [ "$JOBS" -gt 1 ]; then  # the caches (world, tiny model, SFT warm start) built once, alone: a tree from before
    # trainer.services.cache_lock (7a069cb) builds them in two runs at once on a fresh machine. Seconds once built.
    "$PY" -m trainer.cli --config configs/compare.toml --set env.train_limit=300 --set run.steps=0 \
        --set run.eval_every=0 --set run.save_every=0 --set run.plot=false \
        --set "run.output_dir=\"$REPO/runs/warm_caches\"" > "$REPO/runs/warm_caches.log" 2>&1
fi
"$PY" bench/compare_allocators.py --steps 94 --seeds 8 --eval-every 10 --out "$REPO/runs/compare_peers_epochs.json" \
    --keep "$KEEP/compare_peers_epochs" --jobs "$JOBS" \
    --allocators "$ARMS" --arm "$FIXED" --arm "$GRESO" --set env.train_limit=300 --sweep-lrs "$LRS" --tune-seeds 2
echo "regime epochs done $(date)"
fi
exit
}
