"""Deployment to ONNX (SPEC "Deployment", issue 16): every model that uses gapkernels exports
with `torch.onnx.export(model, args, dynamo=True)`, no extra argument, to standard ONNX operators
that onnxruntime runs (outputs compared with torch's, at another batch size than the exported
one: the batch axis is dynamic); also with the legacy exporter, and from a program that
torch.export captured with the kernels. torch.export and AOTInductor: test_export.py.

The tests skip, with the reason, where onnx / onnxscript / onnxruntime are not installed.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch
from export_common import (
    LAYOUTS,
    POOLS,
    Dim,
    assert_close,
    make_pool,
    other_batch,
    pool_targets,
)

import gapkernels
from gapkernels import functional
from helpers import make_input

ONNX_MISSING = [
    m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None
]
needs_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING),
    reason=f"ONNX export tests need {', '.join(ONNX_MISSING)}: "
    "pip install onnx onnxscript onnxruntime",
)
# The public functions route to gapkernels.export during an ONNX export (functional.py imports it).
needs_functional_routing = pytest.mark.skipif(
    getattr(functional, "export", None) is not gapkernels.export,
    reason="gapkernels.functional does not route to gapkernels.export during torch.onnx.export yet",
)


# --- ONNX helpers ------------------------------------------------------------------------------


def onnx_export(model, args, *, dynamic_batch: bool = True, opset: int | None = None):
    """torch.onnx.export(model, args, dynamo=True), the batch axes dynamic: the ModelProto."""
    dynamic_shapes = tuple({0: Dim("batch")} for _ in args) if dynamic_batch else None
    kwargs = {} if opset is None else dict(opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes, **kwargs
        )
    return program.model_proto


def check_standard_ops(proto, expected: set[str]) -> list[str]:
    """Every node is a standard ONNX operator (no custom domain or local function); their types."""
    assert not list(proto.functions), [f.name for f in proto.functions]
    ops = [node.op_type for node in proto.graph.node]
    custom = [(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    assert not custom, custom
    assert not any("gapkernels" in op for op in ops), ops
    assert expected <= set(ops), (expected - set(ops), ops)
    return ops


def run_ort(proto, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Runs the serialized model in a fresh onnxruntime session (bfloat16 through OrtValue)."""
    import onnx
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for arg, x in zip(session.get_inputs(), inputs, strict=True):
        x = x.contiguous()
        if x.dtype == torch.bfloat16:
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                x.view(torch.uint16).numpy(), onnx.TensorProto.BFLOAT16
            )
        else:
            value = ort.OrtValue.ortvalue_from_numpy(x.numpy())
        feeds[arg.name] = value
    outputs = session.run_with_ort_values(None, feeds)
    result = []
    for value in outputs:
        if value.data_type() == "tensor(bfloat16)":
            result.append(torch.from_dlpack(value._get_c_value()).clone())
        else:
            result.append(torch.from_numpy(value.numpy()))
    return result


# --- ONNX: GlobalPool, every op and layout ----------------------------------------------------


class Pools(torch.nn.Module):
    """Every pool of POOLS side by side (one export covers them all): a tuple of outputs."""

    def __init__(self, names, channels, input_fmt="NCHW", flatten=True, gen=None):
        super().__init__()
        self.names = list(names)
        self.pools = torch.nn.ModuleList(
            make_pool(n, channels, input_fmt, flatten, gen=gen) for n in self.names
        )

    def forward(self, x):
        return tuple(pool(x) for pool in self.pools)


def check_pools(model: Pools, proto, x: torch.Tensor, dtype=torch.float32):
    expected_ops = set().union(*(POOLS[n][1] for n in model.names))
    check_standard_ops(proto, expected_ops)
    assert [i.name for i in proto.graph.input] == ["x"]  # weights are initializers, not inputs
    actual = run_ort(proto, x)
    with torch.no_grad():
        expected = model(x)
    assert len(actual) == len(expected)
    for name, a, e in zip(model.names, actual, expected, strict=True):
        try:
            assert_close(a, e, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@needs_onnx
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_onnx_global_pool(layout_name, gen):
    shape, layout, flatten = LAYOUTS[layout_name]
    x, input_fmt = make_input(shape, torch.float32, layout, gen=gen)
    model = Pools(POOLS, 6, input_fmt, flatten, gen=gen).eval()
    proto = onnx_export(model, (x,))
    check_pools(model, proto, other_batch(x, input_fmt, gen=gen))


@needs_onnx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_onnx_half_dtypes(dtype, gen):
    x, input_fmt = make_input((2, 6, 5, 7), dtype, "channels_last", gen=gen)
    model = Pools(POOLS, 6, input_fmt, flatten=False, gen=gen).eval()
    proto = onnx_export(model, (x,))
    ops = [node.op_type for node in proto.graph.node]
    assert ops[0] == "Cast" and "Cast" in ops[1:], ops  # accumulated in float32, as the kernels do
    check_pools(model, proto, other_batch(x, input_fmt, gen=gen), dtype)


@needs_onnx
@pytest.mark.parametrize("opset", [18, 21])
def test_onnx_opsets(opset, gen):
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, "contiguous", gen=gen)
    model = Pools(POOLS, 6, input_fmt, gen=gen).eval()
    proto = onnx_export(model, (x,), opset=opset)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    check_pools(model, proto, x)


