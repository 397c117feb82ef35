"""What of the C++ CUDA token kernels runs without a GPU: the CUDA library registers them, their
argument checks give the CPU token kernels' messages word for word (the CUDA kernel is called on
CPU and meta tensors through OpOverload.redispatch, as tests/test_stable_cuda_lib.py does for
the pooling ops; a valid call stops at "x must be a CUDA tensor" before anything touches CUDA),
and the backend choice for token calls. The kernels themselves: tests/test_tokens_cuda.py."""

from __future__ import annotations

import pytest
import torch
from cuda_common import CUDA_KEY, assert_same_check_message

from gapkernels import backends, tokens

AVG, MAX, MIXED, CAT, GEM = range(5)

needs_kernels = pytest.mark.skipif(
    not (tokens._cpu_token_kernels() and tokens._cuda_token_kernels()),
    reason="this build has no CUDA token kernels (no CUDA library, or a CPU-only torch)",
)


def _x(n=2, c=3, s=4):
    return torch.rand(n, c, s)


def _spans(rows=2, s=4):
    return torch.tensor([[1, s, s - 1, 0]] * rows)


def _packed(c=3, total=4):
    """A packed (total, C) batch as the (1, C, total) NSC view."""
    return torch.rand(1, total, c).transpose(1, 2)


def _forward(x=None, spans=None, mask=None, varlen=False, mode=AVG):
    x = _x() if x is None else x
    return (x, _spans() if spans is None else spans, mask, varlen, mode, None, 0.5, 1e-6, False)


FORWARD_CASES = {  # id: token_pool_forward's arguments, message fragment
    "x_mode": (lambda: _forward(mode=7), "mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat)"),
    "spans_dtype": (
        lambda: _forward(spans=_spans().int()),
        "spans must be int64 (B, 4), got Int [2, 4]",
    ),
    "spans_shape": (lambda: _forward(spans=_spans()[:, :3]), "got Long [2, 3]"),
    "spans_strides": (
        lambda: _forward(spans=_spans().t().contiguous().t()),
        "spans must be contiguous on cpu",
    ),
    "spans_device": (
        lambda: _forward(spans=_spans().to("meta")),
        "spans must be contiguous on cpu",
    ),
    "spans_rows": (lambda: _forward(spans=_spans(3)), "spans must have N=2 rows, got 3"),
    "varlen_samples": (
        lambda: _forward(varlen=True),
        "varlen takes x as (1, C, total) and no mask",
    ),
    "varlen_mask": (
        lambda: _forward(_packed(), _spans(1), torch.ones(1, 4, dtype=torch.bool), True),
        "varlen takes x as (1, C, total) and no mask",
    ),
    "varlen_strides": (
        lambda: _forward(_x(1), _spans(1), None, True),
        "varlen takes the packed (total, C) batch as (1, C, total) with NSC strides",
    ),
    "mask_dtype": (
        lambda: _forward(mask=torch.ones(2, 4, dtype=torch.uint8)),
        "mask must be a contiguous bool (2, 4) tensor on cpu, got Byte [2, 4] on cpu",
    ),
    "mask_shape": (
        lambda: _forward(mask=torch.ones(2, 3, dtype=torch.bool)),
        "got Bool [2, 3] on cpu",
    ),
    "mask_strides": (
        lambda: _forward(mask=torch.ones(4, 2, dtype=torch.bool).t()),
        "mask must be a contiguous bool (2, 4) tensor on cpu, got Bool [2, 4] on cpu",
    ),
    "mask_device": (
        lambda: _forward(mask=torch.ones(2, 4, dtype=torch.bool, device="meta")),
        "got Bool [2, 4] on meta",
    ),
}


@needs_kernels
@pytest.mark.parametrize("case", FORWARD_CASES, ids=list(FORWARD_CASES))
def test_token_forward_checks_give_the_cpu_kernels_messages(case):
    make, fragment = FORWARD_CASES[case]
    assert_same_check_message(torch.ops.gapkernels.token_pool_forward.default, make(), fragment)


