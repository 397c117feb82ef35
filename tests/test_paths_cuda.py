"""Every code path of the CUDA kernels (csrc/cuda/pool_cuda.cu) with an input that makes it
matter; docs/PATHS.md lists them. Skipped without a GPU.

The launch geometry (ncs_geometry, nsc_geometry) is mirrored below from the constants at the top
of pool_cuda.cu, so that ties, NaNs and +-inf are planted on both sides of the boundaries the
kernels really cut at: 16-byte vectors (the head/body/tail peel), lane groups, pieces of a split
reduction and the combine pass, threads across S in an NSC block.

GAPKERNELS_PATHS_DEVICE=cpu runs this file on the CPU kernels instead (a dry run of the tests'
own logic and geometry where no GPU is lent; it proves nothing about the CUDA kernels).
"""

from __future__ import annotations

import os

import pytest
import torch
from paths_common import cdiv, check, make_ncs, make_nsc

import gapkernels

DEVICE = os.environ.get("GAPKERNELS_PATHS_DEVICE", "cuda")
BACKEND = "cpu" if DEVICE == "cpu" else "cuda"
if DEVICE == "cuda":
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Mirrored from csrc/cuda/pool_cuda.cu.
K_THREADS = 256
K_NCS_FILL_ITEMS = 4096
K_NCS_MIN_CHUNK = 2048
K_NCS_CHUNK_ALIGN = 64
K_NSC_FILL_BLOCKS = 512
K_NSC_MIN_STEPS_PER_THREAD = 16
K_UNROLL = 4


def vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def ceil_log2(v: int) -> int:
    return max(0, (v - 1).bit_length())


def ncs_geometry(rows: int, s: int, dtype) -> dict:
    split, chunk = 1, s
    if rows < K_NCS_FILL_ITEMS:
        pieces = min(cdiv(K_NCS_FILL_ITEMS, rows), cdiv(s, K_NCS_MIN_CHUNK))
        if pieces > 1:
            chunk = cdiv(cdiv(s, pieces), K_NCS_CHUNK_ALIGN) * K_NCS_CHUNK_ALIGN
            split = cdiv(s, chunk)
    group = 1 << min(ceil_log2(cdiv(cdiv(chunk, vec(dtype)), K_UNROLL)), 5)
    return {"split": split, "chunk": chunk, "group": group}


def nsc_geometry(n: int, c: int, s: int, dtype) -> dict:
    vectors = cdiv(c, vec(dtype))
    bx = 1 << min(ceil_log2(vectors), 5)
    by = K_THREADS // bx
    channel_blocks = cdiv(vectors, bx)
    split, s_chunk = 1, s
    if channel_blocks * n < K_NSC_FILL_BLOCKS:
        pieces = min(
            cdiv(K_NSC_FILL_BLOCKS, channel_blocks * n), cdiv(s, by * K_NSC_MIN_STEPS_PER_THREAD)
        )
        if pieces > 1:
            s_chunk = cdiv(s, pieces)
            split = cdiv(s, s_chunk)
    return {
        "bx": bx,
        "by": by,
        "channel_blocks": channel_blocks,
        "split": split,
        "s_chunk": s_chunk,
    }


def ncs_cuts(s, dtype, geometry):
    """Piece boundaries, the vector boundaries near the start and end of a row (where the head
    and tail of the peel meet the body; rows start at r * S, so they shift with r), and the
    boundaries of the unrolled lane loop."""
    v = vec(dtype)
    span = geometry["group"] * K_UNROLL * v
    cuts = set(range(geometry["chunk"], s, geometry["chunk"]))
    cuts |= {b for b in (v, 2 * v, span, s - v, s - 2 * v, s - span) if 0 < b < s}
    return sorted(cuts)


