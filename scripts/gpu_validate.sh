#!/usr/bin/env bash
# Validates gapkernels on a machine with a GPU (the device tool's H100/H200 box), in as few calls
# as a short lease allows.
#
#   bash scripts/gpu_validate.sh [STAGE...]        (default: the plan of call 1 below)
#
# STAGE: build | smoke | retest | test | memcheck | racecheck | initcheck | synccheck | bench
#        | benchmore | benchcompile | benchtokens | profile
#   build         pip install --no-build-isolation -e . (sm_90, the libraries built in parallel,
#                 one CPU variant; a library that fails is reported and the rest go on)
#   smoke         every op on both GPU backends against gapkernels.reference, one line each
#   retest        first the tests that failed on the first GPU run (2026-11-26, H200; fixed
#                 without a GPU since): the check-error segfault, the Inductor compile, the
#                 test bugs (bench/results/gpu-validation-nvidia-h200-2026-11-26.md)
#   test          pytest over the GPU-relevant tests (-k "cuda or triton or gpu"), in parallel
#   memcheck ...  compute-sanitizer over a small CUDA selection (each tool its own stage)
#   bench         PERF.md's priority cases: (256,2048,7,7), (1,2048,7,7), (128,256,56,56), odd;
#                 every op, both layouts, bfloat16 and float32, fwd and fwdbwd, both GPU backends,
#                 eager and timm; no torch.compile; one invocation per shape, merged, each
#                 rewriting auto's table from the rows merged so far (--write-auto-table)
#   benchmore     the other PERF.md shapes, same grid
#   benchcompile  the torch.compile peer on the (256,2048,7,7) head, every op (a separate file)
#   benchtokens   token pooling (python -m gapkernels.bench.tokens --device cuda): PERF.md's three
#                 token cases and a random mask, cuda and triton backends, against the
#                 sentence-transformers formula (eager, torch.compile) and timm's global_pool_nlc
#   profile       Nsight Compute (clocks left alone) over the cases furthest from the probe
#                 (scripts/gpu_profile_cases.py): speed of light, launch stats, occupancy
# A device lease is about 15 minutes in all, so the two planned calls are
#   call 1: bash scripts/gpu_validate.sh                     (build smoke retest test bench)
#   call 2: GK_SKIP_BUILD=1 bash scripts/gpu_validate.sh memcheck racecheck benchtokens benchcompile benchmore
# (call 2 only on the same warm machine: it reuses call 1's build).
# Logs go to $OUT, at most 8 files per call: summary.txt, build.log, smoke.log, pytest.log,
# junit.xml (junit-retest.xml), bench.tgz (the results and auto_table.json), one .log per
# sanitizer; each stage is cut off so that the call ends before GK_BUDGET_S seconds (default 560).
# What the first run taught (2026-11-26, H200): the build takes ~50 s, the GPU test selection
# ~140 s at 14 workers, the priority benchmark ~130 s; the machine stays warm only 30 s after a
# call, so have call 2 ready to send at once. Summarize with scripts/gpu_summary.py.
# Environment: PYTHON (default python3), GK_PYTEST_WORKERS (default 14), GK_PYTEST_ARGS,
# GK_SKIP_BUILD=1, GK_CAP_<STAGE> (seconds, overrides a stage's cap).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/gapkernels_gpu_validate}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GK_BUDGET_S:-560}))
SUMMARY="$OUT/summary.txt"
BENCH_DIR=/tmp/gapkernels_bench
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
NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
    STAGES=(build smoke retest test bench)
fi

seconds_left() { echo $((DEADLINE - $(date +%s))); }

# run_logged NAME LOG CAP COMMAND...: runs COMMAND for at most CAP seconds (GK_CAP_<NAME> wins)
# and never past the call's deadline, logs to LOG (appending), records the verdict in the summary.
run_logged() {
    local name=$1 log=$2 cap=$3
    shift 3
    local override="GK_CAP_${name^^}"
    cap=${!override:-$cap}
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
    # bash -c: COMMAND may be one of the exported functions below. SIGINT first, so that pytest
    # writes its summary and junit file.
    timeout -s INT -k 15 "$left" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -ne 0 ] && verdict="FAILED rc=$rc"
    [ $rc -eq 124 ] && verdict="CUT OFF after ${left}s (rc=124)"
    echo "$name: $verdict ($(($(date +%s) - begin))s) -> $(basename "$log")" | tee -a "$SUMMARY"
    return $rc
}

{
    echo "gapkernels GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), stages: ${STAGES[*]}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
    nvcc --version 2>&1 | tail -1
    echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} | tee -a "$SUMMARY"

