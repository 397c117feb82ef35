"""The CPU kernels' libraries, gapkernels/_cpu_<variant>.abi3.so, built on the LibTorch stable ABI
(csrc/cpu/, csrc/stable_common.h; setup.py): every variant built needs nothing of torch beyond
libtorch_cpu and libc10 and their stable C shim (no ATen/c10/torch C++ symbol, no libtorch_python,
no CUDA library, no OpenMP runtime of its own), and every variant this machine runs rejects bad
input with the messages the ATen-based libraries gave, word for word."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from gapkernels import _ext, info

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILT = _ext.cpu_built_variants() if _ext.loaded() else ()
RUNNABLE = [v for v in BUILT if v in _ext.cpu_supported_variants()]
TORCH_LIB = pathlib.Path(torch.__file__).parent / "lib"

needs_extension = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")


def _library(variant: str) -> str:
    spec = importlib.util.find_spec(f"gapkernels._cpu_{variant}")
    assert spec is not None and spec.origin is not None
    return spec.origin


def _run(*cmd: str, text: str | None = None) -> str:
    return subprocess.run(cmd, input=text, capture_output=True, text=True, check=True).stdout


def _binutils():
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("binutils (readelf, nm) are not installed")


@needs_extension
def test_every_cpu_library_is_a_stable_abi3_library():
    assert BUILT, "no CPU kernel library is built"
    for variant in BUILT:
        assert pathlib.Path(_library(variant)).name == f"_cpu_{variant}.abi3.so"
    assert _ext.cpu_library == _library(_ext.cpu_variant)


@needs_extension
def test_build_record_and_info_give_the_stable_target():
    record = info.build_info() or {}
    assert record.get("cpu_stable_target") == "2.11"
    assert "(stable ABI for torch >= 2.11)" in info.report()


@needs_extension
@pytest.mark.parametrize("variant", BUILT)
def test_cpu_library_links_only_torch_cpu_and_c10(variant):
    _binutils()
    needed = re.findall(
        r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", _library(variant))
    )
    torch_libs = {n for n in needed if n.startswith(("libtorch", "libc10", "libcudart"))}
    assert torch_libs <= {"libtorch_cpu.so", "libc10.so"}, needed
    assert not [n for n in needed if "cuda" in n or "omp" in n or "python" in n], needed


@needs_extension
@pytest.mark.parametrize("variant", BUILT)
def test_cpu_library_uses_only_the_stable_c_shim_of_torch(variant):
    """Undefined symbols: C++ ones only of the C++ runtime (std::, operator new/delete, the ABI's
    type info); C ones that torch defines only of the stable shim (aoti_torch_*, torch_*)."""
    _binutils()
    out = _run("nm", "-D", "--undefined-only", _library(variant))
    names = [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]
    mangled = [n for n in names if n.startswith("_Z")]
    if shutil.which("c++filt") and mangled:
        demangled = _run("c++filt", text="\n".join(mangled)).splitlines()
        runtime = ("std::", "operator new", "operator delete", "typeinfo for ", "vtable for ")
        foreign = [n for n in demangled if not n.startswith(runtime)]
        foreign += [n for n in demangled if re.search(r"\b(at|c10|torch|caffe2)::", n)]
        assert foreign == []
        typeinfo = [n for n in demangled if n.startswith(("typeinfo for ", "vtable for "))]
        assert all(re.search(r" for (std|__cxxabiv1)::", n) for n in typeinfo), typeinfo
    c_names = {n for n in names if not n.startswith("_Z")}
    from_torch = set()
    for lib in ("libtorch_cpu.so", "libc10.so"):
        defined = _run("nm", "-D", "--defined-only", str(TORCH_LIB / lib))
        from_torch |= {line.split()[-1].split("@")[0] for line in defined.splitlines()} & c_names
    assert from_torch, "the library calls nothing of torch?"
    assert sorted(n for n in from_torch if not n.startswith(("aoti_torch_", "torch_"))) == []
    assert {"torch_library_impl", "torch_parallel_for", "aoti_torch_empty_strided"} <= from_torch


# --- bad input: the messages of the ATen-based libraries, per variant ---------------------------
# Each case calls one CPU kernel (redispatch at the CPU key: the C++ autograd kernel adds no check
# of its own) with one bad argument; the messages are those the libraries gave before they moved
# to the stable ABI (recorded from that build), whole.

CASES = r"""
import json, sys, torch
import gapkernels
from gapkernels import _ext, info
assert _ext.cpu_variant == sys.argv[1], (_ext.cpu_variant, _ext.cpu_variant_reason)
CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
ops = torch.ops.gapkernels
AVG, MAX, MIXED, CAT, GEM = range(5)
x = lambda n=2, c=3, s=4, dtype=torch.float32: torch.rand(n, c, s, dtype=dtype)
w = lambda c=3, dtype=torch.float32, device="cpu": torch.full((c,), 0.5, dtype=dtype, device=device)
spans = lambda b=2, dtype=torch.int64: torch.tensor([[0, 4, 4, 0]] * b, dtype=dtype)
mask = lambda n=2, s=4, dtype=torch.bool, device="cpu": torch.ones(n, s, dtype=dtype, device=device)
def fwd(*a): return ops.pool_forward.default.redispatch(CPU, *a, 0.5, 1e-6, False)
def bwd(mode=GEM, **change):
    xx = x()
    out, aux, ind = ops.pool_forward(xx, mode, None, 3.0, 1e-6, True)
    a = {"grad_out": torch.ones_like(out), "x": xx, "aux": aux, "indices": ind}
    a.update({k: v() for k, v in change.items()})
    return ops.pool_backward.default.redispatch(CPU, *a.values(), mode, None, 3.0, 1e-6)
