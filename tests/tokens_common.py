"""Inputs, an independent oracle and the checks that every backend's token pooling tests share
(tests/test_tokens*.py).

The oracle pools each row's positions that take part one row at a time, with the unmasked
reference (whose max follows adaptive_max_pool exactly), so it shares no code with
gapkernels.reference_tokens or the kernels. The checks (`check_*`) run one backend ("cpu",
"cuda", "triton") against the reference; `check_*_op` call the C++ ops (CPU and CUDA kernels)
directly."""

from __future__ import annotations

import pytest
import torch

import gapkernels
from gapkernels import reference
from helpers import OPS, assert_bitwise_equal, assert_close

# layout name -> (input_fmt, how the logical (N, C, *spatial) tensor is laid out)
TOKEN_LAYOUTS = ["nlc", "ncl", "nchw_channels_last", "nhwc"]
TOKEN_CASES = ["mask", "lengths", "start", "mask_start", "lengths_start"]
TOKEN_OPS = ["avg", "max", "mixed", "avgmax", "catavgmax", "gem"]


def make_tokens(layout, n, c, s, dtype, gen, device="cpu", positive=False):
    """(x, input_fmt, x3, spatial): x in `layout` and its logical (N, C, S) values `x3`."""
    spatial = (2, s // 2) if layout in ("nchw_channels_last", "nhwc") else (s,)
    x = torch.randn((n, c, *spatial), dtype=torch.float64, generator=gen)
    if positive:
        x = x.abs() + 0.1
    x = x.to(device=device, dtype=dtype)
    x3 = x.flatten(2)
    if layout == "nlc":
        return x.movedim(1, -1).contiguous(), "NLC", x3, spatial
    if layout == "ncl":
        return x, "NCHW", x3, spatial
    if layout == "nchw_channels_last":
        return x.contiguous(memory_format=torch.channels_last), "NCHW", x3, spatial
    return x.movedim(1, -1).contiguous(), "NHWC", x3, spatial


def token_args(case, n, spatial, gen, device="cpu"):
    """The keyword arguments of a case: a random mask (row 0 all False, row 1 all True),
    lengths (0, S and random), start; with the (N, S) bool of positions that take part."""
    s = 1
    for d in spatial:
        s *= d
    kw: dict = {}
    valid = torch.ones((n, s), dtype=torch.bool)
    if case.startswith("mask"):
        mask = torch.rand((n, *spatial), generator=gen) > 0.5
        mask[0] = False
        if n > 1:
            mask[1] = True
        kw["mask"] = mask.to(device)
        valid &= mask.reshape(n, s)
    if case.startswith("lengths"):
        lengths = torch.randint(0, s + 1, (n,), generator=gen)
        lengths[0] = 0
        if n > 1:
            lengths[1] = s
        kw["lengths"] = lengths.to(device)
        valid &= torch.arange(s) < lengths.view(-1, 1)
    if case.endswith("start"):
        kw["start"] = 2
        valid[:, :2] = False
    return kw, valid.to(device)


def call(op, module, x, weight, **kw):
    """OPS[op] on gapkernels or gapkernels.reference (with its token keyword arguments)."""
    return OPS[op](module, x, weight, **kw)


def loop_oracle(op, x3, valid, weight, return_indices=False):
    """(N, C') row by row: the unmasked reference over each row's positions that take part;
    an empty row is 0 (index -1)."""
    rows, indices = [], []
    c = x3.shape[1]
    for n in range(x3.shape[0]):
        idx = valid[n].nonzero().flatten()
        if idx.numel() == 0:
            rows.append(x3.new_zeros(2 * c if op == "catavgmax" else c))
            indices.append(torch.full((c,), -1, dtype=torch.int64))
            continue
        sub = x3[n : n + 1, :, idx]
        rows.append(call(op, reference, sub, weight)[0])
        _, at = reference.global_max_pool(sub, True)
        indices.append(idx.to(at.device)[at[0]])
    out = torch.stack(rows)
    return (out, torch.stack(indices)) if return_indices else out


def varlen_oracle(op, x, cu, weight, start=0, return_indices=False):
    """(B, C') sequence by sequence with the unmasked reference."""
    rows, indices = [], []
    c = x.shape[1]
    for b in range(cu.shape[0] - 1):
        seq = x[int(cu[b]) + start : int(cu[b + 1])]
        if seq.shape[0] == 0:
            rows.append(x.new_zeros(2 * c if op == "catavgmax" else c))
            indices.append(torch.full((c,), -1, dtype=torch.int64))
            continue
        sub = seq.t().unsqueeze(0)
        rows.append(call(op, reference, sub, weight)[0])
        indices.append(reference.global_max_pool(sub, True)[1][0] + start)
    out = torch.stack(rows)
    return (out, torch.stack(indices)) if return_indices else out


def weight_for(op, c, device="cpu", requires_grad=False, dtype=torch.float32):
    """mixed: a per-channel alpha; gem: a scalar p tensor; else None."""
    if op == "mixed":
        w = torch.linspace(0.2, 0.8, c, dtype=dtype)
    elif op == "gem":
        w = torch.tensor(2.5, dtype=dtype)
    else:
        return None
    return w.to(device).requires_grad_(requires_grad)


def cu_seqlens_of(lengths, device="cpu", dtype=torch.int32):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device=device, dtype=dtype)