@needs_onnx
@pytest.mark.parametrize("pool_name", ["mixed-per-channel", "gem-per-channel"])
def test_onnx_learnable_weights_are_initializers(pool_name, gen):
    from onnx import numpy_helper

    x, _ = make_input((2, 6, 5, 7), torch.float32, "contiguous", gen=gen)
    pool = make_pool(pool_name, 6, gen=gen)
    weight = (pool.alpha if pool.pool_type == "mixed" else pool.p).detach()
    proto = onnx_export(pool, (x,))
    assert [i.name for i in proto.graph.input] == ["x"]
    values = [numpy_helper.to_array(t).ravel() for t in proto.graph.initializer]
    # Stored as the constrained value (sigmoid / softplus folded by the exporter's optimizer).
    assert any(
        v.shape == (6,) and torch.allclose(torch.from_numpy(v.copy()), weight) for v in values
    )


@needs_onnx
@needs_functional_routing
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
def test_onnx_functional_api(layout, gen):
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, layout, gen=gen)

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.rand(6, generator=gen))
            self.p = torch.nn.Parameter(torch.rand((), generator=gen) * 3 + 1)

        def forward(self, x):
            kw = dict(input_fmt=input_fmt)
            values, indices = gapkernels.global_max_pool(x, return_indices=True, keepdim=True, **kw)
            return (
                gapkernels.global_avg_pool(x, keepdim=True, **kw),
                values,
                indices,
                gapkernels.global_mixed_pool(x, self.alpha, **kw),
                gapkernels.global_avgmax_pool(x, **kw),
                gapkernels.global_avgmax_pool(x, concat=True, keepdim=True, **kw),
                gapkernels.global_gem_pool(x, self.p, 1e-6, **kw),
            )

    model = Heads().eval()
    proto = onnx_export(model, (x,))
    check_standard_ops(proto, {"ReduceMean", "ReduceMax", "ArgMax", "Concat", "Pow"})
    x3 = other_batch(x, input_fmt, gen=gen)
    with torch.no_grad():
        expected = model(x3)
    actual = run_ort(proto, x3)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e.dtype == torch.int64:
            assert torch.equal(a, e)
        else:
            assert_close(a, e)


@needs_onnx
@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
def test_onnx_converted_torchvision_resnet18(memory_format, gen):
    torchvision = pytest.importorskip("torchvision")
    model, replaced = gapkernels.convert_model(torchvision.models.resnet18(weights=None))
    assert replaced == 1
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen).contiguous(memory_format=memory_format)
    proto = onnx_export(model, (x,))
    check_standard_ops(proto, {"ReduceMean", "Gemm"})
    x3 = torch.randn(3, 3, 64, 64, generator=gen).contiguous(memory_format=memory_format)
    (actual,) = run_ort(proto, x3)
    with torch.no_grad():
        assert_close(actual, model(x3), scale=50)  # through 18 convolutions


@needs_onnx
def test_onnx_converted_timm_catavgmax(gen):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, global_pool="catavgmax")
    model, replaced = gapkernels.convert_model(model)
    assert replaced == 1
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    proto = onnx_export(model, (x,))
    check_standard_ops(proto, {"ReduceMean", "ReduceMax", "Concat"})
    x3 = torch.randn(3, 3, 64, 64, generator=gen)
    (actual,) = run_ort(proto, x3)
    with torch.no_grad():
        assert_close(actual, model(x3), scale=50)


@needs_onnx
@pytest.mark.parametrize("pool_name", ["catavgmax", "gem-per-channel"])
def test_onnx_torchscript_exporter(pool_name, gen):
    """The legacy exporter (dynamo=False) goes through the same plain-torch path."""
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, "channels_last", gen=gen)
    pool = make_pool(pool_name, 6, input_fmt, flatten=False, gen=gen)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pool,
            (x,),
            f,
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    import onnx

    proto = onnx.load_from_string(f.getvalue())
    check_standard_ops(proto, POOLS[pool_name][1])
    x3 = other_batch(x, input_fmt, gen=gen)
    (actual,) = run_ort(proto, x3)
    with torch.no_grad():
        assert_close(actual, pool(x3))


@needs_onnx
def test_onnx_of_a_program_exported_with_the_kernels(gen):
    """A program torch.export captured with the kernels: gapkernels.export.decompositions()
    turns them into plain ops (no other extra argument), then ONNX as above."""
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, "channels_last", gen=gen)
    model = Pools(POOLS, 6, input_fmt, flatten=False, gen=gen).eval()
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    ep = ep.run_decompositions(gapkernels.export.decompositions())
    assert not pool_targets(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(ep, dynamo=True, verbose=False).model_proto
    check_pools(model, proto, other_batch(x, input_fmt, gen=gen))


def test_export_path_matches_the_kernels_and_is_off_outside_onnx_export(gen):
    """The plain-torch path gives the kernels' values; outside an ONNX export it is not taken."""
    assert not gapkernels.export.onnx_exporting()
    x, _ = make_input((2, 6, 5, 7), torch.float32, "contiguous", gen=gen)
    for name in POOLS:
        pool = make_pool(name, 6, gen=gen)
        with torch.no_grad():
            assert_close(pool._export_pool(x), pool(x))
