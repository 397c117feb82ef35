"""What only the CUDA kernels need: inputs over 2**31 elements, the split reductions and their
max semantics, unaligned pointers, every grad_x element written, bitwise determinism, agreement
with the CPU kernels, and torch.use_deterministic_algorithms."""

from __future__ import annotations

import pytest
import torch

import gapkernels
from gapkernels import _ext
from helpers import (
    OP_CASES,
    TOLERANCES,
    assert_bitwise_equal,
    assert_close,
    make_input,
    make_weight,
    run_op,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = list(TOLERANCES)
# (N, C, H, W): the batch-1 head (one launch), NCS rows split over blocks with a combine pass,
# NSC with an odd C (scalar channel loads) and S split over blocks, sub-warp rows (S = 13*17),
# rows shorter than a vector (S = 6: one lane per row, head and tail only).
SHAPES = {
    "head_b1": (1, 2048, 7, 7),
    "tiny_rows": (5, 33, 2, 3),
    "ncs_split": (2, 3, 70, 70),
    "nsc_odd_c_split": (2, 5, 96, 97),
    "subwarp_rows": (3, 40, 13, 17),
}
LAYOUTS = ["contiguous", "channels_last"]


def _forward_backward(op, x, weight, backend):
    """(out, grad_x, grad_weight) of `op`, with a fixed grad_out."""
    x = x.detach().clone().requires_grad_(True)
    w = None if weight is None else weight.detach().clone().requires_grad_(True)
    out = run_op(op, x, w, backend)
    grad_out = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64)
    grad_out = grad_out.to(device=out.device, dtype=out.dtype).view_as(out)
    out.backward(grad_out)
    return out.detach(), x.grad, None if w is None else w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("op,weight_kind", OP_CASES)
def test_bitwise_deterministic(op, weight_kind, shape, layout, dtype, gen):
    x, _ = make_input(shape, dtype, layout, "cuda", gen, positive=op == "gem")
    weight = make_weight(op, weight_kind, shape[1], "cuda", gen=gen)
    first = _forward_backward(op, x, weight, "cuda")
    for _ in range(2):
        again = _forward_backward(op, x, weight, "cuda")
        for a, b in zip(first, again, strict=True):
            if a is not None:
                assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("op,weight_kind", OP_CASES)
def test_matches_cpu_backend(op, weight_kind, shape, layout, dtype, gen):
    if _ext.unavailable_reason("CPU") is not None:
        pytest.skip(_ext.unavailable_reason("CPU"))
    x, _ = make_input(shape, dtype, layout, "cpu", gen, positive=op == "gem")
    weight = make_weight(op, weight_kind, shape[1], "cpu", gen=gen)
    cpu = _forward_backward(op, x, weight, "cpu")
    cuda = _forward_backward(op, x.cuda(), None if weight is None else weight.cuda(), "cuda")
    S = shape[2] * shape[3]
    for name, a, b in zip(("out", "grad_x"), cuda, cpu, strict=True):
        # Two float32 (float64) summation orders, each one rounding from the exact sum.
        assert_close(a.cpu(), b, dtype, msg=f"{op} {name} S={S}")
    if weight is not None:
        # A float32 reduction over (N, C) of differences of the two backends' aux.
        loose = max(TOLERANCES[dtype][0], 1e-4), max(TOLERANCES[dtype][1], 1e-5)
        torch.testing.assert_close(cuda[2].cpu(), cpu[2], rtol=loose[0], atol=loose[1])
    if op == "max":
        xc = x.cuda()
        _, idx_cuda = gapkernels.global_max_pool(xc, return_indices=True, backend="cuda")
        _, idx_cpu = gapkernels.global_max_pool(x, return_indices=True, backend="cpu")
        assert torch.equal(idx_cuda.cpu(), idx_cpu)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,weight_kind", OP_CASES)
