"""The CUDA kernels on data at any address: views that start off a 16-byte boundary (head/tail
peeling and scalar fallbacks) against the reference, and the same bits at element offsets 0..3
of a larger buffer (docs/DESIGN.md "Determinism")."""

from __future__ import annotations

import pytest
import torch
from cuda_common import CUDA_MARK, skip_without_cuda_kernels

from helpers import DTYPES, OP_CASES, assert_close, make_input, make_weight, run_op

pytestmark = CUDA_MARK


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "nhwc"])
@pytest.mark.parametrize("op,weight_kind", OP_CASES)
def test_unaligned_storage_offsets(op, weight_kind, layout, dtype, gen):
    """Views that start off a 16-byte boundary: head/tail peeling and scalar fallbacks."""
    shape = (3, 7, 5, 11)
    big, fmt = make_input(
        (shape[0] + 1,) + shape[1:], dtype, layout, "cuda", gen, positive=op == "gem"
    )
    x = big[1:]
    assert x.data_ptr() % 16 != 0
    weight = make_weight(op, weight_kind, shape[1], "cuda", gen=gen)
    out = run_op(op, x, weight, "cuda", input_fmt=fmt)
    expected = run_op(
        op, x.double(), None if weight is None else weight.double(), "reference", input_fmt=fmt
    )
    assert_close(out.double(), expected, dtype, msg=op)
    got = _forward_backward_fmt(op, x, weight, "cuda", fmt)
    ref = _forward_backward_fmt(op, x, weight, "reference", fmt)
    assert_close(got[1].double(), ref[1].double(), dtype, msg=f"{op} grad_x")


def _forward_backward_fmt(op, x, weight, backend, fmt):
    x = x.detach().clone().requires_grad_(True)
    w = None if weight is None else weight.detach().clone().requires_grad_(True)
    out = run_op(op, x, w, backend, input_fmt=fmt)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


_OFFSET_MODES = [  # (name, mode, weight kind, scalar, with_log)
    ("avg", 0, None, 0.0, False),
    ("max", 1, None, 0.0, False),
    ("mixed", 2, "channel", 0.3, False),
    ("cat", 3, None, 0.0, False),
    ("gem", 4, None, 3.0, False),
    ("gem_log", 4, "channel", 7.5, True),
    ("gem_p90", 4, None, 90.0, True),
]


def _view_at(values3, offset, nsc):
    """The (N, C, S) values as a view starting `offset` elements into a fresh buffer."""
    N, C, S = values3.shape
    buf = torch.full(
        (N * C * S + offset,), float("nan"), dtype=values3.dtype, device=values3.device
    )
    if nsc:
        view = buf[offset:].view(N, S, C).transpose(1, 2)
    else:
        view = buf[offset:].view(N, C, S)
    view.copy_(values3)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nsc", [False, True], ids=["ncs", "nsc"])
@pytest.mark.parametrize(
    "shape",
    [(3, 7, 55), (2, 4, 1155), (2, 3, 4900), (1, 2, 3)],
    ids=["S55", "S1155", "S4900_split", "S3"],
)
@pytest.mark.parametrize(
    "name,mode,weight_kind,scalar,with_log", _OFFSET_MODES, ids=[m[0] for m in _OFFSET_MODES]
)
def test_bitwise_equal_at_any_offset(
    name, mode, weight_kind, scalar, with_log, shape, nsc, dtype, gen
):
    skip_without_cuda_kernels()
    N, C, S = shape
    values = torch.randn(N, C, S, generator=gen, dtype=torch.float64)
    if mode == 4:
        values = values.abs() + 0.1
    values = values.to(dtype).cuda()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = None
    if weight_kind == "channel":
        weight = (scalar + 0.2 * torch.rand(C, generator=gen, dtype=torch.float64)).to(acc).cuda()
    forward = torch.ops.gapkernels.pool_forward
    backward = torch.ops.gapkernels.pool_backward
    results = []
    for offset in range(4):
        x3 = _view_at(values, offset, nsc)
        if offset:
            assert x3.data_ptr() % 16 != 0 or dtype == torch.float64
        assert x3.is_contiguous() != nsc or C == 1 or S == 1
        out, aux, indices = forward(x3, mode, weight, scalar, 1e-6, with_log)
        grad_out = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64)
        grad_out = grad_out.to(device=out.device, dtype=out.dtype).view_as(out)
        grad_x = backward(grad_out, x3, aux, indices, mode, weight, scalar, 1e-6)
        results.append((out, aux, indices, grad_x.contiguous()))
    for offset in range(1, 4):
        names = ("out", "aux", "indices", "grad_x")
        for what, a, b in zip(names, results[0], results[offset], strict=True):
            assert a.shape == b.shape, what
            assert torch.equal(
                a.contiguous().view(torch.uint8) if a.is_floating_point() else a,
                b.contiguous().view(torch.uint8) if b.is_floating_point() else b,
            ), f"{name} {what} differs at offset {offset}"
