#!/usr/bin/env bash
# `pip install .` WITH build isolation, as a user who runs it without reading the README would:
# pip builds the package in an isolated environment against whatever torch it downloads there
# (pyproject.toml's build requirements: torch>=2.11), and the result is installed next to another
# torch. Here that other torch is 2.13.0, the CPU build (the environment scripts/test_torch213.sh
# makes and reuses, GAPKERNELS_VENV213), while the build environment gets the newest torch pip
# finds (2.14.1 on this project's machines) where the disk has room for it, else the same torch
# (GAPKERNELS_ISOLATED_BUILD_TORCH below). The stable-ABI libraries (op schemas, CPU kernels)
# must load and pass the CPU tests; the accelerator gapkernels._C, built against the build
# environment's torch, must be skipped by its version check with the reason, not crash.
#
#   1. copies the checkout's files (tracked, and new ones not ignored) to a temporary folder, so
#      that nothing built in place is picked up;
#   2. `pip wheel --no-deps <copy>` with the 2.13.0 environment's pip and build isolation on (the
#      default), as `pip install .` builds, then `pip install --no-deps --target <tmp>/site` of
#      that wheel: --no-deps keeps that environment's torch as it is;
#   3. from a folder outside the checkout, with only <tmp>/site added to the path: checks where
#      gapkernels was imported from, which libraries loaded (and why _C did not), and runs the
#      CPU test subset of scripts/test_torch213.sh's kind (tests/test_accel.py as a script: the
#      autograd, torch.func, forward-mode, opcheck and error tests; then tests/test_ops.py,
#      tests/test_tokens_cpu.py and tests/test_accel.py itself), from a copy of tests/.
#
# The build is CPU only (GAPKERNELS_NO_CUDA=1) unless GAPKERNELS_ISOLATED_CUDA=1: the CUDA
# library loads only where torch is a CUDA build, which the 2.13.0 environment is not, and its
# compile would add about 10 minutes. Takes about 10 minutes on 2 cores: the build environment's
# torch (a few GB from the machine's wheel folder) and three CPU kernel builds.
#
# Which torch the build environment gets, GAPKERNELS_ISOLATED_BUILD_TORCH:
#   newest  pip's own choice, as a plain `pip install .` makes it (2.14.1, a CUDA build: about 6 GB
#           installed in pip's temporary build environment); _C must then be skipped;
#   same    the torch it is installed next to, pinned with a build constraint (PIP_CONSTRAINT and
#           PIP_BUILD_CONSTRAINT, `torch==<version>`, as the README suggests); _C must then load,
#           and the subset runs with it (test_accel.py --with-accel);
#   auto    (the default) newest where the temporary folder's disk has GAPKERNELS_ISOLATED_MIN_GB
#           (default 12) GB free, else same: CI's machine has run out of disk in the newest build
#           environment, after the project's .venv and the 2.13.0 one.
# GAPKERNELS_NO_ACCEL=1 builds without the accelerator (setup.py): the wheel must then be tagged
# cp310-abi3 and hold no gapkernels._C. GAPKERNELS_KEEP_DIST=1 keeps the temporary folder. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS
VENV=${GAPKERNELS_VENV213:-/tmp/venv213}
step() { echo "check_isolated_install: $* ($((SECONDS - START)) s)"; }
fail() { echo "check_isolated_install: FAILED: $*" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import pytest, torch" 2>/dev/null; then
    bash scripts/test_torch213.sh --collect-only -q >/dev/null  # makes the environment
fi
PY="$VENV/bin/python"
RUN_TORCH=$("$PY" -c 'import torch; print(torch.__version__)')

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gapkernels-isolated.XXXXXX")
if [ "${GAPKERNELS_KEEP_DIST:-0}" = 1 ]; then
    trap 'echo "check_isolated_install: files kept in $TMP"' EXIT
else
    trap 'rm -rf "$TMP"' EXIT
fi
mkdir "$TMP/checkout" "$TMP/run"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$TMP/checkout"
cp -r tests "$TMP/run/tests"
cp pyproject.toml "$TMP/run/"  # pytest's settings (markers); no package beside it
find "$TMP/run/tests" -name __pycache__ -prune -exec rm -rf {} +

NO_CUDA=1
[ "${GAPKERNELS_ISOLATED_CUDA:-0}" = 1 ] && NO_CUDA=0
NO_ACCEL=${GAPKERNELS_NO_ACCEL:-0}
BUILD_TORCH_MODE=${GAPKERNELS_ISOLATED_BUILD_TORCH:-auto}
FREE_GB=$(( $(df -Pk "$TMP" | awk 'NR == 2 {print $4}') / 1048576 ))
MIN_GB=${GAPKERNELS_ISOLATED_MIN_GB:-12}
case "$BUILD_TORCH_MODE" in
    newest | same) WHY="GAPKERNELS_ISOLATED_BUILD_TORCH=$BUILD_TORCH_MODE" ;;
    auto)
        if [ "$FREE_GB" -ge "$MIN_GB" ]; then BUILD_TORCH_MODE=newest; else BUILD_TORCH_MODE=same; fi
        WHY="$FREE_GB GB free in $TMP, newest needs $MIN_GB" ;;
    *) fail "GAPKERNELS_ISOLATED_BUILD_TORCH=$BUILD_TORCH_MODE: expected newest, same or auto" ;;