def gem_double_backward(module, backend, device="cpu"):
    """create_graph=True through a token GeM pool on `backend`: the second-order gradients to
    (x, p), to compare with backend="reference" (the composite)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, generator=gen).abs().add(0.1).to(device).requires_grad_()
    p = torch.tensor(2.5, device=device, requires_grad=True)
    lengths = torch.tensor([7, 3, 0], device=device)
    out = module.global_gem_pool(x, p, input_fmt="NLC", lengths=lengths, backend=backend)
    gx, gp = torch.autograd.grad(out.square().sum(), (x, p), create_graph=True)
    return torch.autograd.grad(gx.sum() + gp, (x, p))


def token_op_samples(gen, device="cpu"):
    """Arguments of token_pool_forward for opcheck: MIXED with a (C,) alpha, GEM with the log
    statistic, CAT with a mask (NCS), MAX on a packed varlen batch."""
    x = torch.randn(3, 10, 4, generator=gen).to(device).transpose(1, 2)  # NSC (3, 4, 10)
    spans = torch.tensor([[1, 10, 9, 0], [1, 4, 3, 0], [1, 1, 0, 0]], device=device)
    mask = (torch.rand(3, 10, generator=gen) > 0.4).to(device)
    counted = spans.clone()
    counted[:, 2] = (mask & (torch.arange(10, device=device) >= 1)).sum(1)
    counted[:, 1] = 10
    packed = torch.randn(1, 4, 12, device=device)  # stands for a (12, 4) packed batch
    packed = packed.transpose(1, 2).contiguous().transpose(1, 2)
    varlen_spans = torch.tensor([[0, 5, 5, 0], [6, 12, 6, 5]], device=device)
    return [
        (x, spans, None, False, 2, torch.full((4,), 0.3, device=device), 0.5, 0.0, False),
        (x.abs(), spans, None, False, 4, torch.tensor([3.0], device=device), 3.0, 1e-6, True),
        (x.contiguous(), counted, mask, False, 3, None, 0.5, 0.0, False),
        (packed, varlen_spans, None, True, 1, None, 0.5, 0.0, False),
    ]


def forward_backward(op, module, x, weight, **kw):
    """(out, (grad_x[, grad_weight])) of `op` on gapkernels or gapkernels.reference, with a fixed
    random output gradient."""
    x = x.detach().requires_grad_()
    w = None if weight is None else weight.detach().requires_grad_()
    out = call(op, module, x, w, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    inputs = [x] + ([w] if w is not None else [])
    return out, torch.autograd.grad(out, inputs, grad_out)


def check_varlen(pool_type, x, cu, backend, device="cpu"):
    """varlen_pool on `backend` against the reference, start 0 and 2: values, gradients to the
    packed batch, and the max indices."""
    if pool_type == "gem":
        x = x.abs() + 0.1
    weight = weight_for(pool_type, x.shape[1], device)
    kw = {"alpha": weight} if pool_type == "mixed" else {"p": weight} if pool_type == "gem" else {}
    for start in (0, 2):
        results = []
        for module, extra in ((gapkernels, dict(backend=backend)), (reference, {})):
            packed = x.clone().requires_grad_()
            out = module.varlen_pool(packed, cu, pool_type, start=start, **kw, **extra)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
            results.append((out, torch.autograd.grad(out, packed, grad_out)[0]))
        (out, grad), (ref, ref_grad) = results
        assert_close(out, ref, torch.float32)
        assert_close(grad, ref_grad, torch.float32, scale=4)
        if pool_type in ("max", "catavgmax"):
            got = gapkernels.varlen_pool(
                x, cu, pool_type, start=start, return_indices=True, backend=backend
            )
            want = reference.varlen_pool(x, cu, pool_type, start=start, return_indices=True)
            assert torch.equal(got[1], want[1])


def check_gem_double_backward(backend, device="cpu"):
    """create_graph=True on `backend`: the second-order gradients are the composite's."""
    got = gem_double_backward(gapkernels, backend, device)
    for g, want in zip(got, gem_double_backward(gapkernels, "reference", device), strict=True):
        assert_close(g, want, torch.float32, scale=10)


