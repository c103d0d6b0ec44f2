#!/usr/bin/env bash
# tools/gpu_check.sh: the one prepared run on a device machine (CUDA backend). Under 10 minutes; it
# appends each step's result to $OUT/report.md as the step finishes and leaves 7 files in $OUT
# (the device tool returns at most 8).
#
#     bash tools/gpu_data.sh                        # here, once: the data the run reads -> .gpu_data/
#     OUT=/some/dir bash tools/gpu_check.sh         # there: run(command="bash tools/gpu_check.sh",
#                                                   #   carry=[".gpu_data"], timeout_s=600)
#
# Steps, most important first; each is time-boxed (`timeout`, and no step starts past the budget):
#   1 preflight    versions, bf16 through CuPy's own kernels, every module compiled (fills CuPy's
#                  disk cache for the later steps), registers / local / shared memory per kernel
#   2 op tests     tests/gpu/test_ops_gpu.py: every CUDA op against its CPU twin, failures listed
#   3 end to end   tests/gpu/test_e2e_gpu.py: fixtures fp16/bf16, head-128 model, stories260K
#                  fp16+fp32 in one process, swap preemption; tests/gpu/test_tp_gpu.py: NCCL of
#                  size 1, the mp executor with one worker against one process (TP 2 with 2 GPUs)
#   4 sanitizer    compute-sanitizer memcheck, racecheck, synccheck, initcheck on
#                  tools/gpu_launch_all.py (every kernel of the table launched once, small sizes)
#   5 kernels      bench/kernel_bench.py: memcpy ceiling, decode at issue 13's shapes (paged and
#                  contiguous KV), prefill vs torch SDPA,
#                  memory-bound kernels, GEMM vs torch.matmul (cold L2, event medians)
#   6 decode step  bench/decode_step.py: host ms / GPU ms / launches of a 32-layer LLaMA-7B step,
#                  eager and replayed from a CUDA graph
#   7 throughput   bench/throughput.py --device cuda (LLaMA-7B layer shapes, 2 layers)
#
# Environment: OUT (default: a new temporary folder); GPU_CHECK_BUDGET seconds for all steps
# (default 530: the device call stops at 600); PYTHON (default python3); RAWPAGED_TEST_DATA
# (default .gpu_data/ when present, else ../shared/data). RAWPAGED_EMULATE_CUDA=1 runs every
# step on the host emulation of tests/cuda_emulator.py (the dry run, tests/test_gpu_check.py);
# GPU_CHECK_QUICK=1 shrinks each step to seconds (pytest subsets, --smoke benchmarks);
# GPU_CHECK_STEPS=1,3 runs only those steps (a rerun; step 1 fills the kernel cache the others use).
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET:-530}"
QUICK="${GPU_CHECK_QUICK:-0}"
STEPS="${GPU_CHECK_STEPS:-1,2,3,4,5,6,7}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${RAWPAGED_TEST_DATA:-}" ]; then
    if [ -d "$REPO/.gpu_data" ]; then RAWPAGED_TEST_DATA="$REPO/.gpu_data"; else RAWPAGED_TEST_DATA="$(cd .. && pwd)/shared/data"; fi
fi
export RAWPAGED_TEST_DATA
# NOTE: the caches live outside $OUT: only 8 files come back from it. CuPy's kernel cache is shared
# by every step's process (the preflight compiles, the others load).
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/rawpaged-numba}" CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/rawpaged-cupy}"
WORK="$(mktemp -d)"
REPORT="$OUT/report.md"
BODY="$WORK/body.md"
FAILS="$WORK/failures.txt"
T0=$(date +%s)
SUMMARY=()
: > "$BODY"
: > "$FAILS"

if [ "${RAWPAGED_EMULATE_CUDA:-0}" = 1 ]; then
    MODE="emulated"
    MODE_LINE="**DRY RUN on the host emulation (tests/cuda_emulator.py): no GPU, no figure below is a GPU's**"
elif "$PY" -c "import sys, cupy; sys.exit(0 if cupy.is_available() else 1)" >/dev/null 2>&1; then
    MODE="device"
    MODE_LINE="device run"
