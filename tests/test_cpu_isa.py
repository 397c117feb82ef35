"""The CPU kernel variants (one library per instruction set, gapkernels/_cpu_<variant>.*.so):
the one loaded is the one torch's CPU capability implies, GAPKERNELS_CPU_CAPABILITY forces another
or errors clearly, and every variant this machine executes matches the reference."""

from __future__ import annotations

import os
import pathlib
import platform
import re
import runpy
import subprocess
import sys

import pytest
import torch

from gapkernels import _ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL = _ext.CPU_VARIANTS
BUILT = _ext.cpu_built_variants() if _ext.loaded() else ()
RUNNABLE = [v for v in BUILT if v in _ext.cpu_supported_variants()]

needs_extension = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")


def _env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", _ext.CPU_ENV_VAR)
    }
    env.update({k: v for k, v in overrides.items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _python(code: str, timeout: int = 300, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- what setup.py builds ---------------------------------------------------------------------


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    for name in ("GAPKERNELS_CPU_VARIANTS", "GAPKERNELS_CPU_ISA", "GAPKERNELS_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the current folder
    return runpy.run_path(str(ROOT / "setup.py"), run_name="gapkernels_setup")[
        "extension"
    ].__globals__


def test_setup_builds_every_variant_of_the_architecture(setup_py, monkeypatch):
    assert setup_py["cpu_variants"]("x86_64") == list(ALL)
    assert setup_py["cpu_variants"]("aarch64") == ["default"]
    monkeypatch.setenv("GAPKERNELS_CPU_VARIANTS", "avx512, default")
    assert setup_py["cpu_variants"]("x86_64") == ["default", "avx512"]
    with pytest.raises(SystemExit, match="the variants of aarch64"):
        setup_py["cpu_variants"]("aarch64")
    monkeypatch.setenv("GAPKERNELS_CPU_VARIANTS", "sse2")
    with pytest.raises(SystemExit, match="expected a comma-separated list of default, avx2"):
        setup_py["cpu_variants"]("x86_64")
    monkeypatch.setenv("GAPKERNELS_CPU_ISA", "avx2")  # the old build flag: an error, not ignored
    with pytest.raises(SystemExit, match="GAPKERNELS_CPU_ISA is gone"):
        setup_py["cpu_variants"]("x86_64")


def test_setup_splits_sources_between_the_libraries(setup_py, monkeypatch):
    monkeypatch.setenv("GAPKERNELS_CPU_VARIANTS", "default,avx2")
    cpu = setup_py["cpu_extensions"]()
    assert [e.name for e in cpu] == ["gapkernels._cpu_default", "gapkernels._cpu_avx2"]
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").rglob("*.cpp"))
    for ext in cpu:
        assert ext.sources == [*kernels, "csrc/checks.cpp"]  # every kernel unit, and the checks
    flags = {e.name: e.extra_compile_args["cxx"] for e in cpu}
    assert "-DCPU_CAPABILITY=DEFAULT" in flags["gapkernels._cpu_default"]
    assert not any(f.startswith("-mavx") for f in flags["gapkernels._cpu_default"])
    assert {"-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2"} <= set(flags["gapkernels._cpu_avx2"])
    monkeypatch.setenv("GAPKERNELS_NO_CUDA", "1")
    main = setup_py["extension"]()
    assert main.name == "gapkernels._C" and "csrc/ops.cpp" in main.sources
    assert "csrc/schemas.cpp" not in main.sources  # the schemas are _ops's alone
    schemas = setup_py["ops_extension"]()
    assert schemas.name == "gapkernels._ops" and schemas.sources == ["csrc/schemas.cpp"]
    assert schemas.py_limited_api  # the stable ABI: no Python API, one build for every torch
    assert setup_py["STABLE_TARGET_FLAG"] in schemas.extra_compile_args["cxx"]
    assert "csrc/checks.cpp" not in main.sources  # only the kernel libraries call the checks
    assert not any(f.startswith(("csrc/cpu/", "csrc/cuda/")) for f in main.sources)
    assert not any(f.startswith("-m") for f in main.extra_compile_args["cxx"])


# --- the choice, as a function of what is requested, supported and built ---------------------


def test_choice_follows_torchs_capability():
    choose = _ext.choose_cpu_variant
    assert choose(None, "AVX512", ALL, ALL)[0] == "avx512"
    assert choose("", "AVX2", ALL, ALL)[0] == "avx2"  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
    assert choose(None, "DEFAULT", ALL, ALL)[0] == "default"
    assert choose(None, "SVE256", ("default",), ("default",))[0] == "default"  # aarch64
    variant, why = choose(None, "AVX512", ALL, ("default", "avx2"))
    assert variant == "avx2" and "avx512 is not built" in why
    assert choose(None, "AVX2", ALL, ())[0] is None  # nothing built: the CPU backend is missing


def test_request_names_any_variant_the_cpu_executes_and_the_build_has():
    choose = _ext.choose_cpu_variant
    assert choose("default", "AVX512", ALL, ALL) == ("default", f"{_ext.CPU_ENV_VAR}=default")
    assert choose(" AVX2 ", "AVX512", ALL, ALL)[0] == "avx2"
    assert choose("avx512", "AVX2", ALL, ALL)[0] == "avx512"  # above ATEN_CPU_CAPABILITY's


@pytest.mark.parametrize(
    "requested,supported,built,message",
    [
        ("sse4", ALL, ALL, "is not a CPU variant; expected one of default, avx2, avx512"),
        ("avx512", ("default", "avx2"), ALL, "cannot execute the avx512 kernels"),
        ("avx2", ("default",), ALL, "cannot execute the avx2 kernels"),
        ("avx512", ALL, ("default", "avx2"), "has no avx512 CPU kernels (built: default, avx2)"),
    ],
)
def test_request_that_cannot_be_honoured_raises(requested, supported, built, message):
    with pytest.raises(_ext.CpuVariantError, match=f"{_ext.CPU_ENV_VAR}=.*{re.escape(message)}"):
        _ext.choose_cpu_variant(requested, "AVX2", supported, built)


# --- this installation -------------------------------------------------------------------------


@needs_extension
def test_loaded_variant_is_the_expected_one():
    requested = os.environ.get(_ext.CPU_ENV_VAR)
    if requested:
        expected = requested.strip().lower()
    else:
        best = _ext.TORCH_CAPABILITIES.get(torch.backends.cpu.get_cpu_capability(), "default")
        expected = [v for v in RUNNABLE if ALL.index(v) <= ALL.index(best)][-1]
    assert _ext.cpu_variant == expected, _ext.cpu_variant_reason
    assert _ext.cpu_library is not None
    assert pathlib.Path(_ext.cpu_library).name.startswith(f"_cpu_{expected}.")
    assert _ext.has_kernel("CPU")


@needs_extension
def test_every_build_on_x86_64_has_every_variant():
    # No build flag decides which instruction sets a wheel supports.
    if "GAPKERNELS_CPU_VARIANTS" in os.environ:
        pytest.skip("GAPKERNELS_CPU_VARIANTS restricts this build")
    x86 = platform.machine() in ("x86_64", "AMD64")
    assert BUILT == (ALL if x86 else ("default",))


@needs_extension
def test_unknown_request_fails_at_import_with_the_reason():
    done = _python("import gapkernels", **{_ext.CPU_ENV_VAR: "avx9000"})
    assert done.returncode != 0
    assert "CpuVariantError" in done.stderr and "'avx9000' is not a CPU variant" in done.stderr


@needs_extension
@pytest.mark.parametrize("variant", [v for v in ALL if v not in RUNNABLE] or [None])
def test_request_this_machine_cannot_run_fails_at_import(variant):
    if variant is None:
        pytest.skip("this machine executes every variant, and this build has each")
    done = _python("import gapkernels", **{_ext.CPU_ENV_VAR: variant})
    assert done.returncode != 0 and "CpuVariantError" in done.stderr, done.stderr
    assert f"{_ext.CPU_ENV_VAR}='{variant}'" in done.stderr


@needs_extension
def test_aten_cpu_capability_lowers_the_choice():
    done = _python(
        "from gapkernels import _ext; print(_ext.cpu_variant)", ATEN_CPU_CAPABILITY="default"
    )
    assert done.returncode == 0, done.stderr
    # A build restricted without "default" (GAPKERNELS_CPU_VARIANTS=avx2, as gpu_validate.sh
    # builds) has no variant torch's DEFAULT capability allows: no CPU kernels, not avx2.
    assert done.stdout.split() == ["default" if "default" in BUILT else "None"]


# --- every variant against the reference ------------------------------------------------------

# A focused subset, run once per variant other than the loaded one: every op, dtype and layout
# (test_ops), and every CPU path test (tests/test_paths_cpu_*.py), whose geometry follows the
# variant's vector width (tests/paths_common.py): the chunk boundaries move with it, and the NCS
# lanes path has 8x8 tiles with 8-float vectors (on an AVX-512 machine, only here) and 16x8 tiles
# with AVX-512's 16-float ones. About a minute a variant on 2 cores.
SUBSET = [
    "tests/test_ops.py::test_matches_reference",
    "tests/test_ops.py::test_max_indices_match_reference",
    "tests/test_paths_cpu_ncs.py",
    "tests/test_paths_cpu_nsc.py",
    "tests/test_paths_cpu_gem.py",
    "tests/test_paths_cpu_memory.py",
]

RUN_SUBSET = """
import sys
import pytest
from gapkernels import _ext
assert _ext.cpu_variant == sys.argv[1], (_ext.cpu_variant, _ext.cpu_variant_reason)
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-k", "cpu", *sys.argv[2:]]))
"""


@needs_extension
@pytest.mark.parametrize("variant", RUNNABLE)
def test_variant_matches_reference(variant):
    if variant == _ext.cpu_variant:
        pytest.skip(f"{variant} is loaded in this process: the rest of the suite tests it")
    done = subprocess.run(
        [sys.executable, "-c", RUN_SUBSET, variant, *SUBSET],
        cwd=ROOT,
        env=_env(**{_ext.CPU_ENV_VAR: variant}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{variant}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout
