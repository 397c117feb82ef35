#!/usr/bin/env bash
# The habits CI checks before the tests: ruff (lint + format), mypy over gapkernels/, clang-format
# over csrc/. Configured in pyproject.toml and .clang-format; the same hooks are in
# .pre-commit-config.yaml. Usage: bash scripts/lint.sh [python] (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:-.venv/bin/python}
BIN=$(dirname "$PY")
"$BIN/ruff" check .
"$BIN/ruff" format --check .
"$PY" -m mypy
git ls-files -z 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' \
    | xargs -0 "$BIN/clang-format" --style=file --dry-run -Werror
echo "lint: ruff, ruff format, mypy and clang-format passed"