def tok(xx, sp, mask=None, varlen=False, mode=MAX):
    op = ops.token_pool_forward.default
    return op.redispatch(CPU, xx, sp, mask, varlen, mode, None, 0.5, 1e-6, False)
def tok_bwd(mode=GEM, **change):
    xx, sp = x(), spans()
    out, aux, ind = ops.token_pool_forward(xx, sp, None, False, mode, None, 3.0, 1e-6, True)
    a = {"grad_out": torch.ones_like(out), "aux": aux, "indices": ind}
    a.update({k: v() for k, v in change.items()})
    return ops.token_pool_backward.default.redispatch(
        CPU, a["grad_out"], xx, sp, None, False, a["aux"], a["indices"], mode, None, 3.0, 1e-6)
cases = {
    "mode": lambda: fwd(x(), 7, None),
    "rank": lambda: fwd(x()[0], AVG, None),
    "dtype": lambda: fwd(torch.ones(2, 3, 4, dtype=torch.int32), AVG, None),
    "empty_s": lambda: fwd(x(s=0), AVG, None),
    "strides": lambda: fwd(x(s=8)[..., ::2], MAX, None),
    "weight_shape": lambda: fwd(x(), GEM, w()[None]),
    "weight_dtype": lambda: fwd(x(dtype=torch.float16), MIXED, w(dtype=torch.float16)),
    "weight_device": lambda: fwd(x(), GEM, w(device="meta")),
    "weight_strides": lambda: fwd(x(c=4), MIXED, torch.rand(8)[::2]),
    "grad_shape": lambda: bwd(CAT, grad_out=lambda: torch.ones(2, 3)),
    "grad_dtype": lambda: bwd(grad_out=lambda: torch.ones(2, 3, dtype=torch.float64)),
    "grad_strides": lambda: bwd(grad_out=lambda: torch.ones(3, 2).t()),
    "device": lambda: bwd(aux=lambda: torch.empty(2, 3, 3, device="meta")),
    "indices": lambda: bwd(MAX, indices=lambda: torch.zeros(2, 3, dtype=torch.int32)),
    "aux": lambda: bwd(aux=lambda: torch.zeros(2, 3, 1)),
    "token_mode": lambda: tok(x(), spans(), mode=9),
    "spans_dtype": lambda: tok(x(), spans(dtype=torch.int32)),
    "spans_shape": lambda: tok(x(), spans()[:, :3]),
    "spans_strides": lambda: tok(x(), torch.zeros(4, 2, dtype=torch.int64).t()),
    "spans_device": lambda: tok(x(), spans().to("meta")),
    "spans_rows": lambda: tok(x(), spans(3)),
    "varlen_n": lambda: tok(x(), spans(1), varlen=True),
    "varlen_mask": lambda: tok(x(1), spans(1), mask=mask(1), varlen=True),
    "varlen_layout": lambda: tok(x(1), spans(1), varlen=True),
    "mask_dtype": lambda: tok(x(), spans(), mask=mask(dtype=torch.uint8)),
    "mask_shape": lambda: tok(x(), spans(), mask=mask(s=5)),
    "mask_device": lambda: tok(x(), spans(), mask=mask(device="meta")),
    "token_grad": lambda: tok_bwd(grad_out=lambda: torch.ones(2, 3, dtype=torch.float64)),
    "token_indices": lambda: tok_bwd(MAX, indices=lambda: torch.zeros(2, 3, dtype=torch.int32)),
    "token_aux": lambda: tok_bwd(aux=lambda: torch.zeros(2, 3, 1, dtype=torch.float64)),
}
messages = {}
for name, call in cases.items():
    try:
        call()
        messages[name] = None
    except RuntimeError as exc:
        messages[name] = str(exc)
