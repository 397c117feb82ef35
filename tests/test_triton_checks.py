"""The Triton ops, called directly, refuse bad arguments before any kernel runs, with the checks
and messages of csrc/ops.cpp (gapkernels/triton/checks.py); where the C++ extension is built,
its ops give the same message for the same arguments."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # As in test_triton.py: without a GPU the kernels can only run in the interpreter, and
    # whichever test file imports gapkernels.triton first fixes that for the whole session.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gapkernels import _ext  # noqa: E402

gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")
from gapkernels.triton import checks  # noqa: E402

DEVICE = "cpu" if gk_triton.INTERPRETED else "cuda"
AVG, MAX, MIXED, CAT, GEM = range(5)


def _x(n=2, c=3, s=4, dtype=torch.float32):
    return torch.rand(n, c, s, dtype=dtype, device=DEVICE) + 0.5


def _w(c=3, dtype=torch.float32, device=DEVICE):
    return torch.full((c,), 0.5, dtype=dtype, device=device)


def _forward_ok(x, mode, weight=None, with_log=False):
    return gk_triton.pool_forward(x, mode, weight, 0.5, 1e-6, with_log)


# (id, args of pool_forward, exception, message fragment)
FORWARD_CASES = [
    (
        "mode_negative",
        lambda: (_x(), -1, None),
        RuntimeError,
        "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got -1",
    ),
    (
        "mode_too_large",
        lambda: (_x(), 5, None),
        RuntimeError,
        "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got 5",
    ),
    (
        "rank_2",
        lambda: (_x()[0], AVG, None),
        RuntimeError,
        "x must be the 3-D (N, C, S) view, got 2 dims",
    ),
    (
        "rank_4",
        lambda: (_x()[..., None], MAX, None),
        RuntimeError,
        "x must be the 3-D (N, C, S) view, got 4 dims",
    ),
    (
        "int_dtype",
        lambda: (torch.ones(2, 3, 4, dtype=torch.int32, device=DEVICE), AVG, None),
        RuntimeError,
        "x must be float16, bfloat16, float32 or float64, got Int",
    ),
    (
        "bool_dtype",
        lambda: (torch.ones(2, 3, 4, dtype=torch.bool, device=DEVICE), MAX, None),
        RuntimeError,
        "x must be float16, bfloat16, float32 or float64, got Bool",
    ),
    (
        "complex_dtype",
        lambda: (torch.ones(2, 3, 4, dtype=torch.complex64, device=DEVICE), AVG, None),
        RuntimeError,
        "x must be float16, bfloat16, float32 or float64, got ComplexFloat",
    ),
    ("empty_spatial", lambda: (_x(s=0), AVG, None), RuntimeError, "the spatial size S must be > 0"),
    (
        "empty_spatial_empty_batch",
        lambda: (_x(n=0, s=0), GEM, None),
        RuntimeError,
        "the spatial size S must be > 0",
    ),
    (
        "strides_neither_ncs_nor_nsc",
        lambda: (_x(s=8)[..., ::2], AVG, None),
        RuntimeError,
        "x must have NCS (contiguous) or NSC (channels_last) strides, got [24, 8, 2]",
    ),
    (
        "strides_transposed_batch",
        lambda: (_x(n=2, c=3, s=4).transpose(0, 1), MAX, None),
        RuntimeError,
        "x must have NCS (contiguous) or NSC (channels_last) strides",
    ),
    (
        "weight_2d",
        lambda: (_x(), MIXED, _w()[None]),
        RuntimeError,
        "weight must be 1-D with 1 or C=3 elements, got shape [1, 3]",
    ),
    (
        "weight_0d",
        lambda: (_x(), GEM, torch.tensor(3.0, device=DEVICE)),
        RuntimeError,
        "weight must be 1-D with 1 or C=3 elements, got shape []",
    ),
    (
        "weight_wrong_numel",
        lambda: (_x(), GEM, _w(c=2)),
        RuntimeError,
        "weight must be 1-D with 1 or C=3 elements, got shape [2]",
    ),
    (
        "weight_float64",
        lambda: (_x(), MIXED, _w(dtype=torch.float64)),
        RuntimeError,
        "weight must be Float for x of Float, got Double",
    ),
    (
        "weight_half_for_half_x",
        lambda: (_x(dtype=torch.float16), GEM, _w(dtype=torch.float16)),
        RuntimeError,
        "weight must be Float for x of Half, got Half",
    ),
    (
        "weight_on_another_device",
        lambda: (_x(), MIXED, _w(device="meta")),
        RuntimeError,
        f"weight is on meta, x on {torch.device(DEVICE)}",
    ),
]


def _on_meta(*tensors) -> bool:
    return any(t is not None and t.device.type == "meta" for t in tensors)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_refuses(case):
    _, make, exc, message = case
    x, mode, weight = make()
    with pytest.raises(exc) as info:
        if _on_meta(x, weight):
            # The dispatcher sends a call with a meta tensor to the fake kernel (which checks
            # no devices): the op's own checks, which a call with a CPU and a CUDA tensor
            # reaches (test_forward_refuses_tensors_on_two_devices), are called directly.
            checks.check_forward_inputs(x, mode, weight)
        else:
            _forward_ok(x, mode, weight)
    assert str(info.value).startswith("gapkernels_triton::pool_forward: ")
    assert message in str(info.value)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (compiled kernels)")
def test_forward_refuses_tensors_on_two_devices():
    with pytest.raises(RuntimeError, match="pool_forward: weight is on cpu, x on cuda:0"):
        _forward_ok(_x(), MIXED, _w(device="cpu"))
    out, aux, indices = _forward_ok(_x(), MAX)
    with pytest.raises(RuntimeError, match="pool_backward: every tensor must be on cuda:0"):
        gk_triton.pool_backward(
            torch.ones_like(out), _x(), aux, indices.cpu(), MAX, None, 0.5, 1e-6
        )


def test_forward_refuses_float64_and_says_where_it_runs():
    with pytest.raises(
        TypeError,
        match=r"pool_forward: x must be float16, bfloat16 or float32 "
        r"\(the Triton kernels accumulate in float32\), got "
        r"Double; the cuda and cpu backends take float64",
    ):
        _forward_ok(_x(dtype=torch.float64), AVG)


def test_forward_ignores_weight_of_modes_without_one():
    """As the C++ ops: AVG, MAX and CAT never look at weight (nor check it)."""
    for mode in (AVG, MAX, CAT):
        out, _, _ = _forward_ok(_x(), mode, torch.ones(7, 7, dtype=torch.float64))
        assert out.shape[0] == 2


def _backward_args(base_mode, **change):
    """Valid pool_backward arguments from a real forward, with `change` applied."""
    mode = base_mode
    x = _x()
    weight = _w() if mode in (MIXED, GEM) else None
    out, aux, indices = _forward_ok(x, mode, weight, with_log=mode == GEM)
    args = dict(
        grad_out=torch.ones_like(out),
        x=x,
        aux=aux,
        indices=indices,
        mode=mode,
        weight=weight,
        scalar=0.5,
        eps=1e-6,
    )
    args.update({k: (v(args) if callable(v) else v) for k, v in change.items()})
    return args


BACKWARD_CASES = [
    (
        "mode",
        MAX,
        dict(mode=7),
        "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got 7",
    ),
    ("x_rank", AVG, dict(x=lambda a: a["x"][0]), "x must be the 3-D (N, C, S) view, got 2 dims"),
    (
        "x_strides",
        AVG,
        dict(x=lambda a: a["x"].transpose(0, 1)),
        "x must have NCS (contiguous) or NSC (channels_last) strides",
    ),
    (
        "weight_shape",
        MIXED,
        dict(weight=_w(c=4)),
        "weight must be 1-D with 1 or C=3 elements, got shape [4]",
    ),
    (
        "grad_out_shape",
        AVG,
        dict(grad_out=lambda a: a["grad_out"][:, :2]),
        "grad_out must be (2, 3), got [2, 2]",
    ),
    (
        "grad_out_shape_cat",
        CAT,
        dict(grad_out=lambda a: a["grad_out"][:, :3]),
        "grad_out must be (2, 6), got [2, 3]",
    ),
    (
        "grad_out_rank",
        MAX,
        dict(grad_out=lambda a: a["grad_out"][..., None]),
        "grad_out must be (2, 3), got [2, 3, 1]",
    ),
    (
        "grad_out_dtype",
        AVG,
        dict(grad_out=lambda a: a["grad_out"].half()),
        "grad_out must be Float, got Half",
    ),
    (
        "grad_out_strides",
        MIXED,
        dict(grad_out=lambda a: torch.ones(3, 2, device=DEVICE).t()),
        "grad_out must be contiguous",
    ),
    (
        "grad_out_device",
        AVG,
        dict(grad_out=lambda a: a["grad_out"].to("meta")),
        f"every tensor must be on {torch.device(DEVICE)}",
    ),
    (
        "aux_device",
        GEM,
        dict(aux=lambda a: a["aux"].to("meta")),
        f"every tensor must be on {torch.device(DEVICE)}",
    ),
    (
        "indices_device",
        MAX,
        dict(indices=lambda a: a["indices"].to("meta")),
        f"every tensor must be on {torch.device(DEVICE)}",
    ),
    (
        "indices_dtype",
        MAX,
        dict(indices=lambda a: a["indices"].int()),
        "indices must be contiguous int64 (N, C)",
    ),
    (
        "indices_shape",
        CAT,
        dict(indices=lambda a: a["indices"][:1]),
        "indices must be contiguous int64 (N, C)",
    ),
    (
        "indices_strides",
        MIXED,
        dict(indices=lambda a: torch.zeros(3, 2, dtype=torch.int64, device=DEVICE).t()),
        "indices must be contiguous int64 (N, C)",
    ),
    (
        "indices_empty",
        MAX,
        dict(indices=lambda a: a["indices"].new_empty(0)),
        "indices must be contiguous int64 (N, C)",
    ),
    (
        "aux_columns",
        GEM,
        dict(aux=lambda a: a["aux"][..., :1].contiguous()),
        "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    ),
    (
        "aux_dtype",
        GEM,
        dict(aux=lambda a: a["aux"].double()),
        "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    ),
    (
        "aux_strides",
        GEM,
        dict(aux=lambda a: a["aux"][..., :2]),
        "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    ),
    (
        "aux_shape",
        GEM,
        dict(aux=lambda a: a["aux"][:1]),
        "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
    ),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_refuses(case):
    _, mode, change, message = case
    args = _backward_args(mode, **change)
    with pytest.raises(RuntimeError) as info:
        if _on_meta(*(a for a in args.values() if isinstance(a, torch.Tensor))):
            checks.check_backward_inputs(
                args["grad_out"],
                args["x"],
                args["aux"],
                args["indices"],
                args["mode"],
                args["weight"],
            )
        else:
            gk_triton.pool_backward(**args)
    assert str(info.value).startswith("gapkernels_triton::pool_backward: ")
    assert message in str(info.value)


def test_backward_accepts_aux_without_log_and_weights_of_any_strides():
    """GeM's backward needs only M and r (K = 2); weights are read through their strides."""
    x = _x()
    p = torch.tensor(3.0, device=DEVICE).expand(3)
    out, aux, indices = _forward_ok(x, GEM, p, with_log=False)
    assert aux.shape == (2, 3, 2)
    grad = gk_triton.pool_backward(torch.ones_like(out), x, aux, indices, GEM, p, 0.5, 1e-6)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_empty_batch_is_checked_then_returns_without_a_launch():
    out, aux, indices = _forward_ok(_x(n=0), GEM, _w(), with_log=True)
    assert out.shape == (0, 3) and aux.shape == (0, 3, 3) and indices.shape == (0,)
    with pytest.raises(RuntimeError, match="weight must be 1-D"):
        _forward_ok(_x(n=0), GEM, _w(c=5))


