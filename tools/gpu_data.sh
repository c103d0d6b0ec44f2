#!/usr/bin/env bash
# tools/gpu_data.sh: copy the shared data the GPU check reads into .gpu_data/ (ignored by git), so
# that the device call can carry it: ../shared does not travel to the device machine.
#
#     RAWPAGED_TEST_DATA=/path/to/shared/data bash tools/gpu_data.sh [DEST]     (DEST: .gpu_data)
#
# Then call the device with carry [".gpu_data"]; tools/gpu_check.sh points RAWPAGED_TEST_DATA at
# it. What it copies (about 6 MB; the call carries at most 64 MiB with the tree):
#   models/stories260K/{stories260K.bin, tok512.bin, greedy_reference.json}   e2e: golden greedy ids
#   tokenizers/llama-32k/tokenizer.json                                     throughput: the workload
#   workloads/{sharegpt_prompts_1000.json, sharegpt_multiturn_lengths.csv}   throughput: the workload
# Exit status 1, naming the file, when one is missing; the destination is then left untouched.
set -eu
cd "$(dirname "$0")/.."
SRC="${RAWPAGED_TEST_DATA:-$(cd .. && pwd)/shared/data}"
DEST="${1:-.gpu_data}"
FILES=(
    models/stories260K/stories260K.bin
    models/stories260K/tok512.bin
    models/stories260K/greedy_reference.json
    tokenizers/llama-32k/tokenizer.json
    workloads/sharegpt_prompts_1000.json
    workloads/sharegpt_multiturn_lengths.csv
)
LIMIT=$((32 << 20))
for f in "${FILES[@]}"; do
    if [ ! -f "$SRC/$f" ]; then
        echo "gpu_data: $SRC/$f not found (set RAWPAGED_TEST_DATA to the shared data folder)" >&2
        exit 1
    fi
done
TMP="$(mktemp -d "${DEST%/}.tmp.XXXXXX")"
for f in "${FILES[@]}"; do
    mkdir -p "$TMP/$(dirname "$f")"
    cp "$SRC/$f" "$TMP/$f"
done
# NOTE: the device gets the tree without .git: the report names the commit from this file.
echo "$(git rev-parse HEAD 2>/dev/null || echo unknown) ($(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) files changed; data copied $(date -u +%FT%TZ))" > "$TMP/SOURCE.txt"
SIZE=$(du -sb "$TMP" | cut -f1)
if [ "$SIZE" -gt "$LIMIT" ]; then
    rm -rf "$TMP"
    echo "gpu_data: $SIZE bytes is over the $LIMIT-byte budget for the device call's carry" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$TMP" "$DEST"
echo "gpu_data: ${#FILES[@]} files, $SIZE bytes in $DEST (carry it: [\"$DEST\"])"
