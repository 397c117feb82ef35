"""The custom ops as torch.library sees them: opcheck on every op, gradcheck in float64,
and torch.compile(fullgraph=True) of a small CNN with no graph break."""

from __future__ import annotations

import pytest
import torch

import gapkernels
from gapkernels import ops
from gapkernels.functional import _as_3d
from gapkernels.ops import MODE_GEM, MODE_MIXED
from helpers import DEVICE_BACKENDS, OP_CASES, make_input, make_weight, run_op

FORWARD = torch.ops.gapkernels.pool_forward.default
BACKWARD = torch.ops.gapkernels.pool_backward.default

MODES = ops.MODES


def _forward_args(mode_name, layout, dtype, device, weighted, gen, requires_grad):
    x, fmt = make_input((2, 5, 3, 4), dtype, layout, device, gen, positive=mode_name == "gem")
    x3 = _as_3d(x, fmt).detach().requires_grad_(requires_grad)
    mode = MODES[mode_name]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = None
    if weighted:
        weight = (0.3 if mode == MODE_MIXED else 2.5) + torch.rand(5, generator=gen, dtype=acc)
        weight = weight.to(device).requires_grad_(requires_grad)
    return (
        x3,
        mode,
        weight,
        0.4 if mode == MODE_MIXED else 3.0,
        1e-6,
        weighted and mode == MODE_GEM,
    )


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "mode_name,weighted",
    [
        ("avg", False),
        ("max", False),
        ("mixed", False),
        ("mixed", True),
        ("cat", False),
        ("gem", False),
        ("gem", True),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_forward(device, backend, mode_name, weighted, layout, dtype, gen):
    args = _forward_args(mode_name, layout, dtype, device, weighted, gen, requires_grad=True)
    torch.library.opcheck(FORWARD, args)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "mode_name,weighted",
    [("avg", False), ("max", False), ("mixed", True), ("cat", False), ("gem", True)],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(device, backend, mode_name, weighted, layout, gen):
    x3, mode, weight, scalar, eps, with_log = _forward_args(
        mode_name, layout, torch.float32, device, weighted, gen, requires_grad=False
    )
    out, aux, indices = FORWARD(x3, mode, weight, scalar, eps, with_log)
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    # The backward op has no derivative of its own (double backward is not supported).
    torch.library.opcheck(
        BACKWARD,
        (grad_out, x3, aux, indices, mode, weight, scalar, eps),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    grad_x = BACKWARD(grad_out, x3, aux, indices, mode, weight, scalar, eps)
    assert grad_x.stride() == x3.stride()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
def test_gradcheck_float64(device, backend, op, wkind, layout, gen):
    x, fmt = make_input((2, 3, 3, 4), torch.float64, layout, device, gen, positive=op == "gem")
    x.requires_grad_(True)
    w = make_weight(op, wkind, 3, device, gen=gen)
    inputs = (x,)
    if w is not None:
        w = w.detach().double().requires_grad_(True)
        inputs = (x, w)

    def fn(*args):
        return run_op(op, args[0], args[1] if len(args) > 1 else None, backend, input_fmt=fmt)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


class SmallSENet(torch.nn.Module):
    """A conv net with a squeeze-excitation block and a learnable GeM + mixed head."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.se_reduce = torch.nn.Linear(16, 4)
        self.se_expand = torch.nn.Linear(4, 16)
        self.p = torch.nn.Parameter(torch.full((16,), 3.0))
        self.alpha = torch.nn.Parameter(torch.tensor(0.4))
        self.fc = torch.nn.Linear(16 * 4, 10)

    def forward(self, x):
        b = self.backend
        h = torch.relu(self.conv(x))
        scale = torch.sigmoid(
            self.se_expand(torch.relu(self.se_reduce(gapkernels.global_avg_pool(h, backend=b))))
        )
        h = h * scale[:, :, None, None]
        feats = torch.cat(
            [
                gapkernels.global_gem_pool(h, self.p, backend=b),
                gapkernels.global_mixed_pool(h, self.alpha, backend=b),
                gapkernels.global_avgmax_pool(h, concat=True, backend=b),
            ],
            dim=1,
        )
        return self.fc(feats)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
def test_torch_compile_fullgraph(device, backend, memory_format, gen):
    torch._dynamo.reset()
    model = SmallSENet(backend).to(device)
    x = torch.randn((2, 3, 8, 8), generator=gen).to(device).contiguous(memory_format=memory_format)
    compiled = torch.compile(model, fullgraph=True)
    out_eager = model(x)
    out_compiled = compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    grads_eager = torch.autograd.grad(out_eager.sum(), list(model.parameters()))
    grads_compiled = torch.autograd.grad(out_compiled.sum(), list(model.parameters()))
    for g_c, g_e in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