else
    MODE="none"
    MODE_LINE="**no usable CUDA device (CuPy missing or cupy.is_available() false): the GPU steps skip**"
fi
NO_GPU="no usable CUDA device (CuPy missing or cupy.is_available() false)"
# compute-sanitizer ships with the CUDA toolkit, which need not be on the PATH
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
             /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n 1)"

commit_line() {
    if git rev-parse HEAD >/dev/null 2>&1; then
        echo "$(git rev-parse HEAD) ($(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) files changed)"
    elif [ -f "$RAWPAGED_TEST_DATA/SOURCE.txt" ]; then
        echo "$(cat "$RAWPAGED_TEST_DATA/SOURCE.txt") (from tools/gpu_data.sh; no .git here)"
    else
        echo "unknown (no .git, no SOURCE.txt)"
    fi
}

HEADER="$WORK/header.md"
{
    echo "# rawpaged GPU check"
    echo
    echo "- $MODE_LINE; $(date -u +%FT%TZ); budget ${BUDGET}s; steps $STEPS; quick=$QUICK"
    echo "- commit: $(commit_line)"
    echo "- data: $RAWPAGED_TEST_DATA ($( [ -d "$RAWPAGED_TEST_DATA" ] && echo present || echo MISSING)); compute-sanitizer: ${SANITIZER:-not found}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader 2>&1 | head -n 2 | tr '\n' ' ')"
    fi
    echo
} > "$HEADER"
cat "$HEADER" > "$REPORT"

# -- step plumbing ---------------------------------------------------------------------------------
# begin NUM NAME LIMIT LOG: sets LIMIT (cut to the budget left), MD (the step's Markdown); 1 = skipped
begin() {
    NUM=$1; NAME=$2; LIMIT=$3; LOG=$4
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    [ "$left" -lt "$LIMIT" ] && LIMIT=$left
    MD="$WORK/step$NUM.md"
    : > "$MD"
    STEP_T0=$(date +%s)
    if [[ ",$STEPS," != *",$NUM,"* ]]; then
        skip "not in GPU_CHECK_STEPS=$STEPS"
        return 1
    fi
    if [ "$LIMIT" -lt 15 ]; then
        skip "out of time: ${left}s of the ${BUDGET}s budget left"
        return 1
    fi
    echo "===== [$NUM. $NAME] limit ${LIMIT}s =====" >> "$OUT/$LOG"
    echo "[$(( $(date +%s) - T0 ))s] step $NUM: $NAME (limit ${LIMIT}s)"
    return 0
}

# limited SECONDS CMD...: the command under `timeout`, its output appended to the step's log
limited() {
    local secs=$1
    shift
    echo "\$ $*" >> "$OUT/$LOG"
    timeout -k 5 "$secs" "$@" >> "$OUT/$LOG" 2>&1
}

verdict() {   # verdict RC LIMIT -> ok | FAILED (rc N) | TIMEOUT after Ns | skipped (pytest's 5: nothing collected)
    case "$1" in
        0) echo "ok" ;;
        5) echo "skipped: no test ran ($(grep -m1 -oE "^SKIPPED \[[0-9]+\] [^ ]+ (.*)" "$OUT/$LOG" | cut -d' ' -f4- | cut -c1-160))" ;;
        124|137) echo "TIMEOUT after ${2}s" ;;
        *) echo "FAILED (rc $1)" ;;
    esac
}

# finish RESULT: the step's section goes into the report now; its failure lines into the summary
finish() {
    local result=$1 dt=$(( $(date +%s) - STEP_T0 ))
    SUMMARY+=("| $NUM | $NAME | $result | ${dt}s | $LOG |")
    {
        echo "## $NUM. $NAME: $result (${dt}s, log: $LOG)"
        echo
        cat "$MD"
        echo
    } >> "$BODY"
    cat "$HEADER" "$BODY" > "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
    if [ "$result" != "ok" ] && [ "${result#skipped}" = "$result" ]; then
        echo "step $NUM ($NAME): $result" >> "$FAILS"
    fi
    echo "[$(( $(date +%s) - T0 ))s] step $NUM: $result"
}