def nsc_cuts(s, geometry):
    """Piece boundaries, and a few consecutive rows (each taken by a different thread ty of the
    block, merged by the shared-memory tree) at the start, middle and end of each piece."""
    cuts = set(range(geometry["s_chunk"], s, geometry["s_chunk"]))
    for start in range(0, s, geometry["s_chunk"]):
        cuts |= {start + 1, start + geometry["by"] // 2, start + geometry["by"] + 1}
    return sorted(b for b in cuts if 0 < b < s)


OP_LIST = ["avg", "max", "mixed", "catavgmax", "gem"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def weight(op, c, gen):
    if op == "mixed":
        return 0.2 + 0.6 * torch.rand(c, generator=gen, dtype=torch.float32)
    if op == "gem":
        return 3.0
    return None


# ---------------------------------------------------------------------------------------------
# NCS: ncs_pool_forward_kernel (groups of 1..32 lanes, peel head/body/tail, unrolled loads),
# combine_pieces_kernel, ncs_pool_backward_kernel.

NCS_LENGTHS = {
    "1": lambda v: 1,
    "v-1": lambda v: v - 1,  # head and tail only, no vector
    "v+1": lambda v: v + 1,
    "49": lambda v: 49,  # a few lanes per row
    "1000": lambda v: 1000,  # a full warp per row, unrolled loop with a remainder
    "split": lambda v: 3 * K_NCS_MIN_CHUNK + 37,  # pieces + combine
}


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", NCS_LENGTHS)
@pytest.mark.parametrize("op", OP_LIST)
def test_ncs_groups_peel_split(op, length, dtype, offset, gen):
    """N*C = 6 rows (each starting at a different 16-byte phase, since S is odd) with every
    group size, and a view one element into its buffer (every row's head, body and tail shift;
    the backward's x is then out of phase with grad_x: x_vectorized = false)."""
    n, c = 2, 3
    s = NCS_LENGTHS[length](vec(dtype))
    geometry = ncs_geometry(n * c, s, dtype)
    if length == "split":
        assert geometry["split"] > 1
    x = make_ncs(
        n,
        c,
        s,
        dtype,
        gen,
        ncs_cuts(s, dtype, geometry),
        positive=op == "gem",
        offset=offset,
        device=DEVICE,
    )
    check(op, x, weight(op, c, gen), gen, backend=BACKEND, msg=f"{geometry}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["max", "mixed", "catavgmax", "avg"])
def test_ncs_combine_more_pieces_than_lanes(op, dtype, gen):
    """One row split into more than 32 pieces: combine_pieces_kernel's lanes each merge several
    pieces before the butterfly; ties and NaNs at every piece boundary."""
    s = 40 * K_NCS_MIN_CHUNK + 5
    geometry = ncs_geometry(1, s, dtype)
    assert geometry["split"] > 32
    x = make_ncs(1, 1, s, dtype, gen, ncs_cuts(s, dtype, geometry), device=DEVICE)
    check(op, x, weight(op, 1, gen), gen, backend=BACKEND, msg=f"{geometry}")


# ---------------------------------------------------------------------------------------------
# NSC: nsc_pool_forward_kernel (vectorized or scalar channel loads, unrolled S loop with its
# remainder, shared-memory tree over ty, channel blocks, S split + combine) and
# nsc_pool_backward_kernel (vectorized or scalar stores; x loaded vectorized or not).


def _nsc_channels(dtype):
    v = vec(dtype)
    # C = 1 is the NCS layout: float64's v - 1 becomes 3.
    return {"2": 2, "v-1": max(v - 1, 3), "v": v, "v+1": v + 1, "33v": 33 * v, "33v+1": 33 * v + 1}


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", ["2", "v-1", "v", "v+1", "33v", "33v+1"])
@pytest.mark.parametrize("s", [7, 3000])
@pytest.mark.parametrize("op", OP_LIST)
def test_nsc_channels_split_tree(op, s, channels, dtype, offset, gen):
    """C below, at and above the vector width (C % VEC == 0 with an aligned pointer: 16-byte
    loads and stores; otherwise, or at offset 1: element by element), more than 32 vectors (two
    channel blocks), S short (one unrolled step or none) and long (split over blocks)."""
    n = 2
    c = _nsc_channels(dtype)[channels]
    geometry = nsc_geometry(n, c, s, dtype)
    x = make_nsc(
        n,
        c,
        s,
        dtype,
        gen,
        nsc_cuts(s, geometry),
        positive=op == "gem",
        offset=offset,
        device=DEVICE,
    )
    check(op, x, weight(op, c, gen), gen, backend=BACKEND, msg=f"{geometry}")


# ---------------------------------------------------------------------------------------------
# GeM: integral_exponent / power: forward p in {1, 2, 3, 4} (multiplications) or pow; backward
# p - 1 in {0, 1, 2, 3, 4} or pow. Moderate p and values: the plain and max-relative formulas
# agree there.


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, "channel"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gem_exponents(p, layout, dtype, gen):
    n, c, s = 2, 9, 300
    make = make_ncs if layout == "ncs" else make_nsc
    x = make(n, c, s, dtype, gen, positive=True, below_eps=0.2, device=DEVICE)
    w = 1.5 + 3.0 * torch.rand(c, generator=gen) if p == "channel" else p
    check("gem", x, w, gen, backend=BACKEND, msg=f"p={p}")


# ---------------------------------------------------------------------------------------------
# 64-bit offsets in the NSC kernels (test_cuda.py::test_more_than_2_31_elements has NCS).


@pytest.mark.slow
def test_nsc_more_than_2_31_elements():
    """(1, 8, 2**28 + 8) bfloat16, channels_last: offsets n*S*C + s*C + c past 2**31, forward
    (max values and indices at both ends) and backward (avg's grad_x at the last element)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA only")
    n, c, s = 1, 8, 2**28 + 8
    assert n * c * s > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * s * 2 + (4 << 30):
        pytest.skip("needs about 17 GB of free GPU memory")
    x_nsc = torch.zeros(n, s, c, dtype=torch.bfloat16, device="cuda")
    x_nsc[0, s - 3, 5] = 2.0
    x_nsc[0, 11, 6] = 3.0
    x = x_nsc.permute(0, 2, 1).unsqueeze(-1)  # (N, C, S, 1), channels_last strides
    values, idx = gapkernels.global_max_pool(x, True, backend="cuda")
    assert values[0, 5].item() == 2.0 and idx[0, 5].item() == s - 3
    assert values[0, 6].item() == 3.0 and idx[0, 6].item() == 11
    del x_nsc
    xr = x.detach().requires_grad_(True)
    gapkernels.global_avg_pool(xr, backend="cuda").sum().backward()
    last = xr.grad[0, c - 1, s - 1, 0].float().item()
    assert abs(last - 1.0 / s) <= 1e-2 / s
