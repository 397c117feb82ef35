"""Set-up shared by the Triton test files (tests/test_triton*.py, tests/test_tokens_triton.py):
the interpreter, the device, the marks, and the comparison against gapkernels.reference.

TRITON_INTERPRET=1 must be set before gapkernels.triton is first imported (the kernels are built
interpreted or compiled when defined); without a GPU this module sets it when it is the first to
import them, with a GPU it leaves the kernels compiled. Import it before gapkernels.
`.ci/run` sets TRITON_INTERPRET=1 for the whole pytest run, so the order of test files does not
matter. Without Triton, or with the kernels built for the GPU and no GPU, every test of a file
that imports this module skips and says why. Sizes are small: the interpreter runs each program
in numpy.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # No GPU: the kernels can only run in the interpreter. With a GPU they must be compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import assert_close, make_input, make_weight, run_op  # noqa: E402

gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")

DEVICE = "cpu" if gk_triton.INTERPRETED else "cuda"

# Every Triton test module sets `pytestmark = TRITON_MARKS`.
TRITON_MARKS = []
if DEVICE == "cuda" and not torch.cuda.is_available():
    TRITON_MARKS.append(
        pytest.mark.skip(
            reason="gapkernels.triton was imported without TRITON_INTERPRET=1 and there is no GPU; "
            "run pytest with TRITON_INTERPRET=1 set"
        )
    )
# numpy's warnings from lanes the kernels mask out (log2(0), inf - inf); the GPU has none.
TRITON_MARKS.append(pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"))

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "nhwc"]

# Shapes that take the other code paths: several loop steps over S, channel blocks with masked
# channels, and S split over programs with the combine kernel.
PATH_SHAPES = {
    "ncs_loop": ((2, 3, 40, 50), "contiguous"),
    "nsc_loop_masked_channels": ((2, 40, 20, 20), "channels_last"),
    "ncs_split": ((1, 2, 96, 96), "contiguous"),
    "nsc_split": ((1, 2, 128, 130), "channels_last"),
}


def inputs(shape, dtype, layout, op, gen):
    x, input_fmt = make_input(shape, dtype, layout, DEVICE, gen, positive=op == "gem")
    return x.requires_grad_(), input_fmt


def forward_backward(op, kind, x, input_fmt, backend, gen):
    """(out, grad_x, grad_weight) of `op` on `backend`, with a fixed random output gradient."""
    channels = x.shape[1] if input_fmt == "NCHW" else x.shape[-1]
    weight = make_weight(op, kind, channels, DEVICE, gen=torch.Generator().manual_seed(1))
    out = run_op(op, x, weight, backend, input_fmt=input_fmt)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    inputs = [x] + ([weight] if weight is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads[0], grads[1] if weight is not None else None


def check_against_reference(op, kind, x, input_fmt, gen):
    out, grad_x, grad_w = forward_backward(op, kind, x, input_fmt, "triton", gen)
    ref_out, ref_grad_x, ref_grad_w = forward_backward(op, kind, x, input_fmt, "reference", gen)
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, msg=f"{op}/{kind} forward")
    assert grad_x.stride() == x.stride(), "grad_x must have x's strides"
    assert_close(grad_x, ref_grad_x, dtype, msg=f"{op}/{kind} grad_x")
    if ref_grad_w is not None:
        # A sum over N*C (N*C*S for GeM's statistics) float32 terms: a few float32 roundings.
        torch.testing.assert_close(
            grad_w, ref_grad_w, rtol=1e-4, atol=1e-5, msg=f"{op}/{kind} grad to weight"
        )


def view_3d(x, layout):
    """The (N, C, S) view the ops take of a rank-4 x in `layout` (contiguous: NCS, else NSC)."""
    return x.flatten(2) if layout == "contiguous" else x.permute(0, 2, 3, 1).flatten(1, 2).mT
