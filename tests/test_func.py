"""torch.func over gapkernels: vmap, grad, jacrev, jacfwd, hessian, jvp, functional_call and
per-sample gradients (the DP-SGD pattern) give the reference's values."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_gradients import BACKENDS, TOL  # noqa: E402
from torch import func
from torch.utils import _pytree as pytree  # noqa: E402

import gapkernels  # noqa: E402
from helpers import OP_CASES, make_input, make_weight, run_op  # noqa: E402


def _setup(op, wkind, device, dtype, gen, shape=(2, 3, 3, 4), layout="contiguous"):
    x, fmt = make_input(shape, torch.float64, layout, "cpu", gen, positive=op == "gem")
    x = x.to(device=device, dtype=dtype)
    w = make_weight(op, wkind, shape[-3], "cpu", requires_grad=False, gen=gen)
    if w is not None:
        w = w.to(device=device, dtype=dtype)
    return x, fmt, w


def _both(op, backend, fmt):
    def got(z, w):
        return run_op(op, z, w, backend, input_fmt=fmt)

    def want(z, w):
        return run_op(op, z, w, "reference", input_fmt=fmt)

    return got, want


def _close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_vmap(device, backend, dtype, op, wkind, layout, gen):
    x, fmt, w = _setup(op, wkind, device, dtype, gen, shape=(3, 2, 3, 3, 4))
    if layout == "channels_last":  # each vmapped slice channels_last
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    got, want = _both(op, backend, fmt)
    _close(func.vmap(got, in_dims=(0, None))(x, w), func.vmap(want, in_dims=(0, None))(x, w), dtype)
    moved = x.movedim(0, 1)  # the vmapped dimension second
    _close(
        func.vmap(got, in_dims=(1, None))(moved, w),
        func.vmap(want, in_dims=(1, None))(moved, w),
        dtype,
    )
    if w is not None:  # a batched weight
        wb = torch.stack([w, w * 1.1, w * 0.9])
        _close(func.vmap(got)(x, wb), func.vmap(want)(x, wb), dtype)


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
def test_grad_jacrev_jacfwd_hessian(device, backend, dtype, op, wkind, gen):
    x, fmt, w = _setup(op, wkind, device, dtype, gen, shape=(1, 2, 2, 3))
    got, want = _both(op, backend, fmt)
    xd, wd = x.double(), None if w is None else w.double()
    argnums = (0,) if w is None else (0, 1)

    def loss(f, dt):
        return lambda z, wt: (f(z, wt).to(dt) ** 2).sum()

    for transform in (func.grad, func.jacrev, func.jacfwd, func.hessian):
        a = transform(loss(got, dtype), argnums=argnums)(x, w)
        b = transform(loss(want, torch.float64), argnums=argnums)(xd, wd)
        leaves_a, leaves_b = pytree.tree_leaves(a), pytree.tree_leaves(b)
        for ga, gb in zip(leaves_a, leaves_b, strict=True):
            _close(ga, gb, dtype)
    tx = torch.randn_like(x)
    _, ta = func.jvp(lambda z: got(z, w), (x,), (tx,))
    _, tb = func.jvp(lambda z: want(z, wd), (xd,), (tx.double(),))
    _close(ta, tb, dtype)


class Head(torch.nn.Module):
    def __init__(self, pool_type, channels=3, classes=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, channels, 3, padding=1)
        self.pool = (
            gapkernels.nn.GlobalPool(pool_type, per_channel=True, channels=channels)
            if pool_type in ("mixed", "gem")
            else gapkernels.nn.GlobalPool(pool_type)
        )
        self.fc = torch.nn.LazyLinear(classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x)) + 0.01))


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax", "catavgmax", "mixed", "gem"])
def test_per_sample_gradients_match_a_loop(pool_type, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = Head(pool_type).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    model(x)  # materialize the lazy layer
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = func.functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-7, atol=1e-9)