skip() {
    echo "skipped: $1" >> "$MD"
    LOG="-"
    finish "skipped: $1"
}

# pytest_lines RC: the failure lines of this step's pytest run (-v -rfEs) into its Markdown and the
# summary. Cut by the timeout, pytest prints no summary: the verbose lines give the failures so far
# and the test that was running (its id printed, its result not).
pytest_lines() {
    local rc=$1 run lines
    run=$(awk -v t="===== [$NUM. " 'index($0, t) == 1 {on = 1} on' "$OUT/$LOG")
    lines=$(grep -E '^(FAILED|ERROR) |^SKIPPED \[|^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error|xfailed).* in [0-9.]+s|no tests ran|ran past RAWPAGED_TEST_TIMEOUT' <<< "$run" | tail -n 80)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        lines="$lines
$(grep -E '::.* (FAILED|ERROR)' <<< "$run" | sed 's/^/FAILED (before the timeout) /' | head -n 40)
still running at the timeout: $(tail -n 1 <<< "$run" | cut -c1-200)"
    fi
    {
        echo '```'
        echo "${lines:-(no pytest summary in $LOG: see the log)}"
        echo '```'
    } >> "$MD"
    grep -E '^(FAILED|ERROR) |^still running' <<< "$lines" | sed "s/^/step $NUM: /" >> "$FAILS" || true
}

# -- the steps -------------------------------------------------------------------------------------
step_preflight() {
    begin 1 "preflight" 60 preflight.log || return
    if [ "$MODE" = none ]; then skip "$NO_GPU"; return; fi
    limited "$LIMIT" "$PY" tools/gpu_preflight.py --md "$MD"
    finish "$(verdict $? "$LIMIT")"
}

step_ops() {
    begin 2 "op tests: tests/gpu/test_ops_gpu.py against the CPU twins" 100 ops.log || return
    local sel=()
    [ "$QUICK" = 1 ] && sel=(-k "test_copy_blocks or test_swap_round_trip or test_memory_queries or (test_decode and 128-16-4-bfloat16)")
    RAWPAGED_TEST_TIMEOUT=60 limited "$LIMIT" "$PY" -m pytest -v -rfEs -p no:cacheprovider tests/gpu/test_ops_gpu.py "${sel[@]}"
    local rc=$?
    pytest_lines $rc
    finish "$(verdict $rc "$LIMIT")"
}

step_e2e() {
    begin 3 "end to end: tests/gpu/test_e2e_gpu.py, test_graphs_gpu.py" 120 e2e.log || return
    local sel=()
    # NOTE: quick: one fixture in fp16 and bf16 (stories260K's default profiling pass takes minutes
    # emulated), and one graph replay against the eager step
    [ "$QUICK" = 1 ] && sel=(-k "(test_fixture_16bit_gpu_follows_fp32_cpu or test_replay_equals_eager_on_the_device) and llama-gqa")
    RAWPAGED_TEST_TIMEOUT=90 limited "$LIMIT" "$PY" -m pytest -v -s -rfEs -p no:cacheprovider tests/gpu/test_e2e_gpu.py \
        tests/gpu/test_tp_gpu.py tests/gpu/test_graphs_gpu.py "${sel[@]}"
    local rc=$?
    pytest_lines $rc
    {
        echo "What the tests printed (logprob gaps against fp32 on the CPU, the bound's base, the kernels run):"
        echo '```'
        grep -E 'logprob gap|stories260K .*golden' "$OUT/$LOG" | tail -n 22
        echo '```'
    } >> "$MD"
    finish "$(verdict $rc "$LIMIT")"
}

