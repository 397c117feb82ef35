"""Every op x layout x dtype x rank on each extension backend, against gapkernels.reference:
values, indices, gradients to x and to alpha / p, shapes, dtypes and gradient layouts."""

from __future__ import annotations

import pytest
import torch

import gapkernels
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    LAYOUTS,
    OP_CASES,
    assert_close,
    channels_of,
    make_input,
    make_weight,
    run_op,
)

SHAPES = {3: (2, 5, 13), 4: (3, 6, 5, 7), 5: (2, 3, 3, 4, 5)}
WEIGHT_GRAD_TOL = {torch.float64: (1e-9, 1e-10)}


def _detached_copy(t):
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


def check_against_reference(op, wkind, x, fmt, backend, gen, **kw):
    """Forward and backward of `op` on `backend` against the reference, on the same inputs."""
    dtype, device = x.dtype, x.device
    w = make_weight(op, wkind, channels_of(x, fmt), device, gen=gen)
    x = x.detach().requires_grad_(True)
    x_ref, w_ref = _detached_copy(x), _detached_copy(w)

    out = run_op(op, x, w, backend, input_fmt=fmt, **kw)
    ref = run_op(op, x_ref, w_ref, "reference", input_fmt=fmt, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, msg=f"{op} forward")

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    inputs, inputs_ref = [x], [x_ref]
    if w is not None:
        inputs, inputs_ref = [x, w], [x_ref, w_ref]
    grads = torch.autograd.grad(out, inputs, grad)
    grads_ref = torch.autograd.grad(ref, inputs_ref, grad)
    assert grads[0].shape == x.shape and grads[0].dtype == dtype
    assert_close(grads[0], grads_ref[0], dtype, msg=f"{op} grad x")
    if w is not None:
        rtol, atol = WEIGHT_GRAD_TOL.get(dtype, (2e-4, 2e-5))
        torch.testing.assert_close(
            grads[1], grads_ref[1], rtol=rtol, atol=atol, msg=lambda m: f"{op} grad weight\n{m}"
        )
    return out, grads[0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,wkind", OP_CASES)
def test_matches_reference(device, backend, rank, layout, dtype, op, wkind, gen):
    x, fmt = make_input(SHAPES[rank], dtype, layout, device, gen)
    _, grad_x = check_against_reference(op, wkind, x, fmt, backend, gen)
    if layout == "channels_last" and rank >= 4:
        fmt_mem = torch.channels_last if rank == 4 else torch.channels_last_3d
        assert grad_x.is_contiguous(memory_format=fmt_mem), "grad_x should keep channels_last"
    if layout == "contiguous":
        assert grad_x.is_contiguous()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_max_indices_match_reference(device, backend, layout, dtype, gen):
    x, fmt = make_input((3, 7, 6, 9), dtype, layout, device, gen)
    values, indices = gapkernels.global_max_pool(x, True, input_fmt=fmt, backend=backend)
    ref_values, ref_indices = gapkernels.reference.global_max_pool(x, True, input_fmt=fmt)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)


# Shapes that stress the kernels' tails, splits and row grouping.
EDGE_SHAPES = [
    (4, 3, 1, 1),  # S = 1
    (1, 1, 7, 7),  # N*C = 1
    (2, 3, 1, 97),  # odd S, one spatial dim 1
    (5, 17, 3, 5),  # C not a multiple of any vector width
    (1, 1000, 13, 17),  # nothing a power of two
    (2, 9, 64, 65),  # long rows
    (3, 33, 1, 3),  # S smaller than a vector
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "op,wkind",
    [
        ("avg", "none"),
        ("max", "none"),
        ("mixed", "channel"),
        ("catavgmax", "none"),
        ("gem", "none"),
        ("gem", "channel"),
    ],
)
def test_edge_shapes(device, backend, shape, layout, dtype, op, wkind, gen):
    x, fmt = make_input(shape, dtype, layout, device, gen)
    check_against_reference(op, wkind, x, fmt, backend, gen)


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("op", ["avg", "max", "gem"])
def test_huge_spatial(device, backend, op, gen):
    """One row of 4096 x 4096: the split of S over threads (or blocks) and its combine."""
    x = torch.randn((1, 1, 4096, 4096), generator=gen).to(device)
    if op == "gem":
        x = x.abs()
    out = run_op(op, x, None, backend)
    exact = run_op(op, x.double(), None, "reference").float()
    scale = x.abs().mean().item()
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6 * scale)
    if op == "max":
        _, idx = gapkernels.global_max_pool(x, True, backend=backend)
        assert idx.item() == x.flatten().argmax().item()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
@pytest.mark.parametrize("op", ["avg", "max", "catavgmax", "gem"])
def test_keepdim(device, backend, layout, op, gen):
    x, fmt = make_input((2, 6, 4, 5), torch.float32, layout, device, gen)
    out = run_op(op, x, None, backend, keepdim=True, input_fmt=fmt)
    ref = run_op(op, x, None, "reference", keepdim=True, input_fmt=fmt)
    c_out = 12 if op == "catavgmax" else 6
    assert out.shape == ((2, c_out, 1, 1) if fmt == "NCHW" else (2, 1, 1, c_out))
    assert_close(out, ref, torch.float32)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if op == "max":
        _, idx = gapkernels.global_max_pool(x, True, keepdim=True, input_fmt=fmt, backend=backend)
        assert idx.shape == out.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3)])
@pytest.mark.parametrize(
    "op,wkind",
    [("avg", "none"), ("max", "none"), ("catavgmax", "none"), ("mixed", "scalar"), ("gem", "none")],
)
def test_empty_batch_or_channels(device, backend, shape, op, wkind):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = make_weight(op, wkind, shape[1], device)
    out = run_op(op, x, w, backend)
    c_out = 2 * shape[1] if op == "catavgmax" else shape[1]
    assert out.shape == (shape[0], c_out)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_env_backend_override(monkeypatch, gen):
    x = torch.randn((2, 3, 4, 4), generator=gen)
    monkeypatch.setenv("GAPKERNELS_BACKEND", "reference")
    assert torch.equal(gapkernels.global_avg_pool(x), gapkernels.reference.global_avg_pool(x))
    monkeypatch.setenv("GAPKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GAPKERNELS_BACKEND"):
        gapkernels.global_avg_pool(x)


def test_auto_uses_the_extension_on_cpu():
    """CI builds the extension: `auto` must run the C++ kernels, not fall back silently."""
    assert "cpu" in gapkernels.available_backends("cpu"), gapkernels._ext.unavailable_reason("CPU")
