"""Defined once: the mode numbers (gapkernels.ops) and the op schemas (gapkernels.ops) against
every place that mirrors them (the C++ enum and registered schema, the Triton kernels)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest
import torch
from packaging.version import Version

from gapkernels import _ext, ops, token_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpp_modes() -> dict[str, int]:
    """`enum class Mode : int64_t { Avg = 0, ... }` from the C++ headers under csrc/."""
    found = {}
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True):
        with open(path, encoding="utf-8") as f:
            m = re.search(r"enum class Mode\s*:\s*int64_t\s*\{([^}]*)\}", f.read())
        if m:
            found[path] = {
                name.lower(): int(value)
                for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", m.group(1))
            }
    assert len(found) == 1, f"expected one `enum class Mode` under csrc/, found {list(found)}"
    return next(iter(found.values()))


def test_cpp_modes_match_python():
    assert _cpp_modes() == ops.MODES


def test_triton_kernel_modes_match_python():
    # Loaded from its file, as the ahead-of-time compile does (it must not import gapkernels).
    pytest.importorskip("triton")
    path = os.path.join(ROOT, "gapkernels", "triton", "pool_math.py")
    spec = importlib.util.spec_from_file_location("_gk_pool_math_definitions", path)
    pool_math = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool_math)
    for name, value in ops.MODES.items():
        assert getattr(pool_math, f"MODE_{name.upper()}").value == value, name


@pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")
def test_cpp_schemas_match_python():
    """As csrc/schemas.cpp (gapkernels/_ops) registers them."""
    cpp = torch.ops.gapkernels
    assert str(cpp.pool_forward.default._schema) == "gapkernels::pool_forward" + ops.FORWARD_SCHEMA
    assert str(cpp.pool_backward.default._schema) == (
        "gapkernels::pool_backward" + ops.BACKWARD_SCHEMA
    )
    assert str(cpp.token_pool_forward.default._schema) == (
        "gapkernels::token_pool_forward" + token_ops.TOKEN_FORWARD_SCHEMA
    )
    assert str(cpp.token_pool_backward.default._schema) == (
        "gapkernels::token_pool_backward" + token_ops.TOKEN_BACKWARD_SCHEMA
    )


@pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")
def test_cpp_rejects_the_first_mode_past_the_last():
    x = torch.randn(1, 2, 3)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.gapkernels.pool_forward.default(
            x, max(ops.MODES.values()) + 1, None, 0.5, 1e-6, False
        )


def test_triton_schemas_match_python():
    gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")
    fwd = str(gk_triton.pool_forward._schema)
    bwd = str(gk_triton.pool_backward._schema)
    if Version(torch.__version__).release >= (2, 14):  # older torch infers it from annotations
        assert fwd == "gapkernels_triton::pool_forward" + ops.FORWARD_SCHEMA
        assert bwd == "gapkernels_triton::pool_backward" + ops.BACKWARD_SCHEMA