build() {
    # The libraries at once (GAPKERNELS_BUILD_JOBS), one CPU variant: the GPU is what is tested.
    export GAPKERNELS_BUILD_JOBS=4 GAPKERNELS_BUILD_KEEP_GOING=1 GAPKERNELS_CPU_VARIANTS=avx2
    "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"
    if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e .; then
        # One try is all a lease has: a setuptools older than pyproject.toml's metadata needs
        # (77) still builds the libraries in place, without the metadata.
        echo "gapkernels: pip install -e failed; building in place without pyproject.toml"
        mv pyproject.toml /tmp/pyproject.toml.orig
        "$PY" setup.py build_ext --inplace
        mv /tmp/pyproject.toml.orig pyproject.toml
    fi
    "$PY" -m gapkernels.info
    # The toolchain against the runtime C++ library (the first GPU run's check-error segfault
    # happened in code this machine's compiler built): which libstdc++ each library binds to,
    # and the stream symbols it takes from it.
    g++ --version | head -1
    for lib in gapkernels/*.so; do
        echo "== $lib"
        ldd "$lib" | grep -E "stdc\+\+|gcc_s" || true
        nm -D --undefined-only "$lib" | c++filt | grep -iE "stringstream|ostream::_M_insert" | head -5
    done
}

smoke() {
    "$PY" - <<'PYEOF'
import torch

import gapkernels
from gapkernels import _ext, reference

print("CUDA kernels:", _ext.unavailable_reason("CUDA") or "loaded")
ops = {  # (x, backend, keyword arguments) -> pooled
    "avg": lambda x, b, kw: gapkernels.global_avg_pool(x, backend=b, **kw),
    "max": lambda x, b, kw: gapkernels.global_max_pool(x, backend=b, **kw),
    "avgmax": lambda x, b, kw: gapkernels.global_avgmax_pool(x, backend=b, **kw),
    "catavgmax": lambda x, b, kw: gapkernels.global_avgmax_pool(x, True, backend=b, **kw),
    "mixed": lambda x, b, kw: gapkernels.global_mixed_pool(x, 0.3, backend=b, **kw),
    "gem": lambda x, b, kw: gapkernels.global_gem_pool(x, 3.0, backend=b, **kw),
}
bad = 0


def check(label, fn, backend, x, kw, tol):
    """One case against the reference in float64, forward and backward; prints one line."""
    global bad
    try:
        x = x.detach().requires_grad_(True)
        out = fn(x, backend, kw)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        xr = x.detach().double().requires_grad_(True)
        ref = fn(xr, "reference", kw)
        (gr,) = torch.autograd.grad(ref, xr, g.double())
        err = (out.double() - ref).abs().max().item()
        gerr = (gx.double() - gr).abs().max().item()
        ok = err <= tol and gerr <= tol
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {backend:6} {label} out {err:.2e} grad {gerr:.2e}")
    except Exception as exc:  # report every case, then fail
        bad += 1
        print(f"ERR {backend:6} {label}: {type(exc).__name__}: {str(exc)[:300]}")


for backend in ("cuda", "triton"):
    for name, fn in ops.items():
        for layout in ("contiguous", "channels_last"):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.rand(6, 70, 13, 17, device="cuda", dtype=dtype) + 0.1
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                check(f"{name:9} {layout:14} {str(dtype):15}", fn, backend, x, {}, tol)
        # token pooling: (N, L, C) with lengths (0, 1, partial, full) and a prefix token skipped
        x = torch.rand(5, 77, 96, device="cuda") + 0.1
        lengths = torch.tensor([0, 1, 40, 77, 60], device="cuda")
        kw = dict(input_fmt="NLC", lengths=lengths, start=1)
        check(f"{name:9} tokens lengths+start", fn, backend, x, kw, 1e-4)
raise SystemExit(1 if bad else 0)
PYEOF
}

pytest_args() {
    local args="-q -rfE -p no:cacheprovider --junitxml=$OUT/${1:-junit}.xml"
    if "$PY" -c "import xdist" >/dev/null 2>&1 && [ "${GK_PYTEST_WORKERS:-14}" -gt 1 ]; then
        args="$args -n ${GK_PYTEST_WORKERS:-14}"
    fi
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        args="$args --timeout 180"
    fi
    echo "$args"
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

# bench_shapes SHAPES EXTRA...: one invocation per shape, merged into one result per device and
# day, so that a cut-off call keeps the shapes already measured.
bench_shapes() {
    local shapes=$1
    shift
    mkdir -p "$BENCH_DIR"
    for shape in ${shapes//,/ }; do
        "$PY" -m gapkernels.bench --device cuda --out "$BENCH_DIR" --no-plots --merge \
            --shapes "$shape" --dtypes bfloat16,float32 "$@" || return 1
    done
}

pack_bench() {
    cp gapkernels/auto_table.json "$BENCH_DIR/" 2>/dev/null
    tar czf "$OUT/bench.tgz" -C "$(dirname "$BENCH_DIR")" "$(basename "$BENCH_DIR")" 2>/dev/null
}

export -f build smoke sanitize bench_shapes
export PY OUT SANITIZER NCU BENCH_DIR

status=0
for stage in "${STAGES[@]}"; do
    case $stage in
        build)
            if [ "${GK_SKIP_BUILD:-0}" = 1 ]; then
                continue
            fi
            if ! run_logged build "$OUT/build.log" 300 build; then
                tail -40 "$OUT/build.log"
                status=1
            fi
            grep -E "BUILD FAILED|error:" "$OUT/build.log" | head -20
            ;;
        smoke)
            run_logged smoke "$OUT/smoke.log" 60 smoke || status=1
            grep -vE "^ok " "$OUT/smoke.log" | tail -30
            ;;
        retest)
            # shellcheck disable=SC2046,SC2086
            run_logged retest "$OUT/pytest.log" 120 "$PY" -m pytest $(pytest_args junit-retest) \
                tests/test_tokens_cuda_checks.py tests/test_stable_cuda_lib.py \
                tests/test_triton_checks.py tests/test_gem_stable.py tests/test_cuda_gem.py \
                tests/test_triton_gem.py tests/test_checks_source.py \
                tests/test_triton.py::test_torch_compile_inductor \
                "tests/test_export.py::test_aoti_compile_and_load" \
                "tests/test_tokens_cuda.py::test_cuda_token_op_opcheck" || status=1
            grep -E "^(FAILED|ERROR)|crashed" "$OUT/pytest.log" | head -40
            tail -3 "$OUT/pytest.log"
            ;;
        test)
            # shellcheck disable=SC2046,SC2086
            run_logged pytest "$OUT/pytest.log" 240 "$PY" -m pytest $(pytest_args) \
                ${GK_PYTEST_ARGS:-} -k "cuda or triton or gpu" \
                --ignore=tests/test_packaging.py --ignore=tests/test_tokens_integration.py \
                tests || status=1
            grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
            tail -3 "$OUT/pytest.log"
            ;;
        memcheck)
            run_logged memcheck "$OUT/memcheck.log" 120 sanitize memcheck "$SANITIZE_SELECTION" || status=1
            tail -4 "$OUT/memcheck.log"
            ;;
        racecheck)
            run_logged racecheck "$OUT/racecheck.log" 120 sanitize racecheck "$RACECHECK_SELECTION" || status=1
            tail -4 "$OUT/racecheck.log"
            ;;
        initcheck | synccheck)
            run_logged "$stage" "$OUT/$stage.log" 90 sanitize "$stage" "$SANITIZE_SELECTION" || status=1
            tail -4 "$OUT/$stage.log"
            ;;
        bench)
            run_logged bench "$OUT/bench.log" 220 bench_shapes \
                resnet50-head,resnet50-head-b1,se-56,odd --no-compile --write-auto-table || status=1
            pack_bench
            tail -30 "$OUT/bench.log"
            ;;
        benchmore)
            run_logged benchmore "$OUT/bench.log" 0 bench_shapes \
                effnet-b0-head,se-28,se-14,wide-hw --no-compile --write-auto-table || status=1
            pack_bench
            ;;
        benchcompile)
            run_logged benchcompile "$OUT/bench.log" 150 "$PY" -m gapkernels.bench \
                --device cuda --out "$BENCH_DIR/compile" --no-plots --shapes resnet50-head \
                --dtypes bfloat16,float32 --passes fwd || status=1
            pack_bench
            ;;
        benchtokens)
            mkdir -p "$BENCH_DIR"
            run_logged benchtokens "$OUT/bench.log" 120 "$PY" -m gapkernels.bench.tokens \
                --device cuda --backends cuda,triton --reps 3 \
                --out "$BENCH_DIR/tokens_gpu.md" || status=1
            pack_bench
            ;;
        profile)
            run_logged profile "$OUT/profile.log" 180 "$NCU" --clock-control none \
                --section SpeedOfLight --section LaunchStats --section Occupancy --nvtx \
                "$PY" scripts/gpu_profile_cases.py --no-warmup || status=1
            grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|Registers Per|Achieved Occupancy" \
                "$OUT/profile.log" | head -60
            ;;
        *)
            echo "unknown stage $stage" | tee -a "$SUMMARY"
            status=2
            ;;
    esac
done
echo "---- summary ----"
cat "$SUMMARY"
exit $status
