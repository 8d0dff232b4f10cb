#!/usr/bin/env bash
# Commits what a long comparison's --keep folder (bench/results/NAME) has gained, every INTERVAL seconds (default
# 600), so that a session that ends part way loses at most one interval's runs: runs/ is scratch that a new checkout
# lacks, bench/results/ is tracked. Only that folder goes into each commit (`git commit -- DIR`): other staged or
# unstaged work is left as it is. A commit that fails (the index busy with another git command) is tried next time.
#
#   setsid nohup bench/commit_kept.sh bench/results/compare_peers_epochs > runs/commit_kept.log 2>&1 &
set -uo pipefail
DIR="${1:?usage: bench/commit_kept.sh DIR [INTERVAL_S]}"
EVERY="${2:-600}"
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
while true; do
    if [ -d "$DIR" ] && [ -n "$(git status --porcelain -- "$DIR")" ]; then
        n="$(find "$DIR" -name result.json | wc -l)"
        if git add -- "$DIR" && git commit -q -m "$DIR: $n finished runs kept (bench/commit_kept.sh)" -- "$DIR"; then
            echo "$(date -u +%T) committed $DIR: $n runs"
        else
            echo "$(date -u +%T) commit failed; next time"
        fi
    fi
    sleep "$EVERY"
done
