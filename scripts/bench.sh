#!/usr/bin/env bash
# The main job: sets up .venv, builds the extension, runs the benchmark suite on the GPU if there
# is one (full), else on the CPU (quick). Extra arguments go to `python -m gapkernels.bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m gapkernels.bench --out bench/results "$@"