# The same message from the C++ ops, where they are built. Not for tensors on the meta device:
# the dispatcher sends those calls to the fake kernel, which does not check devices.
SAME_DEVICE_FORWARD = [c for c in FORWARD_CASES if "device" not in c[0]]
SAME_DEVICE_BACKWARD = [c for c in BACKWARD_CASES if "device" not in c[0]]


def _on_cpu(t):
    """t on the CPU with t's sizes and strides (Tensor.cpu() makes a strided view contiguous,
    which the first GPU run found hiding the strides case from the C++ check)."""
    if t is None or t.device.type != "cuda":
        return t
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)


@pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", SAME_DEVICE_FORWARD, ids=[c[0] for c in SAME_DEVICE_FORWARD])
def test_forward_messages_match_the_cpp_ops(case):
    _, make, _, _ = case
    x, mode, weight = make()
    x, weight = _on_cpu(x), _on_cpu(weight)
    with pytest.raises(RuntimeError) as cpp:
        torch.ops.gapkernels.pool_forward(x, mode, weight, 0.5, 1e-6, False)
    with pytest.raises(RuntimeError) as ours:
        gk_triton.pool_forward(x, mode, weight, 0.5, 1e-6, False)
    tail = str(ours.value).split(": ", 1)[1]
    assert tail in str(cpp.value), (str(cpp.value), tail)


@pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", SAME_DEVICE_BACKWARD, ids=[c[0] for c in SAME_DEVICE_BACKWARD])
def test_backward_messages_match_the_cpp_ops(case):
    _, mode, change, _ = case
    args = _backward_args(mode, **change)
    with pytest.raises(RuntimeError) as cpp:
        torch.ops.gapkernels.pool_backward(*args.values())
    with pytest.raises(RuntimeError) as ours:
        gk_triton.pool_backward(**args)
    tail = str(ours.value).split(": ", 1)[1]
    assert tail in str(cpp.value), (str(cpp.value), tail)