def check_token_opcheck(forward, backward, samples, forward_utils=None):
    """torch.library.opcheck of a backend's token op pair on `samples` (token_op_samples; the
    forward with `forward_utils`, or opcheck's default tests), and the spans check."""
    forward_kw = {} if forward_utils is None else dict(test_utils=forward_utils)
    for args in samples:
        torch.library.opcheck(forward, args, **forward_kw)
        out, aux, indices = forward(*args)
        backward_args = (torch.randn_like(out), *args[:4], aux, indices, *args[4:8])
        torch.library.opcheck(
            backward, backward_args, test_utils=("test_schema", "test_faketensor")
        )
    x, spans = samples[0][:2]
    with pytest.raises(RuntimeError, match="spans must have N=3 rows"):
        forward(x, spans[:2], None, False, 0, None, 0.5, 0.0, False)


def check_compile_fullgraph(backend, compile_backend, gen, device="cpu"):
    """torch.compile(fullgraph=True) of a head with lengths, start and varlen on `backend`: the
    same values as eager, and gradients to x, the packed batch and alpha."""
    x = torch.randn(3, 9, 4, generator=gen).to(device).requires_grad_()
    lengths = torch.tensor([9, 2, 0], device=device)
    packed = torch.randn(11, 4, generator=gen).to(device).requires_grad_()
    cu = cu_seqlens_of([4, 7], device)
    alpha = torch.tensor(0.3, device=device, requires_grad=True)

    def head(x, packed):
        return gapkernels.global_mixed_pool(
            x, alpha, input_fmt="NLC", lengths=lengths, start=1, backend=backend
        ) + gapkernels.varlen_pool(packed, cu, "max", backend=backend).sum(0)

    compiled = torch.compile(head, fullgraph=True, backend=compile_backend)
    out = compiled(x, packed)
    torch.testing.assert_close(out, head(x, packed))
    out.sum().backward()
    assert x.grad is not None and packed.grad is not None and alpha.grad is not None