def _backward(mode=GEM, **change):
    x, spans = _x(), _spans()
    out, aux, indices = torch.ops.gapkernels.token_pool_forward(
        x, spans, None, False, mode, None, 3.0, 1e-6, True
    )
    args = {"grad_out": torch.ones_like(out), "x": x, "spans": spans, "mask": None}
    args.update(varlen=False, aux=aux, indices=indices)
    args.update({k: v() for k, v in change.items()})
    return (*args.values(), mode, None, 3.0, 1e-6)


BACKWARD_CASES = {  # id: token_pool_backward's arguments, message fragment
    "spans": (
        lambda: _backward(spans=lambda: _spans().int()),
        "spans must be int64 (B, 4), got Int [2, 4]",
    ),
    "grad_shape": (
        lambda: _backward(CAT, grad_out=lambda: torch.ones(2, 3)),
        "grad_out must be contiguous Float (2, 6), got [2, 3]",
    ),
    "grad_dtype": (
        lambda: _backward(grad_out=lambda: torch.ones(2, 3, dtype=torch.float64)),
        "grad_out must be contiguous Float (2, 3), got [2, 3]",
    ),
    "grad_strides": (
        lambda: _backward(grad_out=lambda: torch.ones(3, 2).t()),
        "grad_out must be contiguous Float (2, 3), got [2, 3]",
    ),
    "grad_device": (
        lambda: _backward(grad_out=lambda: torch.ones(2, 3, device="meta")),
        "grad_out must be contiguous Float (2, 3), got [2, 3]",
    ),
    "indices": (
        lambda: _backward(MAX, indices=lambda: torch.zeros(2, 3, dtype=torch.int32)),
        "indices must be the int64 (B, C) tensor token_pool_forward returned",
    ),
    "aux": (
        lambda: _backward(aux=lambda: torch.zeros(2, 3, 1)),
        "aux must be the (B, C, K>=2) tensor token_pool_forward returned",
    ),
}


@needs_kernels
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=list(BACKWARD_CASES))
def test_token_backward_checks_give_the_cpu_kernels_messages(case):
    make, fragment = BACKWARD_CASES[case]
    assert_same_check_message(torch.ops.gapkernels.token_pool_backward.default, make(), fragment)


@needs_kernels
def test_valid_cpu_tensors_stop_at_the_device_check():
    fwd = torch.ops.gapkernels.token_pool_forward.default
    mask = torch.rand(2, 4) > 0.5
    for args in (_forward(mask=mask, mode=MIXED), _forward(_packed(), _spans(1), None, True, MAX)):
        with pytest.raises(
            RuntimeError, match=r"^gapkernels::token_pool_forward: x must be a CUDA t"
        ):
            fwd.redispatch(CUDA_KEY, *args)
    bwd = torch.ops.gapkernels.token_pool_backward.default
    with pytest.raises(RuntimeError, match=r"^gapkernels::token_pool_backward: x must be a CUDA"):
        bwd.redispatch(CUDA_KEY, *_backward(MAX))


# --- the backend choice -----------------------------------------------------------------------


@pytest.mark.parametrize("has_token_kernels", [True, False])
@pytest.mark.parametrize("triton_reason", [None, "no Triton"])
def test_auto_on_cuda_follows_the_pooling_choice(monkeypatch, has_token_kernels, triton_reason):
    """auto on a CUDA tensor takes gapkernels.backends' choice; a CUDA library without token
    kernels gives way to Triton, or to the composite where Triton cannot run."""
    for choice in ("cuda", "triton", "reference"):
        monkeypatch.setattr(backends, "resolve", lambda *a, choice=choice, **k: choice)
        monkeypatch.setattr(tokens, "_cuda_token_kernels", lambda: has_token_kernels)
        monkeypatch.setattr(backends, "unavailable_reason", lambda name, x: triton_reason)
        got = tokens._auto_on_cuda(torch.empty(1, 1, 1), "NCHW", "fn")
        if choice != "cuda" or has_token_kernels:
            assert got == choice
        else:
            assert got == ("triton" if triton_reason is None else "reference")
