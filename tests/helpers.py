"""The grid every test file shares: devices, backends, dtypes with tolerances, layouts, ops, and
the helpers that build inputs and compare results (`from helpers import ...`; the fixtures are in
conftest.py)."""

from __future__ import annotations

import pytest
import torch

import gapkernels
from gapkernels import reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is visible")

# (rtol, atol) against the reference: one rounding of a float32 (float64) result in the dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
DTYPES = list(TOLERANCES)
LAYOUTS = ["contiguous", "channels_last", "strided", "nhwc"]

# Extension backends by device; "reference" is tested against torch in test_reference.py.
DEVICE_BACKENDS = [pytest.param("cpu", "cpu", id="cpu")] + [
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda)
]


def make_input(shape, dtype, layout, device="cpu", gen=None, positive=False):
    """A random tensor of logical shape (N, C, *spatial) in `layout`; returns (x, input_fmt)."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    if positive:
        x = x.abs() + 0.1
    x = x.to(device=device, dtype=dtype)
    rank = len(shape)
    if layout == "contiguous":
        return x, "NCHW"
    if layout == "channels_last":
        if rank == 4:
            return x.contiguous(memory_format=torch.channels_last), "NCHW"
        if rank == 5:
            return x.contiguous(memory_format=torch.channels_last_3d), "NCHW"
        return x.movedim(1, -1).contiguous().movedim(-1, 1), "NCHW"
    if layout == "strided":
        wide = torch.cat([x, x], dim=-1)  # every other element along the last dim
        return wide[..., ::2], "NCHW"
    if layout == "nhwc":
        return x.movedim(1, -1).contiguous(), "NHWC"
    raise ValueError(layout)


def channels_of(x, input_fmt):
    return x.shape[1] if input_fmt == "NCHW" else x.shape[-1]


# Each op: (name, call(module, x, weight, **kw), weight kind). Weight kinds: None; "float";
# "scalar" (a () tensor); "channel" (a (C,) tensor). `module` is gapkernels or gapkernels.reference.
def _mixed(mod, x, w, **kw):
    return mod.global_mixed_pool(x, 0.3 if w is None else w, **kw)


def _gem(mod, x, w, **kw):
    return mod.global_gem_pool(x, 3.0 if w is None else w, 1e-6, **kw)


OPS = {
    "avg": lambda mod, x, w, **kw: mod.global_avg_pool(x, **kw),
    "max": lambda mod, x, w, **kw: mod.global_max_pool(x, **kw),
    "mixed": _mixed,
    "avgmax": lambda mod, x, w, **kw: mod.global_avgmax_pool(x, **kw),
    "catavgmax": lambda mod, x, w, **kw: mod.global_avgmax_pool(x, concat=True, **kw),
    "gem": _gem,
}
WEIGHTED = {"mixed": 0.3, "gem": 2.5}  # the value of a learnable weight, per op
OP_CASES = (
    [(op, "none") for op in ("avg", "max", "avgmax", "catavgmax")]
    + [("mixed", k) for k in ("none", "scalar", "channel")]
    + [("gem", k) for k in ("none", "scalar", "channel")]
)


def make_weight(op, kind, channels, device, requires_grad=True, gen=None):
    if kind == "none":
        return None
    base = WEIGHTED[op]
    if kind == "scalar":
        w = torch.tensor(base, dtype=torch.float32)
    else:
        w = base + 0.2 * torch.rand(channels, generator=gen, dtype=torch.float32)
    return w.to(device).requires_grad_(requires_grad)


def run_op(op, x, weight, backend, **kw):
    """Runs `op` on a backend ("reference" uses gapkernels.reference directly)."""
    if backend == "reference":
        return OPS[op](reference, x, weight, **kw)
    return OPS[op](gapkernels, x, weight, backend=backend, **kw)


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol * scale,
        equal_nan=True,
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )


def assert_bitwise_equal(a, b):
    """Same dtype, shape, strides and bits (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    # reshape(-1): a 0-d tensor (a scalar weight's gradient) has no bytes view of its own
    assert torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )
