"""The CUDA kernels' own library, gapkernels/_cuda.abi3.so, built on the LibTorch stable ABI
(csrc/cuda/pool_cuda.cpp, token_cuda.cpp, csrc/stable_common.h): it loads under a CUDA build of
torch with or without a GPU, registers the CUDA kernel of every op it implements, needs nothing
of torch beyond the stable C shim (no ATen/c10 C++ symbols, no libtorch_python, no libc10_cuda,
no shared cudart), and its argument checks are the CPU kernels' (one copy, csrc/checks.cpp),
message for message (the token ops': test_tokens_cuda_checks.py). The kernels themselves run
only on a GPU (tests/test_cuda*.py, test_tokens_cuda.py)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from cuda_common import CUDA_KEY, assert_same_check_message

from gapkernels import _ext, info

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECORD = info.build_info() or {}
BUILT_WITH_CUDA = bool(RECORD.get("cuda_kernels"))
LIB = _ext.cuda_library_path() if _ext.loaded() else None
# the ops csrc/cuda/pool_cuda.cpp and token_cuda.cpp implement
CUDA_OPS = {"pool_forward", "pool_backward", "token_pool_forward", "token_pool_backward"}
AVG, MAX, MIXED, CAT, GEM = range(5)

# Skipped only where this build has no CUDA library (its record says so) or torch cannot load one;
# a build that recorded CUDA kernels and lacks the file fails below instead.
needs_library = pytest.mark.skipif(
    not (_ext.loaded() and BUILT_WITH_CUDA and torch.version.cuda),
    reason="this build has no CUDA kernels, or torch is a CPU-only build",
)


def _needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def _binutils():
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("binutils (readelf, nm) are not installed")


@needs_library
def test_cuda_library_is_loaded_and_registers_every_cuda_op():
    assert LIB is not None, "the build record says CUDA kernels, but gapkernels/_cuda is missing"
    assert _ext.cuda_broken_reason is None and _ext.cuda_library == LIB
    assert os.path.basename(LIB).startswith("_cuda.abi3")  # py_limited_api: no Python API
    ops = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("gapkernels::")
    }
    with_cuda = {
        op
        for op in ops
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"gapkernels::{op}", "CUDA")
    }
    assert with_cuda == CUDA_OPS
    assert _ext.has_kernel("CUDA") and _ext.unavailable_reason("CUDA") is None


@needs_library
def test_the_schema_library_has_no_cuda_kernels_and_the_cuda_library_adds_them():
    """In a fresh process without the gapkernels package: _ops alone defines the ops and registers
    no CUDA kernel; loading _cuda after it registers them."""
    code = f"""
