"""The C++ CUDA token kernels (gapkernels::token_pool_forward / token_pool_backward on CUDA
tensors: csrc/cuda/token_cuda.cpp and the CUDA pool kernels' templates with TokenPositions)
against gapkernels.reference and the CPU kernels: every mode, dtype and layout, mask / lengths /
start, varlen, empty rows, the max rules at vector, chunk and piece boundaries, NCS and NSC rows
split into pieces (the combine pass), any address, bitwise determinism, gradcheck in float64,
double backward, opcheck and torch.compile(fullgraph=True). Needs a GPU (skipped without one);
the checks that run without one are in test_tokens_cuda_checks.py."""

from __future__ import annotations

import pytest
import torch
from cuda_common import CUDA_MARK
from tokens_common import (
    TOKEN_CASES,
    TOKEN_LAYOUTS,
    TOKEN_OPS,
    call,
    check_against,
    check_compile_fullgraph,
    check_empty_rows_op,
    check_gem_double_backward,
    check_gradcheck,
    check_spans_clamped_op,
    check_token_opcheck,
    check_varlen,
    cu_seqlens_of,
    forward_backward,
    make_tokens,
    token_args,
    token_op_samples,
    weight_for,
)

import gapkernels
from gapkernels import reference, tokens
from helpers import assert_bitwise_equal, assert_close

pytestmark = [
    CUDA_MARK,
    pytest.mark.skipif(
        not tokens._cuda_token_kernels(), reason="the extension's CUDA token kernels are not built"
    ),
]

OPS = torch.ops.gapkernels
DEV = "cuda"
# Around the kernels' widths: 4 to 8 elements a 16-byte slot, NSC channel vectors with a tail
# (C = 19), rows of a few slots.
N, C, S = 4, 19, 38
# Shapes whose rows are cut into pieces (a partials buffer and the combine kernel): NCS with few
# rows of S > 4096 (2048-element chunks), NSC with few channel blocks and S > 1024.
SPLIT_SHAPES = {"ncs_split": ("ncl", 2, 3, 9000), "nsc_split": ("nlc", 2, 19, 3000)}


@pytest.mark.parametrize("layout", TOKEN_LAYOUTS)
@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cuda_matches_reference(op, case, layout, gen):
    x, fmt, _, spatial = make_tokens(layout, N, C, S, torch.float32, gen, DEV, op == "gem")
    kw, _ = token_args(case, N, spatial, gen, DEV)
    check_against(op, x, fmt, kw, torch.float32, "cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nlc", "ncl"])
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cuda_dtypes(op, layout, dtype, gen):
    x, fmt, _, spatial = make_tokens(layout, N, C, S, dtype, gen, DEV, op == "gem")
    kw, _ = token_args("mask_start", N, spatial, gen, DEV)
    check_against(op, x, fmt, kw, dtype, "cuda")


@pytest.mark.parametrize("shape", list(SPLIT_SHAPES))
@pytest.mark.parametrize("case", ["mask_start", "lengths_start"])
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cuda_split_rows_match_cpu_kernels(op, case, shape, gen):
    """Rows cut into pieces and combined, against the CPU kernels (their own cuts)."""
    layout, n, c, s = SPLIT_SHAPES[shape]
    x, fmt, _, spatial = make_tokens(layout, n, c, s, torch.float32, gen, DEV, op == "gem")
    kw, _ = token_args(case, n, spatial, gen, DEV)
    check_against(op, x, fmt, kw, torch.float32, "cuda", against="cpu")


def _special_rows(n, s, gen):
    """Ties, NaNs and infinities at slot edges (8 elements) and in different pieces of a split
    row (9000 positions: NCS pieces of 1856, NSC of 3000); an all -inf row."""
    x = torch.randn(n, s, generator=gen)
    nan, inf = float("nan"), float("inf")
    x[0, [7, 8, 2047, 2048, 4095, 4096]] = 7.0  # a tie across slots and chunks: the first wins
    x[1, [15, 2048, 4100]] = nan  # NaNs: the last one's index
    x[2, :] = -inf  # the first position that takes part
    x[3, [17, 4097]] = inf
    x[3, 4101] = nan
    return x


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_cuda_max_rules_at_boundaries(layout, gen):
    s = 9000
    x3 = _special_rows(5, s, gen).unsqueeze(1).repeat(1, 3, 1)  # (5, 3, s): few rows, split
    x = (x3 if layout == "ncl" else x3.transpose(1, 2).contiguous()).to(DEV)
    fmt = "NCHW" if layout == "ncl" else "NLC"
    mask = torch.rand(5, s, generator=gen) > 0.2
    mask[:, [7, 8, 15, 17, 2047, 2048, 4095, 4096, 4097, 4100, 4101]] = True
    mask[2, :3] = False
    lengths = torch.tensor([s, 4097, s, 4102, 0])
    for kw in (dict(start=1), dict(lengths=lengths.to(DEV)), dict(mask=mask.to(DEV), start=1)):
        got = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend="cuda", **kw)
        want = reference.global_max_pool(x, True, input_fmt=fmt, **kw)
        assert torch.equal(got[1], want[1]), kw
        assert_bitwise_equal(got[0], want[0])
        for op in ("avg", "mixed", "gem"):
            w = weight_for(op, 3, DEV)
            y = x.abs() if op == "gem" else x
            assert_close(
                call(op, gapkernels, y, w, input_fmt=fmt, backend="cuda", **kw).cpu(),
                call(op, reference, y, w, input_fmt=fmt, **kw).cpu(),
                torch.float32,
            )


