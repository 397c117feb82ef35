"""The Triton backend against gapkernels.reference, run on the CPU in Triton's interpreter (on a
GPU, compiled; the set-up is in tests/triton_common.py): every op, dtype, layout and code path,
torch's max rules, determinism, the op schema and fake kernels, torch.compile, and the `auto`
table. Stable GeM is in test_triton_gem.py, the launcher's arguments (weights of any strides,
64-bit indices, the device guard) in test_triton_launch.py."""

from __future__ import annotations

import pytest
import torch
from triton_common import (
    DEVICE,
    LAYOUTS,
    PATH_SHAPES,
    TRITON_DTYPES,
    TRITON_MARKS,
    check_against_reference,
    forward_backward,
    gk_triton,
    inputs,
)

import gapkernels
from gapkernels import auto_table, backends
from gapkernels.triton import configs
from helpers import OP_CASES, assert_bitwise_equal, assert_close

pytestmark = TRITON_MARKS


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,kind", OP_CASES)
def test_forward_backward_rank4(op, kind, layout, dtype, gen):
    x, input_fmt = inputs((2, 5, 3, 4), dtype, layout, op, gen)
    check_against_reference(op, kind, x, input_fmt, gen)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 2, 3, 2)], ids=["rank3", "rank5"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,kind", OP_CASES)
def test_forward_backward_rank3_rank5(op, kind, layout, shape, gen):
    x, input_fmt = inputs(shape, torch.float32, layout, op, gen)
    check_against_reference(op, kind, x, input_fmt, gen)


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
    x, input_fmt = inputs(shape, torch.float32, layout, op, gen)
    check_against_reference(op, kind, x, input_fmt, gen)


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
    x, input_fmt = inputs(shape, torch.float32, layout, op, gen)
    first = forward_backward(op, kind, x, input_fmt, "triton", gen)
    second = forward_backward(op, kind, x, input_fmt, "triton", gen)
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
    assert "CUDA" in gk_triton.unavailable_reason(torch.empty(1, device="meta"))


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
    _check_table_form(table)
    # The shipped table (measured on a GPU by --write-auto-table, or the unmeasured default) has
    # the same form and is what `auto` uses.
    measured_on, shipped = auto_table.load()
    assert (measured_on, shipped) == (auto_table.MEASURED_ON, auto_table.CUDA_TABLE)
    _check_table_form(shipped)


def _check_table_form(table):
    for dtype, layout, min_bytes, order in table:
        assert isinstance(dtype, str) and isinstance(layout, str) and isinstance(min_bytes, int)
        assert set(order) <= set(backends.BACKENDS) and "eager" not in order
    assert table[-1][:3] == ("*", "*", 0), "the last row catches every case"
    for i, (dtype, layout, min_bytes, _) in enumerate(table[:-1]):
        later = [r for r in table[i + 1 :] if r[:2] == (dtype, layout)]
        assert all(r[2] < min_bytes for r in later), "larger thresholds must come first"
