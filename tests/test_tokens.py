"""Token pooling (mask / lengths / start / input_fmt="NLC" / varlen_pool) on the CPU: the
reference against a row-by-row oracle and the plain-torch formulas of sentence-transformers and
timm, the composite that `auto` runs, gradients (gradcheck in float64, zero where nothing takes
part), torch.func, torch.compile, GlobalPool; every argument error is in test_tokens_errors.py."""

from __future__ import annotations

import pytest
import torch
from tokens_common import (
    TOKEN_CASES,
    TOKEN_LAYOUTS,
    TOKEN_OPS,
    call,
    cu_seqlens_of,
    loop_oracle,
    make_tokens,
    token_args,
    varlen_oracle,
    weight_for,
)

import gapkernels
from gapkernels import reference, tokens
from helpers import DTYPES, assert_close


@pytest.mark.parametrize("layout", TOKEN_LAYOUTS)
@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_reference_matches_row_oracle(op, case, layout, gen):
    x, fmt, x3, spatial = make_tokens(layout, 5, 3, 8, torch.float64, gen, positive=op == "gem")
    kw, valid = token_args(case, 5, spatial, gen)
    weight = weight_for(op, 3, dtype=torch.float64)
    expected = loop_oracle(op, x3, valid, weight)
    out = call(op, reference, x, weight, input_fmt=fmt, **kw)
    torch.testing.assert_close(out, expected)
    if case != "start":  # row 0 is empty in the other cases
        assert (out[0] == 0).all()
    if op == "max":
        _, indices = reference.global_max_pool(x, True, input_fmt=fmt, **kw)
        torch.testing.assert_close(indices, loop_oracle(op, x3, valid, None, True)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", TOKEN_OPS)
def test_composite_every_dtype(op, dtype, gen):
    """backend='reference' (the composite) and 'auto' (the CPU kernels where built) against the
    float64 oracle, within the dtype's tolerance of one rounding."""
    x, fmt, x3, spatial = make_tokens("nlc", 4, 6, 12, dtype, gen, positive=op == "gem")
    kw, valid = token_args("mask_start", 4, spatial, gen)
    weight = weight_for(op, 6)
    expected = loop_oracle(op, x3.double(), valid, weight)
    auto = call(op, gapkernels, x, weight, input_fmt=fmt, **kw)
    assert_close(auto.double(), expected.to(dtype).double(), dtype, scale=4)
    out = call(op, gapkernels, x, weight, input_fmt=fmt, backend="reference", **kw)
    assert out.dtype == dtype
    assert_close(out.double(), expected.to(dtype).double(), dtype, scale=4)


def _st_pool(mode, x, attention_mask):
    """sentence-transformers' Pooling._forward_padded formulas (mean, max, mean_sqrt_len)."""
    if mode == "max":
        m = attention_mask.unsqueeze(-1).expand_as(x).to(x.dtype)
        return x.masked_fill(m == 0, float("-inf")).max(dim=1).values
    m = attention_mask.unsqueeze(-1).to(x.dtype)
    total = (x * m).sum(dim=1, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    count = torch.clamp(m.sum(dim=1, dtype=total.dtype), min=1e-9)
    return (total / (count if mode == "mean" else count.sqrt())).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sentence_transformers_formulas(dtype, gen):
    n, length, c = 6, 17, 8
    x = torch.randn(n, length, c, generator=gen).to(dtype)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[0] = length
    attention = (torch.arange(length) < lengths.view(-1, 1)).long()  # int64, as tokenizers give
    for kw in (dict(mask=attention), dict(lengths=lengths)):
        mean = gapkernels.global_avg_pool(x, input_fmt="NLC", **kw)
        assert_close(mean.float(), _st_pool("mean", x, attention).float(), dtype)
        mx = gapkernels.global_max_pool(x, input_fmt="NLC", **kw)
        torch.testing.assert_close(mx, _st_pool("max", x, attention), rtol=0, atol=0)
        sqrt_len = (mean.float() * lengths.float().sqrt().view(-1, 1)).to(dtype)
        assert_close(
            sqrt_len.float(), _st_pool("mean_sqrt_len_tokens", x, attention).float(), dtype
        )


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax"])
def test_timm_global_pool_nlc(pool_type, gen):
    timm_pool1d = pytest.importorskip("timm.layers.pool1d", reason="timm is not installed")
    x = torch.randn(3, 197, 16, generator=gen)
    expected = timm_pool1d.global_pool_nlc(x, pool_type, num_prefix_tokens=1)
    if pool_type == "avg":
        out = gapkernels.global_avg_pool(x, input_fmt="NLC", start=1)
    elif pool_type == "max":
        out = gapkernels.global_max_pool(x, input_fmt="NLC", start=1)
    else:
        out = gapkernels.global_avgmax_pool(x, input_fmt="NLC", start=1)
    assert_close(out, expected, torch.float32)


def test_max_rules_ties_nans_infs_and_padding():
    """Ties go to the first position that takes part, a NaN that takes part wins (the last
    NaN's index), NaN and larger values outside never count, a row of -inf gives its first
    position that takes part."""
    nan, inf = float("nan"), float("inf")
    rows = [
        [9.0, 1.0, 5.0, 5.0, 0.0, 7.0],  # start=1, length 5: tie of 5 at 2 and 3 -> 2
        [nan, 1.0, nan, 2.0, nan, nan],  # NaN at 2 and 4 -> 4; the NaN at 5 is padding
        [inf, -inf, -inf, -inf, -inf, 8.0],  # all -inf in [1, 5) -> 1
        [0.0, 3.0, 3.0, nan, 1.0, 1.0],  # mask drops 1 and 3: -> 2
    ]
    x = torch.tensor(rows).unsqueeze(1)  # (4, 1, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1] * 6, [1, 0, 1, 0, 1, 1]])
    mask[2, 5] = 0
    for backend_args in (dict(), dict(backend="reference")):
        values, indices = gapkernels.global_max_pool(x, True, mask=mask, start=1, **backend_args)
        assert indices.flatten().tolist() == [2, 4, 1, 2]
        assert values[0].item() == 5.0 and values[1].isnan().item()
        assert values[2].item() == -inf and values[3].item() == 3.0
    lengths = torch.tensor([5, 5, 5, 6])
    _, indices = gapkernels.global_max_pool(x, True, lengths=lengths, start=1)
    assert indices.flatten().tolist() == [2, 4, 1, 3]


@pytest.mark.parametrize("op", TOKEN_OPS)
@pytest.mark.parametrize("case", ["mask_start", "lengths"])
def test_gradcheck_float64(op, case, gen):
    """Gradients to x and to alpha / p, first and second order (composite)."""
    x, fmt, _, spatial = make_tokens("nlc", 3, 2, 6, torch.float64, gen, positive=op == "gem")
    kw, valid = token_args(case, 3, spatial, gen)
    x.requires_grad_()
    weight = weight_for(op, 2, requires_grad=True, dtype=torch.float64)
    inputs = (x,) if weight is None else (x, weight)

    def fn(*args):
        return call(
            op, gapkernels, args[0], args[1] if len(args) > 1 else None, input_fmt=fmt, **kw
        )

    assert torch.autograd.gradcheck(fn, inputs)
    if op in ("avg", "mixed", "gem"):
        assert torch.autograd.gradgradcheck(fn, inputs)
    grad_x = torch.autograd.grad(fn(*inputs).sum(), x)[0]  # (N, L, C)
    assert (grad_x.movedim(-1, 1)[~valid.unsqueeze(1).expand(-1, 2, -1)] == 0).all()


def test_empty_rows_give_zero_and_zero_gradient(gen):
    x = torch.randn(3, 4, 5, generator=gen).abs().requires_grad_()
    lengths = torch.tensor([0, 5, 2])
    p = torch.tensor(3.0, requires_grad=True)
    alpha = torch.tensor(0.4, requires_grad=True)
    for out in (
        gapkernels.global_gem_pool(x, p, lengths=lengths),
        gapkernels.global_mixed_pool(x, alpha, lengths=lengths),
        gapkernels.global_avgmax_pool(x, concat=True, lengths=lengths),
    ):
        assert (out[0] == 0).all() and out.isfinite().all()
        grads = torch.autograd.grad(out.sum(), [x, p, alpha], allow_unused=True)
        assert (grads[0][0] == 0).all() and (grads[0][2, :, 2:] == 0).all()
        for g in grads[1:]:
            assert g is None or g.isfinite().all()
    _, indices = gapkernels.global_max_pool(x, True, lengths=lengths)
    assert (indices[0] == -1).all() and (indices[1:] >= 0).all()


def test_torch_func_grad_and_vmap(gen):
    x = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.3

    def loss(x):
        return gapkernels.global_mixed_pool(x, 0.3, input_fmt="NLC", mask=mask).sum()

    expected = torch.func.grad(
        lambda x: reference.global_mixed_pool(x, 0.3, input_fmt="NLC", mask=mask).sum()
    )(x)
    torch.testing.assert_close(torch.func.grad(loss)(x), expected)
    batched = torch.func.vmap(lambda x: gapkernels.global_avg_pool(x, input_fmt="NLC", mask=mask))
    stacked = torch.stack([x, 2 * x])
    torch.testing.assert_close(batched(stacked)[1], 2 * batched(stacked)[0])


def test_torch_compile_fullgraph(gen):
    x = torch.randn(4, 10, 8, generator=gen, requires_grad=True)
    mask = torch.rand(4, 10, generator=gen) > 0.3
    lengths = torch.tensor([0, 3, 10, 7])
    packed = torch.randn(12, 8, generator=gen, requires_grad=True)
    cu = cu_seqlens_of([3, 0, 9])
    p = torch.tensor(2.0, requires_grad=True)

    def head(x, packed):
        return (
            gapkernels.global_avg_pool(x, input_fmt="NLC", mask=mask, start=1)
            + gapkernels.global_max_pool(x, input_fmt="NLC", lengths=lengths)
            + gapkernels.global_gem_pool(x.abs() + 0.1, p, input_fmt="NLC", lengths=lengths)
            + gapkernels.varlen_pool(packed, cu, "avgmax").sum(0)
        )

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(x, packed)
    torch.testing.assert_close(out, head(x, packed))
    out.sum().backward()
    assert x.grad is not None and packed.grad is not None and p.grad is not None


@pytest.mark.parametrize("pool_type", TOKEN_OPS)
@pytest.mark.parametrize("start", [0, 2])
def test_varlen_against_sequence_oracle(pool_type, start, gen):
    cu = cu_seqlens_of([3, 0, 7, 1, 5], dtype=torch.int32)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    if pool_type == "gem":
        x = x.abs() + 0.1
    weight = weight_for(pool_type, 4, dtype=torch.float64)
    kw = {"alpha": weight} if pool_type == "mixed" else {"p": weight} if pool_type == "gem" else {}
    out = gapkernels.varlen_pool(x, cu, pool_type, start=start, **kw)
    torch.testing.assert_close(out, varlen_oracle(pool_type, x, cu, weight, start))
    if pool_type in ("max", "avgmax"):
        _, indices = gapkernels.varlen_pool(
            x, cu.long(), pool_type, start=start, return_indices=True
        )
        torch.testing.assert_close(indices, varlen_oracle(pool_type, x, cu, weight, start, True)[1])
    packed = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: gapkernels.varlen_pool(t, cu, pool_type, start=start, **kw), (packed,)
    )


def test_varlen_all_empty():
    x = torch.randn(0, 3)
    out, indices = gapkernels.varlen_pool(
        x, torch.zeros(3, dtype=torch.int64), "max", return_indices=True
    )
    assert out.shape == (2, 3) and (out == 0).all() and (indices == -1).all()


def test_global_pool_module_tokens(gen):
    x = torch.randn(3, 9, 4, generator=gen)
    lengths = torch.tensor([9, 4, 1])
    pool = gapkernels.nn.GlobalPool("avgmax", input_fmt="NLC", start=1)
    torch.testing.assert_close(
        pool(x, lengths=lengths),
        gapkernels.global_avgmax_pool(x, input_fmt="NLC", start=1, lengths=lengths),
    )
    assert (pool(x, lengths=lengths)[2] == 0).all()
    torch.testing.assert_close(pool(x, start=0), reference.global_avgmax_pool(x, input_fmt="NLC"))
    gem = gapkernels.nn.GlobalPool("gem", input_fmt="NHWC")
    mask = torch.rand(3, 9, generator=gen) > 0.5
    torch.testing.assert_close(
        gem(x.abs(), mask=mask), reference.global_gem_pool(x.abs(), 3.0, input_fmt="NLC", mask=mask)
    )
    assert "start=1" in repr(pool)


def test_nlc_without_token_args_is_nhwc(gen):
    x = torch.randn(2, 5, 3, generator=gen)
    torch.testing.assert_close(
        gapkernels.global_max_pool(x, input_fmt="NLC"),
        gapkernels.global_max_pool(x, input_fmt="NHWC"),
    )
    with pytest.raises(ValueError, match="input_fmt='NLC' names rank-3"):
        gapkernels.global_avg_pool(torch.randn(2, 3, 4, 5), input_fmt="NLC")


def test_backends_for_tokens(monkeypatch):
    x = torch.randn(2, 3, 5)
    lengths = torch.tensor([5, 2])
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .* CUDA tensors"):
        gapkernels.global_avg_pool(x, lengths=lengths, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        gapkernels.varlen_pool(x[0].t(), torch.tensor([0, 5]), backend="cuda")
    monkeypatch.setenv("GAPKERNELS_BACKEND", "reference")  # the environment names auto's choice
    assert tokens.resolve("auto", x, "f") == "reference"
    monkeypatch.setenv("GAPKERNELS_BACKEND", "cuda")  # as for the pooling ops: an error on the CPU
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        gapkernels.global_avg_pool(x, lengths=lengths)
    monkeypatch.setenv("GAPKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="GAPKERNELS_BACKEND='nope'"):
        gapkernels.global_avg_pool(x, lengths=lengths)
    monkeypatch.delenv("GAPKERNELS_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        gapkernels.global_avg_pool(x, lengths=lengths, backend="fast")