print(json.dumps(messages))
"""

F = "gapkernels::pool_forward: "
B = "gapkernels::pool_backward: "
TF = "gapkernels::token_pool_forward: "
TB = "gapkernels::token_pool_backward: "
EXPECTED = {
    "mode": F + "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got 7",
    "rank": F + "x must be the 3-D (N, C, S) view, got 2 dims",
    "dtype": F + "x must be float16, bfloat16, float32 or float64, got Int",
    "empty_s": F + "the spatial size S must be > 0",
    "strides": F + "x must have NCS (contiguous) or NSC (channels_last) strides, got [24, 8, 2]",
    "weight_shape": F + "weight must be 1-D with 1 or C=3 elements, got shape [1, 3]",
    "weight_dtype": F + "weight must be Float for x of Half, got Half",
    "weight_device": F + "weight is on meta, x on cpu",
    "weight_strides": F + "weight must be contiguous",
    "grad_shape": B + "grad_out must be (2, 6), got [2, 3]",
    "grad_dtype": B + "grad_out must be Float, got Double",
    "grad_strides": B + "grad_out must be contiguous",
    "device": B + "every tensor must be on cpu",
    "indices": B
    + "indices must be contiguous int64 (N, C), as pool_forward returns them with with_index=True",
    "aux": B + "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    "token_mode": TF + "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got 9",
    "spans_dtype": TF + "spans must be int64 (B, 4), got Int [2, 4]",
    "spans_shape": TF + "spans must be int64 (B, 4), got Long [2, 3]",
    "spans_strides": TF + "spans must be contiguous on cpu",
    "spans_device": TF + "spans must be contiguous on cpu",
    "spans_rows": TF + "spans must have N=2 rows, got 3",
    "varlen_n": TF + "varlen takes x as (1, C, total) and no mask",
    "varlen_mask": TF + "varlen takes x as (1, C, total) and no mask",
    "varlen_layout": TF
    + "varlen takes the packed (total, C) batch as (1, C, total) with NSC strides",
    "mask_dtype": TF
    + "mask must be a contiguous bool (2, 4) tensor on cpu, got Byte [2, 4] on cpu",
    "mask_shape": TF
    + "mask must be a contiguous bool (2, 4) tensor on cpu, got Bool [2, 5] on cpu",
    "mask_device": TF
    + "mask must be a contiguous bool (2, 4) tensor on cpu, got Bool [2, 4] on meta",
    "token_grad": TB + "grad_out must be contiguous Float (2, 3), got [2, 3]",
    "token_indices": TB + "indices must be the int64 (B, C) tensor token_pool_forward returned",
    "token_aux": TB + "aux must be the (B, C, K>=2) tensor token_pool_forward returned",
}


@needs_extension
@pytest.mark.parametrize("variant", RUNNABLE)
def test_bad_input_messages_are_unchanged(variant):
    done = subprocess.run(
        [sys.executable, "-c", CASES, variant],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), _ext.CPU_ENV_VAR: variant},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    messages = json.loads(done.stdout.splitlines()[-1])
    assert messages == EXPECTED
