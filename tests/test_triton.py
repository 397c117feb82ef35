"""The Triton backend against gapkernels.reference, run on the CPU in Triton's interpreter.

TRITON_INTERPRET=1 must be set before gapkernels.triton is first imported (the kernels are built
interpreted or compiled when defined); without a GPU this module sets it when it is the first to
import them, with a GPU it leaves the kernels compiled.
`.ci/run` sets TRITON_INTERPRET=1 for the whole pytest run, so the order of test files does not
matter. Without Triton, or with the kernels built for the GPU and no GPU, every test here skips
and says why. Sizes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch

if not torch.cuda.is_available():
    # No GPU: the kernels can only run in the interpreter. With a GPU they must be compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gapkernels  # noqa: E402
from gapkernels import auto_table, backends  # noqa: E402
from helpers import (  # noqa: E402
    OP_CASES,
    assert_bitwise_equal,
    assert_close,
    make_input,
    make_weight,
    run_op,
)

gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gapkernels import reference  # noqa: E402
from gapkernels.triton import configs  # noqa: E402
from gapkernels.triton import kernels as tk  # noqa: E402
from gapkernels.triton import pool as tpool  # noqa: E402

DEVICE = "cpu" if gk_triton.INTERPRETED else "cuda"
_REASON = gk_triton.unavailable_reason(torch.empty(1, device="meta"))
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytestmark = [
        pytest.mark.skip(
            reason="gapkernels.triton was imported without TRITON_INTERPRET=1 and there is no GPU; "
            "run pytest with TRITON_INTERPRET=1 set"
        )
    ]

# numpy's warnings from lanes the kernels mask out (log2(0), inf - inf); the GPU has none.
pytestmark = [
    *globals().get("pytestmark", []),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "nhwc"]


def _inputs(shape, dtype, layout, op, gen):
    x, input_fmt = make_input(shape, dtype, layout, DEVICE, gen, positive=op == "gem")
    return x.requires_grad_(), input_fmt


def _forward_backward(op, kind, x, input_fmt, backend, gen, grad_seed_out=None):
    """(out, grad_x, grad_weight) of `op` on `backend`, with a fixed random output gradient."""
    channels = x.shape[1] if input_fmt == "NCHW" else x.shape[-1]
    weight = make_weight(op, kind, channels, DEVICE, gen=torch.Generator().manual_seed(1))
    out = run_op(op, x, weight, backend, input_fmt=input_fmt)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    inputs = [x] + ([weight] if weight is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads[0], grads[1] if weight is not None else None


def _check_against_reference(op, kind, x, input_fmt, gen):
    out, grad_x, grad_w = _forward_backward(op, kind, x, input_fmt, "triton", gen)
    ref_out, ref_grad_x, ref_grad_w = _forward_backward(op, kind, x, input_fmt, "reference", gen)
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


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,kind", OP_CASES)
def test_forward_backward_rank4(op, kind, layout, dtype, gen):
    x, input_fmt = _inputs((2, 5, 3, 4), dtype, layout, op, gen)
    _check_against_reference(op, kind, x, input_fmt, gen)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 2, 3, 2)], ids=["rank3", "rank5"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,kind", OP_CASES)
def test_forward_backward_rank3_rank5(op, kind, layout, shape, gen):
    x, input_fmt = _inputs(shape, torch.float32, layout, op, gen)
    _check_against_reference(op, kind, x, input_fmt, gen)


# Shapes that take the other code paths: several loop steps over S, channel blocks with masked
# channels, and S split over programs with the combine kernel.
PATH_SHAPES = {
    "ncs_loop": ((2, 3, 40, 50), "contiguous"),
    "nsc_loop_masked_channels": ((2, 40, 20, 20), "channels_last"),
    "ncs_split": ((1, 2, 96, 96), "contiguous"),
    "nsc_split": ((1, 2, 128, 130), "channels_last"),
}


def test_path_shapes_take_their_paths():
    loop = configs.forward_config(2, 3, 2000, False)
    assert loop.s_programs == 1 and loop.block_s < 2000
    masked = configs.forward_config(2, 40, 400, True)
    assert 40 % masked.rows and masked.block_s < 400 and masked.s_programs == 1
    assert configs.forward_config(1, 2, 96 * 96, False).s_programs > 1
    assert configs.forward_config(1, 2, 128 * 130, True).s_programs > 1


@pytest.mark.parametrize(
    "op,kind",
    [
        ("avg", "none"),
        ("max", "none"),
        ("mixed", "channel"),
        ("catavgmax", "none"),
        ("gem", "scalar"),
    ],
)
@pytest.mark.parametrize("path", PATH_SHAPES)
def test_forward_backward_paths(path, op, kind, gen):
    shape, layout = PATH_SHAPES[path]
    x, input_fmt = _inputs(shape, torch.float32, layout, op, gen)
    _check_against_reference(op, kind, x, input_fmt, gen)


def _ties_and_nans(shape, layout):
    """Rows of: ties of the maximum, one NaN, several NaNs, all -inf, +inf ties."""
    n, c = shape[:2]
    s = 1
    for d in shape[2:]:
        s *= d
    flat = torch.randint(-3, 3, (n, c, s), generator=torch.Generator().manual_seed(3)).float()
    rows = flat.view(n * c, s)
    rows[0, :] = 1.0
    rows[0, [5, s // 2, s - 1]] = 7.0
    rows[1, s // 3] = float("nan")
    rows[2, [1, s // 2, s - 2]] = float("nan")
    rows[3, :] = float("-inf")
    rows[4, [0, s - 1]] = float("inf")
    rows[5, [s - 1, 0]] = float("nan")
    x = flat.view(shape).to(DEVICE)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), "NCHW"
    if layout == "nhwc":
        return x.movedim(1, -1).contiguous(), "NHWC"
    return x, "NCHW"


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 5, 7), (1, 6, 96, 96), (1, 6, 128, 130)],
    ids=["small", "ncs_split", "nsc_split"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_max_ties_and_nan_follow_torch(shape, layout, dtype):
    if shape[2] > 8 and layout == "nhwc":
        pytest.skip("nhwc is the channels_last kernel, covered at this size by channels_last")
    x, input_fmt = _ties_and_nans(shape, layout)
    x = x.to(dtype)
    values, indices = gapkernels.global_max_pool(x, True, input_fmt=input_fmt, backend="triton")
    ref_values, ref_indices = gapkernels.reference.global_max_pool(x, True, input_fmt=input_fmt)
    assert torch.equal(indices, ref_indices), (indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    for concat in (False, True):
        out = gapkernels.global_avgmax_pool(x, concat, input_fmt=input_fmt, backend="triton")
        ref = gapkernels.reference.global_avgmax_pool(x, concat, input_fmt=input_fmt)
        assert_close(out, ref, dtype)


def test_max_backward_sends_gradient_to_the_torch_index():
    x, _ = _ties_and_nans((2, 3, 5, 7), "contiguous")
    x.requires_grad_()
    out = gapkernels.global_max_pool(x, backend="triton")
    (grad,) = torch.autograd.grad(out.nansum(), x)
    ref_x = x.detach().clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(gapkernels.reference.global_max_pool(ref_x).nansum(), ref_x)
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("path", ["small", "ncs_split", "nsc_split"])
@pytest.mark.parametrize("op,kind", [("mixed", "channel"), ("gem", "channel")])
def test_bitwise_deterministic(path, op, kind, gen):
    shape, layout = {"small": ((2, 5, 3, 4), "channels_last"), **PATH_SHAPES}[path]
    x, input_fmt = _inputs(shape, torch.float32, layout, op, gen)
    first = _forward_backward(op, kind, x, input_fmt, "triton", gen)
    second = _forward_backward(op, kind, x, input_fmt, "triton", gen)
    for a, b in zip(first, second, strict=True):
        assert_bitwise_equal(a, b)


def test_keepdim_and_empty_batch():
    x = torch.randn(2, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out = gapkernels.global_gem_pool(x.abs(), keepdim=True, backend="triton")
    assert out.shape == (2, 3, 1, 1)
    assert_close(out, gapkernels.reference.global_gem_pool(x.abs(), keepdim=True), x.dtype)
    empty = gapkernels.global_max_pool(
        torch.randn(0, 3, 4, 5, device=DEVICE), True, backend="triton"
    )
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


def test_unavailable_reasons():
    assert gk_triton.unavailable_reason(torch.empty(1, 1, 1, device=DEVICE)) is None
    reason = gk_triton.unavailable_reason(torch.empty(1, 1, 1, dtype=torch.float64))
    assert "float64" in reason
    with pytest.raises(RuntimeError, match="float64"):
        gapkernels.global_avg_pool(torch.randn(1, 2, 3, dtype=torch.float64), backend="triton")
    assert "triton" in backends.available_backends(DEVICE)
    assert "CUDA" in _REASON


def test_op_schema_and_fake_kernels():
    schema = str(torch.ops.gapkernels_triton.pool_forward.default._schema)
    assert "Tensor? weight, float scalar, float eps, bool with_log" in schema
    x = torch.randn(2, 20, 3, device=DEVICE).transpose(1, 2)  # NSC view
    samples = [
        (x, 2, torch.full((3,), 0.3, device=DEVICE), 0.5, 0.0, False),
        (x.abs(), 4, torch.tensor([3.0], device=DEVICE), 3.0, 1e-6, True),
        (x.contiguous(), 1, None, 0.5, 0.0, False),
    ]
    # test_aot_dispatch_* would run the interpreter on fake tensors (see test_torch_compile).
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for args in samples:
        torch.library.opcheck(gk_triton.pool_forward, args, test_utils=checks)
        out, aux, indices = gk_triton.pool_forward(*args)
        grad_out = torch.randn_like(out)
        torch.library.opcheck(
            gk_triton.pool_backward,
            (grad_out, args[0], aux, indices, args[1], args[2], args[3], args[4]),
            test_utils=checks[:2],
        )


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(0.3))
        self.p = torch.nn.Parameter(torch.full((4,), 3.0))

    def forward(self, x):
        mixed = gapkernels.global_mixed_pool(x, self.alpha, backend="triton")
        gem = gapkernels.global_gem_pool(x.abs() + 0.1, self.p, backend="triton")
        return mixed + gem + gapkernels.global_avgmax_pool(x, backend="triton")


def test_torch_compile_fullgraph_traces_without_graph_breaks():
    """Dynamo traces the model in one graph through the fake kernels (backend="eager" runs
    the graph as traced; inductor is in test_torch_compile_inductor)."""
    head = _Head().to(DEVICE)
    x = torch.randn(2, 4, 3, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(head, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), head(x))
    compiled(x).sum().backward()
    assert head.alpha.grad is not None and head.p.grad is not None


def test_torch_compile_inductor():
    if gk_triton.INTERPRETED:
        pytest.skip(
            "under TRITON_INTERPRET=1, torch.library.wrap_triton returns the "
            "InterpretedFunction unwrapped, so AOTAutograd's decomposition of a triton_op "
            "runs the interpreter on fake tensors; this test runs on a GPU only"
        )
    head = _Head().to(DEVICE)
    x = torch.randn(2, 4, 3, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(head, fullgraph=True)
    torch.testing.assert_close(compiled(x), head(x))
    compiled(x).sum().backward()


def _fake_results():
    rows = []
    for dtype in ("float32", "bfloat16"):
        for layout in ("contiguous", "channels_last"):
            for size, cuda_s, triton_s in ((4096, 1.0, 2.0), (2**20, 1.0, 0.5), (2**26, 3.0, 1.0)):
                for _op in ("avg", "max"):
                    rows.append(
                        dict(dtype=dtype, layout=layout, bytes=size, backend="cuda", time_s=cuda_s)
                    )
                    rows.append(
                        dict(
                            dtype=dtype,
                            layout=layout,
                            bytes=size,
                            backend="triton",
                            time_s=triton_s,
                        )
                    )
                    rows.append(
                        dict(dtype=dtype, layout=layout, bytes=size, backend="eager", time_s=0.1)
                    )
    return rows


def test_auto_table_from_fake_results(tmp_path):
    data = auto_table.table_from_results(_fake_results(), measured_on="a fake GPU")
    path = tmp_path / "auto_table.json"
    auto_table.write(data, str(path))
    measured_on, table = auto_table.load(str(path))
    assert measured_on == "a fake GPU"
    assert "NOT MEASURED" not in data["note"]
    assert ("float32", "contiguous", 2**20, ("triton", "cuda")) in table
    assert ("float32", "contiguous", 0, ("cuda", "triton")) in table
    assert table[-1] == ("*", "*", 0, ("cuda", "triton"))
    for dtype, layout, min_bytes, order in table:
        assert isinstance(dtype, str) and isinstance(layout, str) and isinstance(min_bytes, int)
        assert set(order) <= set(backends.BACKENDS) and "eager" not in order
    for i, (dtype, layout, min_bytes, _) in enumerate(table[:-1]):
        later = [r for r in table[i + 1 :] if r[:2] == (dtype, layout)]
        assert all(r[2] < min_bytes for r in later), "larger thresholds must come first"
    assert auto_table.MEASURED_ON is None
    assert auto_table.load() == (None, auto_table.CUDA_TABLE)


# ---------------------------------------------------------------------------------------------
# Stable GeM (docs/DESIGN.md "Modes"): statistics relative to the row maximum.

GEM_PATHS = {
    "small": ((2, 4, 5, 6), "contiguous"),
    "small_nsc": ((2, 4, 5, 6), "channels_last"),
    "ncs_split": ((1, 4, 96, 96), "contiguous"),
    "nsc_split": ((1, 4, 128, 130), "channels_last"),
}


def test_gem_paths_take_their_paths():
    for path, (shape, layout) in GEM_PATHS.items():
        n, c, s = shape[0], shape[1], shape[2] * shape[3]
        split = configs.forward_config(n, c, s, layout == "channels_last").s_programs > 1
        assert split == path.endswith("split"), path


def _gem_input(shape, layout, gen, dtype=torch.float32, large=1e30):
    """Channel 0 dead (all zeros), 1 large (x**p overflows float32 for p >= 2), 2 constant 3,
    3 random with values below eps (clamped) and above; more channels random."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    x[:, 0] = 0.0
    x[:, 1] = (x[:, 1].abs() + 0.5) * large
    x[:, 2] = 3.0
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _gem_p(kind, channels):
    if kind == "float":
        return 90.0
    return torch.linspace(1.0, 100.0, channels, dtype=torch.float32).to(DEVICE)


