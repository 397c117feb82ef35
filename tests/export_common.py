"""Models and checks shared by the deployment tests (tests/test_export*.py): the pools of every
type with random learnable weights, the layouts, a new input at another batch size, the
gapkernels ops left in an exported program, and the comparison with the eager model."""

from __future__ import annotations

import torch

from gapkernels.nn import GlobalPool
from helpers import TOLERANCES

Dim = torch.export.Dim

# The pool types, with their learnable weight (random values, so that exporting the wrong ones
# shows) and the ONNX operators their graph must contain.
POOLS = {
    "avg": (dict(), {"ReduceMean"}),
    "max": (dict(), {"ReduceMax"}),
    "avgmax": (dict(), {"ReduceMean", "ReduceMax", "Add"}),
    "catavgmax": (dict(), {"ReduceMean", "ReduceMax", "Concat"}),
    "mixed": (dict(), {"ReduceMean", "ReduceMax", "Mul", "Add"}),
    "mixed-per-channel": (dict(per_channel=True), {"ReduceMean", "ReduceMax", "Mul", "Add"}),
    "gem": (dict(), {"Clip", "ReduceMax", "Div", "Pow", "ReduceMean", "Mul"}),
    "gem-per-channel": (
        dict(per_channel=True),
        {"Clip", "ReduceMax", "Div", "Pow", "ReduceMean", "Mul"},
    ),
}

# (logical shape, layout of helpers.make_input, flatten)
LAYOUTS = {
    "nchw-flatten": ((2, 6, 5, 7), "contiguous", True),
    "channels_last-keepdim": ((2, 6, 5, 7), "channels_last", False),
    "rank3-keepdim": ((2, 6, 9), "contiguous", False),
    "rank5-channels_last_3d": ((2, 6, 3, 4, 5), "channels_last", True),
    "nhwc-keepdim": ((2, 6, 5, 7), "nhwc", False),
}


def make_pool(
    name: str, channels: int, input_fmt: str = "NCHW", flatten: bool = True, gen=None
) -> GlobalPool:
    """A GlobalPool in eval mode; learnable weights set to random in-range values."""
    pool_type = name.removesuffix("-per-channel")
    kwargs = POOLS[name][0]
    pool = GlobalPool(pool_type, flatten=flatten, input_fmt=input_fmt, channels=channels, **kwargs)
    with torch.no_grad():
        for raw in pool.parameters():
            raw.copy_(torch.rand(raw.shape, generator=gen, dtype=torch.float64) * 2 + 0.2)
    return pool.eval()


def other_batch(x: torch.Tensor, input_fmt: str, batch: int = 3, gen=None) -> torch.Tensor:
    """A new input like x (same layout and dtype) with another batch size."""
    shape = (batch, *x.shape[1:])
    new = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype)
    if input_fmt == "NCHW" and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.dim() in (4, 5):
            new = new.contiguous(memory_format=fmt)
    return new


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
):
    rtol, atol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale)


def pool_targets(ep) -> list[str]:
    """The gapkernels ops in the program, nested graphs included (a learnable weight puts the
    forward under a `wrap_with_set_grad_enabled` submodule)."""
    return [
        str(n.target)
        for module in ep.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for n in module.graph.nodes
        if n.op == "call_function" and "gapkernels" in str(n.target)
    ]
