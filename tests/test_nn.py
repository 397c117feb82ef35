"""gapkernels.nn.GlobalPool: every pool type against the reference, learnable alpha / p,
serialization, repr, errors, and torch.compile of a CNN that uses it."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import gapkernels
from gapkernels import reference
from gapkernels.nn import P_MIN, POOL_TYPES, TIMM_POOL_TYPES, GlobalPool
from helpers import TOLERANCES, assert_close, make_input


def _reference(module: GlobalPool, x, input_fmt):
    kw = dict(keepdim=not module.flatten, input_fmt=input_fmt)
    if module.pool_type == "avg":
        return reference.global_avg_pool(x, **kw)
    if module.pool_type == "max":
        return reference.global_max_pool(x, **kw)
    if module.pool_type == "avgmax":
        return reference.global_avgmax_pool(x, **kw)
    if module.pool_type == "catavgmax":
        return reference.global_avgmax_pool(x, concat=True, **kw)
    if module.pool_type == "mixed":
        return reference.global_mixed_pool(x, module.alpha, **kw)
    return reference.global_gem_pool(x, module.p, module.eps, **kw)


def _params(module):
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("pool_type", POOL_TYPES)
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "keepdim"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(pool_type, flatten, layout, dtype, gen):
    x, input_fmt = make_input((3, 6, 5, 4), dtype, layout, gen=gen, positive=pool_type == "gem")
    x.requires_grad_(True)
    module = GlobalPool(
        pool_type,
        flatten=flatten,
        input_fmt=input_fmt,
        channels=6,
        per_channel=pool_type in ("mixed", "gem"),
        alpha=0.3,
        p=2.5,
    )
    out = module(x)
    expected = _reference(module, x, input_fmt)
    c_out = 6 * module.feat_mult()
    if flatten:
        assert out.shape == (3, c_out)
    else:
        assert out.shape == ((3, c_out, 1, 1) if input_fmt == "NCHW" else (3, 1, 1, c_out))
    assert out.dtype == dtype
    assert_close(out, expected, dtype, scale=4)

    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    inputs = [x] + _params(module)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for g, e in zip(grads, expected_grads, strict=True):
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(g, e.to(g.dtype), rtol=rtol * 4, atol=atol * 4)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 5, 3, 4, 2)], ids=["1d", "3d"])
@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_other_ranks(shape, pool_type, gen):
    x = torch.rand(shape, generator=gen) + 0.1
    module = GlobalPool(pool_type, flatten=False)
    out = module(x)
    assert out.shape == (2, 5 * module.feat_mult()) + (1,) * (len(shape) - 2)
    assert_close(out, _reference(module, x, "NCHW"), torch.float32)


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_backend_reference_matches_default(pool_type, gen):
    x = torch.rand((4, 8, 6, 6), generator=gen).contiguous(memory_format=torch.channels_last)
    default = GlobalPool(pool_type)
    ref = GlobalPool(pool_type, backend="reference")
    ref.load_state_dict(default.state_dict())
    assert_close(default(x), ref(x), torch.float32)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
def test_drop_in_for_adaptive_pools(flatten, memory_format, gen):
    x = torch.randn((2, 8, 5, 5), generator=gen).contiguous(memory_format=memory_format)
    for pool_type, torch_pool in (
        ("avg", torch.nn.AdaptiveAvgPool2d(1)),
        ("max", torch.nn.AdaptiveMaxPool2d((1, 1))),
    ):
        expected = torch_pool(x)
        if flatten:
            expected = expected.flatten(1)
        torch.testing.assert_close(GlobalPool(pool_type, flatten=flatten)(x), expected)


def test_spatial_dims_takes_unbatched_input_like_torch(gen):
    x = torch.randn((8, 5, 5), generator=gen)  # (C, H, W)
    module = GlobalPool("avg", flatten=False, spatial_dims=2)
    torch.testing.assert_close(module(x), torch.nn.AdaptiveAvgPool2d(1)(x))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        module(torch.randn(2, 8, 3, 3, 3))


@pytest.mark.parametrize("pool_type,name,value", [("mixed", "alpha", 0.3), ("gem", "p", 2.5)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
def test_learnable_parameter(pool_type, name, value, per_channel):
    module = GlobalPool(pool_type, channels=4, per_channel=per_channel, **{name: value})
    constrained = getattr(module, name)
    assert constrained.shape == ((4,) if per_channel else ())
    torch.testing.assert_close(constrained, torch.full_like(constrained, value), rtol=3e-7, atol=0)
    (raw,) = module.parameters()
    assert raw.requires_grad and raw.shape == constrained.shape

    fixed = GlobalPool(
        pool_type, channels=4, per_channel=per_channel, learnable=False, **{name: value}
    )
    assert list(fixed.parameters()) == []
    assert list(fixed.state_dict()) == list(module.state_dict())
    torch.testing.assert_close(getattr(fixed, name), constrained)


def _assert_valid(module):
    if module.pool_type == "mixed":
        assert ((module.alpha >= 0) & (module.alpha <= 1)).all()
    else:
        assert (torch.isfinite(module.p) & (module.p >= P_MIN)).all()


@pytest.mark.parametrize("pool_type", ["mixed", "gem"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["minimize", "maximize"])
def test_params_get_gradients_and_stay_valid(pool_type, per_channel, direction, gen):
    module = GlobalPool(pool_type, channels=6, per_channel=per_channel)
    x = torch.rand((4, 6, 5, 5), generator=gen) * 3
    (raw,) = module.parameters()
    module(x).sum().backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and (raw.grad != 0).any()

    # One step far past any sensible value of alpha / p, in either direction.
    optimizer = torch.optim.SGD(module.parameters(), lr=1e4)
    optimizer.zero_grad()
    (direction * module(x).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        _assert_valid(module)
        out = module(x)
    # Maximizing GeM sends p far up, and x ** p overflows float32 as the formula does anywhere.
    assert not torch.isnan(out).any()
    if pool_type == "mixed" or direction > 0:
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("pool_type", ["mixed", "gem"])
def test_any_raw_value_is_valid(pool_type):
    module = GlobalPool(pool_type, channels=4, per_channel=True)
    (raw,) = module.parameters()
    with torch.no_grad():
        raw.copy_(torch.tensor([-1e30, -50.0, 50.0, 1e30]))
    _assert_valid(module)


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_serialization_round_trips(pool_type, gen):
    learnable = pool_type in ("mixed", "gem")
    module = GlobalPool(
        pool_type, flatten=False, input_fmt="NHWC", channels=5, per_channel=learnable
    )
    with torch.no_grad():
        for raw in module.parameters():
            raw.copy_(torch.randn(raw.shape, generator=gen))
    x = torch.rand((2, 4, 4, 5), generator=gen)
    expected = module(x)

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = GlobalPool(
        pool_type, flatten=False, input_fmt="NHWC", channels=5, per_channel=learnable
    )
    loaded.load_state_dict(torch.load(buffer))
    copies = [loaded, pickle.loads(pickle.dumps(module)), copy.deepcopy(module)]
    for other in copies:
        assert repr(other) == repr(module)
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_repr():
    assert repr(GlobalPool("avg")) == "GlobalPool(pool_type='avg', flatten=True, input_fmt='NCHW')"
    text = repr(GlobalPool("gem", flatten=False, input_fmt="NHWC", p=4.0, backend="reference"))
    for part in (
        "pool_type='gem'",
        "flatten=False",
        "input_fmt='NHWC'",
        "p=4 (learnable)",
        "backend='reference'",
    ):
        assert part in text
    text = repr(GlobalPool("mixed", channels=7, per_channel=True, learnable=False))
    assert "alpha=per-channel (7,) (fixed)" in text


def test_feat_mult_and_timm_interface():
    for pool_type in POOL_TYPES:
        module = GlobalPool(pool_type)
        assert module.feat_mult() == (2 if pool_type == "catavgmax" else 1)
        assert module.is_identity() is False
        assert module.pool_type == pool_type


@pytest.mark.parametrize("name,pool_type", list(TIMM_POOL_TYPES.items()))
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "keepdim"])
@pytest.mark.parametrize("input_fmt", ["NCHW", "NHWC"])
def test_timm_fast_pool_type_names(name, pool_type, flatten, input_fmt, gen):
    """timm's SelectAdaptivePool2d names: "fast" is avg; the same values as timm's module."""
    module = GlobalPool(name, flatten=flatten, input_fmt=input_fmt)
    assert module.pool_type == pool_type
    assert module.feat_mult() == (2 if pool_type == "catavgmax" else 1)
    layers = pytest.importorskip("timm.layers")
    timm_pool = layers.SelectAdaptivePool2d(pool_type=name, flatten=flatten, input_fmt=input_fmt)
    assert module.feat_mult() == timm_pool.feat_mult()
    shape = (2, 6, 5, 7) if input_fmt == "NCHW" else (2, 5, 7, 6)
    x = torch.randn(shape, generator=gen)
    torch.testing.assert_close(module(x), timm_pool(x))


@pytest.mark.parametrize("wrap", [False, True], ids=["module", "inside_a_model"])
def test_torch_jit_script_points_to_torch_export(wrap):
    """TorchScript is deprecated: scripting raises an error that says what to use instead."""
    model = GlobalPool("gem")
    if wrap:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), model)
    with pytest.raises(RuntimeError, match=r"TorchScript.*torch\.export\.export.*dynamo=True"):
        torch.jit.script(model)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(pool_type="fastgem"), ValueError, "pool_type"),
        (dict(pool_type="Avg"), ValueError, "pool_type"),
        (dict(pool_type=""), ValueError, "pool_type"),
        (dict(input_fmt="NCL"), ValueError, "input_fmt"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(pool_type="gem", per_channel=True), ValueError, "channels"),
        (dict(pool_type="avg", per_channel=True, channels=3), ValueError, "per_channel"),
        (dict(pool_type="mixed", alpha=1.0), ValueError, "alpha"),
        (dict(pool_type="mixed", alpha=-0.1, learnable=False), ValueError, "alpha"),
        (dict(pool_type="gem", p=0.0), ValueError, "p must be"),
        (dict(pool_type="gem", p=float("inf")), ValueError, "p must be"),
        (dict(pool_type="gem", eps=0.0), ValueError, "eps"),
        (dict(spatial_dims=0), ValueError, "spatial_dims"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GlobalPool(**kwargs)


def test_fixed_alpha_may_be_0_or_1(gen):
    x = torch.randn((2, 3, 4, 4), generator=gen)
    torch.testing.assert_close(
        GlobalPool("mixed", alpha=1.0, learnable=False)(x), gapkernels.global_max_pool(x)
    )
    torch.testing.assert_close(
        GlobalPool("mixed", alpha=0.0, learnable=False)(x), gapkernels.global_avg_pool(x)
    )


def test_wrong_channel_count_is_an_error(gen):
    module = GlobalPool("gem", channels=4, per_channel=True)
    with pytest.raises(ValueError, match=r"p must have shape"):
        module(torch.rand((2, 5, 3, 3), generator=gen))


def test_weight_property_of_other_pool_types():
    assert not hasattr(GlobalPool("gem"), "alpha")
    assert not hasattr(GlobalPool("avg"), "p")


def test_dtype_conversion(gen):
    module = GlobalPool("gem", channels=4, per_channel=True).to(torch.float64)
    x = torch.rand((2, 4, 3, 3), generator=gen, dtype=torch.float64)
    assert module.p.dtype == torch.float64 and module(x).dtype == torch.float64


class SmallCNN(torch.nn.Module):
    def __init__(self, pool_type, backend="auto"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = GlobalPool(pool_type, channels=8, per_channel=True, backend=backend)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("pool_type", ["mixed", "gem"])
def test_torch_compile_fullgraph(pool_type, backend, gen):
    torch._dynamo.reset()
    model = SmallCNN(pool_type, backend)
    x = torch.randn((2, 3, 8, 8), generator=gen).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    out_eager, out_compiled = model(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    params = list(model.parameters())
    grads_eager = torch.autograd.grad(out_eager.sum(), params)
    grads_compiled = torch.autograd.grad(out_compiled.sum(), params)
    for g_c, g_e in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
