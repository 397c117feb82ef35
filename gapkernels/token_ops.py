"""The token op pair (schema, argument checks, fake kernels, autograd), shared by every backend
that implements it: the Triton ops `gapkernels_triton::token_pool_forward/backward` and the C++
ops `gapkernels::token_pool_forward/backward` (one pair, with CPU and CUDA kernels: backends
"cpu" and "cuda"), all with the same schema.

The kernels see one normalized form (docs/DESIGN.md, "Token pooling"): `x` is the usual 3-D
view (N, C, S) (NCS or NSC; varlen: the packed (total, C) batch as (1, C, total) with NSC
strides), `spans` int64 (B, 4) is per output row (begin, end, count, origin): the positions
[begin, end) of the row's sample take part where the optional (N, S) bool `mask` is True,
`count` of them, and max indices are reported relative to `origin`.

Autograd: a first-order backward runs the backward op; when the backward is itself
differentiated (create_graph=True), the gradients are those of the plain-torch composite
(gapkernels.reference_tokens) recomputed from the saved input, which is differentiable to any
order. torch.func transforms and forward mode never reach these ops: gapkernels.tokens routes
them to the composite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gapkernels import reference_tokens
from gapkernels.ops import (
    MAX_MODES,
    MODE_CAT,
    MODE_GEM,
    MODE_MIXED,
    acc_dtype,
    aux_columns,
    grad_input_like,
    weight_grad,
)

TOKEN_FORWARD_SCHEMA = (
    "(Tensor x, Tensor spans, Tensor? mask, bool varlen, int mode, Tensor? weight, "
    "float scalar, float eps, bool with_log) -> (Tensor, Tensor, Tensor)"
)
TOKEN_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor spans, Tensor? mask, bool varlen, Tensor aux, "
    "Tensor indices, int mode, Tensor? weight, float scalar, float eps) -> Tensor"
)

OpPair = tuple[Callable[..., Any], Callable[..., Any]]


def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{op}: {message}")


def check_token_inputs(x, spans, mask, varlen: bool, op: str) -> None:
    """spans and mask against the (N, C, S) view x (x itself is checked as for pool_forward)."""
    n, _, s = x.shape
    _check(
        spans.dim() == 2 and spans.shape[1] == 4 and spans.dtype == torch.int64,
        op,
        f"spans must be int64 (B, 4), got {spans.dtype} {tuple(spans.shape)}",
    )
    _check(
        spans.is_contiguous() and spans.device == x.device,
        op,
        f"spans must be contiguous on {x.device}",
    )
    if varlen:
        _check(n == 1 and mask is None, op, "varlen takes x as (1, C, total) and no mask")
    else:
        _check(spans.shape[0] == n, op, f"spans must have N={n} rows, got {spans.shape[0]}")
    if mask is not None:
        _check(
            mask.dtype == torch.bool
            and tuple(mask.shape) == (n, s)
            and mask.is_contiguous()
            and mask.device == x.device,
            op,
            f"mask must be a contiguous bool ({n}, {s}) tensor on {x.device}, got "
            f"{mask.dtype} {tuple(mask.shape)} on {mask.device}",
        )


def check_token_backward_inputs(grad_out, x, spans, aux, indices, mode: int, op: str) -> None:
    rows, c = spans.shape[0], x.shape[1]
    out_c = 2 * c if mode == MODE_CAT else c
    _check(
        tuple(grad_out.shape) == (rows, out_c)
        and grad_out.dtype == x.dtype
        and grad_out.is_contiguous(),
        op,
        f"grad_out must be contiguous {x.dtype} ({rows}, {out_c}), got {tuple(grad_out.shape)}",
    )
    if mode in MAX_MODES:
        _check(
            tuple(indices.shape) == (rows, c) and indices.dtype == torch.int64,
            op,
            "indices must be the int64 (B, C) tensor token_pool_forward returned",
        )
    if mode == MODE_GEM:
        _check(
            aux.dim() == 3 and tuple(aux.shape[:2]) == (rows, c) and aux.shape[2] >= 2,
            op,
            "aux must be the (B, C, K>=2) tensor token_pool_forward returned",
        )


def token_forward_fake(x, spans, mask, varlen, mode, weight, scalar, eps, with_log):
    rows, c = spans.shape[0], x.shape[1]
    out = x.new_empty((rows, 2 * c if mode == MODE_CAT else c))
    aux = x.new_empty((rows, c, aux_columns(mode, with_log)), dtype=acc_dtype(x.dtype))
    indices = x.new_empty((rows, c) if mode in MAX_MODES else (0,), dtype=torch.int64)
    return out, aux, indices


def token_backward_fake(grad_out, x, spans, mask, varlen, aux, indices, mode, weight, scalar, eps):
    return grad_input_like(x)


def composite_reductions(x3: torch.Tensor, spans: torch.Tensor, mask, varlen: bool):
    """(reductions, values) of gapkernels.reference_tokens for the normalized form: Dense over
    (N, C, S), or Segments over the (total, C) tokens for varlen."""
    n, _, s = x3.shape
    begin, end, count, origin = spans.unbind(1)
    positions = torch.arange(s, device=x3.device)
    if not varlen:
        valid = (positions >= begin.view(-1, 1)) & (positions < end.view(-1, 1))
        if mask is not None:
            valid = valid & mask
        return reference_tokens.Dense(valid), x3
    rows = spans.shape[0]
    seg = (torch.searchsorted(begin, positions, right=True) - 1).clamp(min=0)
    takes_part = (positions >= begin.index_select(0, seg)) & (positions < end.index_select(0, seg))
    seg = torch.where(takes_part, seg, rows)
    return reference_tokens.Segments(seg, count, origin), x3[0].t()


def composite_pool(x3, spans, mask, varlen: bool, mode: int, weight, scalar: float, eps: float):
    """The token op's `out` in plain torch (differentiable to any order)."""
    red, values = composite_reductions(x3, spans, mask, varlen)
    w = weight if weight is not None else scalar
    out, _ = reference_tokens.pool(red, values.to(acc_dtype(x3.dtype)), mode, w, eps)
    return out.to(x3.dtype)


