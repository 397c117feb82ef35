#!/usr/bin/env bash
# The test command: sets up .venv, builds the extension, runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k max -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # No GPU: the Triton kernels run in Triton's interpreter on the CPU.
    export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