def check_empty_rows_op(device="cpu"):
    """The C++ token ops on an empty row: out 0, index -1, MIXED aux 0, GEM aux (0, 1, 0), zero
    gradient, NCS and NSC; a varlen call with no row gives a zero grad_x."""
    ops = torch.ops.gapkernels
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 20, 5, generator=gen).abs().to(device)  # NSC view (3, 5, 20)
    spans = torch.tensor([[2, 2, 0, 0], [0, 20, 20, 0], [5, 9, 4, 0]], device=device)
    for x_ in (x.transpose(1, 2).contiguous(), x.transpose(1, 2)):  # NCS, NSC
        for mode, w, with_log in (
            (2, torch.full((5,), 0.3, device=device), False),
            (4, torch.tensor([3.0], device=device), True),
        ):
            out, aux, idx = ops.token_pool_forward(
                x_, spans, None, False, mode, w, 0.5, 1e-6, with_log
            )
            assert (out[0] == 0).all()
            if mode == 2:
                assert (idx[0] == -1).all() and (aux[0] == 0).all()
            else:
                assert aux[0].tolist() == [[0.0, 1.0, 0.0]] * 5
            g = ops.token_pool_backward(
                torch.ones_like(out), x_, spans, None, False, aux, idx, mode, w, 0.5, 1e-6
            )
            assert g.stride() == x_.stride()
            assert (g[0] == 0).all() and (g[2][:, :5] == 0).all() and (g[2][:, 9:] == 0).all()
            assert (g[2][:, 5:9] != 0).all()
    packed = torch.randn(1, 12, 4, device=device).transpose(1, 2)  # (12, 4) as (1, 4, 12)
    none = torch.zeros(0, 4, dtype=torch.int64, device=device)
    g = ops.token_pool_backward(
        torch.ones(0, 4, device=device), packed, none, None, True, packed, packed, 0, None, 0.5, 0.0
    )
    assert (g == 0).all()


def check_spans_clamped_op(device="cpu"):
    """Span values are not trusted (inside torch.compile they are not checked): clamped, NCS and
    NSC."""
    x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(12)).to(device)
    spans = torch.tensor([[-5, 100, 10, 0], [12, 3, 0, 0]], device=device)
    for x_ in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        out, _, idx = torch.ops.gapkernels.token_pool_forward(
            x_, spans, None, False, 1, None, 0.5, 0.0, False
        )
        torch.testing.assert_close(out[0], x[0].amax(1))
        assert (out[1] == 0).all() and (idx[1] == -1).all()


def check_gradcheck(op, layout, case, backend, gen, device="cpu"):
    """torch.autograd.gradcheck in float64 of `op` on `backend` (x and the weight)."""
    x, fmt, _, spatial = make_tokens(layout, 3, 5, 6, torch.float64, gen, device, op == "gem")
    kw, _ = token_args(case, 3, spatial, gen, device)
    weight = weight_for(op, 5, device, requires_grad=True, dtype=torch.float64)
    inputs = (x.detach().requires_grad_(),) + ((weight,) if weight is not None else ())

    def f(*args):
        w = args[1] if len(args) > 1 else None
        return call(op, gapkernels, args[0], w, input_fmt=fmt, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, inputs)


def check_against(op, x, fmt, kw, dtype, backend, against="reference"):
    """`op` on `backend` against the reference, or (against="cpu") against the CPU kernels on
    CPU copies: values, gradients to x and the weight (x's strides kept), the max indices
    exactly and the max bitwise."""
    weight = weight_for(op, x.shape[1] if fmt == "NCHW" else x.shape[-1], x.device)
    out, grads = forward_backward(op, gapkernels, x, weight, input_fmt=fmt, backend=backend, **kw)
    if against == "reference":
        ref, ref_grads = forward_backward(op, reference, x, weight, input_fmt=fmt, **kw)
    else:
        cpu_kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        w_cpu = None if weight is None else weight.cpu()
        ref, ref_grads = forward_backward(
            op, gapkernels, x.cpu(), w_cpu, input_fmt=fmt, backend="cpu", **cpu_kw
        )
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert grads[0].stride() == x.stride()
    assert_close(out.cpu(), ref.cpu(), dtype)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g.cpu(), r.cpu(), dtype, scale=4)
    if op in ("max", "avgmax", "catavgmax"):
        got = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend=backend, **kw)
        want = reference.global_max_pool(x, True, input_fmt=fmt, **kw)
        assert torch.equal(got[1], want[1])
        assert_bitwise_equal(got[0], want[0])
