#!/usr/bin/env bash
# Release check, run by .ci/run before the tests: what a user gets from the sdist works.
#   1. builds the sdist and checks its file list (every file under csrc/, nothing generated);
#   2. unpacks it in a temporary folder, away from the checkout, and builds a CPU-only wheel
#      from it (GAPKERNELS_NO_CUDA=1, --no-build-isolation against this environment's torch);
#   3. installs the wheel into a throwaway folder and, from outside the source tree, imports it
#      and runs pooling ops on the CPU backend against gapkernels.reference, once per CPU kernel
#      variant (gapkernels/_cpu_<variant>.so) this machine executes;
#   4. checks the wheel's file list (its own checks, check-wheel-contents) and both files'
#      metadata (twine check --strict).
# Exits non-zero at the first failure. Takes a few minutes, nearly all of it the C++ build.
#
# Python: $GAPKERNELS_PYTHON when set (an environment with torch and requirements-dev.txt),
# else the project's .venv, set up as scripts/setup_env.sh does (same variables) but without
# building the extension in place: scripts/test.sh does that. GAPKERNELS_KEEP_DIST=1 keeps the
# temporary folder (sdist, wheel, build logs) and prints where it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS

step() { echo "check_dist: $* ($((SECONDS - START)) s)"; }
fail() { echo "check_dist: FAILED: $*" >&2; exit 1; }

if [ -n "${GAPKERNELS_PYTHON:-}" ]; then
    PY=$GAPKERNELS_PYTHON
else
    VENV=${GAPKERNELS_VENV:-.venv}
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q --upgrade pip setuptools wheel
        "$PY" -m pip install -q "${GAPKERNELS_TORCH:-torch==2.14.1}"
    fi
    "$PY" -m pip install -q -r requirements-dev.txt
