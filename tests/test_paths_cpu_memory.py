"""How the data sits in memory, on the CPU kernels' paths (docs/PATHS.md; the geometry and the
checks are in tests/paths_common.py): misaligned data pointers, and 64-bit offsets (opt-in)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from paths_common import (
    DTYPES,
    K_ROW_BLOCK,
    OP_LIST,
    check,
    default_weight,
    make_ncs,
    make_nsc,
    run_boundaries,
    vector_bytes,
    width,
)

import gapkernels

# ---------------------------------------------------------------------------------------------
# Misaligned data pointers: a view starting one element into a larger buffer (every load is
# unaligned; the lanes' 8-wide loads and the tail chunks included).


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["ncs", "ncs_lanes", "nsc"])
@pytest.mark.parametrize("op", OP_LIST)
def test_misaligned_views(op, layout, dtype, gen):
    w = width(dtype)
    if layout == "ncs":
        x = make_ncs(
            2,
            3,
            3 * w + 5,
            dtype,
            gen,
            run_boundaries(3 * w + 5, dtype),
            positive=op == "gem",
            offset=1,
        )
    elif layout == "ncs_lanes":
        x = make_ncs(
            3, 7, 45, dtype, gen, run_boundaries(45, dtype), positive=op == "gem", offset=1
        )
    else:
        x = make_nsc(
            2, w + 3, 37, dtype, gen, [K_ROW_BLOCK, 2 * K_ROW_BLOCK], positive=op == "gem", offset=1
        )
    assert x.data_ptr() % vector_bytes() != 0, "the view must start off a vector boundary"
    check(op, x, default_weight(op, x.shape[1], gen), gen)


# ---------------------------------------------------------------------------------------------
# 64-bit offsets: every offset in the CPU kernels is int64 arithmetic; driving it needs a tensor
# over 2**31 elements (4 GiB in float16), too large for CI. Opt in with GAPKERNELS_TEST_HUGE=1.


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GAPKERNELS_TEST_HUGE") != "1",
    reason="needs about 20 GiB of memory: set GAPKERNELS_TEST_HUGE=1",
)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_offsets_past_2_31_elements(layout):
    n, c, s = 2, 2, 2**29 + 3
    assert n * c * s > 2**31
    x3 = torch.zeros(n, c, s, dtype=torch.float16)
    x3[1, 1, s - 2] = 5.0
    x3[1, 0, 7] = 3.0
    x = x3.unsqueeze(-1)
    if layout == "nsc":
        x = x3.transpose(1, 2).contiguous().view(n, s, 1, c).permute(0, 3, 1, 2)
    values, idx = gapkernels.global_max_pool(x, True, backend="cpu")
    assert values[1].tolist() == [3.0, 5.0] and idx[1].tolist() == [7, s - 2]
    xr = x.detach().requires_grad_(True)
    gapkernels.global_avg_pool(xr, backend="cpu").sum().backward()
    assert math.isclose(xr.grad[1, 1, s - 1, 0].item(), 1.0 / s, rel_tol=1e-2)
