"""Every bad input of SPEC.md raises a clear error (naming the argument, what was given and
what is accepted) before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import gapkernels

ALL_FUNCTIONS = [
    lambda x, **kw: gapkernels.global_avg_pool(x, **kw),
    lambda x, **kw: gapkernels.global_max_pool(x, **kw),
    lambda x, **kw: gapkernels.global_mixed_pool(x, 0.5, **kw),
    lambda x, **kw: gapkernels.global_avgmax_pool(x, **kw),
    lambda x, **kw: gapkernels.global_gem_pool(x, 3.0, **kw),
]
FUNCTION_IDS = ["avg", "max", "mixed", "avgmax", "gem"]


@pytest.fixture(params=list(zip(FUNCTION_IDS, ALL_FUNCTIONS, strict=True)), ids=FUNCTION_IDS)
def pool(request):
    return request.param[1]


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_rank_below_three(pool, shape):
    with pytest.raises(ValueError, match=r"rank >= 3.*got shape"):
        pool(torch.randn(shape))


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
)
def test_non_float_dtype(pool, dtype):
    x = torch.zeros((2, 3, 4, 4), dtype=dtype)
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64, got"):
        pool(x)


@pytest.mark.parametrize(
    "shape,fmt", [((2, 3, 0, 4), "NCHW"), ((2, 3, 0), "NCHW"), ((2, 0, 4, 3), "NHWC")]
)
def test_empty_spatial(pool, shape, fmt):
    with pytest.raises(ValueError, match="empty spatial dims"):
        pool(torch.randn(shape), input_fmt=fmt)


def test_bad_input_fmt(pool):
    with pytest.raises(ValueError, match=r"input_fmt must be 'NCHW' or 'NHWC', got 'NCWH'"):
        pool(torch.randn(2, 3, 4, 4), input_fmt="NCWH")


def test_unknown_backend(pool):
    with pytest.raises(ValueError, match=r"backend must be one of .*'reference'.*got 'fast'"):
        pool(torch.randn(2, 3, 4, 4), backend="fast")


def test_unavailable_backend_says_why(pool):
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*x is on cpu"):
        pool(torch.randn(2, 3, 4, 4), backend="cuda")


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        gapkernels.global_avg_pool([[[1.0]]])


WEIGHTED = [
    ("alpha", lambda x, w: gapkernels.global_mixed_pool(x, w)),
    ("p", lambda x, w: gapkernels.global_gem_pool(x, w)),
]


@pytest.mark.parametrize("name,fn", WEIGHTED, ids=["alpha", "p"])
@pytest.mark.parametrize("shape", [(2,), (3, 1), (1, 3), (4,)])
def test_weight_wrong_shape(name, fn, shape):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(\) or \(C,\) = \(3,\), got"):
        fn(torch.randn(2, 3, 4, 4), torch.full(shape, 0.5))


@pytest.mark.parametrize("name,fn", WEIGHTED, ids=["alpha", "p"])
@pytest.mark.parametrize(
    "weight",
    [torch.tensor(1), torch.tensor([1, 2, 3]), torch.tensor(True), "0.5", True, None],
    ids=["int_tensor", "int_channels", "bool_tensor", "str", "bool", "none"],
)
def test_weight_wrong_type(name, fn, weight):
    with pytest.raises(TypeError, match=name):
        fn(torch.randn(2, 3, 4, 4), weight)


@pytest.mark.parametrize("name,fn", WEIGHTED, ids=["alpha", "p"])
def test_weight_wrong_device(name, fn):
    with pytest.raises(RuntimeError, match=rf"{name} is on meta but x is on cpu"):
        fn(torch.randn(2, 3, 4, 4), torch.empty(3, device="meta"))


@pytest.mark.parametrize(
    "p",
    [0.0, -1.0, float("inf"), float("nan"), torch.tensor(0.0), torch.tensor([1.0, -2.0, 3.0])],
    ids=["zero", "negative", "inf", "nan", "zero_tensor", "neg_channel"],
)
def test_gem_p_not_positive(p):
    with pytest.raises(ValueError, match="p must be"):
        gapkernels.global_gem_pool(torch.rand(2, 3, 4, 4), p)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), "small"])
def test_gem_eps_not_positive(eps):
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        gapkernels.global_gem_pool(torch.rand(2, 3, 4, 4), 3.0, eps)


def test_direct_op_call_checks_strides():
    """The C++ op re-checks what the Python layer guarantees, for callers of torch.ops."""
    x = torch.randn(2, 4, 6)[:, :, ::2]
    with pytest.raises(RuntimeError, match="NCS .* or NSC"):
        torch.ops.gapkernels.pool_forward(x, 0, None, 0.5, 1e-6, False)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.gapkernels.pool_forward(torch.randn(2, 3, 4), 9, None, 0.5, 1e-6, False)