fi
# An absolute path to the environment's own python (not the symlink's target): we leave $ROOT.
case "$PY" in /*) ;; *) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
"$PY" -c "import torch, setuptools, build, twine, check_wheel_contents, packaging" \
    || fail "$PY lacks a build tool: pip install -r requirements-dev.txt"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gapkernels-dist.XXXXXX")
if [ "${GAPKERNELS_KEEP_DIST:-0}" = 1 ]; then
    trap 'echo "check_dist: files kept in $TMP"' EXIT
else
    trap 'rm -rf "$TMP"' EXIT
fi
VERSION=$("$PY" -c "exec(open('gapkernels/_version.py').read()); print(__version__)")
step "gapkernels $VERSION, $("$PY" -c 'import torch; print("torch", torch.__version__)'), in $TMP"

# 1. The sdist, built from a copy of the checkout's files (tracked, and new ones not ignored), as
# from a clean clone: a stale gapkernels.egg-info/SOURCES.txt in the checkout would add the
# files it lists and hide a gap in MANIFEST.in. Built as on a machine without a CUDA toolkit: it
# must hold the CUDA sources all the same. Its file list is compared with the repository's.
mkdir "$TMP/checkout"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$TMP/checkout"
else
    tar -c --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' . \
        | tar -x -C "$TMP/checkout"
fi
# Every file under csrc/ and gapkernels/ goes into the sdist (but compiled ones, when not in git).
( cd "$TMP/checkout" && find csrc gapkernels -type f ! -name '*.so' ! -name '*.py[co]' ) \
    >"$TMP/wanted.txt"
( cd "$TMP/checkout" && GAPKERNELS_NO_CUDA=1 "$PY" -m build --sdist --no-isolation \
    --outdir "$TMP/dist" . ) >"$TMP/sdist.log" 2>&1 \
    || { tail -40 "$TMP/sdist.log"; fail "building the sdist"; }
SDIST="$TMP/dist/gapkernels-$VERSION.tar.gz"
[ -f "$SDIST" ] || fail "no $SDIST (found: $(ls "$TMP/dist"))"
"$PY" - "$SDIST" "$VERSION" "$TMP/wanted.txt" <<'PYEOF'
import sys, tarfile
sdist, version, wanted_list = sys.argv[1], sys.argv[2], sys.argv[3]
prefix = f"gapkernels-{version}/"
with tarfile.open(sdist) as tar:
    names = {m.name[len(prefix):] for m in tar.getmembers() if m.isfile()}
wanted = {line.strip() for line in open(wanted_list) if line.strip()}
wanted |= {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
           "PKG-INFO", "gapkernels/py.typed", "gapkernels/_version.py", "csrc/pool_common.h"}
problems = [f"missing: {name}" for name in sorted(wanted - names)]
forbidden_dirs = ("build/", "dist/", "bench/results/", ".venv/", ".git/", ".ci/")
forbidden_ext = (".so", ".o", ".a", ".pyc", ".pyo", ".whl", ".tar.gz", ".ninja")
for name in sorted(names):
    parts = name.split("/")
    if (name.startswith(forbidden_dirs) or name.endswith(forbidden_ext) or "__pycache__" in parts
            or any(p.startswith((".pytest_cache", ".hypothesis", ".benchmarks")) for p in parts)):
        problems.append(f"should not be there: {name}")
if problems:
    sys.exit("sdist " + sdist + ":\n  " + "\n  ".join(problems))
print(f"check_dist: sdist ok: {len(names)} files, every csrc/ file, nothing generated")
PYEOF
SDIST_BYTES=$(stat -c %s "$SDIST")
[ "$SDIST_BYTES" -lt 2000000 ] || fail "the sdist is $SDIST_BYTES bytes: something large got in"

# 2. A CPU-only wheel from the unpacked sdist.
mkdir "$TMP/src"
tar -xzf "$SDIST" -C "$TMP/src"
step "sdist ok ($SDIST_BYTES bytes); building a CPU-only wheel from it"
( cd "$TMP/src/gapkernels-$VERSION" \
  && GAPKERNELS_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -v --no-deps \
        --no-build-isolation -w "$TMP/wheels" . ) >"$TMP/wheel.log" 2>&1 \
    || { tail -60 "$TMP/wheel.log"; fail "building a wheel from the sdist (log: $TMP/wheel.log)"; }
WHEELS=("$TMP"/wheels/gapkernels-"$VERSION"-*.whl)
[ -f "${WHEELS[0]}" ] || fail "no wheel in $TMP/wheels"
WHEEL=${WHEELS[0]}
step "built $(basename "$WHEEL")"

# 3. Installed into a throwaway folder; imported from an empty folder, so that nothing of the
# checkout (and no editable install of it) can be picked up.
"$PY" -m pip install -q --no-deps --no-index --target "$TMP/site" "$WHEEL"
mkdir "$TMP/run"
VARIANTS=$(cd "$TMP/run" && env -u GAPKERNELS_CPU_CAPABILITY PYTHONPATH="$TMP/site" "$PY" -c \
    "from gapkernels import _ext as e; print(*[v for v in e.cpu_built_variants() if v in e.cpu_supported_variants()])")
for VARIANT in $VARIANTS; do
( cd "$TMP/run" && env -u GAPKERNELS_BACKEND PYTHONPATH="$TMP/site" SITE="$TMP/site" \
    GAPKERNELS_CPU_CAPABILITY="$VARIANT" "$PY" - ) <<'PYEOF'
import importlib.metadata, os
import torch
import gapkernels
from gapkernels import _ext, reference
from packaging.requirements import Requirement

site = os.path.realpath(os.environ["SITE"]) + os.sep
where = os.path.realpath(gapkernels.__file__)
assert where.startswith(site), f"imported {where}, not the wheel installed in {site}"
assert _ext.loaded(), _ext.broken_reason or _ext.missing_reason
assert os.path.realpath(_ext.ops_library).startswith(site), _ext.ops_library
# built against this torch (the wheel's _build_info.json says so): the accelerator loads
assert _ext.accel_loaded(), _ext.accel_reason
assert os.path.realpath(_ext._C.__file__).startswith(site), _ext._C.__file__
assert _ext.has_kernel("CPU") and not _ext.has_kernel("CUDA"), sorted(_ext.KERNEL_KEYS)
variant = os.environ["GAPKERNELS_CPU_CAPABILITY"]
assert _ext.cpu_variant == variant, (_ext.cpu_variant, _ext.cpu_variant_reason)
assert os.path.realpath(_ext.cpu_library).startswith(site), _ext.cpu_library
dist = importlib.metadata.distribution("gapkernels")
assert os.path.realpath(dist.locate_file("")) + os.sep == site, dist.locate_file("")
assert dist.version == gapkernels.__version__, (dist.version, gapkernels.__version__)
assert dist.metadata["License-Expression"] == "BSD-3-Clause", dist.metadata["License-Expression"]
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        have = importlib.metadata.version(req.name)
        assert req.specifier.contains(have, prereleases=True), f"{req} but {req.name} {have}"

g = torch.Generator().manual_seed(0)
for memory_format in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(3, 16, 5, 7, generator=g).to(memory_format=memory_format).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    got = {
        "avg": gapkernels.global_avg_pool(x, backend="cpu"),
        "max": gapkernels.global_max_pool(x, backend="cpu"),
        "catavgmax": gapkernels.global_avgmax_pool(x, concat=True, backend="cpu"),
        "mixed": gapkernels.global_mixed_pool(x, 0.3, backend="cpu"),
    }
    want = {
        "avg": reference.global_avg_pool(xr),
        "max": reference.global_max_pool(xr),
        "catavgmax": reference.global_avgmax_pool(xr, concat=True),
        "mixed": reference.global_mixed_pool(xr, 0.3),
    }
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}")
    weights = {name: torch.randn(out.shape, generator=g) for name, out in want.items()}
    sum((got[k] * weights[k]).sum() for k in got).backward()
    sum((want[k] * weights[k]).sum() for k in want).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    values, index = gapkernels.global_max_pool(x.detach(), return_indices=True, backend="cpu")
    ref_values, ref_index = reference.global_max_pool(x.detach(), return_indices=True)
    assert torch.equal(index, ref_index) and torch.equal(values, ref_values)
    xp = x.detach().abs() + 0.1
    torch.testing.assert_close(gapkernels.global_gem_pool(xp, 3.0, backend="cpu"),
                               reference.global_gem_pool(xp, 3.0))
print(f"check_dist: smoke test ok: gapkernels {gapkernels.__version__} from "
      f"{os.path.dirname(where)}: {variant} CPU kernels against the reference (forward, "
      "backward, indices; contiguous and channels_last)")
PYEOF
done

# 4. The wheel's file list and the metadata of both files.
"$PY" - "$WHEEL" "$VERSION" <<'PYEOF'
import platform, re, sys, zipfile
wheel, version = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
info = f"gapkernels-{version}.dist-info/"
problems = []
for wanted in ("gapkernels/__init__.py", "gapkernels/_version.py", "gapkernels/py.typed",
               "gapkernels/_build_info.json", info + "METADATA", info + "licenses/LICENSE"):
    if wanted not in names:
        problems.append(f"missing: {wanted}")
variants = ["default", "avx2", "avx512"] if platform.machine() in ("x86_64", "AMD64") else ["default"]
for lib in ["_ops", "_C", *(f"_cpu_{v}" for v in variants)]:
    if not any(re.fullmatch(rf"gapkernels/{lib}\.[^/]*\.so", n) for n in names):
        problems.append(f"missing: the compiled library gapkernels/{lib}.*.so")
for name in names:
    top = name.split("/")[0]
    if top not in ("gapkernels", info[:-1]):
        problems.append(f"outside the package: {name}")  # tests/, csrc/, build/, bench/ ...
    elif (name.endswith((".o", ".a", ".cpp", ".cc", ".cu", ".h", ".cuh", ".pyc", ".ninja"))
          or "__pycache__" in name or "/tests/" in name or "/build/" in name):
        problems.append(f"should not be there: {name}")
if problems:
    sys.exit("wheel " + wheel + ":\n  " + "\n  ".join(problems))
print(f"check_dist: wheel file list ok: {len(names)} files, _C and the CPU variants "
      f"({', '.join(variants)}) present, py.typed, LICENSE")
PYEOF
"$PY" -m check_wheel_contents --toplevel gapkernels "$WHEEL"
"$PY" -m twine check --strict "$SDIST" "$WHEEL"
step "passed"
