#!/usr/bin/env bash
# The package built in place (scripts/test.sh builds it against the project's torch, 2.14.1)
# under another torch: torch 2.13.0, the CPU build, in a virtual environment of its own, with the
# checkout on PYTHONPATH (nothing is rebuilt or installed from it). It runs the CPU test subset of
# tests/test_accel.py (autograd, torch.func, forward mode, opcheck, errors) and the CPU kernel
# tests below (tests/test_stable_cpu_lib.py: every variant's bad-input messages under this
# torch), after checking that gapkernels._C (the accelerator, which only loads under the torch it
# was built against) is not loaded and that the CPU kernels are: it cannot pass on the
# reference backend alone. Triton is not installed there; its tests skip.
#
# The op schemas (gapkernels/_ops) and the CPU kernel libraries (gapkernels/_cpu_<variant>.abi3.so)
# are on the LibTorch stable ABI (target 2.11), so they load under any torch >= 2.11; where they
# do not, the run stops at the check above, after `python -m gapkernels.info` has printed why.
# Takes about 3 minutes on 2 cores, 1 of them making the environment.
#
# Environment: GAPKERNELS_VENV213 (default /tmp/venv213; made when missing or without the packages
# below, GAPKERNELS_FRESH_VENV=1 remakes it), PYTHON311 (default python3.11). Extra arguments go
# to pytest. torch 2.13.0+cpu comes from the machine's wheel folder (pip's find-links).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS
VENV=${GAPKERNELS_VENV213:-/tmp/venv213}
TORCH_SPEC="torch==2.13.0"
PACKAGES=("$TORCH_SPEC" pytest numpy hypothesis expecttest packaging)

step() { echo "test_torch213: $* ($((SECONDS - START)) s)"; }

ready() {
    "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import expecttest, hypothesis, numpy, packaging, pytest, torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
PYEOF
}

if [ "${GAPKERNELS_FRESH_VENV:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ] || ! ready; then
    step "making $VENV"
    rm -rf "$VENV"
    "${PYTHON311:-python3.11}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"
    ready || { echo "test_torch213: $VENV lacks one of ${PACKAGES[*]}" >&2; exit 1; }
fi
step "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)') in $VENV"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset GAPKERNELS_NO_ACCEL GAPKERNELS_BACKEND  # _C must be turned off by the version check
(cd /tmp && "$VENV/bin/python" -m gapkernels.info)
"$VENV/bin/python" tests/test_accel.py tests/test_ops.py tests/test_tokens_cpu.py \
    tests/test_nn.py tests/test_determinism.py tests/test_stable_cpu_lib.py "$@"
step "passed"
