#!/usr/bin/env bash
# tools/gpu_check.sh: the one prepared run for the device machine (CUDA backend, issue 4).
#
# Uses only what the device image has (Python 3.12, cupy-cuda13x, numba, numpy, safetensors,
# tokenizers, torch, pytest); installs nothing. Run from the source tree:
#     OUT=/some/dir bash tools/gpu_check.sh
# Steps (each under `timeout`, so one failure cannot eat the budget; the whole run stays < 6 min):
#     env          nvidia-smi, versions, commit
#     pytest       tests/gpu (every op vs its CPU twin, end-to-end fixtures, stories260K, swap preemption)
#     attention    bench/attention_bench.py --quick
#     swap         bench/swap_bench.py --quick
#     stories      stories260K greedy on the GPU (fp16) vs its golden ids, via the llama2.c converter
#     throughput   bench/throughput.py --device cuda --shape llama7b --layers 2 (LLaMA-7B layer shapes, 2 layers)
# stories260K is read from $RAWPAGED_TEST_DATA (default ../shared/data, which does not travel to the
# device: carry a copy of models/stories260K, tokenizers/llama-32k and workloads in an ignored folder of
# the checkout and point RAWPAGED_TEST_DATA at it).  
# Writes $OUT/report.md plus at most 5 logs (the device tool returns at most 8 files).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAWPAGED_TEST_DATA="${RAWPAGED_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$OUT/.numba_cache}"
PY="${PYTHON:-python3}"
REPORT="$OUT/report.md"
T0=$(date +%s)
STATUS=()

step() {   # step NAME LIMIT_S LOGFILE CMD...
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$(date +%s)
    { echo "### $name: $*"; } >> "$log"
    timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t ))
    local what="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT after ${limit}s"
    [ $rc -ne 0 ] && [ "$what" = "ok" ] && what="FAILED (rc $rc)"
    STATUS+=("| $name | $what | ${dt}s | $(basename "$log") |")
    return 0
}

skip() { STATUS+=("| $1 | skipped: $2 | - | - |"); }

# ---- env ------------------------------------------------------------------------------------
ENV="$OUT/env.txt"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) uncommitted"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi failed"
    "$PY" - <<'EOF' 2>&1
import platform
print("python", platform.python_version())
for m in ("numpy", "cupy", "numba", "ml_dtypes", "torch"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as err:
        print(m, "missing:", err)
try:
    import cupy
    print("cupy.is_available:", cupy.is_available())
    d = cupy.cuda.Device()
    print("compute capability:", d.compute_capability, "SMs:", d.attributes["MultiProcessorCount"])
    from rawpaged.backend import cuda
    print("bfloat16 arrays:", cuda.bfloat16_supported())
except Exception as err:
    print("cupy probe failed:", err)
EOF
} > "$ENV" 2>&1
STATUS+=("| env | ok | - | env.txt |")

if "$PY" -c "import sys, cupy; sys.exit(0 if cupy.is_available() else 1)" >/dev/null 2>&1; then
    GPU=1
else
    GPU=0
    NO_GPU="no usable CUDA device (CuPy missing or cupy.is_available() false)"
fi

# ---- tests/gpu ------------------------------------------------------------------------------
if [ $GPU = 1 ]; then
    step pytest 160 "$OUT/pytest.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu
else
    # still collect them, so the report shows each module's skip reason
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu > "$OUT/pytest.log" 2>&1
    skip pytest "$NO_GPU (see pytest.log)"
fi

# ---- benchmarks -----------------------------------------------------------------------------
BENCH="$OUT/bench.log"
E2E="$OUT/e2e.log"
if [ $GPU = 1 ]; then
    step attention 60 "$BENCH" "$PY" bench/attention_bench.py --quick --out "$OUT/attention.md"
    step swap 25 "$BENCH" "$PY" bench/swap_bench.py --quick --out "$OUT/swap.md"
else
    skip attention "$NO_GPU"
    skip swap "$NO_GPU"
fi

# ---- end to end -----------------------------------------------------------------------------
if [ $GPU = 0 ]; then
    skip stories "$NO_GPU"
elif [ -f "$RAWPAGED_TEST_DATA/models/stories260K/stories260K.bin" ]; then
    step stories 45 "$E2E" "$PY" - <<'EOF'
import json, os, tempfile, time
from pathlib import Path
from rawpaged import LLM, SamplingParams
from rawpaged.convert.llama2c import convert_llama2c
src = Path(os.environ["RAWPAGED_TEST_DATA"]) / "models" / "stories260K"
hf = convert_llama2c(src / "stories260K.bin", src / "tok512.bin", Path(tempfile.mkdtemp()) / "hf")
want = json.loads((src / "greedy_reference.json").read_text())["greedy_next_token_ids_64"]
for dtype in ("float16", "float32"):
    llm = LLM(model=str(hf), device="cuda", dtype=dtype)
    t = time.perf_counter()
    out = llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    got = out[0].outputs[0].token_ids
    print(f"stories260K {dtype}: {'EQUAL' if got == want else 'DIFFERENT'} to the golden 64 ids "
          f"({time.perf_counter() - t:.2f}s); text: {out[0].outputs[0].text[:80]!r}")
    assert got == want, (got, want)
EOF
else
    skip stories "no stories260K under \$RAWPAGED_TEST_DATA ($RAWPAGED_TEST_DATA)"
fi

if [ $GPU = 0 ]; then
    skip throughput "$NO_GPU"
elif [ -f bench/throughput.py ] && "$PY" bench/throughput.py --help 2>/dev/null | grep -q -- "--device"; then
    step throughput 60 "$E2E" "$PY" bench/throughput.py --device cuda --shape llama7b --layers 2 --num-requests 64
else
    skip throughput "bench/throughput.py has no --device option yet"
fi

# ---- report ---------------------------------------------------------------------------------
{
    echo "# rawpaged GPU check"
    echo
    echo "Total $(( $(date +%s) - T0 ))s. Numbers below were measured in this run on the device named in env.txt."
    echo
    echo '```'
    cat "$ENV"
    echo '```'
    echo
    echo "| step | result | time | log |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "## tests/gpu"
    echo '```'
    tail -n 25 "$OUT/pytest.log" 2>/dev/null
    echo '```'
    for f in attention swap; do
        echo
        echo "## $f bench"
        if [ -f "$OUT/$f.md" ]; then cat "$OUT/$f.md"; else echo "(no table: see bench.log)"; fi
    done
    echo
    echo "## end to end"
    echo '```'
    grep -E "stories260K|Error|error|assert" "$E2E" 2>/dev/null | tail -n 20
    echo '```'
} > "$REPORT"
rm -rf "$NUMBA_CACHE_DIR"
echo "report: $REPORT"
