#!/usr/bin/env bash
# Coverage of the CPU test suite: which lines and branches of the C++ CPU kernels (csrc/) and of
# the Python package (gapkernels/, the Triton kernels included: they run as Python in Triton's
# interpreter) the tests execute. A report, not a gate: it prints the summaries and writes them
# to the output folder; it exits non-zero only when the tooling itself fails (a build, pytest not
# starting, gcovr or coverage.py missing), never because a test failed or coverage is low.
#
#   bash scripts/coverage.sh [OUTDIR] [-- PYTEST ARGS...]
#
# OUTDIR (default: $OUT when set, else a new temp folder) gets: summary.txt (both summaries),
# gcovr.txt / gcovr-branches.txt / gcovr.html (C++, per file and per line), gcovr-instances.txt
# (per template instance), gcovr.json (the tracefile), coverage.txt / coverage-html/ (Python),
# build.log, pytest.log. The build is a coverage-instrumented, CPU-only build of a copy of the source tree in
# a temp folder (GAPKERNELS_NO_CUDA=1, CFLAGS/LDFLAGS --coverage): the checkout's own in-place
# build and its build/ folder are not touched. COVERAGE_SOURCE=head measures the committed tree
# (git archive HEAD) instead of the working tree. Needs gcovr and coverage (requirements-dev.txt);
# the Python is .venv/bin/python, or $PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