def _token_grads(ctx, pair: OpPair, grad_out):
    x3, spans, mask, aux, indices, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    args = (ctx.mode, weight, ctx.scalar, ctx.eps)
    if torch.is_grad_enabled():  # the backward is differentiated: the composite's gradients
        wanted = [t for t, need in ((x3, need_x), (weight, need_w)) if need]
        out = composite_pool(x3, spans, mask, ctx.varlen, *args)
        grads = list(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
        return (grads.pop(0) if need_x else None), (grads.pop(0) if need_w else None)
    grad_x = grad_w = None
    if need_x:
        grad_x = pair[1](grad_out.contiguous(), x3, spans, mask, ctx.varlen, aux, indices, *args)
    if need_w and ctx.mode in (MODE_MIXED, MODE_GEM):
        grad_w = weight_grad(ctx.mode, grad_out, aux, weight)
    return grad_x, grad_w


def _save(ctx, inputs, output) -> None:
    x3, spans, mask, varlen, mode, weight, scalar, eps = inputs[:8]
    _, aux, indices = output
    ctx.varlen, ctx.mode, ctx.scalar, ctx.eps = varlen, mode, scalar, eps
    ctx.save_for_backward(x3, spans, mask, aux, indices, weight)
    ctx.mark_non_differentiable(aux, indices)


_PAIRS: dict[str, OpPair] = {}


class TokenPoolFunction(torch.autograd.Function):
    """out, aux, indices = token_pool_forward(x3, spans, mask, varlen, ...) on `backend`."""

    @staticmethod
    def forward(x3, spans, mask, varlen, mode, weight, scalar, eps, with_log, backend):
        return _PAIRS[backend][0](x3, spans, mask, varlen, mode, weight, scalar, eps, with_log)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)
        ctx.backend = inputs[9]

    @staticmethod
    def backward(ctx, grad_out, _grad_aux, _grad_indices):
        grad_x, grad_w = _token_grads(ctx, _PAIRS[ctx.backend], grad_out)
        return grad_x, None, None, None, None, grad_w, None, None, None, None


def register_token_ops(forward_op, backward_op, backend: str = "triton") -> None:
    """Registers one backend's token op pair: fake kernels, autograd, and the name
    TokenPoolFunction runs it under. A pair already registered for another backend (the C++ ops
    serve "cpu" and "cuda") only gets the new name."""
    registered = (forward_op, backward_op) in _PAIRS.values()
    _PAIRS[backend] = (forward_op, backward_op)
    if registered:
        return
    torch.library.register_fake(forward_op)(token_forward_fake)
    torch.library.register_fake(backward_op)(token_backward_fake)

    def backward(ctx, grad_out, _grad_aux, _grad_indices):
        grad_x, grad_w = _token_grads(ctx, (forward_op, backward_op), grad_out)
        return grad_x, None, None, None, None, grad_w, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_save)

    def backward_of_backward(ctx, *grads):
        raise RuntimeError(
            f"{backward_op}: differentiating the backward op itself is not supported; "
            "differentiate through the forward, whose backward is differentiable to any order"
        )

    torch.library.register_autograd(backward_op, backward_of_backward)