def _gem_triton_and_reference(x, p, eps=1e-6):
    """(out, grad_x, grad_p) from the Triton backend and from the reference in float64."""
    x = x.detach().requires_grad_()
    p_t = p.detach().clone().requires_grad_() if isinstance(p, torch.Tensor) else p
    out = gapkernels.global_gem_pool(x, p_t, eps, backend="triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad(out, [x] + ([p_t] if isinstance(p, torch.Tensor) else []), g)
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_() if isinstance(p, torch.Tensor) else p
    ref = reference.global_gem_pool(x64, p64, eps)
    ref_grads = torch.autograd.grad(
        ref, [x64] + ([p64] if isinstance(p, torch.Tensor) else []), g.double()
    )
    return (out, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("p_kind", ["float", "channel"])
@pytest.mark.parametrize("path", GEM_PATHS)
def test_gem_stable_against_float64_reference(path, p_kind, gen):
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen)
    p = _gem_p(p_kind, shape[1])
    (out, grad_x, *grad_p), (ref, ref_grad_x, *ref_grad_p) = _gem_triton_and_reference(x, p)
    for t in (out, grad_x, *grad_p):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out, ref.float(), rtol=2e-5, atol=0)
    assert torch.equal(out[:, 2], torch.full_like(out[:, 2], 3.0)), "x = 3 gives 3 for any p"
    torch.testing.assert_close(out[:, 0], torch.full_like(out[:, 0], 1e-6), rtol=1e-6, atol=0)
    # grad_x: (x/M)**(p-1) with p up to 100, a few float32 roundings of the exponent
    scale = ref_grad_x.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(grad_x.double() / scale, ref_grad_x / scale, rtol=1e-4, atol=1e-6)
    assert (grad_x[:, 0] == 0).all(), "a dead channel gets no gradient"
    if grad_p:
        torch.testing.assert_close(grad_p[0].double(), ref_grad_p[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["small", "nsc_split"])
def test_gem_stable_half_precision(path, dtype, gen):
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen, dtype, large=5e3 if dtype == torch.float16 else 1e30)
    (out, grad_x, grad_p), (ref, ref_grad_x, ref_grad_p) = _gem_triton_and_reference(
        x, _gem_p("channel", shape[1])
    )
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    assert_close(out, ref.to(dtype), dtype)
    assert (out[:, 2] == 3).all()
    scale = ref_grad_x.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(
        grad_x.double() / scale, ref_grad_x / scale, rtol=TOL_HALF[dtype], atol=TOL_HALF[dtype]
    )
    torch.testing.assert_close(grad_p.double(), ref_grad_p, rtol=1e-3, atol=1e-5)