OUTDIR="${OUT:-}"
if [[ $# -gt 0 && "$1" != "--" ]]; then OUTDIR="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
[[ -n "$OUTDIR" ]] || OUTDIR="$(mktemp -d -t gapkernels-coverage.XXXXXX)"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

"$PY" -m gcovr --version >/dev/null 2>&1 || { echo "coverage.sh: gcovr is missing: $PY -m pip install gcovr" >&2; exit 2; }
"$PY" -m coverage --version >/dev/null 2>&1 || { echo "coverage.sh: coverage is missing: $PY -m pip install coverage" >&2; exit 2; }

WORK="$(mktemp -d -t gapkernels-covbuild.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# 1. A copy of the sources (tracked and untracked files git does not ignore), built in place
#    there with coverage instrumentation. -fprofile-update=atomic: the kernels' OpenMP threads
#    update the same counters. The flags come after setup.py's -O3 would in a plain CFLAGS, so
#    the build stays optimized (lines folded together by inlining count as executed together).
if [[ "${COVERAGE_SOURCE:-worktree}" == "head" ]]; then
  git -C "$ROOT" archive HEAD | tar -x -C "$WORK"
else
  ( cd "$ROOT" && git ls-files -z --cached --others --exclude-standard ) \
    | ( cd "$ROOT" && xargs -0 cp --parents -t "$WORK" 2>/dev/null || true )
fi
SRC="$WORK"
# One CPU kernel variant (setup.py builds one per instruction set): the one this machine loads,
# so that the build costs one compile of the kernels and every line counted ran in the tests.
# The kernels' source is the same for every variant.
VARIANT=$("$PY" -c "import torch; c = torch.backends.cpu.get_cpu_capability(); \
print({'AVX2': 'avx2', 'AVX512': 'avx512'}.get(c, 'default'))")
export GAPKERNELS_CPU_VARIANTS="$VARIANT"
echo "coverage.sh: building a coverage build of the CPU kernels ($VARIANT variant) in $SRC"
( cd "$SRC" && GAPKERNELS_NO_CUDA=1 CFLAGS="--coverage -fprofile-update=atomic" \
    LDFLAGS="--coverage" PATH="$(dirname "$PY"):$PATH" \
    "$PY" setup.py build_ext --inplace ) > "$OUTDIR/build.log" 2>&1 \
  || { echo "coverage.sh: the coverage build failed; see $OUTDIR/build.log" >&2; exit 3; }
built=$(date +%s)

# 2. The CPU test suite (Triton in its interpreter) under coverage.py, on the copy.
cat > "$WORK/.coveragerc" <<EOF
[run]
source = gapkernels
branch = True
data_file = $WORK/.coverage
[report]
show_missing = True
skip_empty = True
EOF
echo "coverage.sh: running the test suite under coverage (log: $OUTDIR/pytest.log)"
set +e
( cd "$SRC" && TRITON_INTERPRET=1 GAPKERNELS_NO_CUDA=1 PYTHONPATH="$SRC" \
    "$PY" -m coverage run --rcfile="$WORK/.coveragerc" -m pytest -q -p no:cacheprovider \
    "${@:-tests}" ) > "$OUTDIR/pytest.log" 2>&1
pytest_status=$?
set -e
tested=$(date +%s)
if [[ $pytest_status -ge 2 ]]; then
  # 1 = some tests failed (still a report); 2+ = pytest itself could not run.
  echo "coverage.sh: pytest exited $pytest_status (not a test failure); see $OUTDIR/pytest.log" >&2
  tail -20 "$OUTDIR/pytest.log" >&2
  exit 4
fi

# 3. Reports.
# gcovr: one JSON tracefile (kept: other reports can be made from it with --add-tracefile), then
# the reports per source line (a line counts as executed when any template instance executed it)
# and per template instance (each (mode, dtype, power, ...) instantiation's lines on their own).
( cd "$SRC" && "$PY" -m gcovr --root "$SRC" --filter "$SRC/csrc/" --exclude-unreachable-branches \
    --exclude-throw-branches --gcov-ignore-parse-errors=all --json "$OUTDIR/gcovr.json" build ) \
  > "$OUTDIR/gcovr.log" 2>&1 || { echo "coverage.sh: gcovr failed; see $OUTDIR/gcovr.log" >&2; exit 5; }
TRACE=("$PY" -m gcovr --root "$SRC" --add-tracefile "$OUTDIR/gcovr.json")
( cd "$SRC" && "${TRACE[@]}" --merge-lines --txt "$OUTDIR/gcovr.txt" --txt-summary \
    --html-details "$OUTDIR/gcovr.html" ) > "$OUTDIR/gcovr-summary.txt" 2>> "$OUTDIR/gcovr.log" \
  || { echo "coverage.sh: gcovr failed; see $OUTDIR/gcovr.log" >&2; exit 5; }
( cd "$SRC" && "${TRACE[@]}" --merge-lines --txt-metric branch --txt "$OUTDIR/gcovr-branches.txt" ) \
  2>> "$OUTDIR/gcovr.log" || true
( cd "$SRC" && "${TRACE[@]}" --txt "$OUTDIR/gcovr-instances.txt" --txt-summary ) \
  > "$OUTDIR/gcovr-summary-instances.txt" 2>> "$OUTDIR/gcovr.log" || true
( cd "$SRC" && "$PY" -m coverage report --rcfile="$WORK/.coveragerc" ) > "$OUTDIR/coverage.txt" \
  || { echo "coverage.sh: coverage report failed" >&2; exit 5; }
( cd "$SRC" && "$PY" -m coverage html --rcfile="$WORK/.coveragerc" -d "$OUTDIR/coverage-html" -q ) \
  || true
end=$(date +%s)

{
  changes=""
  if [[ "${COVERAGE_SOURCE:-worktree}" != "head" ]] && ! git -C "$ROOT" diff --quiet; then
    changes=" + local changes"
  fi
  echo "gapkernels coverage, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD)$changes"
  echo "pytest: $(tail -1 "$OUTDIR/pytest.log") (exit $pytest_status)"
  echo "time: build $((built - start)) s, tests $((tested - built)) s, reports $((end - tested)) s"
  echo
  echo "== C++ (gcovr, csrc/): per source line (any template instance) =="
  cat "$OUTDIR/gcovr-summary.txt"
  echo "-- per template instance (dtype x mode x GeM power x with_log ... each counted) --"
  cat "$OUTDIR/gcovr-summary-instances.txt"
  echo
  echo "== Python (coverage.py, gapkernels/; Triton kernels in the interpreter) =="
  grep -E "^(Name|gapkernels/triton/kernels|gapkernels/triton/|gapkernels/(functional|ops|autograd)|TOTAL)" "$OUTDIR/coverage.txt" || true
} | tee "$OUTDIR/summary.txt"
echo
echo "coverage.sh: full reports in $OUTDIR (gcovr.txt, gcovr.html, coverage.txt, coverage-html/)"
