"""What only the CUDA kernels need: inputs over 2**31 elements, the split reductions and their
max semantics, every grad_x element written, bitwise determinism, agreement with the CPU
kernels, and torch.use_deterministic_algorithms. Stable GeM: test_cuda_gem.py; unaligned
pointers and any storage offset: test_cuda_alignment.py."""

from __future__ import annotations

import pytest
import torch
from cuda_common import CUDA_MARK, LAYOUTS

import gapkernels
from gapkernels import _ext
from helpers import (
    DTYPES,
    OP_CASES,
    TOLERANCES,
    assert_bitwise_equal,
    assert_close,
    make_input,
    make_weight,
    run_op,
)

pytestmark = CUDA_MARK

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
    for name, a, b in zip(("out", "grad_x"), cuda[:2], cpu[:2], strict=True):
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