esac
# No PIP_NO_BUILD_ISOLATION from the caller's environment: isolation is the point; no pip cache.
BUILD_ENV=(env -u PIP_NO_BUILD_ISOLATION PIP_NO_CACHE_DIR=1)
if [ "$BUILD_TORCH_MODE" = same ]; then
    echo "torch==$RUN_TORCH" >"$TMP/build-constraints.txt"
    # pip < 26.2 applies PIP_CONSTRAINT to build environments, later ones PIP_BUILD_CONSTRAINT.
    BUILD_ENV+=(PIP_CONSTRAINT="$TMP/build-constraints.txt"
        PIP_BUILD_CONSTRAINT="$TMP/build-constraints.txt")
fi
step "pip wheel (build isolation on) for torch $RUN_TORCH; build environment's torch:" \
    "$BUILD_TORCH_MODE ($WHY); GAPKERNELS_NO_CUDA=$NO_CUDA GAPKERNELS_NO_ACCEL=$NO_ACCEL"
if ! (cd "$TMP" && "${BUILD_ENV[@]}" GAPKERNELS_NO_CUDA=$NO_CUDA \
        GAPKERNELS_NO_ACCEL="$NO_ACCEL" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PY" -m pip wheel -v --no-deps -w "$TMP/wheels" "$TMP/checkout") >"$TMP/build.log" 2>&1
then
    tail -60 "$TMP/build.log"
    fail "pip wheel with build isolation (log: $TMP/build.log with GAPKERNELS_KEEP_DIST=1)"
fi
WHEELS=("$TMP"/wheels/gapkernels-*.whl)
[ -f "${WHEELS[0]}" ] || fail "no wheel in $TMP/wheels"
WHEEL=${WHEELS[0]}
BUILD_TORCH=$(grep -o -E "Successfully installed .*" "$TMP/build.log" \
    | grep -o -m1 -E " torch-[0-9][^ ]*" | tr -d ' ' || true)
step "built $(basename "$WHEEL"); the build environment had ${BUILD_TORCH:-a torch the log does not name}"
if [ "$BUILD_TORCH_MODE" = same ] && [ "$BUILD_TORCH" != "torch-$RUN_TORCH" ]; then
    fail "the build constraint torch==$RUN_TORCH did not hold: the build environment had $BUILD_TORCH"
fi
if [ "$NO_ACCEL" = 1 ]; then
    case "$WHEEL" in *-cp310-abi3-*.whl) ;; *) fail "without the accelerator the wheel is not cp310-abi3: $WHEEL" ;; esac
    if "$PY" -m zipfile -l "$WHEEL" | grep -q "gapkernels/_C\."; then
        fail "GAPKERNELS_NO_ACCEL=1 but the wheel holds gapkernels/_C"
    fi
fi
"$PY" -m pip install -q --no-deps --no-index --target "$TMP/site" "$WHEEL"

cd "$TMP/run"
export PYTHONPATH="$TMP/site" SITE="$TMP/site" BUILD_TORCH_MODE
unset GAPKERNELS_NO_ACCEL GAPKERNELS_BACKEND GAPKERNELS_CPU_CAPABILITY
"$PY" -m gapkernels.info
"$PY" - <<'PYEOF'
import glob, json, os
import torch
import gapkernels
from gapkernels import _ext

site = os.path.realpath(os.environ["SITE"]) + os.sep
where = os.path.realpath(gapkernels.__file__)
assert where.startswith(site), f"imported {where}, not the install in {site}"
assert _ext.loaded(), _ext.broken_reason or _ext.missing_reason
assert os.path.realpath(_ext.ops_library).startswith(site), _ext.ops_library
assert os.path.realpath(_ext.cpu_library).startswith(site), _ext.cpu_library
assert _ext.has_kernel("CPU"), sorted(_ext.KERNEL_KEYS)
built = json.load(open(os.path.join(os.path.dirname(where), "_build_info.json")))
built_torch = built["torch"]
print(f"check_isolated_install: built against torch {built_torch}, running torch "
      f"{torch.__version__}; CPU kernels: {_ext.cpu_variant}")
if not os.path.exists(os.path.join(os.path.dirname(where), "_build_info.json")):
    raise AssertionError("no _build_info.json in the install")
if glob.glob(os.path.join(os.path.dirname(where), "_C.*")) == []:
    assert not _ext.accel_loaded() and _ext.accel_reason == "gapkernels._C is not built"
elif str(built_torch).split("+")[0] != torch.__version__.split("+")[0]:
    assert not _ext.accel_loaded(), "the accelerator loaded under a torch it was not built for"
    assert "built against torch" in (_ext.accel_reason or ""), _ext.accel_reason
elif os.environ["BUILD_TORCH_MODE"] == "same":
    assert built_torch == torch.__version__, (built_torch, torch.__version__)
    assert _ext.accel_loaded(), f"built against this torch, yet: {_ext.accel_reason}"
PYEOF
# tests/test_accel.py as a script: its subset of the CPU tests (autograd, torch.func, forward mode,
# opcheck, errors) after checking that the CPU kernels are loaded and _C is not (or is, when the
# build had this torch and the accelerator), plus these files.
WITH_ACCEL=()
if [ "$BUILD_TORCH_MODE" = same ] && [ "$NO_ACCEL" != 1 ]; then WITH_ACCEL=(--with-accel); fi
"$PY" tests/test_accel.py "${WITH_ACCEL[@]}" tests/test_ops.py tests/test_tokens_cpu.py \
    tests/test_accel.py "$@"
step "passed"
