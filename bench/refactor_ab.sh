#!/usr/bin/env bash
# A/B of bench/throughput.py across commits: one worktree per commit, interleaved rounds, one line
# per run with the process CPU time (user + sys) beside the wall-clock rate (bench/RESULTS.md, the
# refactor section). CPU seconds for the same work survive a busy machine; wall time does not.
#
#   ROUNDS=3 THREADS=1 bash bench/refactor_ab.sh [COMMIT ...]    # default: 93d1ff0 7ce3100 HEAD
#
# Needs RAWPAGED_TEST_DATA (the ShareGPT workload and the LLaMA tokenizer) and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-1}
PYTHON=${PYTHON:-python3}
commits=("$@")
[ ${#commits[@]} -gt 0 ] || commits=(93d1ff0 7ce3100 HEAD)
work=$(mktemp -d)
trap 'for c in "${commits[@]}"; do git worktree remove --force "$work/$c" 2>/dev/null || true; done; rm -rf "$work"' EXIT
for c in "${commits[@]}"; do
    git worktree add -q --detach "$work/$c" "$c"
    # NOTE: a warm-up run each, not reported: Numba's cache is keyed by source path, so a new
    # worktree compiles its kernels once (seconds of CPU that would land in round 1).
    (cd "$work/$c" && PYTHONPATH=$work/$c "$PYTHON" bench/throughput.py --num-requests 4 > /dev/null 2>&1) || true
done
for r in $(seq 1 "$ROUNDS"); do
    for c in "${commits[@]}"; do
        d=$work/$c
        out=$(cd "$d" && PYTHONPATH=$d OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS \
              NUMBA_NUM_THREADS=$THREADS /usr/bin/time -f "cpu_s %U %S" "$PYTHON" bench/throughput.py 2>&1) || {
            echo "round $r $c: failed"; tail -n 5 <<< "$out"; continue; }
        cpu=$(awk '/^cpu_s/ {printf "%.2f", $2 + $3}' <<< "$out")
        row=$(grep '^| rawpaged' <<< "$out" | awk -F'|' '{gsub(/ /, "", $4); print $4}')
        echo "round $r $(git -C "$d" rev-parse --short HEAD) load $(cut -d' ' -f1 /proc/loadavg)" \
             "cpu_s $cpu generated_tok_s $row"
    done
done