step_sanitizer() {
    begin 4 "compute-sanitizer on tools/gpu_launch_all.py" 90 sanitizer.log || return
    if [ "$MODE" = none ]; then skip "$NO_GPU"; return; fi
    local launch=("$PY" tools/gpu_launch_all.py --no-pool)
    if [ -z "$SANITIZER" ]; then
        limited "$LIMIT" "${launch[@]}"
        local rc=$?
        { echo "compute-sanitizer not found (PATH, /usr/local/cuda*): the launch script ran alone."; echo '```';
          grep -E '^(launched|FAILED|NOT|NO LAUNCHER|launch-all)' "$OUT/$LOG" | tail -n 20; echo '```'; } >> "$MD"
        finish "$(verdict $rc "$LIMIT")"
        return
    fi
    local rows=() worst=0 tool each=$(( LIMIT / 4 ))
    for tool in memcheck racecheck synccheck initcheck; do
        local t=$(date +%s)
        echo "----- $tool -----" >> "$OUT/$LOG"
        limited "$each" "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 10 "${launch[@]}"
        local rc=$? summary
        summary=$(awk -v t="----- $tool -----" '$0 == t {on = 1} on' "$OUT/$LOG" | grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|launch-all:' | tr '\n' ' ')
        rows+=("| $tool | $(verdict $rc "$each") | $(( $(date +%s) - t ))s | ${summary:-no summary line} |")
        [ $rc -ne 0 ] && worst=$rc
    done
    {
        echo "| tool | result | time | summary |"
        echo "|---|---|---|---|"
        printf '%s\n' "${rows[@]}"
        echo
        echo "First findings (sanitizer.log has them all):"
        echo '```'
        grep -E '^========= +(Invalid|Race|Barrier|Uninitialized|Error|Program hit|Address|Saved host)|^(FAILED|NOT|NO LAUNCHER)' "$OUT/$LOG" | head -n 30
        echo '```'
    } >> "$MD"
    finish "$(verdict $worst "$LIMIT")"
}

step_kernels() {
    begin 5 "kernel performance: bench/kernel_bench.py" 90 bench.log || return
    if [ "$MODE" = none ]; then skip "$NO_GPU"; return; fi
    local args=(--budget $(( LIMIT - 20 )))
    [ "$QUICK" = 1 ] && args+=(--smoke)
    limited "$LIMIT" "$PY" bench/kernel_bench.py --md "$MD" "${args[@]}"
    finish "$(verdict $? "$LIMIT")"
}

step_decode_step() {
    begin 6 "decode step breakdown: bench/decode_step.py" 45 bench.log || return
    if [ "$MODE" = none ]; then skip "$NO_GPU"; return; fi
    local args=()
    [ "$QUICK" = 1 ] && args=(--smoke --batches 1,2 --context 40)
    limited "$LIMIT" "$PY" bench/decode_step.py --md "$MD" "${args[@]}"
    finish "$(verdict $? "$LIMIT")"
}

step_throughput() {
    begin 7 "throughput: bench/throughput.py --device cuda" 90 throughput.log || return
    if [ "$MODE" = none ]; then skip "$NO_GPU"; return; fi
    local args=(--shape llama7b --layers 2 --num-requests 64)
    [ "$QUICK" = 1 ] && args=(--num-requests 1 --scale 0.01 --max-len 16)
    limited "$LIMIT" "$PY" tools/gpu_emulated.py bench/throughput.py --device cuda "${args[@]}"
    local rc=$?
    { echo '```'; grep -E '^machine:|requests, mean|^\||^rawpaged:|baseline skipped|Error' "$OUT/$LOG" | tail -n 20; echo '```'; } >> "$MD"
    finish "$(verdict $rc "$LIMIT")"
}

step_preflight
step_ops
step_e2e
step_sanitizer
step_kernels
step_decode_step
step_throughput

# -- the summary goes on top -----------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T0 ))
{
    cat "$HEADER"
    echo "Total ${TOTAL}s. Sections below follow in the order the steps ran."
    echo
    echo "| step | what | result | time | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "## Failures"
    echo
    if [ -s "$FAILS" ]; then echo '```'; cat "$FAILS"; echo '```'; else echo "none"; fi
    echo
    cat "$BODY"
} > "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
rm -rf "$WORK"
awk '/^## [0-9]\. / {exit} {print}' "$REPORT"          # the header, the summary and the failures
echo "report: $REPORT ($(ls "$OUT" | wc -l) files in $OUT)"
