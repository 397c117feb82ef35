"""The accelerator (gapkernels._C) is optional: the op schemas are gapkernels/_ops (LibTorch
stable ABI), defined once whichever libraries load; _C loads only under the torch it was built
against and not with GAPKERNELS_NO_ACCEL=1, and says why not; each op has one Autograd kernel,
the accelerator's (C++) or gapkernels.autograd's (Python); and the CPU tests of autograd,
torch.func, forward mode, opcheck and the public functions' eager route pass without it.

`python tests/test_accel.py [pytest arguments]` runs that subset in the current environment after
checking that the accelerator is not loaded and the CPU kernels are (so that it cannot pass on the
reference alone): test_cpu_subset_without_the_accelerator runs it with GAPKERNELS_NO_ACCEL=1, and
scripts/test_torch213.sh under another torch, where the version check turns _C off.
`python tests/test_accel.py --with-accel [...]` runs the same subset but requires the accelerator
loaded instead (scripts/check_isolated_install.sh, when its build environment had the same torch).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The tests that run again without the accelerator, and what of them is left out (Triton and
# CUDA have their own jobs; gradcheck, gradgradcheck and torch.compile of the public functions
# take the same route with or without it, and the most time).
SUBSET = [
    "tests/test_op_autograd.py",
    "tests/test_latency_paths.py",
    "tests/test_func.py",
    "tests/test_gradients.py",
    "tests/test_library.py",
    "tests/test_errors.py",
]
DESELECT = "not triton and not cuda and not gradgradcheck and not gradcheck_float64 and not compile"


def run_subset(extra: list[str], with_accel: bool = False) -> int:
    """Runs SUBSET (and `extra`, more test paths or pytest arguments) in this process, after
    checking that the CPU kernels are loaded and the accelerator is not (or is, `with_accel`)."""
    from gapkernels import _ext

    if with_accel and not _ext.accel_loaded():
        sys.exit(f"gapkernels._C is not loaded: {_ext.accel_reason}")
    if not with_accel and _ext.accel_loaded():
        sys.exit(f"gapkernels._C is loaded ({_ext._C}): the subset would not test its absence")
    if not _ext.has_kernel("CPU"):
        sys.exit(f"the CPU kernels are not loaded: {_ext.unavailable_reason('CPU')}")
    if with_accel:
        print(f"gapkernels._C loaded: {_ext._C}")
    else:
        print(f"gapkernels._C not loaded: {_ext.accel_reason}")
    print(f"CPU kernels: {_ext.cpu_library}")
    return pytest.main(["-q", "-p", "no:cacheprovider", "-k", DESELECT, *SUBSET, *extra])


if __name__ == "__main__":
    os.chdir(ROOT)
    ARGS = sys.argv[1:]
    WITH_ACCEL = "--with-accel" in ARGS
    sys.exit(run_subset([a for a in ARGS if a != "--with-accel"], with_accel=WITH_ACCEL))


from gapkernels import _ext, info  # noqa: E402

needs_ops = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")
needs_cpu = pytest.mark.skipif(
    not _ext.has_kernel("CPU"), reason=f"no CPU kernels: {_ext.unavailable_reason('CPU')}"
)
GIT = torch.version.git_version


# --- when the accelerator loads ---------------------------------------------------------------


def test_accel_loads_only_under_the_torch_it_was_built_against():
    same = {"torch": torch.__version__, "torch_git_version": GIT}
    assert _ext.accel_mismatch(same, torch.__version__, GIT) is None
    built = "2.12.0+cpu" if torch.__version__.startswith("2.13.0") else "2.13.0+cpu"
    other = _ext.accel_mismatch({**same, "torch": built}, torch.__version__, GIT)
    assert f"built against torch {built} (git {GIT[:12]})" in other
    assert f"torch {torch.__version__} (git {GIT[:12]}) is running" in other
    assert "--no-build-isolation" in other  # how to get it back
    rebuilt = _ext.accel_mismatch({**same, "torch_git_version": "0" * 40}, torch.__version__, GIT)
    assert rebuilt is not None and "git 000000000000" in rebuilt  # same version, other build
    assert "does not name the torch" in _ext.accel_mismatch(
        {"torch": torch.__version__}, torch.__version__, GIT
    )
    assert "no build record" in _ext.accel_mismatch(None, torch.__version__, GIT)


def test_no_accel_switch():
    assert _ext.accel_disabled("1")
    assert not any(_ext.accel_disabled(v) for v in (None, "", "0"))
    with pytest.raises(ValueError, match="GAPKERNELS_NO_ACCEL='yes': expected 1"):
        _ext.accel_disabled("yes")


@pytest.fixture
def accel_state(monkeypatch):
    """_ext's accelerator state, put back after the test."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "accel_reason", None)
    monkeypatch.delenv(_ext.ACCEL_ENV_VAR, raising=False)
    return monkeypatch