@pytest.mark.parametrize("pool_type", TOKEN_OPS)
def test_cuda_varlen(pool_type, gen):
    # Empty sequences, one token, and a sequence long enough to be cut into NSC pieces.
    cu = cu_seqlens_of([3, 0, 2100, 1, 17], DEV)
    x = torch.randn(int(cu[-1]), 21, generator=gen).to(DEV)
    check_varlen(pool_type, x, cu, "cuda", DEV)


def test_cuda_empty_rows_outputs_aux_and_zero_gradient():
    check_empty_rows_op(DEV)


def test_cuda_spans_out_of_range_are_clamped():
    check_spans_clamped_op(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cuda_deterministic_at_any_address(op, layout, dtype, gen):
    """Two runs, and a copy of the input 1 to 3 elements off a 16-byte boundary: the same bits,
    forward and backward, rows split into pieces included."""
    _, n, c, s = SPLIT_SHAPES["ncs_split" if layout == "ncl" else "nsc_split"]
    x, fmt, _, spatial = make_tokens(layout, n, c, s, dtype, gen, DEV, op == "gem")
    kw, _ = token_args("mask_start", n, spatial, gen, DEV)
    weight = weight_for(op, c, DEV)
    first = forward_backward(op, gapkernels, x, weight, input_fmt=fmt, backend="cuda", **kw)
    for offset in (0, 1, 3):
        flat = torch.empty(x.numel() + offset, dtype=dtype, device=DEV)
        moved = flat[offset:].view(x.shape).copy_(x)  # x is contiguous in both layouts
        again = forward_backward(op, gapkernels, moved, weight, input_fmt=fmt, backend="cuda", **kw)
        assert_bitwise_equal(first[0], again[0])
        for a, b in zip(first[1], again[1], strict=True):
            assert_bitwise_equal(a, b)


def test_cuda_under_deterministic_algorithms(gen):
    x = torch.randn(3, 40, 8, generator=gen).to(DEV).requires_grad_()
    lengths = torch.tensor([40, 7, 0], device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        out = gapkernels.global_max_pool(x, input_fmt="NLC", lengths=lengths, backend="cuda")
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert x.grad is not None and (x.grad[2] == 0).all()


@pytest.mark.parametrize("layout, case", [("nlc", "mask"), ("ncl", "lengths_start")])
@pytest.mark.parametrize("op", ["avg", "max", "mixed", "catavgmax", "gem"])
def test_cuda_gradcheck_float64(op, layout, case, gen):
    check_gradcheck(op, layout, case, "cuda", gen, DEV)


@pytest.mark.parametrize("pool_type", ["avg", "max", "gem"])
def test_cuda_varlen_gradcheck_float64(pool_type, gen):
    cu = cu_seqlens_of([2, 0, 5], DEV)
    x = torch.randn(7, 3, dtype=torch.float64, generator=gen).abs().add(0.1).to(DEV)

    def f(packed):
        return gapkernels.varlen_pool(packed, cu, pool_type, start=1, backend="cuda")

    assert torch.autograd.gradcheck(f, (x.requires_grad_(),))


def test_cuda_double_backward_matches_reference():
    check_gem_double_backward("cuda", DEV)


def test_cuda_token_op_opcheck(gen):
    fwd, bwd = OPS.token_pool_forward.default, OPS.token_pool_backward.default
    check_token_opcheck(fwd, bwd, token_op_samples(gen, DEV))


def test_cuda_torch_compile_fullgraph(gen):
    check_compile_fullgraph("cuda", "aot_eager", gen, DEV)


def test_auto_runs_the_cuda_token_kernels_where_auto_picks_cuda(gen):
    """auto on CUDA tensors makes the pooling ops' choice (gapkernels.backends, by the table)."""
    from gapkernels import backends

    x = torch.randn(2, 9, 4, generator=gen).to(DEV)
    want = backends.resolve("auto", x, "NCHW", "test")
    assert tokens.resolve("auto", x, "test") == want
    if want == "cuda":
        kw = dict(input_fmt="NLC", lengths=torch.tensor([9, 3], device=DEV))
        torch.testing.assert_close(
            gapkernels.global_avg_pool(x, **kw), gapkernels.global_avg_pool(x, backend="cuda", **kw)
        )
