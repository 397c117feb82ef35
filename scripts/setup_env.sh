#!/usr/bin/env bash
# Sets up .venv (torch, test and benchmark dependencies) and builds the extension in place.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (the build is incremental).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${GAPKERNELS_TORCH:-torch==2.14.1}
VENV=${GAPKERNELS_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch first, alone, so that nothing else picks its version.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip setuptools wheel
    "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -r requirements-dev.txt

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
    # No GPU here: one architecture proves the CUDA code compiles and keeps the build short.
    # With a GPU, setup.py's default applies (README: Installing).
    export TORCH_CUDA_ARCH_LIST=9.0
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" - <<'PYEOF'
import torch, gapkernels
from gapkernels import _ext
print(f"gapkernels {gapkernels.__version__}: torch {torch.__version__}, "
      f"extension CPU kernels: {_ext.has_kernel('CPU')}, CUDA kernels: {_ext.has_kernel('CUDA')}")
if _ext.broken_reason or _ext.missing_reason:
    raise SystemExit(_ext.broken_reason or _ext.missing_reason)
PYEOF
