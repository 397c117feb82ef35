"""convert_model on torch's and timm's pooling modules and on whole torchvision / timm models:
outputs and gradients unchanged, in NCHW and channels_last, eager and under torch.compile;
and the training example runs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gapkernels
from gapkernels.nn import GlobalPool

ROOT = Path(__file__).resolve().parents[1]

# (rtol, atol) for a whole model's outputs and gradients: pooling sums in another order (and, in
# the half types, rounds once where torch rounds twice), and the network carries that further.
MODEL_TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
}
MEMORY_FORMATS = [
    pytest.param(torch.contiguous_format, id="contiguous"),
    pytest.param(torch.channels_last, id="channels_last"),
]


def _assert_close(actual, expected, dtype, what):
    rtol, atol = MODEL_TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _forward_backward(model, x, weight):
    x = x.detach().requires_grad_(True)
    out = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), [x] + params)
    return out, grads


def check_converted(
    model,
    expected_count,
    memory_format=torch.contiguous_format,
    dtype=torch.float32,
    shape=(2, 3, 64, 64),
    compile_it=False,
    backend="auto",
):
    """Converts a copy of `model` and checks its outputs and gradients against the original."""
    torch.manual_seed(0)
    original = model.eval().to(dtype=dtype, memory_format=memory_format)
    converted, count = gapkernels.convert_model(copy.deepcopy(original), backend=backend)
    assert count == expected_count
    assert sum(isinstance(m, GlobalPool) for m in converted.modules()) == expected_count
    leftover = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)
    assert not any(type(m) in leftover for m in converted.modules())
    if compile_it:
        torch._dynamo.reset()
        converted = torch.compile(converted, fullgraph=True)

    x = torch.randn(shape).to(dtype=dtype, memory_format=memory_format)
    with torch.no_grad():
        weight = torch.randn(original(x).shape).to(dtype)
    expected, expected_grads = _forward_backward(original, x, weight)
    out, grads = _forward_backward(converted, x, weight)
    _assert_close(out, expected, dtype, "output")
    for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
        _assert_close(g, e, dtype, "grad to x" if i == 0 else f"grad to parameter {i - 1}")
    return converted


# --- torch's modules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module,shape",
    [
        (torch.nn.AdaptiveAvgPool1d(1), (2, 6, 9)),
        (torch.nn.AdaptiveMaxPool1d((1,)), (2, 6, 9)),
        (torch.nn.AdaptiveAvgPool2d((1, 1)), (2, 6, 5, 4)),
        (torch.nn.AdaptiveMaxPool2d(1), (2, 6, 5, 4)),
        (torch.nn.AdaptiveAvgPool3d(1), (2, 6, 3, 4, 2)),
        (torch.nn.AdaptiveMaxPool3d((1, 1, 1)), (2, 6, 3, 4, 2)),
        (torch.nn.AdaptiveAvgPool2d(1), (6, 5, 4)),  # unbatched input, as torch allows
        (torch.nn.AdaptiveMaxPool3d(1), (6, 3, 4, 2)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "x".join(map(str, v)),
)
def test_torch_pools(module, shape):
    converted = check_converted(torch.nn.Sequential(module), 1, shape=shape)
    assert converted[0].flatten is False


def test_leaves_other_modules_alone():
    class MyPool(torch.nn.AdaptiveAvgPool2d):
        pass

    keep = [
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.AdaptiveAvgPool2d((1, 2)),
        torch.nn.AdaptiveAvgPool2d((1, None)),
        torch.nn.AdaptiveMaxPool2d(1, return_indices=True),
        torch.nn.AdaptiveAvgPool3d((1, 1, 2)),
        MyPool(1),
        torch.nn.AvgPool2d(2),
        torch.nn.Identity(),
    ]
    model = torch.nn.ModuleList(keep)
    converted, count = gapkernels.convert_model(model)
    assert count == 0 and converted is model
    assert all(a is b for a, b in zip(converted, keep, strict=True))


def test_in_place_shared_and_root():
    shared = torch.nn.AdaptiveAvgPool2d(1)
    model = torch.nn.ModuleDict(
        {
            "a": torch.nn.Sequential(shared),
            "b": torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), shared),
        }
    )
    converted, count = gapkernels.convert_model(model, backend="reference")
    assert converted is model and count == 1
    assert isinstance(model["a"][0], GlobalPool) and model["a"][0] is model["b"][1]
    assert model["a"][0].backend == "reference"

    root, count = gapkernels.convert_model(torch.nn.AdaptiveMaxPool2d(1))
    assert isinstance(root, GlobalPool) and root.pool_type == "max" and count == 1


# --- timm's modules --------------------------------------------------------------------------

TIMM_POOL_TYPES = [
    "avg",
    "max",
    "avgmax",
    "catavgmax",
    "fast",
    "fastavg",
    "fastmax",
    "fastavgmax",
    "fastcatavgmax",
]


@pytest.mark.parametrize("pool_type", TIMM_POOL_TYPES)
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "keepdim"])
@pytest.mark.parametrize("input_fmt", ["NCHW", "NHWC"])
def test_timm_select_adaptive_pool(pool_type, flatten, input_fmt):
    layers = pytest.importorskip("timm.layers")
    pool = layers.SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten, input_fmt=input_fmt)
    shape = (2, 6, 5, 4) if input_fmt == "NCHW" else (2, 5, 4, 6)
    converted = check_converted(torch.nn.Sequential(pool), 1, shape=shape)
    assert converted[0].feat_mult() == pool.feat_mult()
    assert converted[0].flatten is flatten and converted[0].input_fmt == input_fmt


@pytest.mark.parametrize(
    "name,pool_type",
    [
        ("FastAdaptiveAvgPool", "avg"),
        ("FastAdaptiveMaxPool", "max"),
        ("FastAdaptiveAvgMaxPool", "avgmax"),
        ("FastAdaptiveCatAvgMaxPool", "catavgmax"),
    ],
)
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "keepdim"])
@pytest.mark.parametrize(
    "fmt,shape",
    [("NCHW", (2, 6, 5, 4)), ("NHWC", (2, 5, 4, 6)), ("NCL", (2, 6, 7)), ("NLC", (2, 7, 6))],
)
def test_timm_fast_pools(name, pool_type, flatten, fmt, shape):
    pools = pytest.importorskip("timm.layers.adaptive_avgmax_pool")
    pool = getattr(pools, name)(flatten=flatten, input_fmt=fmt)
    converted = check_converted(torch.nn.Sequential(pool), 1, shape=shape)
    assert converted[0].pool_type == pool_type


@pytest.mark.parametrize("name", ["AdaptiveAvgMaxPool2d", "AdaptiveCatAvgMaxPool2d"])
def test_timm_avgmax_pools(name):
    pools = pytest.importorskip("timm.layers.adaptive_avgmax_pool")
    check_converted(torch.nn.Sequential(getattr(pools, name)((1, 1))), 1, shape=(2, 6, 5, 4))
    kept = getattr(pools, name)(2)
    assert gapkernels.convert_model(torch.nn.Sequential(kept))[1] == 0


def test_timm_leaves_identity_and_non_global_pools():
    layers = pytest.importorskip("timm.layers")
    identity = layers.SelectAdaptivePool2d(pool_type="", flatten=True)
    non_global = layers.SelectAdaptivePool2d(output_size=2, pool_type="avgmax")
    model = torch.nn.Sequential(identity, non_global)
    _, count = gapkernels.convert_model(model)
    assert count == 0 and model[0] is identity and model[1] is non_global


# --- whole models ----------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("name,count", [("resnet18", 1), ("efficientnet_b0", 17)])
def test_torchvision_models(name, count, memory_format):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    check_converted(getattr(models, name)(weights=None, num_classes=10), count, memory_format)


def test_torchvision_resnet18_bfloat16():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    check_converted(
        models.resnet18(weights=None, num_classes=10), 1, torch.channels_last, dtype=torch.bfloat16
    )


def _timm_model(global_pool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10, global_pool=global_pool)


# Each pool type in one memory format (the pool tests above cover every combination).
@pytest.mark.parametrize(
    "global_pool,memory_format",
    [
        ("avg", torch.contiguous_format),
        ("max", torch.channels_last),
        ("avgmax", torch.contiguous_format),
        ("catavgmax", torch.channels_last),
        ("fastavg", torch.channels_last),
        ("fastcatavgmax", torch.contiguous_format),
    ],
    ids=lambda v: v if isinstance(v, str) else str(v).removeprefix("torch."),
)
def test_timm_models(global_pool, memory_format):
    converted = check_converted(_timm_model(global_pool), 1, memory_format)
    assert isinstance(converted.global_pool, GlobalPool)
    assert converted.num_features * converted.global_pool.feat_mult() == converted.fc.in_features


def test_timm_model_without_pooling_is_left_alone():
    model = _timm_model("")
    assert gapkernels.convert_model(model)[1] == 0


def test_compiled_converted_model():
    """torch.compile(fullgraph=True) of one converted model (the rest are eager: CI time)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.efficientnet_b0(weights=None, num_classes=10)
    model.features = model.features[:3]  # three SE blocks are enough, and compile faster
    model.classifier[1] = torch.nn.Linear(24, 10)
    check_converted(model, 4, torch.channels_last, shape=(2, 3, 32, 32), compile_it=True)


# --- the example -----------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mixed", "gem"])
def test_example_runs(head):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_se_cnn.py"),
            "--head",
            head,
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    symbol = "alpha" if head == "mixed" else "p"
    assert f"learnable {symbol} moved" in result.stdout, result.stdout
    assert "convert_model replaced 3 pools" in result.stdout
