"""The C++ CPU token kernels (gapkernels::token_pool_forward / token_pool_backward,
csrc/cpu/token_*.cpp) against gapkernels.reference: every mode, dtype and layout, mask / lengths
/ start, varlen, empty rows, the max rules at vector-width and block boundaries, NSC rows split
into pieces, 1 and 2 threads, gradcheck in float64, double backward, opcheck and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
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
    make_tokens,
    token_args,
    token_op_samples,
    weight_for,
)

import gapkernels
from gapkernels import reference, tokens
from helpers import assert_bitwise_equal, assert_close

pytestmark = pytest.mark.skipif(
    not tokens._cpu_token_kernels(), reason="the extension's CPU token kernels are not built"
)

OPS = torch.ops.gapkernels
# Shapes around the kernels' widths: 16 lanes a chunk (8 for float64), NSC's tail chunk (C = 19)
# and NCS runs longer than a chunk.
N, C, S = 4, 19, 38


def _check_against_reference(op, x, fmt, kw, dtype=torch.float32):
    check_against(op, x, fmt, kw, dtype, "cpu")


@pytest.mark.parametrize("layout", TOKEN_LAYOUTS)
@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cpu_matches_reference(op, case, layout, gen):
    x, fmt, _, spatial = make_tokens(layout, N, C, S, torch.float32, gen, positive=op == "gem")
    kw, _ = token_args(case, N, spatial, gen)
    _check_against_reference(op, x, fmt, kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nlc", "ncl"])
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cpu_dtypes(op, layout, dtype, gen):
    x, fmt, _, spatial = make_tokens(layout, N, C, S, dtype, gen, positive=op == "gem")
    kw, _ = token_args("mask_start", N, spatial, gen)
    _check_against_reference(op, x, fmt, kw, dtype)


def test_cpu_gem_learnable_p_per_channel(gen):
    """GeM with a learnable (C,) p: the log statistic (with_log) and per-lane exponents."""
    for layout in ("nlc", "ncl"):
        x, fmt, _, spatial = make_tokens(layout, N, C, S, torch.float32, gen, positive=True)
        kw, _ = token_args("lengths_start", N, spatial, gen)
        p = torch.linspace(1.5, 4.0, C)
        results = []
        for module, extra in ((gapkernels, dict(backend="cpu")), (reference, {})):
            xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
            out = module.global_gem_pool(xr, pr, input_fmt=fmt, **kw, **extra)
            results.append((out, *torch.autograd.grad(out.square().sum(), (xr, pr))))
        for got, want in zip(*results, strict=True):
            assert_close(got, want, torch.float32, scale=4)


def _special_rows(n, s, gen):
    """Rows with ties, NaNs and infinities planted at chunk (16) and max-block (4096) edges."""
    x = torch.randn(n, s, generator=gen)
    nan, inf = float("nan"), float("inf")
    x[0, [15, 16, 4095, 4096]] = 7.0  # a tie across chunks and blocks: the first wins
    x[1, [15, 4096]] = nan  # NaNs: the last one's index
    x[2, :] = -inf
    x[3, [17, 4097]] = inf
    x[3, 4100] = nan
    return x


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_cpu_max_rules_at_boundaries(layout, gen):
    s = 4096 + 40
    x3 = _special_rows(5, s, gen).unsqueeze(1).repeat(1, 3, 1)  # (5, 3, s)
    x = x3 if layout == "ncl" else x3.transpose(1, 2).contiguous()
    fmt = "NCHW" if layout == "ncl" else "NLC"
    mask = torch.rand(5, s, generator=gen) > 0.2
    mask[:, [15, 16, 4095, 4096]] = True
    for kw in (dict(start=1), dict(lengths=torch.tensor([s, 4097, s, 4101, 0])), dict(mask=mask)):
        got = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend="cpu", **kw)
        want = reference.global_max_pool(x, True, input_fmt=fmt, **kw)
        assert torch.equal(got[1], want[1]), kw
        assert_bitwise_equal(got[0], want[0])
        for op in ("avg", "mixed", "gem"):
            w = weight_for(op, 3)
            y = x.abs() if op == "gem" else x
            assert_close(
                call(op, gapkernels, y, w, input_fmt=fmt, backend="cpu", **kw),
                call(op, reference, y, w, input_fmt=fmt, **kw),
                torch.float32,
            )


@pytest.mark.parametrize("op", TOKEN_OPS)
def test_cpu_scattered_and_long_runs(op, gen):
    """NSC masks of every run structure: scattered positions (gathered 64 rows at a time, the
    gathered rows' max index mapped back), runs of 64 or more (reduced in place) between them,
    gathers that cross a piece boundary, and a mask equal to lengths (the same bits as lengths)."""
    n, s, c = 4, 1200, 21
    x = torch.randn(n, s, c, generator=gen)
    x[:, ::7] = x[:, ::7].round()  # ties
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[0] = torch.rand(s, generator=gen) < 0.5
    mask[0, 100:180] = True  # a long run among scattered ones
    mask[0, 1000:1100] = True  # across the piece boundary at 1024
    mask[1, ::3] = True
    mask[2, 5:69] = True  # exactly 64
    mask[2, 300:363] = True  # 63: gathered
    mask[2, 1010:1040] = torch.rand(30, generator=gen) < 0.7
    mask[3, :777] = True  # a prefix
    y = x.abs() + 0.1 if op == "gem" else x
    w = weight_for(op, c)
    got = call(op, gapkernels, y, w, input_fmt="NLC", mask=mask, backend="cpu")
    want = call(op, reference, y, w, input_fmt="NLC", mask=mask)
    assert_close(got, want, torch.float32)
    if op == "max":
        values, index = gapkernels.global_max_pool(
            y, True, input_fmt="NLC", mask=mask, backend="cpu"
        )
        ref_values, ref_index = reference.global_max_pool(y, True, input_fmt="NLC", mask=mask)
        assert torch.equal(index, ref_index)
        assert_bitwise_equal(values, ref_values)
    lengths = torch.tensor([777])
    assert_bitwise_equal(
        call(op, gapkernels, y[3:], w, input_fmt="NLC", mask=mask[3:], backend="cpu"),
        call(op, gapkernels, y[3:], w, input_fmt="NLC", lengths=lengths, backend="cpu"),
    )


@pytest.mark.parametrize("pool_type", TOKEN_OPS)
def test_cpu_varlen(pool_type, gen):
    # A sequence of 2100 tokens is cut into NSC pieces of 1024 rows.
    cu = cu_seqlens_of([3, 0, 2100, 1, 17])
    check_varlen(pool_type, torch.randn(int(cu[-1]), 21, generator=gen), cu, "cpu")


@pytest.mark.parametrize("layout", ["nlc", "ncl"])
def test_cpu_long_rows_and_threads(layout, gen):
    """NSC rows longer than a piece (merged in order) and NCS rows of several max blocks; the
    same bits with 1 and 2 threads."""
    x, fmt, _, spatial = make_tokens(layout, 3, 24, 2600, torch.float32, gen)
    mask = torch.rand(3, 2600, generator=gen) > 0.1
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for op in ("mixed", "gem"):
                y = (x.abs() if op == "gem" else x).detach().requires_grad_()
                w = weight_for(op, 24)
                out = call(op, gapkernels, y, w, input_fmt=fmt, mask=mask, backend="cpu")
                runs.append((out, torch.autograd.grad(out.sum(), y)[0]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(runs[:2], runs[2:], strict=True):
        assert_bitwise_equal(a[0], b[0])
        assert_bitwise_equal(a[1], b[1])
    ref = call("mixed", reference, x, weight_for("mixed", 24), input_fmt=fmt, mask=mask)
    assert_close(runs[0][0], ref, torch.float32)


def test_cpu_empty_rows_outputs_and_aux():
    check_empty_rows_op("cpu")


def test_cpu_spans_out_of_range_are_clamped():
    check_spans_clamped_op("cpu")


@pytest.mark.parametrize("layout, case", [("nlc", "mask"), ("ncl", "lengths_start")])
@pytest.mark.parametrize("op", ["avg", "max", "mixed", "catavgmax", "gem"])
def test_cpu_gradcheck_float64(op, layout, case, gen):
    check_gradcheck(op, layout, case, "cpu", gen)


def test_cpu_double_backward_matches_reference():
    check_gem_double_backward("cpu")


def test_cpu_token_op_opcheck(gen):
    samples = token_op_samples(gen)
    fwd, bwd = OPS.token_pool_forward.default, OPS.token_pool_backward.default
    check_token_opcheck(fwd, bwd, samples)
    x, spans, mask = samples[0][0], samples[0][1], samples[2][2]
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool"):
        fwd(x, spans, mask[:, :5], False, 0, None, 0.5, 0.0, False)


def test_cpu_torch_compile_fullgraph(gen):
    check_compile_fullgraph("cpu", "aot_eager", gen)