def test_a_mismatched_record_keeps_the_accelerator_out(accel_state):
    record = {"torch": "2.13.0+cpu", "torch_git_version": "0" * 40}
    accel_state.setattr(_ext, "read_build_info", lambda path=_ext.BUILD_INFO: record)
    accel_state.setattr(_ext, "_library_path", lambda name: "/built/_C.so")
    _ext._load_accel()
    assert _ext._C is None and "built against torch 2.13.0+cpu" in _ext.accel_reason
    accel_state.setenv(_ext.ACCEL_ENV_VAR, "1")
    _ext._load_accel()
    assert _ext._C is None and _ext.accel_reason == "GAPKERNELS_NO_ACCEL=1 is set"
    accel_state.setenv(_ext.ACCEL_ENV_VAR, "0")
    accel_state.setattr(_ext, "_library_path", lambda name: None)
    _ext._load_accel()
    assert _ext._C is None and _ext.accel_reason == "gapkernels._C is not built"


def test_info_says_whether_the_accelerator_is_loaded(accel_state):
    accel_state.setattr(_ext, "accel_reason", "it was built against torch 9.9")
    assert "accelerator (gapkernels._C): not loaded: it was built against torch 9.9" in (
        info.report()
    )


def test_this_process_state_is_consistent():
    """Loaded exactly when nothing says why not; GAPKERNELS_NO_ACCEL=1 always wins."""
    assert _ext.accel_loaded() == (_ext.accel_reason is None)
    if os.environ.get(_ext.ACCEL_ENV_VAR) == "1":
        assert _ext.accel_reason == "GAPKERNELS_NO_ACCEL=1 is set"
    record = _ext.read_build_info()
    if _ext.loaded() and _ext._library_path("_C") and record and "torch_git_version" in record:
        matches = _ext.accel_mismatch(record, torch.__version__, GIT) is None
        assert _ext.accel_loaded() == (
            matches and not _ext.accel_disabled(os.environ.get(_ext.ACCEL_ENV_VAR))
        )


# --- the registrations ------------------------------------------------------------------------


def _autograd_registrations(op: str) -> list[str]:
    dump = torch._C._dispatch_dump(f"gapkernels::{op}")
    return [line for line in dump.splitlines() if line.startswith("Autograd")]


@needs_ops
@pytest.mark.parametrize("op", ["pool_forward", "pool_backward"])
def test_one_autograd_kernel_per_op_the_accelerators_or_pythons(op):
    (line,) = _autograd_registrations(op)  # exactly one, at the Autograd alias key
    assert ("ops.cpp" in line) == _ext.accel_loaded(), line
    assert ("gapkernels/autograd.py" in line) != _ext.accel_loaded(), line


@needs_ops
def test_the_schemas_are_the_stable_librarys():
    for op in ("pool_forward", "pool_backward", "token_pool_forward", "token_pool_backward"):
        dump = torch._C._dispatch_dump(f"gapkernels::{op}").splitlines()
        (debug,) = [line for line in dump if line.startswith("debug: registered at")]
        assert re.search(r"csrc/schemas\.cpp:\d+$", debug), debug
    assert os.path.basename(_ext.ops_library).startswith("_ops.abi3")  # no Python API


@needs_ops
def test_the_schema_library_alone_defines_every_op_and_the_accelerator_none():
    """In fresh processes without the gapkernels package: _ops defines the four ops (with no
    kernel and no autograd), and _C, imported alone, defines none (it only registers the
    Autograd kernels of two of them)."""
    ops = ["pool_forward", "pool_backward", "token_pool_forward", "token_pool_backward"]
    code = f"""
import importlib.util, sys, torch
if sys.argv[1] == "_ops":
    torch.ops.load_library({_ext.ops_library!r})
else:
    spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
for op in {ops!r}:
    try:
        torch._C._dispatch_find_schema_or_throw("gapkernels::" + op, "")
    except RuntimeError:
        print(op, "undefined")
        continue
    kernels = [k for k in ("CPU", "CUDA", "Autograd")
               if torch._C._dispatch_has_kernel_for_dispatch_key("gapkernels::" + op, k)]
    print(op, "defined", *kernels)
"""

    def run(arg):
        out = subprocess.run(
            [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=300, cwd="/"
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run("_ops") == [word for op in ops for word in (op, "defined")]
    accel = _ext._library_path("_C")
    if accel is not None and _ext.accel_loaded():  # it imports only under its own torch
        assert run(accel) == [word for op in ops for word in (op, "undefined")]


# --- the CPU tests without it -------------------------------------------------------------------


@needs_cpu
@pytest.mark.skipif(
    not _ext.accel_loaded(),
    reason=f"this whole run is without the accelerator ({_ext.accel_reason})",
)
def test_cpu_subset_without_the_accelerator():
    env = {**os.environ, _ext.ACCEL_ENV_VAR: "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "gapkernels._C not loaded: GAPKERNELS_NO_ACCEL=1 is set" in out.stdout
    assert " passed" in out.stdout and " failed" not in out.stdout
