"""Deployment (SPEC "Deployment", issue 16): every model that uses gapkernels exports

- with `torch.onnx.export(model, args, dynamo=True)`, no extra argument, to standard ONNX
  operators that onnxruntime runs (outputs compared with torch's, at another batch size than the
  exported one: the batch axis is dynamic);
- with `torch.export.export`, strict and non-strict, dynamic batch and spatial sizes, keeping the
  fused kernels (the custom op stays in the graph) and the learnable weights as parameters;
- with AOTInductor (`aoti_compile_and_package` then `aoti_load_package`), which runs the kernels.

The ONNX tests skip, with the reason, where onnx / onnxscript / onnxruntime are not installed.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch

import gapkernels
from gapkernels import _ext, functional
from gapkernels.nn import GlobalPool
from helpers import TOLERANCES, make_input, needs_cuda

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
    assert not _pool_targets(ep)
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


# --- torch.export ------------------------------------------------------------------------------


def _pool_targets(ep) -> list[str]:
    """The gapkernels ops in the program, nested graphs included (a learnable weight puts the
    forward under a `wrap_with_set_grad_enabled` submodule)."""
    return [
        str(n.target)
        for module in ep.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for n in module.graph.nodes
        if n.op == "call_function" and "gapkernels" in str(n.target)
    ]


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize(
    "pool_name", ["avg", "max", "avgmax", "catavgmax", "mixed-per-channel", "gem"]
)
def test_torch_export_dynamic_shapes(pool_name, strict, gen):
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, "channels_last", gen=gen)
    pool = make_pool(pool_name, 6, input_fmt, flatten=False, gen=gen)
    ep = torch.export.export(
        pool, (x,), strict=strict, dynamic_shapes=({0: Dim("batch"), 2: Dim("h"), 3: Dim("w")},)
    )
    if _ext.loaded():
        assert _pool_targets(ep) == ["gapkernels.pool_forward.default"]  # the fused kernel
    params = set(ep.graph_signature.parameters)
    assert params == {name for name, _ in pool.named_parameters()}
    module = ep.module()
    for shape in [(2, 6, 5, 7), (3, 6, 4, 9), (1, 6, 11, 2)]:
        x2 = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert_close(module(x2), pool(x2))


@pytest.mark.parametrize(
    "shape,layout",
    [((2, 6, 9), "nhwc"), ((2, 6, 3, 4, 5), "channels_last"), ((2, 6, 3, 4, 5), "contiguous")],
    ids=["rank3-nlc", "rank5-channels_last_3d", "rank5"],
)
def test_torch_export_ranks_and_formats(shape, layout, gen):
    x, input_fmt = make_input(shape, torch.float32, layout, gen=gen)
    pool = make_pool("gem-per-channel", 6, input_fmt, flatten=False, gen=gen)
    batch_spatial = {0: Dim("batch")}
    spatial = range(1, x.dim() - 1) if input_fmt == "NHWC" else range(2, x.dim())
    batch_spatial.update({d: Dim(f"s{d}") for d in spatial})
    ep = torch.export.export(pool, (x,), dynamic_shapes=(batch_spatial,))
    x2 = torch.randn(
        *[3 if d == 0 else (s + 2 if d in spatial else s) for d, s in enumerate(x.shape)],
        generator=gen,
    )
    if layout == "channels_last":
        x2 = x2.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert_close(ep.module()(x2), pool(x2))


def test_torch_export_save_load_and_functional_api(tmp_path, gen):
    """An exported program holding the custom op round-trips through torch.export.save / load."""

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.full((6,), 2.5))

        def forward(self, x):
            values, indices = gapkernels.global_max_pool(x, return_indices=True)
            return gapkernels.global_gem_pool(x, self.p) + values, indices

    model = Heads()
    x = torch.randn(2, 6, 5, 7, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    assert "p" in ep.graph_signature.parameters
    path = tmp_path / "heads.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    x2 = torch.randn(4, 6, 5, 7, generator=gen)
    with torch.no_grad():
        (a, ai), (e, ei) = loaded.module()(x2), model(x2)
    assert_close(a, e)
    assert torch.equal(ai, ei)


def test_torch_export_converted_resnet18(gen):
    torchvision = pytest.importorskip("torchvision")
    model, _ = gapkernels.convert_model(torchvision.models.resnet18(weights=None))
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    if _ext.loaded():
        assert _pool_targets(ep) == ["gapkernels.pool_forward.default"]
    x3 = torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert_close(ep.module()(x3), model(x3), scale=50)


# --- AOTInductor -------------------------------------------------------------------------------


class _AotiNet(torch.nn.Module):
    """Three heads on one feature map: GeM (per channel), mixed, catavgmax; learnable weights."""

    def __init__(self, gen):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gem = make_pool("gem-per-channel", 8, gen=gen)
        self.mixed = make_pool("mixed", 8, gen=gen)
        self.cat = make_pool("catavgmax", 8, gen=gen)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        h = self.conv(x).relu()
        return self.fc(torch.cat([self.gem(h), self.mixed(h), self.cat(h)], dim=1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_aoti_compile_and_load(device, tmp_path, gen):
    model = _AotiNet(gen).eval().to(device)
    x = torch.randn(2, 3, 9, 11, generator=gen).to(device)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: Dim("batch"), 2: Dim("h"), 3: Dim("w")},)
    )
    if device == "cpu" and _ext.loaded() or device == "cuda" and _ext.has_kernel("CUDA"):
        assert _pool_targets(ep) == ["gapkernels.pool_forward.default"] * 3
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "net.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for shape in [(2, 3, 9, 11), (5, 3, 7, 4)]:
        x2 = torch.randn(shape, generator=gen).to(device)
        with torch.no_grad():
            assert_close(compiled(x2), model(x2), scale=5)