TOL_HALF = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("p", [1.0, 3.0, 100.0])
@pytest.mark.parametrize("path", GEM_PATHS)
def test_gem_aux_is_the_contract(path, p, gen):
    """aux = [M, r, l] (with_log) or [M, r]: M = max clamp(x, eps), r = mean (y/M)**p,
    l = mean (y/M)**p * log(y/M), on the op itself."""
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen)
    x3 = x.flatten(2) if layout == "contiguous" else x.permute(0, 2, 3, 1).flatten(1, 2).mT
    y = x3.double().clamp(min=torch.tensor(1e-6).item())
    y = torch.where(x3.double() < 1e-6, torch.tensor(1e-6, dtype=torch.float32).double(), y)
    big_m = y.amax(dim=2)
    z = y / big_m[..., None]
    r = z.pow(p).mean(dim=2)
    lg = (z.pow(p) * z.log()).mean(dim=2)
    for with_log in (False, True):
        out, aux, _ = gk_triton.pool_forward(x3, 4, None, p, 1e-6, with_log)
        assert aux.shape == (*x3.shape[:2], 3 if with_log else 2) and aux.dtype == torch.float32
        torch.testing.assert_close(aux[..., 0].double(), big_m, rtol=0, atol=0)
        torch.testing.assert_close(aux[..., 1].double(), r, rtol=2e-5, atol=1e-9)
        if with_log:
            torch.testing.assert_close(aux[..., 2].double(), lg, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out.double(), big_m * r.pow(1 / p), rtol=2e-5, atol=0)


