"""The Triton token kernels against gapkernels.reference, in Triton's interpreter on the CPU
(on a GPU, compiled): every mode, both layouts, mask / lengths / start, varlen, forward and
backward, double backward, opcheck, torch.compile, determinism. Small shapes (see
tests/triton_common.py for how the interpreter is set up)."""

from __future__ import annotations

import pytest
import torch
from tokens_common import (
    TOKEN_OPS,
    check_compile_fullgraph,
    check_gem_double_backward,
    check_token_opcheck,
    check_varlen,
    cu_seqlens_of,
    forward_backward,
    make_tokens,
    token_args,
    token_op_samples,
    weight_for,
)
from triton_common import DEVICE, TRITON_MARKS

import gapkernels
from gapkernels import reference
from gapkernels.triton import tokens as ttokens
from helpers import assert_bitwise_equal, assert_close

pytestmark = TRITON_MARKS


# NSC (nlc, channels_last) and NCS (ncl: rows of one tile from different samples, each with its
# own span and mask) with each form of the arguments.
LAYOUT_CASES = [
    ("nlc", "mask"),
    ("nlc", "lengths_start"),
    ("ncl", "mask_start"),
    ("ncl", "lengths"),
    ("nchw_channels_last", "mask_start"),
]


@pytest.mark.parametrize("layout, case", LAYOUT_CASES)
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_triton_matches_reference(op, case, layout, gen):
    x, fmt, _, spatial = make_tokens(layout, 4, 5, 12, torch.float32, gen, DEVICE, op == "gem")
    kw, _ = token_args(case, 4, spatial, gen, DEVICE)
    weight = weight_for(op, 5, DEVICE)
    out, grads = forward_backward(op, gapkernels, x, weight, input_fmt=fmt, backend="triton", **kw)
    ref, ref_grads = forward_backward(op, reference, x, weight, input_fmt=fmt, **kw)
    assert_close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, torch.float32, scale=4)
    if op in ("max", "avgmax"):
        got = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend="triton", **kw)[1]
        assert torch.equal(got, reference.global_max_pool(x, True, input_fmt=fmt, **kw)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["avg", "max", "gem"])
def test_triton_half_dtypes(op, dtype, gen):
    x, fmt, _, spatial = make_tokens("nlc", 3, 8, 10, dtype, gen, DEVICE, op == "gem")
    kw, _ = token_args("lengths_start", 3, spatial, gen, DEVICE)
    out, grads = forward_backward(op, gapkernels, x, None, input_fmt=fmt, backend="triton", **kw)
    ref, ref_grads = forward_backward(op, reference, x, None, input_fmt=fmt, **kw)
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(grads[0], ref_grads[0], dtype, scale=4)


def test_triton_max_rules_and_padding_never_read():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor(
        [
            [9.0, 1.0, 5.0, 5.0, 0.0, nan],
            [nan, 1.0, nan, 2.0, nan, nan],
            [inf, -inf, -inf, -inf, -inf, 8.0],
        ],
        device=DEVICE,
    ).unsqueeze(1)
    lengths = torch.tensor([5, 5, 5], device=DEVICE)
    values, indices = gapkernels.global_max_pool(
        x, True, lengths=lengths, start=1, backend="triton"
    )
    assert indices.flatten().tolist() == [2, 4, 1]
    assert values[0].item() == 5.0 and values[1].isnan().item() and values[2].item() == -inf
    avg = gapkernels.global_avg_pool(
        x, lengths=torch.tensor([5, 0, 1], device=DEVICE), backend="triton"
    )
    assert avg[0].item() == pytest.approx(4.0) and avg[1].item() == 0.0 and avg[2].item() == inf


@pytest.mark.parametrize("pool_type", TOKEN_OPS)
def test_triton_varlen(pool_type, gen):
    x = torch.randn(19, 6, generator=gen).to(DEVICE)
    check_varlen(pool_type, x, cu_seqlens_of([3, 0, 9, 1, 6], DEVICE), "triton", DEVICE)


def test_triton_double_backward_matches_reference():
    """create_graph=True: the gradients are the composite's, differentiable again."""
    check_gem_double_backward("triton", DEVICE)


def test_triton_deterministic(gen):
    x = torch.randn(4, 33, 8, generator=gen).to(DEVICE).requires_grad_()
    mask = (torch.rand(4, 33, generator=gen) > 0.3).to(DEVICE)
    runs = []
    for _ in range(2):
        out = gapkernels.global_mixed_pool(x, 0.3, input_fmt="NLC", mask=mask, backend="triton")
        runs.append((out, torch.autograd.grad(out.sum(), x)[0]))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert_bitwise_equal(runs[0][1], runs[1][1])


def test_triton_float64_refused():
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="do not support float64"):
        gapkernels.global_avg_pool(x, start=1, backend="triton")
    with pytest.raises(RuntimeError, match="do not support float64"):
        gapkernels.varlen_pool(x[0].t(), torch.tensor([0, 4], device=DEVICE), backend="triton")


def test_token_op_schema_fake_and_autograd_registration(gen):
    check_token_opcheck(
        ttokens.token_pool_forward,
        ttokens.token_pool_backward,
        token_op_samples(gen, DEVICE),
        ("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph_triton(gen):
    check_compile_fullgraph("triton", "eager", gen, DEVICE)