def test_deterministic_algorithms_mode(op, weight_kind, layout, gen):
    x, _ = make_input((4, 96, 45, 50), torch.float32, layout, "cuda", gen, positive=op == "gem")
    weight = make_weight(op, weight_kind, 96, "cuda", gen=gen)
    free_run = _forward_backward(op, x, weight, "cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict_run = _forward_backward(op, x, weight, "cuda")
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
    for a, b in zip(free_run, strict_run, strict=True):
        if a is not None:
            assert_bitwise_equal(a, b)


def _reference_max(x3: torch.Tensor):
    """torch's adaptive max pooling semantics on the (N, C, S) view, on the CPU."""
    values, indices = torch.nn.functional.adaptive_max_pool1d(
        x3.detach().cpu().double().contiguous(), 1, return_indices=True
    )
    return values[..., 0], indices[..., 0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("S", [49, 4096 * 4 + 3])
def test_max_semantics_across_pieces(layout, S, gen):
    """Ties, NaNs and -inf placed so that a split reduction sees them in different pieces."""
    N, C = 2, 6
    x3 = torch.randn(N, C, S, generator=gen, dtype=torch.float64).float()
    x3[0, 0, [5, S // 2, S - 1]] = 100.0  # tie: first index wins
    x3[0, 1, [3, S // 3, S - 2]] = float("nan")  # several NaNs: the last one wins
    x3[0, 1, S - 1] = 1000.0
    x3[0, 2] = float("-inf")  # all -inf: index 0
    x3[0, 3, S - 1] = float("nan")  # one NaN at the end
    x3[1, 4, 0] = float("nan")  # one NaN at the start, numbers after it
    x3[1, 5, :] = 7.0  # constant row: index 0
    expected_values, expected_indices = _reference_max(x3)
    x = x3.view(N, C, S, 1).cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    values, indices = gapkernels.global_max_pool(x, return_indices=True, backend="cuda")
    torch.testing.assert_close(
        values.cpu().double(), expected_values, equal_nan=True, rtol=0, atol=0
    )
    assert torch.equal(indices.cpu(), expected_indices)


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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,weight_kind", OP_CASES)
def test_every_grad_element_written(op, weight_kind, layout, gen):
    """grad_x comes from torch.empty: poison the allocator's cached block with NaN first."""
    shape = (2, 9, 37, 41)
    x, _ = make_input(shape, torch.float32, layout, "cuda", gen, positive=op == "gem")
    weight = make_weight(op, weight_kind, shape[1], "cuda", gen=gen)
    xr = x.detach().clone().requires_grad_(True)
    out = run_op(op, xr, weight, "cuda")
    grad_out = torch.rand(out.shape, generator=gen).to("cuda")
    poison = torch.full((x.numel() * 4,), float("nan"), device="cuda")
    del poison
    out.backward(grad_out)
    assert not torch.isnan(xr.grad).any()
    xref = x.detach().double().requires_grad_(True)
    wref = None if weight is None else weight.detach().double()
    run_op(op, xref, wref, "reference").backward(grad_out.double())
    assert_close(xr.grad.double(), xref.grad, torch.float32, msg=op)


@pytest.mark.parametrize(
    "op,weight_kind", [("avg", "none"), ("max", "none"), ("avgmax", "none"), ("gem", "none")]
)
def test_few_long_rows_split(op, weight_kind, gen):
    """(1, 1, 4096, 4096): one row split over thousands of blocks and combined."""
    x, _ = make_input(
        (1, 1, 4096, 4096), torch.float32, "contiguous", "cuda", gen, positive=op == "gem"
    )
    out, grad_x, _ = _forward_backward(op, x, None, "cuda")
    out_ref, grad_ref, _ = _forward_backward(op, x.double(), None, "reference")
    assert_close(out.double(), out_ref, torch.float32, scale=10.0, msg=op)
    assert_close(grad_x.double(), grad_ref, torch.float32, msg=op)


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("op", ["avg", "max"])
def test_more_than_2_31_elements(op):
    """(1, 2, 2**15, 2**15 + 1) float16: 64-bit offsets and a split over > 2**30 elements."""
    shape = (1, 2, 2**15, 2**15 + 1)
    numel = 2 * 2**15 * (2**15 + 1)
    assert numel > 2**31
    if _free_bytes() < 3 * numel * 2 + (4 << 30):
        pytest.skip("needs about 17 GB of free GPU memory")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    x = torch.randn(shape, dtype=torch.float16, device="cuda", generator=gen)
    rows = x.view(2, -1)
    chunk = 1 << 26
    if op == "avg":
        total = torch.zeros(2, dtype=torch.float64, device="cuda")
        for start in range(0, rows.shape[1], chunk):
            total += rows[:, start : start + chunk].double().sum(dim=1)
        expected = (total / rows.shape[1]).view(1, 2)
        out = gapkernels.global_avg_pool(x, backend="cuda")
        torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=1e-4)
    else:
        best = torch.full((2,), float("-inf"), dtype=torch.float32, device="cuda")
        best_index = torch.zeros(2, dtype=torch.int64, device="cuda")
        for start in range(0, rows.shape[1], chunk):
            values, indices = rows[:, start : start + chunk].float().max(dim=1)
            # the first chunk that reaches the max keeps its (first) index
            better = values > best
            best = torch.where(better, values, best)
            best_index = torch.where(better, indices + start, best_index)
        out, index = gapkernels.global_max_pool(x, return_indices=True, backend="cuda")
        assert torch.equal(out.float().view(2), best)
        assert torch.equal(index.view(2), best_index)

    x.requires_grad_(True)
    pooled = (gapkernels.global_avg_pool if op == "avg" else gapkernels.global_max_pool)(
        x, backend="cuda"
    )
    # avg: a large gradient so that g / S is no float16 zero; the kernel divides in float32.
    grad_value = 60000.0 if op == "avg" else 1.0
    pooled.backward(torch.full_like(pooled, grad_value))
    grad_rows = x.grad.view(2, -1)
    if op == "avg":
        value = (torch.tensor(grad_value) / torch.tensor(float(rows.shape[1]))).half().cuda()
        assert value != 0
        for start in range(0, rows.shape[1], chunk):
            assert bool((grad_rows[:, start : start + chunk] == value).all())
    else:
        nonzero = sum(
            int(torch.count_nonzero(grad_rows[:, start : start + chunk]))
            for start in range(0, rows.shape[1], chunk)
        )
        assert nonzero == 2
        assert bool((grad_rows[torch.arange(2, device="cuda"), best_index] == 1).all())


# ---------------------------------------------------------------------------------------------
# Stable GeM: statistics relative to the row maximum (docs/DESIGN.md "Modes").


def _skip_without_cuda_kernels():
    if _ext.unavailable_reason("CUDA") is not None:
        pytest.skip(_ext.unavailable_reason("CUDA"))


def _gem_channels(shape, dtype, gen):
    """(N, 8, *spatial) float64 values, channel by channel: dead (all 0: y = eps everywhere),
    constant 3, large (about the dtype's largest / 4, so that y**p overflows for any p > 4), and
    random with values below eps (zero gradient there), each once with p = 7.5 and once with
    p = 90; the max of the large and random channels sits late in the row (a split reduction's
    pieces meet a new maximum)."""
    N, C = shape[0], 8
    S = int(torch.tensor(shape[2:]).prod())
    big = {torch.float16: 1.5e4, torch.bfloat16: 1e37, torch.float32: 1e37, torch.float64: 1e300}[
        dtype
    ]
    x = torch.empty(N, C, S, dtype=torch.float64)
    x[:, 0:2] = 0.0
    x[:, 2:4] = 3.0
    ramp = torch.linspace(0.5, 1.0, S, dtype=torch.float64)
    x[:, 4:6] = big * ramp * (0.9 + 0.1 * torch.rand(N, 2, S, generator=gen, dtype=torch.float64))
    x[:, 6:8] = torch.randn(N, 2, S, generator=gen, dtype=torch.float64) + 2.0 * ramp
    p = torch.tensor([7.5, 90.0] * 4, dtype=torch.float32)
    return x.view(N, C, *shape[2:]).to(dtype), p


def _gem_fwd_bwd(x, p, backend, grad_out=None):
    x = x.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    out = (
        gapkernels.reference.global_gem_pool(x, p, 1e-6)
        if backend == "reference"
        else gapkernels.global_gem_pool(x, p, 1e-6, backend=backend)
    )
    if grad_out is None:
        grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64)
        grad_out = grad_out.to(device=out.device, dtype=out.dtype).view_as(out)
    out.backward(grad_out)
    return out.detach(), x.grad, p.grad, grad_out


def _close_normwise(actual, expected, rtol, what):
    """Elementwise within rtol of the larger of |expected| and rtol-scaled max |expected| (so
    that tiny entries of a wide-ranging tensor are compared at the tensor's scale)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite: {actual}"
    assert torch.isfinite(expected).all(), f"{what}: reference not finite"
    scale = expected.abs().amax(dim=0, keepdim=True).clamp(min=1e-300)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + 1e-3 * scale)
    assert bool((err <= bound).all()), (
        f"{what}: max rel err {(err / (expected.abs() + 1e-3 * scale)).max().item():.3g} > {rtol}"
    )


# (rtol value, rtol grads): grads carry (y/M)**(p-1) with p up to 90, i.e. about 90 roundings of
# y/M, and grad_p a difference of two terms of similar size.
GEM_RTOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-3),
    torch.float16: (2e-3, 3e-2),
    torch.bfloat16: (1.6e-2, 1.5e-1),
}
# (2, 8, 5, 7): one group per row, no split; (1, 8, 160, 160): NCS rows and NSC columns split
# over blocks and combined (S = 25600).
GEM_SHAPES = {"small": (2, 8, 5, 7), "split": (1, 8, 160, 160)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(GEM_SHAPES.values()), ids=list(GEM_SHAPES))
def test_gem_stable_large_p_dead_and_large_channels(shape, layout, dtype, gen):
    """Value, grad_x and grad_p finite and equal to the reference (float64) for dead channels,
    x = 3 with p = 90 and near-overflow inputs, at p = 7.5 and p = 90 (learnable, per channel)."""
    _skip_without_cuda_kernels()
    x, p = _gem_channels(shape, dtype, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, grad_x, grad_p, grad_out = _gem_fwd_bwd(x.cuda(), p.cuda(), "cuda")
    ref_out, ref_gx, ref_gp, _ = _gem_fwd_bwd(
        x.double(), p.double(), "reference", grad_out.double().cpu()
    )
    rtol_value, rtol_grad = GEM_RTOL[dtype]
    # Dead channels: eps = 1e-6 is subnormal in float16 (an ulp is 6e-8): absolute there.
    torch.testing.assert_close(
        out[:, 0:2].double().cpu(), ref_out[:, 0:2], rtol=rtol_value, atol=1e-7
    )
    _close_normwise(out[:, 2:], ref_out[:, 2:], rtol_value, "out")
    _close_normwise(
        grad_x.reshape(shape[0], 8, -1).transpose(0, 1).reshape(8, -1).T,
        ref_gx.reshape(shape[0], 8, -1).transpose(0, 1).reshape(8, -1).T,
        rtol_grad,
        "grad_x",
    )
    _close_normwise(grad_p.view(1, -1), ref_gp.view(1, -1), rtol_grad, "grad_p")
    # The exact cases: a dead channel gives eps and a constant one itself, with grad_p = 0.
    if dtype in (torch.float32, torch.float64):  # (eps rounded once to the dtype)
        eps = torch.tensor(1e-6, dtype=dtype).double()
        assert torch.equal(out[:, 0:2].double().cpu(), eps.expand(shape[0], 2))
    assert torch.equal(
        out[:, 2:4].double().cpu(), torch.full((shape[0], 2), 3.0, dtype=torch.float64)
    )
    assert bool((grad_x[:, 0:2] == 0).all())
    assert torch.equal(grad_p[0:4].cpu(), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p_value", [1.0, 2.0, 3.0, 8.0, 8.5, 100.0])
def test_gem_integral_fast_path_and_pow_agree(p_value, layout, dtype, gen):
    """Integral p (multiplications, 1..8) and non-integral p (pow) against the reference."""
    _skip_without_cuda_kernels()
    shape = (3, 6, 11, 13)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).abs().to(dtype) + 0.05
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.full((6,), p_value, dtype=torch.float32)
    out, grad_x, grad_p, grad_out = _gem_fwd_bwd(x.cuda(), p.cuda(), "cuda")
    ref_out, ref_gx, ref_gp, _ = _gem_fwd_bwd(
        x.double(), p.double(), "reference", grad_out.double().cpu()
    )
    rtol_value, rtol_grad = GEM_RTOL[dtype]
    _close_normwise(out, ref_out, rtol_value, "out")
    _close_normwise(grad_x.reshape(-1, 1), ref_gx.reshape(-1, 1), rtol_grad, "grad_x")
    _close_normwise(grad_p.view(1, -1), ref_gp.view(1, -1), rtol_grad, "grad_p")


def test_gem_nan_and_inf_rows():
    """A NaN in a row gives NaN; +inf gives +inf (M itself), per the contract."""
    _skip_without_cuda_kernels()
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.5
    x[0, 0, 1, 2] = float("nan")
    x[1, 2, 3, 4] = float("inf")
    for layout in LAYOUTS:
        xl = x.float()
        if layout == "channels_last":
            xl = xl.contiguous(memory_format=torch.channels_last)
        out = gapkernels.global_gem_pool(xl.cuda(), 90.0, backend="cuda").cpu()
        assert torch.isnan(out[0, 0])
        assert out[1, 2] == float("inf")
        mask = torch.ones_like(out, dtype=torch.bool)
        mask[0, 0] = mask[1, 2] = False
        assert torch.isfinite(out[mask]).all()


# ---------------------------------------------------------------------------------------------
# Determinism independent of the address: the same values at element offsets 0..3 of a larger
# buffer give the same bits (docs/DESIGN.md "Determinism").

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
    _skip_without_cuda_kernels()
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