def test_gem_nan_and_inf():
    """NaN propagates to out; +inf gives +inf (out = M); NaN x gets a zero gradient."""
    x = torch.rand(2, 3, 4, 5, device=DEVICE) + 0.5
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 3, 3] = float("inf")
    x.requires_grad_()
    out = gapkernels.global_gem_pool(x, 3.0, backend="triton")
    assert torch.isnan(out[0, 0]) and out[0, 1] == float("inf")
    ref = reference.global_gem_pool(x.detach(), 3.0)
    assert_close(out.detach(), ref, torch.float32)
    (grad,) = torch.autograd.grad(out[1].sum(), x)
    assert grad[0, 0, 1, 2] == 0
    assert torch.isfinite(grad[1]).all()


# ---------------------------------------------------------------------------------------------
# Weights of any strides (issue 13.2): the op reads them through their stride.


def _weights(mode, c):
    base = 0.3 if mode == 2 else 2.5
    wide = base + 0.2 * torch.rand(2 * c + 1, generator=torch.Generator().manual_seed(4))
    wide = wide.to(DEVICE)
    return {
        "expanded": torch.tensor(base, device=DEVICE).expand(c),
        "slice": wide[::2][:c],
        "offset_slice": wide[1::2][:c],
        "one_of_slice": wide[3:4],
    }


