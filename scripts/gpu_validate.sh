#!/usr/bin/env bash
# Validates the CUDA kernels on a machine with a GPU (the device tool's H100/H200 box).
#
#   bash scripts/gpu_validate.sh [STAGE...]     STAGE: test | sanitize | bench | all (default)
#
# Every call first builds the extension in place (sm_90; incremental, so fast on a machine that
# already built it), then runs the stages named. One device-tool command may run 10 minutes, so
# run the stages as separate calls, each with timeout_s=600:
#   1. bash scripts/gpu_validate.sh test       whole pytest suite                (~build + tests)
#   2. bash scripts/gpu_validate.sh sanitize   compute-sanitizer memcheck + racecheck on a
#                                              small tests/test_cuda*.py and
#                                              tests/test_tokens_cuda.py selection
#   3. bash scripts/gpu_validate.sh bench      python -m gapkernels.bench --device cuda
# Logs go to $OUT (at most 8 files per call): summary.txt, build.log, and one log per stage;
# benchmark results to $OUT/bench/. Each stage is cut off so that the call ends before
# GK_BUDGET_S seconds (default 570). Environment: PYTHON (default python3), GK_PYTEST_ARGS,
# GK_BENCH_ARGS (extra arguments), GK_PYTEST_WORKERS (pytest-xdist workers, default 4).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/gapkernels_gpu_validate}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GK_BUDGET_S:-570}))
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/compute-sanitizer/compute-sanitizer")
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[0]}" = all ]; then
    STAGES=(test sanitize bench)
fi

seconds_left() { echo $((DEADLINE - $(date +%s))); }

# run_logged NAME LOG CAP COMMAND...: runs COMMAND for at most CAP seconds (0: no cap) and never
# past the call's deadline, logs to LOG, records the verdict in the summary.
run_logged() {
    local name=$1 log=$2 cap=$3
    shift 3
    local left
    left=$(seconds_left)
    if [ "$cap" -gt 0 ] && [ "$cap" -lt "$left" ]; then
        left=$cap
    fi
    if [ "$left" -le 15 ]; then
        echo "$name: SKIPPED (no time left in this call)" | tee -a "$SUMMARY"
        return 1
    fi
    local begin=$(date +%s)
    # bash -c: COMMAND may be one of the exported functions below.
    timeout -s INT -k 20 "$left" bash -c '"$@"' "$name" "$@" >"$log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -ne 0 ] && verdict="FAILED rc=$rc"
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${left}s (rc=124)"
    echo "$name: $verdict ($(( $(date +%s) - begin ))s) -> $(basename "$log")" | tee -a "$SUMMARY"
    return $rc
}

{
    echo "gapkernels GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), stages: ${STAGES[*]}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
    nvcc --version 2>&1 | tail -1
} | tee "$SUMMARY"

build() {
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . &&
        "$PY" - <<'PYEOF'
import torch
from gapkernels import _ext
print("CPU kernels:", _ext.has_kernel("CPU"), "| CUDA kernels:", _ext.has_kernel("CUDA"))
if _ext.unavailable_reason("CUDA"):
    raise SystemExit(_ext.unavailable_reason("CUDA"))
PYEOF
}
export -f build
export PY OUT SANITIZER
if ! run_logged build "$OUT/build.log" 0 build; then
    tail -40 "$OUT/build.log"
    exit 1
fi

pytest_workers() {
    if "$PY" -c "import xdist" >/dev/null 2>&1 && [ "${GK_PYTEST_WORKERS:-4}" -gt 1 ]; then
        echo "-n ${GK_PYTEST_WORKERS:-4}"
    fi
}

# The sanitizers see every out-of-bounds access only when each tensor is its own allocation.
# The token kernels' part: spans clamped, empty rows, varlen (rows found by position), the max
# rules and rows split into pieces (the combine pass), on the CUDA token kernels.
TOKEN_SELECTION="tokens_cuda and (varlen or empty_rows or clamped or max_rules or (split_rows and mask_start and (mixed or gem)))"
SANITIZE_SELECTION="max_semantics or (unaligned and float16) or (bitwise and (subwarp_rows or ncs_split or nsc_odd_c_split) and float32) or few_long_rows or ($TOKEN_SELECTION)"
RACECHECK_SELECTION="(bitwise and channels_last and (subwarp_rows or nsc_odd_c_split) and (float16 or float64)) or (tokens_cuda and split_rows and nsc_split and (max or gem))"

sanitize() {
    local tool=$1 selection=$2
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 3 \
        --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_cuda_alignment.py tests/test_tokens_cuda.py -k "$selection"
}

bench() {
    if ! "$PY" -c "import gapkernels.bench" >/dev/null 2>&1; then
        echo "gapkernels.bench is not there: nothing to run"
        return 0
    fi
    mkdir -p "$OUT/bench"
    # shellcheck disable=SC2086
    "$PY" -m gapkernels.bench --device cuda --out "$OUT/bench" ${GK_BENCH_ARGS:-}
}

export -f sanitize bench

status=0
for stage in "${STAGES[@]}"; do
    case $stage in
        test)
            # shellcheck disable=SC2046,SC2086
            run_logged pytest "$OUT/pytest.log" 0 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
                --durations=15 $(pytest_workers) ${GK_PYTEST_ARGS:-} tests || status=1
            tail -15 "$OUT/pytest.log"
            ;;
        sanitize)
            # memcheck gets at most 60% of what is left, so that racecheck runs too.
            run_logged memcheck "$OUT/memcheck.log" $(($(seconds_left) * 6 / 10)) \
                sanitize memcheck "$SANITIZE_SELECTION" || status=1
            tail -6 "$OUT/memcheck.log"
            run_logged racecheck "$OUT/racecheck.log" 0 sanitize racecheck "$RACECHECK_SELECTION" || status=1
            tail -6 "$OUT/racecheck.log"
            ;;
        bench)
            run_logged bench "$OUT/bench.log" 0 bench || status=1
            tail -30 "$OUT/bench.log"
            ;;
        *)
            echo "unknown stage $stage (test | sanitize | bench | all)" | tee -a "$SUMMARY"
            status=2
            ;;
    esac
done
echo "---- summary ----"
cat "$SUMMARY"
exit $status
