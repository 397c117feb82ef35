"""The Triton token kernels against gapkernels.reference, in Triton's interpreter on the CPU
(on a GPU, compiled): every mode, both layouts, mask / lengths / start, varlen, forward and
backward, double backward, opcheck, torch.compile, determinism. Small shapes (see
tests/test_triton.py for how the interpreter is set up)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tokens_common import (  # noqa: E402
    TOKEN_OPS,
    call,
    cu_seqlens_of,
    gem_double_backward,
    make_tokens,
    token_args,
    token_op_samples,
    weight_for,
)

import gapkernels  # noqa: E402
from gapkernels import reference  # noqa: E402
from helpers import assert_bitwise_equal, assert_close  # noqa: E402

gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")
from gapkernels.triton import tokens as ttokens  # noqa: E402

DEVICE = "cpu" if gk_triton.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytestmark = [
        pytest.mark.skip(
            reason="gapkernels.triton was imported without TRITON_INTERPRET=1 and there is no GPU"
        )
    ]
pytestmark = [
    *globals().get("pytestmark", []),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def _forward_backward(op, module, x, weight, **kw):
    x = x.detach().requires_grad_()
    w = None if weight is None else weight.detach().requires_grad_()
    out = call(op, module, x, w, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    inputs = [x] + ([w] if w is not None else [])
    return out, torch.autograd.grad(out, inputs, grad_out)


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
    out, grads = _forward_backward(op, gapkernels, x, weight, input_fmt=fmt, backend="triton", **kw)
    ref, ref_grads = _forward_backward(op, reference, x, weight, input_fmt=fmt, **kw)
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
    out, grads = _forward_backward(op, gapkernels, x, None, input_fmt=fmt, backend="triton", **kw)
    ref, ref_grads = _forward_backward(op, reference, x, None, input_fmt=fmt, **kw)
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
    cu = cu_seqlens_of([3, 0, 9, 1, 6], DEVICE)
    x = torch.randn(19, 6, generator=gen).to(DEVICE)
    if pool_type == "gem":
        x = x.abs() + 0.1
    weight = weight_for(pool_type, 6, DEVICE)
    kw = {"alpha": weight} if pool_type == "mixed" else {"p": weight} if pool_type == "gem" else {}
    for start in (0, 2):
        results = []
        for module, extra in ((gapkernels, dict(backend="triton")), (reference, {})):
            packed = x.clone().requires_grad_()
            out = module.varlen_pool(packed, cu, pool_type, start=start, **kw, **extra)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
            results.append((out, torch.autograd.grad(out, packed, grad_out)[0]))
        (out, grad), (ref, ref_grad) = results
        assert_close(out, ref, torch.float32)
        assert_close(grad, ref_grad, torch.float32, scale=4)
        if pool_type in ("max", "catavgmax"):
            got = gapkernels.varlen_pool(
                x, cu, pool_type, start=start, return_indices=True, backend="triton"
            )
            want = reference.varlen_pool(x, cu, pool_type, start=start, return_indices=True)
            assert torch.equal(got[1], want[1])


def test_triton_double_backward_matches_reference():
    """create_graph=True: the gradients are the composite's, differentiable again."""
    got = gem_double_backward(gapkernels, "triton", DEVICE)
    for g, want in zip(got, gem_double_backward(gapkernels, "reference", DEVICE), strict=True):
        assert_close(g, want, torch.float32, scale=10)


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
    samples = token_op_samples(gen, DEVICE)
    x, spans = samples[0][:2]
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for args in samples:
        torch.library.opcheck(ttokens.token_pool_forward, args, test_utils=checks)
        out, aux, indices = ttokens.token_pool_forward(*args)
        backward_args = (torch.randn_like(out), *args[:4], aux, indices, *args[4:8])
        torch.library.opcheck(ttokens.token_pool_backward, backward_args, test_utils=checks[:2])
    with pytest.raises(RuntimeError, match="spans must have N=3 rows"):
        ttokens.token_pool_forward(x, spans[:2], None, False, 0, None, 0.5, 0.0, False)


def test_torch_compile_fullgraph_triton(gen):
    x = torch.randn(3, 9, 4, generator=gen).to(DEVICE).requires_grad_()
    lengths = torch.tensor([9, 2, 0], device=DEVICE)
    packed = torch.randn(11, 4, generator=gen).to(DEVICE).requires_grad_()
    cu = cu_seqlens_of([4, 7], DEVICE)
    alpha = torch.tensor(0.3, device=DEVICE, requires_grad=True)

    def head(x, packed):
        return gapkernels.global_mixed_pool(
            x, alpha, input_fmt="NLC", lengths=lengths, start=1, backend="triton"
        ) + gapkernels.varlen_pool(packed, cu, "max", backend="triton").sum(0)

    compiled = torch.compile(head, fullgraph=True, backend="eager")
    out = compiled(x, packed)
    torch.testing.assert_close(out, head(x, packed))
    out.sum().backward()
    assert x.grad is not None and packed.grad is not None and alpha.grad is not None