@pytest.mark.parametrize("kind", ["expanded", "slice", "offset_slice", "one_of_slice"])
@pytest.mark.parametrize("mode", [2, 4], ids=["mixed", "gem"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_op_reads_weights_of_any_strides(layout, mode, kind, gen):
    x, _ = make_input((2, 5, 3, 4), torch.float32, layout, DEVICE, gen, positive=True)
    x3 = x.flatten(2) if layout == "contiguous" else x.permute(0, 2, 3, 1).flatten(1, 2).mT
    weight = _weights(mode, 5)[kind]
    assert not weight.is_contiguous() or weight.storage_offset()
    dense = weight.contiguous()
    got = gk_triton.pool_forward(x3, mode, weight, 0.5, 1e-6, True)
    want = gk_triton.pool_forward(x3, mode, dense, 0.5, 1e-6, True)
    for a, b in zip(got, want, strict=True):
        assert_bitwise_equal(a, b)
    grad_out = torch.randn(got[0].shape, generator=gen).to(got[0])
    grad = gk_triton.pool_backward(grad_out, x3, got[1], got[2], mode, weight, 0.5, 1e-6)
    want_grad = gk_triton.pool_backward(grad_out, x3, want[1], want[2], mode, dense, 0.5, 1e-6)
    assert_bitwise_equal(grad, want_grad)


@pytest.mark.parametrize("op", ["mixed", "gem"])
def test_functional_with_expanded_and_sliced_weights(op, gen):
    x, _ = make_input((2, 6, 3, 4), torch.float32, "contiguous", DEVICE, gen, positive=True)
    for make in (
        lambda: torch.tensor(0.7, device=DEVICE).expand(6),
        lambda: (torch.arange(12, device=DEVICE, dtype=torch.float32) / 24 + 0.5)[::2],
    ):
        w = make().detach().requires_grad_()
        w_dense = w.detach().contiguous().requires_grad_()
        if op == "gem":
            w, w_dense = (w * 4).detach().requires_grad_(), (w_dense * 4).detach().requires_grad_()
        out = run_op(op, x, w, "triton")
        ref = run_op(op, x, w_dense, "reference")
        assert_close(out, ref, torch.float32)
        (g,) = torch.autograd.grad(out.sum(), w)
        (g_ref,) = torch.autograd.grad(ref.sum(), w_dense)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 64-bit index arithmetic (issue 13.1): the kernels' helpers, run on shapes past 2**31 without
# allocating them.


@triton.jit
def _index_probe_kernel(
    out_ptr,
    pid_rows,
    pid_s,
    N,
    C,
    S,
    per_program,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    row, channel, row_mask, base = tk._row_block(pid_rows, N, C, S, ROWS, CHANNELS_LAST, INDEX_64)
    s_begin, s_end = tk._piece(pid_s, per_program, S, INDEX_64)
    s = s_end - BLOCK_S + tl.arange(0, BLOCK_S)  # the piece's last BLOCK_S offsets
    offsets = tk._offsets(base, s, C, CHANNELS_LAST)
    lane = tl.arange(0, ROWS)
    tl.store(out_ptr + lane, row)
    tl.store(out_ptr + ROWS + lane, channel)
    tl.store(out_ptr + 2 * ROWS + lane, row_mask.to(tl.int64))
    tl.store(out_ptr + 3 * ROWS + lane, row + (row - channel))  # CAT's output offset
    tl.store(out_ptr + 4 * ROWS, s_begin)
    tl.store(out_ptr + 4 * ROWS + 1, s_end)
    tile = tl.arange(0, ROWS)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    tl.store(out_ptr + 4 * ROWS + 2 + tile, offsets)


def _expected_indices(pid_rows, pid_s, n, c, s, per_program, rows, block_s, channels_last):
    """The same quantities in Python's exact integers."""
    lane = torch.arange(rows, dtype=torch.int64)
    if channels_last:
        blocks = -(-c // rows)
        sample = pid_rows // blocks
        channel = (pid_rows % blocks) * rows + lane
        row = sample * c + channel
        mask = channel < c
        base = sample * s * c + channel
    else:
        row = pid_rows * rows + lane
        channel = row % c
        mask = row < n * c
        base = row * s
    s_begin = pid_s * per_program
    s_end = min(s, s_begin + per_program)
    offs = torch.arange(s_end - block_s, s_end, dtype=torch.int64)
    offsets = base[:, None] + (offs[None, :] * c if channels_last else offs[None, :])
    return torch.cat(
        [
            row,
            channel,
            mask.long(),
            2 * row - channel,
            torch.tensor([s_begin, s_end]),
            offsets.flatten(),
        ]
    )


# (N, C, S, layout): a row of 2**31 + 2**24 elements (issue 13's (1, 1, 2**16, 2**15 + 2**8)),
# N*S*C past 2**32 in NSC, N*C past 2**31 (and 2*N*C for CAT) in both layouts.
BIG_SHAPES = {
    "row_2e31_ncs": (1, 1, 2**16 * (2**15 + 2**8), False),
    "row_2e31_nsc": (1, 24, 2**31 + 2**24, True),
    "sample_2e33_nsc": (2, 4096, 2**20, True),
    "rows_2e31_ncs": (2**20, 2**11 + 3, 4, False),
    "rows_2e31_nsc": (2**20, 2**11 + 3, 4, True),
}


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("shape", BIG_SHAPES)
def test_index_arithmetic_past_2e31(shape, which):
    n, c, s, channels_last = BIG_SHAPES[shape]
    choose = configs.forward_config if which == "forward" else configs.backward_config
    config = choose(n, c, s, channels_last)
    rows, block_s = config.rows, min(config.block_s, s)
    largest = 0
    for pid_rows in (config.row_programs - 1, config.row_programs // 2):
        for pid_s in (config.s_programs - 1, config.s_programs // 2):
            want = _expected_indices(
                pid_rows, pid_s, n, c, s, config.s_per_program, rows, block_s, channels_last
            )
            got = torch.full_like(want, -7).to(DEVICE)
            _index_probe_kernel[(1,)](
                got,
                pid_rows,
                pid_s,
                n,
                c,
                s,
                config.s_per_program,
                ROWS=rows,
                BLOCK_S=block_s,
                CHANNELS_LAST=channels_last,
                INDEX_64=tpool.index_64(n, c, s, config),
            )
            assert torch.equal(got.cpu(), want), (shape, which, pid_rows, pid_s)
            largest = max(largest, int(want.max()))
    assert largest >= 2**31, "the shape must take the index math past 2**31"


def test_index_64_when_indices_could_wrap():
    """INDEX_64 (int64 rows, spatial offsets and arg-max lanes) whenever a spatial offset, a
    piece's end or the loop's last step, or a row-indexed offset (3 aux columns, CAT's 2C)
    could pass 2**31 - 1; int32 (fewer registers) below."""
    for choose in (configs.forward_config, configs.backward_config):
        for n, c, s, cl in [
            (1, 1, 2**31 - 1, False),
            (1, 1, 2**31 - 2000, False),
            (1, 24, 2**31 - 100, True),
            (1, 1, 2**31 + 2**24, False),
            (2**20, 2**11 + 3, 4, False),
            (2**20, 2**11 + 3, 4, True),
            (2**29, 2, 1, False),
            (716_000_000, 1, 1, False),
        ]:
            assert tpool.index_64(n, c, s, choose(n, c, s, cl)), (n, c, s, cl)
        for n, c, s, cl in [
            (2, 3, 2**20, False),
            (8, 2048, 49, True),
            (1, 2, 2**29, False),
            (2**18, 2048, 1, False),
            (700_000_000, 1, 1, False),
        ]:
            assert not tpool.index_64(n, c, s, choose(n, c, s, cl)), (n, c, s, cl)


# ---------------------------------------------------------------------------------------------
# Device guard (issue 13.3): every launch runs with x's CUDA device current.


def test_device_guard_selects_the_tensors_device():
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    guard = tpool._device_of(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(tpool._device_of(torch.empty(1)), contextlib.nullcontext)


def test_every_launch_runs_under_the_device_guard(monkeypatch, gen):
    depth = [0]
    launches = []

    @contextlib.contextmanager
    def guard(x):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_wrap = tpool.wrap_triton

    class _Recording:
        def __init__(self, kernel):
            self.kernel, self.wrapped = kernel, real_wrap(kernel)

        def __getitem__(self, grid):
            launch = self.wrapped[grid]

            def run(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, depth[0]))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(tpool, "_device_of", guard)
    monkeypatch.setattr(tpool, "wrap_triton", _Recording)
    for shape, layout in (PATH_SHAPES["ncs_split"], ((2, 3, 4, 5), "channels_last")):
        x, _ = make_input(shape, torch.float32, layout, DEVICE, gen, positive=True)
        x3 = x.flatten(2) if layout == "contiguous" else x.permute(0, 2, 3, 1).flatten(1, 2).mT
        for mode in (2, 4):
            out, aux, indices = gk_triton.pool_forward(x3, mode, None, 0.5, 1e-6, True)
            gk_triton.pool_backward(torch.ones_like(out), x3, aux, indices, mode, None, 0.5, 1e-6)
    names = {name for name, _ in launches}
    assert names == {"pool_forward_kernel", "pool_combine_kernel", "pool_backward_kernel"}
    assert all(d == 1 for _, d in launches), launches


@pytest.mark.skipif(
    gk_triton.INTERPRETED or torch.cuda.device_count() < 2,
    reason="needs 2 or more GPUs and compiled (not interpreted) kernels",
)
def test_tensor_on_a_second_gpu(gen):
    torch.cuda.set_device(0)
    for layout in ("contiguous", "channels_last"):
        x, _ = make_input((2, 6, 40, 50), torch.float32, layout, "cuda:1", gen, positive=True)
        x.requires_grad_()
        for op, kind in (("mixed", "channel"), ("gem", "channel"), ("max", "none")):
            w = make_weight(op, kind, 6, "cuda:1", gen=gen)
            out = run_op(op, x, w, "triton")
            assert out.device == x.device and torch.cuda.current_device() == 0
            ref = run_op(op, x.detach().cpu(), None if w is None else w.detach().cpu(), "reference")
            assert_close(out.detach().cpu(), ref, torch.float32)
            (grad,) = torch.autograd.grad(out.sum(), x)
            torch.cuda.synchronize(1)
            assert grad.device == x.device and torch.isfinite(grad).all()