import torch
torch.ops.load_library({_ext.ops_library!r})
has = lambda op: torch._C._dispatch_has_kernel_for_dispatch_key("gapkernels::" + op, "CUDA")
print(sorted(op for op in {sorted(CUDA_OPS)!r} if has(op)))
torch.ops.load_library({LIB!r})
print(sorted(op for op in {sorted(CUDA_OPS)!r} if has(op)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", repr(sorted(CUDA_OPS))]


@needs_library
def test_cuda_library_links_only_torch_cpu_cuda_and_c10():
    _binutils()
    needed = _needed(LIB)
    torch_libs = {n for n in needed if n.startswith(("libtorch", "libc10", "libcudart"))}
    assert torch_libs <= {"libtorch_cuda.so", "libtorch_cpu.so", "libc10.so"}, needed
    assert "libtorch_cuda.so" in torch_libs  # aoti_torch_get_current_cuda_stream lives there


def undefined_symbols(path: str) -> list[str]:
    """The symbols `path` needs from other libraries, demangled where c++filt is there (so that
    torch's types inside std:: names show too)."""
    _binutils()
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]
    if shutil.which("c++filt"):
        names = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    return names


def cpp_torch_symbols(names: list[str]) -> list[str]:
    """The ATen/c10/torch C++ symbols among `names`: any one ties a library to one torch build."""
    return [n for n in names if re.search(r"\b(at|c10|torch|caffe2)::|_ZN?K?(2at|3c10|5torch)", n)]


@needs_library
def test_cuda_library_uses_no_cpp_symbol_of_torch():
    """Every undefined symbol is C (the stable shim: aoti_torch_*, torch_*), CUDA's, or the C++
    runtime's: no ATen/c10/torch C++ symbol, which would tie the library to one torch build."""
    names = undefined_symbols(LIB)
    assert any(n.startswith("aoti_torch_") for n in names)  # the shim is really what it calls
    assert cpp_torch_symbols(names) == []


def test_no_cuda_library_in_the_schema_accelerator_and_cpu_libraries():
    """A CPU-only torch loads _ops, _C and the CPU kernels: none needs a CUDA library."""
    if not _ext.loaded():
        pytest.skip("the C++ extension is not built")
    _binutils()
    libraries = (_ext.ops_library, _ext._library_path("_C"), _ext.cpu_library)
    paths = [path for path in libraries if path is not None]
    for path in paths:
        cuda = [n for n in _needed(path) if "cuda" in n or n.startswith("libcudart")]
        assert cuda == [], (path, cuda)


# --- the checks: the stable library's messages are the CPU kernels' (cuda_common.py) ---------


def _x(n=2, c=3, s=4, dtype=torch.float32):
    return torch.rand(n, c, s, dtype=dtype)


def _w(c=3, dtype=torch.float32, device="cpu"):
    return torch.full((c,), 0.5, dtype=dtype, device=device)


FORWARD_CASES = {  # id: (x, mode, weight), message fragment
    "mode": (lambda: (_x(), 7, None), "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat)"),
    "rank": (lambda: (_x()[0], AVG, None), "x must be the 3-D (N, C, S) view, got 2 dims"),
    "dtype": (
        lambda: (torch.ones(2, 3, 4, dtype=torch.int32), AVG, None),
        "x must be float16, bfloat16, float32 or float64, got Int",
    ),
    "empty_s": (lambda: (_x(s=0), AVG, None), "the spatial size S must be > 0"),
    "strides": (lambda: (_x(s=8)[..., ::2], MAX, None), "strides, got [24, 8, 2]"),
    "weight_shape": (lambda: (_x(), GEM, _w()[None]), "1 or C=3 elements, got shape [1, 3]"),
    "weight_dtype": (
        lambda: (_x(dtype=torch.float16), MIXED, _w(dtype=torch.float16)),
        "weight must be Float for x of Half, got Half",
    ),
    "weight_device": (lambda: (_x(), GEM, _w(device="meta")), "weight is on meta, x on cpu"),
    "weight_strides": (
        lambda: (_x(c=4), MIXED, torch.rand(8)[::2]),
        "weight must be contiguous",
    ),
}


@needs_library
@pytest.mark.parametrize("case", FORWARD_CASES, ids=list(FORWARD_CASES))
def test_forward_checks_give_the_cpu_kernels_messages(case):
    make, fragment = FORWARD_CASES[case]
    args = (*make(), 0.5, 1e-6, False)
    assert_same_check_message(torch.ops.gapkernels.pool_forward.default, args, fragment)


def _backward_args(mode=GEM, **change):
    x = _x()
    out, aux, indices = torch.ops.gapkernels.pool_forward(x, mode, None, 3.0, 1e-6, True)
    args = {"grad_out": torch.ones_like(out), "x": x, "aux": aux, "indices": indices}
    args.update({k: v() for k, v in change.items()})
    return (*args.values(), mode, None, 3.0, 1e-6)


BACKWARD_CASES = {  # id: pool_backward's arguments, message fragment
    "grad_shape": (
        lambda: _backward_args(CAT, grad_out=lambda: torch.ones(2, 3)),
        "grad_out must be (2, 6), got [2, 3]",
    ),
    "grad_dtype": (
        lambda: _backward_args(grad_out=lambda: torch.ones(2, 3, dtype=torch.float64)),
        "grad_out must be Float, got Double",
    ),
    "grad_strides": (
        lambda: _backward_args(grad_out=lambda: torch.ones(3, 2).t()),
        "grad_out must be contiguous",
    ),
    "device": (
        lambda: _backward_args(aux=lambda: torch.empty(2, 3, 3, device="meta")),
        "every tensor must be on cpu",
    ),
    "indices": (
        lambda: _backward_args(MAX, indices=lambda: torch.zeros(2, 3, dtype=torch.int32)),
        "indices must be contiguous int64 (N, C)",
    ),
    "aux": (
        lambda: _backward_args(aux=lambda: torch.zeros(2, 3, 1)),
        "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    ),
}


@needs_library
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=list(BACKWARD_CASES))
def test_backward_checks_give_the_cpu_kernels_messages(case):
    make, fragment = BACKWARD_CASES[case]
    assert_same_check_message(torch.ops.gapkernels.pool_backward.default, make(), fragment)


@needs_library
def test_valid_cpu_tensors_stop_at_the_device_check():
    fwd = torch.ops.gapkernels.pool_forward.default
    x = _x()
    with pytest.raises(RuntimeError, match=r"^gapkernels::pool_forward: x must be a CUDA tensor$"):
        fwd.redispatch(CUDA_KEY, x, MIXED, _w(), 0.5, 1e-6, False)
    bwd = torch.ops.gapkernels.pool_backward.default
    with pytest.raises(RuntimeError, match=r"^gapkernels::pool_backward: x must be a CUDA tensor$"):
        bwd.redispatch(CUDA_KEY, *_backward_args(MAX))


# --- the build and the reports ----------------------------------------------------------------


@needs_library
def test_info_reports_the_cuda_library():
    text = info.report()
    assert f"CUDA kernels: loaded from {LIB}" in text
    assert f"stable ABI for torch >= {RECORD['cuda_stable_target']}" in text
    assert RECORD["cuda_library"] == "gapkernels._cuda" and RECORD["cuda_arch_list"] in text


def test_info_says_why_the_cuda_kernels_are_not_loaded(monkeypatch):
    monkeypatch.setattr(_ext, "cuda_library", None)
    monkeypatch.setattr(_ext, "cuda_broken_reason", "the CUDA kernels x.so failed to load: boom")
    assert "CUDA kernels: not loaded: the CUDA kernels x.so failed to load: boom" in info.report()


@pytest.fixture
def fresh_cuda_state(monkeypatch):
    """_ext's CUDA-library state, put back after the test."""
    for name in ("cuda_library", "cuda_missing_reason", "cuda_broken_reason"):
        monkeypatch.setattr(_ext, name, None)
    return monkeypatch


def test_a_cpu_only_torch_does_not_try_the_cuda_library(fresh_cuda_state):
    fresh_cuda_state.setattr(torch.version, "cuda", None)

    def load(path):
        raise AssertionError(f"loaded {path}")

    fresh_cuda_state.setattr(torch.ops, "load_library", load)
    _ext._load_cuda()
    assert _ext.cuda_library is None and _ext.cuda_broken_reason is None
    assert "is a CPU-only build" in _ext.cuda_missing_reason


def test_an_unbuilt_cuda_library_says_how_to_build_it(fresh_cuda_state):
    fresh_cuda_state.setattr(torch.version, "cuda", "13.0")
    fresh_cuda_state.setattr(_ext, "cuda_library_path", lambda: None)
    _ext._load_cuda()
    assert _ext.cuda_library is None and _ext.cuda_broken_reason is None
    assert "gapkernels/_cuda.*.so) are not built" in _ext.cuda_missing_reason
    assert _ext.BUILD_HINT in _ext.cuda_missing_reason


def test_a_cuda_library_that_fails_to_load_keeps_the_reason(fresh_cuda_state, tmp_path):
    bogus = tmp_path / "_cuda.abi3.so"
    bogus.write_bytes(b"not an ELF file")
    fresh_cuda_state.setattr(torch.version, "cuda", "13.0")
    fresh_cuda_state.setattr(_ext, "cuda_library_path", lambda: str(bogus))
    _ext._load_cuda()
    assert _ext.cuda_library is None and _ext.cuda_missing_reason is None
    assert f"the CUDA kernels {bogus} failed to load" in _ext.cuda_broken_reason
    assert "file too short" in _ext.cuda_broken_reason  # the loader's own words


def test_a_broken_cuda_library_is_reported_and_not_skipped_by_auto(monkeypatch):
    monkeypatch.setattr(_ext, "cuda_broken_reason", "the CUDA kernels x.so failed to load: boom")
    monkeypatch.setattr(_ext, "KERNEL_KEYS", _ext.KERNEL_KEYS - {"CUDA"})
    reason = _ext.unavailable_reason("CUDA")
    assert reason is not None and "x.so failed to load: boom" in reason
    assert _ext.broken("CUDA")
    assert _ext.broken("CPU") == (_ext.broken_reason is not None)  # the CPU kernels are unaffected


def test_setup_builds_the_cuda_library_on_the_stable_abi(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    monkeypatch.delenv("GAPKERNELS_NO_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the current folder
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="gapkernels_setup")
    monkeypatch.setenv("GAPKERNELS_NO_CUDA", "1")
    assert setup["cuda_extension"]() is None
    monkeypatch.delenv("GAPKERNELS_NO_CUDA")
    if not setup["with_cuda"]():
        pytest.skip("no CUDA toolkit or a CPU-only torch: the CUDA library is not built here")
    ext = setup["cuda_extension"]()
    assert ext.name == "gapkernels._cuda" and ext.py_limited_api
    kernels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").rglob("*.cu"))
    hosts = ["csrc/cuda/pool_cuda.cpp", "csrc/cuda/token_cuda.cpp"]
    assert ext.sources == [*kernels, *hosts, "csrc/checks.cpp"]
    for compiler in ("cxx", "nvcc"):
        flags = ext.extra_compile_args[compiler]
        assert "-DTORCH_TARGET_VERSION=0x020b000000000000" in flags and "-DUSE_CUDA" in flags
    assert not {"torch_python", "c10_cuda", "cudart", "torch"} & set(ext.libraries)
    assert {"torch_cuda", "torch_cpu", "cudart_static"} <= set(ext.libraries)
    record = setup["build_info"](True)
    assert record["cuda_library"] == "gapkernels._cuda" and record["cuda_stable_target"] == "2.11"
    assert json.loads(json.dumps(record)) == record
