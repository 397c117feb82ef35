"""The Triton token kernels on long rows: the forward split over several programs per row (each
row's own range [begin, end) cut into pieces, merged in order by token_combine_kernel) and the
backward's pieces, against gapkernels.reference, in Triton's interpreter (compiled on a GPU).

The launch geometry is scaled down (fixture `split_long_rows`, as tests/test_paths_triton.py
lowers TARGET_PROGRAMS): with the real values a row is split only when the launch has fewer than
264 row programs and the row at least 8 steps of BLOCK_S, sizes the interpreter runs slowly. The
code paths are the same. The pieces' boundaries come from configs itself, and ties, NaNs and
infinities are planted on both sides of each (tests/paths_common.py's `plant`).
"""

from __future__ import annotations

import pytest
import torch
from paths_common import SPECIALS, plant
from tokens_common import (
    TOKEN_OPS,
    check_varlen,
    cu_seqlens_of,
    forward_backward,
    token_args,
    weight_for,
)
from triton_common import DEVICE, TRITON_MARKS

import gapkernels
from gapkernels import reference
from gapkernels.triton import configs
from helpers import assert_bitwise_equal, assert_close

pytestmark = TRITON_MARKS

# (N, C, S): NCS rows of one 1024-position step each, three steps long; NSC blocks of 16
# channels (7 of them used), 256 positions a step, three steps long.
SHAPES = {"ncl": (4, 2, 2300), "nlc": (4, 7, 700)}


@pytest.fixture(autouse=True)
def split_long_rows(monkeypatch):
    """The forward splits when the launch has fewer than 64 row programs and a row at least two
    steps of BLOCK_S; the backward cuts its rows into pieces of one step."""
    monkeypatch.setattr(configs, "TARGET_PROGRAMS", 64)
    monkeypatch.setattr(configs, "MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(configs, "BACKWARD_TILES_PER_PROGRAM", 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def piece_cuts(begin: int, end: int, pieces: int, block_s: int) -> list[int]:
    """Where the kernels cut a row's range [begin, end) into `pieces` (token_kernels.py's
    `_token_piece`: whole BLOCK_S steps from begin)."""
    per_piece = _cdiv(_cdiv(max(end - begin, 0), pieces), block_s) * block_s
    return [begin + k * per_piece for k in range(1, pieces) if begin + k * per_piece < end]


def geometry(rows_out: int, c: int, typical: int, channels_last: bool):
    """(forward pieces, backward pieces, block_s) of a launch; both must cut rows, or the tests
    no longer reach the split."""
    fwd = configs.forward_config(rows_out, c, typical, channels_last)
    bwd = configs.backward_config(rows_out, c, typical, channels_last)
    assert fwd.s_programs > 1 and bwd.s_programs > 1, (fwd, bwd)
    assert bwd.block_s == fwd.block_s
    return fwd.s_programs, bwd.s_programs, fwd.block_s


def planted(layout, case, op, dtype, gen):
    """(x, input_fmt, kw): x with specials on both sides of every forward and backward piece
    boundary of its rows (GeM: positive values), and the case's mask / lengths / start."""
    n, c, s = SHAPES[layout]
    kw, _ = token_args(case, n, (s,), gen, DEVICE)
    x3 = torch.randn(n, c, s, generator=gen, dtype=torch.float64)
    channels_last = layout == "nlc"
    fwd_pieces, bwd_pieces, block_s = geometry(n, c, s, channels_last)
    start = kw.get("start", 0)
    ends = kw["lengths"].clamp(min=start).tolist() if "lengths" in kw else [s] * n
    if "mask" in kw:  # sample 2's first piece takes no part: the second piece comes first
        kw["mask"][2, : piece_cuts(start, s, fwd_pieces, block_s)[0]] = False
    for i in range(n):
        if op == "gem":
            x3[i] = x3[i].abs() + 0.1
            continue
        cuts = piece_cuts(start, ends[i], fwd_pieces, block_s)
        cuts += piece_cuts(0, s, bwd_pieces, block_s)
        # The specials' kinds continue from sample to sample: all of them are planted.
        k = i * c % len(SPECIALS)
        kinds = SPECIALS[k:] + SPECIALS[:k]
        plant(x3[i : i + 1], sorted(set(cuts)), gen, kinds)
    x3 = x3.to(device=DEVICE, dtype=dtype)
    if channels_last:
        return x3.transpose(1, 2).contiguous(), "NLC", kw
    return x3, "NCHW", kw


def check(op, x, fmt, kw):
    weight = weight_for(op, x.shape[1] if fmt == "NCHW" else x.shape[-1], DEVICE)
    out, grads = forward_backward(op, gapkernels, x, weight, input_fmt=fmt, backend="triton", **kw)
    ref, ref_grads = forward_backward(op, reference, x, weight, input_fmt=fmt, **kw)
    assert_close(out, ref, x.dtype, msg=f"{op} forward")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, x.dtype, scale=4, msg=f"{op} gradient")
    if op in ("max", "mixed", "catavgmax"):
        got = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend="triton", **kw)
        want = reference.global_max_pool(x, True, input_fmt=fmt, **kw)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["mask_start", "lengths_start", "lengths"])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_split_matches_reference(op, layout, case, gen):
    """Every mode, both layouts: random masks (a row of none, a row of all), lengths 0, S and
    random, start; ties (the first wins), NaNs (the last wins), +-inf and rows of -inf (the
    first position that takes part) on both sides of the pieces' boundaries."""
    x, fmt, kw = planted(layout, case, op, torch.float32, gen)
    check(op, x, fmt, kw)


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("op", ["max", "mixed"])
def test_split_bfloat16_ties(op, layout, gen):
    """bfloat16, where equal maxima in different pieces are common."""
    x, fmt, kw = planted(layout, "mask_start", op, torch.bfloat16, gen)
    check(op, x, fmt, kw)


@pytest.mark.parametrize("pool_type", TOKEN_OPS)
def test_split_varlen(pool_type, gen):
    """A packed batch: empty, one-token, short and long sequences, start 0 and 2; the long ones
    cut into pieces forward and backward."""
    lengths = [3, 0, 1500, 1, 40, 700]
    cu = cu_seqlens_of(lengths, DEVICE)
    total, c = sum(lengths), 7
    fwd_pieces, bwd_pieces, block_s = geometry(len(lengths), c, total // len(lengths), True)
    x = torch.randn(total, c, generator=gen, dtype=torch.float64)
    if pool_type != "gem":
        cuts = set()
        for origin, length in zip(cu[:-1].tolist(), lengths, strict=True):
            for start in (0, 2):
                begin, end = min(origin + start, origin + length), origin + length
                cuts |= set(piece_cuts(begin, end, fwd_pieces, block_s))
            cuts |= set(piece_cuts(origin, origin + length, bwd_pieces, block_s))
        plant(x.t().unsqueeze(0), sorted(cuts), gen)
    check_varlen(pool_type, x.to(device=DEVICE, dtype=torch.float32), cu, "triton", DEVICE)


def test_split_deterministic(gen):
    """The same bits forward and backward on every run (the pieces are merged in order)."""
    x, fmt, kw = planted("nlc", "mask_start", "mixed", torch.float32, gen)
    runs = []
    for _ in range(2):
        xr = x.detach().requires_grad_()
        out = gapkernels.global_mixed_pool(xr, 0.3, input_fmt=fmt, backend="triton", **kw)
        runs.append((out, torch.autograd.grad(out.sum(), xr)[0]))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert_bitwise_equal(runs[0][1], runs[1][1])
