"""Autograd for the pool op pairs: every derivative the reference has, or an error.

Two routes lead here, with one set of formulas:

- `PoolFunction` (an `autograd.Function` with `setup_context` and a `vmap` rule) is what the public
  functions call. It is what makes `torch.func` (`grad`, `vjp`, `jacrev`, `hessian`, `vmap`,
  `functional_call`, per-sample gradients) work: functorch needs `setup_context`, and custom ops
  registered with `torch.library.register_autograd` cannot provide it. `PoolFunctionFwdAD` adds a
  forward-mode formula (`jvp`, `jacfwd`, `torch.autograd.forward_ad`); Dynamo refuses a custom
  `jvp`, so under `torch.compile` the class without it is used (forward mode of a compiled graph
  then raises torch's "jvp is not implemented" error instead of giving zeros).
- The ops' own autograd, for callers of `torch.ops.gapkernels*.pool_forward` itself, for
  `opcheck`, and for the public functions' plain eager calls (no `torch.func`, no forward mode,
  not compiling), where `PoolFunction`'s Python costs more than the op. Where the accelerator
  (gapkernels._C) is loaded, the C++ ops have it in C++ (`csrc/ops.cpp`, the Autograd key): first
  order runs there entirely (weight gradients included); a differentiated backward calls
  `cpp_op_grads` below, and forward mode on the op itself `pool_tangent`. Without the
  accelerator, `register_op_autograd` below registers the same at the Autograd key in Python
  (PoolFunctionFwdAD's formulas, and forward mode on the op itself from `pool_tangent`; the
  autograd.Function that `torch.library.register_autograd` makes has no forward mode, and the
  kernel it registers skips that Function when nothing requires grad, so a tangent would be
  dropped silently). The Triton ops register theirs with `register_pool_ops` in
  `gapkernels/ops.py`.

First-order backward (grad mode off inside backward: `loss.backward()`, `autograd.grad` without
`create_graph`) runs the backend's fused backward kernel, and the weight gradients from the
forward's statistics (`ops.weight_grad`; its twin `weight_grad` in csrc/ops.cpp for the C++
ops). When the backward itself is differentiated
(`create_graph=True`, or any `torch.func` transform), the gradients are computed by the plain-torch
formulas below instead: every op in them has derivatives (of any order) and forward-mode rules,
they use the forward's arg-max indices (so ties and NaNs go where the kernel sent them), and GeM is
written relative to the row maximum as the kernels compute it. No float atomics (a scatter to one
index per row), so determinism is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from gapkernels import _ext
from gapkernels.ops import (
    BACKWARD_OP_NOT_DIFFERENTIABLE,
    MAX_MODES,
    MODE_AVG,
    MODE_GEM,
    MODE_MAX,
    MODE_MIXED,
    acc_dtype,
    reduce_to,
    weight_grad,
)

OpPair = tuple[Callable[..., Any], Callable[..., Any]]


def _per_channel(weight: torch.Tensor | None, scalar: float):
    """alpha / p shaped to broadcast against (N, C) statistics: (1, C), (1, 1) or a float."""
    return scalar if weight is None else weight.view(1, -1)


def _gem_terms(xf: torch.Tensor, p, eps: float):
    """GeM's pieces from the (N, C, S) input in acc dtype, relative to the (detached) row max:
    z = clamp(x, eps) / M, r = mean(z**p), out = M * r**(1/p). Any constant M gives the same
    value and derivatives of every order, and keeps every power in range."""
    y = xf.clamp(min=eps)
    big_m = y.amax(dim=2, keepdim=True).detach()
    z = y / big_m
    pe = p.unsqueeze(-1) if isinstance(p, torch.Tensor) else p
    zp = z.pow(pe)
    r = zp.mean(dim=2)
    out = big_m.squeeze(2) * r.pow(1.0 / p)
    return z, pe, zp, r, out


def _gem_p_coefficient(z, zp, r, out, p):
    """d out / d p per row: out * (l / (r p) - log(r) / p**2), l = mean(z**p log z)."""
    lg = (zp * z.log()).mean(dim=2)
    return out * (lg / (r * p) - r.log() / (p * p))


def _argmax_scatter(values: torch.Tensor, indices: torch.Tensor, s: int) -> torch.Tensor:
    """(N, C, S) zeros with values[n, c] at indices[n, c]: one write per row, no accumulation."""
    n, c = values.shape
    return values.new_zeros((n, c, s)).scatter(2, indices.unsqueeze(2), values.unsqueeze(2))


def differentiable_grads(x3, indices, mode, weight, scalar, eps, g, need_x, need_w):
    """(grad_x, grad_weight) for `g = d loss / d out`, in plain torch: differentiable to any order.

    `x3` is the (N, C, S) input, `weight` the 1-D (1 or C) acc-dtype weight or None (then `scalar`).
    """
    acc = acc_dtype(x3.dtype)
    n, c, s = x3.shape
    gf = g.to(acc)
    grad_x = grad_w = None
    w = _per_channel(weight, scalar)
    if mode == MODE_GEM:
        xf = x3.to(acc)
        z, pe, zp, r, out = _gem_terms(xf, w, eps)
        if need_x:
            coef = gf * r.pow(1.0 / w - 1.0) / s
            grad = coef.unsqueeze(2) * z.pow(pe - 1.0)
            grad_x = torch.where(xf >= eps, grad, torch.zeros_like(grad)).to(x3.dtype)
        if need_w:
            grad_w = reduce_to(gf * _gem_p_coefficient(z, zp, r, out, w), weight)
        return grad_x, grad_w
    if need_x:
        if mode == MODE_AVG:
            grad = (gf / s).unsqueeze(2).expand(n, c, s)
        elif mode == MODE_MAX:
            grad = _argmax_scatter(gf, indices, s)
        elif mode == MODE_MIXED:
            grad = ((1.0 - w) * gf / s).unsqueeze(2) + _argmax_scatter(w * gf, indices, s)
        else:  # MODE_CAT: grad_out = [d/d avg, d/d max]
            grad = (gf[:, :c] / s).unsqueeze(2) + _argmax_scatter(gf[:, c:], indices, s)
        grad_x = grad.to(x3.dtype)
    if need_w and mode == MODE_MIXED:
        xf = x3.to(acc)
        spread = xf.gather(2, indices.unsqueeze(2)).squeeze(2) - xf.mean(dim=2)  # max - avg
        grad_w = reduce_to(gf * spread, weight)
    return grad_x, grad_w


def _below_autograd(op, *args):
    """op(*args) dispatched below the Autograd key (its Python autograd kernel is skipped) in
    eager mode; Dynamo cannot trace that guard, and needs no such help."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def fused_grads(pair: OpPair, x3, aux, indices, mode, weight, scalar, eps, g, need_x, need_w):
    """(grad_x, grad_weight) from the backend's backward kernel and the forward's statistics."""
    grad_x = grad_w = None
    if need_x:
        grad_x = _below_autograd(
            pair[1], g.contiguous(), x3, aux, indices, mode, weight, scalar, eps
        )
    if need_w and weight is not None:
        grad_w = weight_grad(mode, g, aux, weight)
    return grad_x, grad_w


def pool_grads(pair: OpPair, x3, aux, indices, mode, weight, scalar, eps, g, need_x, need_w):
    """The backward of one pool op: fused when nothing differentiates it, else plain torch."""
    need_w = need_w and weight is not None and mode in (MODE_MIXED, MODE_GEM)
    if torch.is_grad_enabled():
        return differentiable_grads(x3, indices, mode, weight, scalar, eps, g, need_x, need_w)
    return fused_grads(pair, x3, aux, indices, mode, weight, scalar, eps, g, need_x, need_w)


def pool_tangent(x3, aux, indices, mode, weight, scalar, eps, t_x, t_w):
    """Forward mode: the tangent of `out` for tangents `t_x` of x3 and `t_w` of the weight."""
    if t_x is not None:
        require_indices(mode, indices, "forward mode")
    acc = acc_dtype(x3.dtype)
    w = _per_channel(weight, scalar)
    tangent = None

    def add(term):
        nonlocal tangent
        tangent = term if tangent is None else tangent + term

    if mode == MODE_GEM:
        xf = x3.to(acc)
        z, pe, zp, r, out = _gem_terms(xf, w, eps)
        if t_x is not None:
            coef = z.pow(pe - 1.0) * (xf >= eps)
            add(r.pow(1.0 / w - 1.0) * (coef * t_x.to(acc)).mean(dim=2))
        if t_w is not None:
            add(_gem_p_coefficient(z, zp, r, out, w) * _per_channel(t_w, 0.0))
    else:
        if t_x is not None:
            tf = t_x.to(acc)
            t_avg = tf.mean(dim=2)
            t_max = tf.gather(2, indices.unsqueeze(2)).squeeze(2) if mode in MAX_MODES else None
            if mode == MODE_AVG:
                add(t_avg)
            elif mode == MODE_MAX:
                add(t_max)
            elif mode == MODE_MIXED:
                add(w * t_max + (1.0 - w) * t_avg)
            else:
                add(torch.cat([t_avg, t_max], dim=1))
        if t_w is not None and mode == MODE_MIXED:
            add(aux[..., 0] * _per_channel(t_w, 0.0))
    if tangent is None:
        return None
    return tangent.to(x3.dtype)


def save_pool_context(ctx, inputs, output) -> tuple:
    """What a pool op's backward needs, saved the same way by both autograd routes; returns the
    saved tensors."""
    x3, mode, weight, scalar, eps = inputs[:5]
    _, aux, indices = output
    ctx.mode, ctx.scalar, ctx.eps = mode, scalar, eps
    ctx.save_for_backward(x3, aux, indices, weight)
    ctx.mark_non_differentiable(aux, indices)
    return x3, aux, indices, weight


def require_indices(mode: int, indices: torch.Tensor, what: str) -> None:
    """Raises when a derivative of a mode with a max lacks the forward's indices."""
    if mode in MAX_MODES and indices.dim() != 2:
        raise RuntimeError(
            f"gapkernels: {what} of a pooling with a max needs the indices: run pool_forward "
            "with with_index=True"
        )


def grads_from_context(ctx, pair: OpPair, grad_out):
    """(grad_x, grad_weight) from what `save_pool_context` saved."""
    x3, aux, indices, weight = ctx.saved_tensors
    require_indices(ctx.mode, indices, "the backward")
    return pool_grads(
        pair,
        x3,
        aux,
        indices,
        ctx.mode,
        weight,
        ctx.scalar,
        ctx.eps,
        grad_out,
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[2],
    )


# The C++ op pair, looked up once (torch.ops attribute lookups cost a few us per call).
_CPP_PAIR: OpPair | None = (
    (torch.ops.gapkernels.pool_forward.default, torch.ops.gapkernels.pool_backward.default)
    if _ext.loaded()
    else None
)


def _pair(backend: str) -> OpPair:
    if backend == "triton":
        from gapkernels import triton as gk_triton

        return gk_triton.pool_forward, gk_triton.pool_backward
    if _CPP_PAIR is None:
        raise RuntimeError(
            f"gapkernels: the C++ ops are not loaded: {_ext.unavailable_reason('CPU')}"
        )
    return _CPP_PAIR


def cpp_op_grads(grad_out, x3, aux, indices, mode, weight, scalar, eps, need_x, need_w):
    """(grad_x, grad_weight) for the C++ ops' autograd (csrc/ops.cpp), which calls this for a
    backward that is itself differentiated (grad mode on: the differentiable formulas)."""
    return pool_grads(
        _pair("cpu"), x3, aux, indices, mode, weight, scalar, eps, grad_out, need_x, need_w
    )


def _no_accel(*args):
    raise RuntimeError(
        f"gapkernels: the accelerator (gapkernels._C) is not loaded: {_ext.accel_reason}"
    )


# Whether the C++ ops' autograd and the eager entry are the accelerator's (gapkernels._C).
ACCEL = _ext.accel_loaded()
_CPP_FORWARD: Callable[..., Any] = _no_accel
# _C.pool(x, nhwc, mode, weight, scalar, eps, with_log, with_index): see entry_applies and
# csrc/ops.cpp.
cpp_entry: Callable[..., Any] = _no_accel
if _ext._C is not None:
    _ext._C._set_python_callbacks(cpp_op_grads, pool_tangent)
    _CPP_FORWARD = torch.ops.gapkernels.pool_forward.default
    cpp_entry = _ext._C.pool


class PoolFunction(torch.autograd.Function):
    """out, aux, indices = pool_forward(x3, ...) on `backend`, with autograd and torch.func."""

    @staticmethod
    def forward(x3, mode, weight, scalar, eps, with_log, with_index, backend):
        # Below the Autograd key: the op's own autograd has nothing to do here (and a C++
        # autograd kernel would refuse nested torch.func transforms).
        return _below_autograd(
            _pair(backend)[0], x3, mode, weight, scalar, eps, with_log, with_index
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*save_pool_context(ctx, inputs, output))
        ctx.backend = inputs[7]

    @staticmethod
    def backward(ctx, grad_out, _grad_aux, _grad_indices):
        grad_x, grad_w = grads_from_context(ctx, _pair(ctx.backend), grad_out)
        return grad_x, None, grad_w, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x3, mode, weight, scalar, eps, with_log, with_index, backend):
        """Folds the vmapped dimension into N (one launch), or loops when the weight is batched."""
        x_dim, _, w_dim = in_dims[:3]
        size = info.batch_size
        if w_dim is not None:
            results = [
                pool_apply(
                    x3 if x_dim is None else x3.select(x_dim, b),
                    mode,
                    weight.select(w_dim, b),
                    scalar,
                    eps,
                    with_log,
                    with_index,
                    backend,
                )
                for b in range(size)
            ]
            return tuple(torch.stack(parts) for parts in zip(*results, strict=True)), (0, 0, 0)
        if x_dim is None:
            x3 = x3.unsqueeze(0).expand(size, *x3.shape)
        else:
            x3 = x3.movedim(x_dim, 0)
        n, c, s = x3.shape[1:]
        folded = x3.reshape(size * n, c, s)
        if not (folded.is_contiguous() or folded.transpose(1, 2).is_contiguous()):
            folded = folded.contiguous()
        out, aux, indices = pool_apply(
            folded, mode, weight, scalar, eps, with_log, with_index, backend
        )
        out = out.view(size, n, -1)
        aux = aux.view(size, n, c, -1)
        indices = indices.view(size, n, c) if indices.numel() else indices.new_empty((size, 0))
        return (out, aux, indices), (0, 0, 0)


class PoolFunctionFwdAD(PoolFunction):
    """PoolFunction for eager mode: with a forward-mode formula (Dynamo cannot trace a custom
    jvp), and a forward that is cheaper to call."""

    @staticmethod
    def forward(*args):
        # `*args`: Function.apply binds the arguments to this signature on every call, and a
        # single var-positional parameter is the cheapest to bind (Dynamo needs named ones).
        # Below the Autograd key: the op's own (Python) autograd kernel has nothing to do here.
        x3, mode, weight, scalar, eps, with_log, with_index, backend = args
        with torch._C._AutoDispatchBelowAutograd():
            return _pair(backend)[0](x3, mode, weight, scalar, eps, with_log, with_index)

    @staticmethod
    def jvp(ctx, t_x, _t_mode, t_w, *_):
        x3, aux, indices, weight = ctx.saved_tensors
        tangent = pool_tangent(x3, aux, indices, ctx.mode, weight, ctx.scalar, ctx.eps, t_x, t_w)
        if tangent is None:
            raise RuntimeError("gapkernels: forward mode got no tangent for x or the weight")
        return tangent, None, None


class _PoolFunctionEager(torch.autograd.Function):
    """PoolFunctionFwdAD without setup_context (the forward takes ctx), for eager calls that no
    torch.func transform sees (they need setup_context): Function.apply then binds no arguments
    to the forward's signature, which costs as much as a small pooling. Where it is used: the C++
    ops without the accelerator (the public functions' eager calls, and the ops' Python Autograd
    kernel)."""

    @staticmethod
    def forward(ctx, x3, mode, weight, scalar, eps, with_log, with_index, backend):
        with torch._C._AutoDispatchBelowAutograd():
            output = _pair(backend)[0](x3, mode, weight, scalar, eps, with_log, with_index)
        ctx.save_for_forward(*save_pool_context(ctx, (x3, mode, weight, scalar, eps), output))
        ctx.backend = backend
        # No zero gradients made for aux and indices (non-differentiable, never read), as in
        # csrc/ops.cpp: two allocations and fills per backward.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_aux, _grad_indices):
        if grad_out is None:  # nothing reached out (materialize_grads is off)
            return (None,) * 8
        return PoolFunction.backward(ctx, grad_out, None, None)

    jvp = PoolFunctionFwdAD.jvp


def _differentiable(x3: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether this call can be differentiated (so it must go through PoolFunction)."""
    if torch.is_grad_enabled() and (
        x3.requires_grad or (weight is not None and weight.requires_grad)
    ):
        return True
    return _transformed()


def _transformed() -> bool:
    """Whether a torch.func transform or forward-mode AD is active: PoolFunction's territory."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


def entry_applies(x: torch.Tensor) -> bool:
    """Whether a public function's call on `x` (on a C++ backend) can take `_C.pool`, which
    takes the (N, C, S) view and calls the op in C++: the accelerator is loaded, and x is a plain
    tensor in plain eager mode (not compiling, no torch.func transform or forward mode, no
    __torch_function__ to honor). `functional._run`'s eager path inlines the same test (a call
    costs 3% of a small pooling)."""
    return (
        ACCEL
        and not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
        and not _transformed()
        and not torch._C._is_torch_function_mode_enabled()
    )


def _dual_parts(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(primal, tangent) of t under forward-mode AD (tangent None when it has none)."""
    if t is None:
        return None, None
    primal, tangent = fwAD.unpack_dual(t)
    return primal, tangent


class _BackwardOpFunction(torch.autograd.Function):
    """pool_backward where something requires grad: its output's derivative raises (the op has
    none of its own), as csrc/ops.cpp's PoolBackwardFunction does."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.gapkernels.pool_backward.default(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"gapkernels::pool_backward: {BACKWARD_OP_NOT_DIFFERENTIABLE}")


def _pool_forward_autograd(keyset, x3, mode, weight, scalar, eps, with_log, with_index=True):
    """pool_forward at the Autograd key, without the accelerator, as csrc/ops.cpp's: reverse
    mode through _PoolFunctionEager (forward mode too, when both are asked for), forward mode
    alone (torch.autograd.forward_ad, torch.func.jvp / jacfwd) from pool_tangent, set on `out`.
    Either mode finds the indices whatever with_index says (their formulas read them)."""
    if torch.is_grad_enabled() and (
        x3.requires_grad or (weight is not None and weight.requires_grad)
    ):
        if torch._C._are_functorch_transforms_active():
            # An autograd.Function cannot be applied from inside a dispatcher kernel under
            # torch.func (the accelerator's C++ Function is refused there too).
            raise RuntimeError(
                "gapkernels::pool_forward: torch.func's reverse-mode transforms (grad, vjp, "
                "jacrev, hessian) of the op itself are not supported; gapkernels' functions "
                "support every torch.func transform"
            )
        return _PoolFunctionEager.apply(x3, mode, weight, scalar, eps, with_log, True, "cpu")
    with_index = with_index or (
        fwAD._current_level >= 0
        and any(_dual_parts(t)[1] is not None for t in (x3, weight) if t is not None)
    )
    with torch._C._AutoDispatchBelowAutograd():
        out, aux, indices = torch.ops.gapkernels.pool_forward.default.redispatch(
            keyset & torch._C._after_autograd_keyset,
            x3,
            mode,
            weight,
            scalar,
            eps,
            with_log,
            with_index,
        )
    if fwAD._current_level >= 0:
        x_primal, t_x = _dual_parts(x3)
        w_primal, t_w = _dual_parts(weight)
        if mode not in (MODE_MIXED, MODE_GEM):
            t_w = None
        if t_x is not None or t_w is not None:
            tangent = pool_tangent(x_primal, aux, indices, mode, w_primal, scalar, eps, t_x, t_w)
            if tangent is not None:
                out = fwAD.make_dual(out, tangent)
    return out, aux, indices


def _pool_backward_autograd(keyset, grad_out, x3, aux, indices, mode, weight, scalar, eps):
    """pool_backward at the Autograd key, without the accelerator: no derivative of its own, in
    either mode, and an error (not a silent zero) when one is asked for."""
    args = (grad_out, x3, aux, indices, mode, weight, scalar, eps)
    tensors = (grad_out, x3, aux, weight)
    if fwAD._current_level >= 0 and any(_dual_parts(t)[1] is not None for t in tensors):
        raise RuntimeError(
            "gapkernels::pool_backward: forward-mode AD of the backward op itself is not "
            "supported; differentiate through the forward (gapkernels' functions or "
            "pool_forward), whose backward is differentiable to any order"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _BackwardOpFunction.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.gapkernels.pool_backward.default.redispatch(
            keyset & torch._C._after_autograd_keyset, *args
        )


_OP_AUTOGRAD: list[torch.library.Library] = []  # kept alive: the registrations last as long


def register_op_autograd() -> None:
    """Registers the C++ ops' autograd in Python, where the accelerator (whose C++ autograd
    registers the same) is not loaded; one Autograd kernel per op, in either case."""
    if ACCEL or _OP_AUTOGRAD:
        return
    lib = torch.library.Library("gapkernels", "FRAGMENT")
    lib.impl("pool_forward", _pool_forward_autograd, "Autograd", with_keyset=True)
    lib.impl("pool_backward", _pool_backward_autograd, "Autograd", with_keyset=True)
    _OP_AUTOGRAD.append(lib)


if _ext.loaded():
    register_op_autograd()


def pool_apply(x3, mode, weight, scalar, eps, with_log, with_index, backend):
    """The differentiable (out, aux, indices) of one pool op on `backend` ("cpu"/"cuda" use the
    C++ ops, "triton" the Triton ones). `with_index`: whether the caller wants the indices of the
    modes with a max; a call that can be differentiated finds them in any case (the backward
    reads them), and the ops' own autograd does the same for its calls.

    A plain eager call of the C++ ops with the accelerator is the op itself: their autograd is
    in C++ (csrc/ops.cpp), cheaper than `autograd.Function.apply`, which binds its arguments with
    `inspect.signature` on every call. torch.func transforms and forward mode need
    PoolFunctionFwdAD (the C++ ops without the accelerator, outside torch.func: its twin
    _PoolFunctionEager, which binds nothing), and compiled graphs PoolFunction. A call that
    nothing can differentiate of an op whose autograd is Python (Triton's, and the C++ ones
    without the accelerator) skips autograd entirely."""
    if torch.compiler.is_compiling():
        with_index = with_index or (
            torch.is_grad_enabled()
            and (x3.requires_grad or (weight is not None and weight.requires_grad))
        )
        return PoolFunction.apply(x3, mode, weight, scalar, eps, with_log, with_index, backend)
    if ACCEL and backend != "triton" and not _transformed():
        return _CPP_FORWARD(x3, mode, weight, scalar, eps, with_log, with_index)
    if _differentiable(x3, weight):
        if backend != "triton" and not torch._C._are_functorch_transforms_active():
            return _PoolFunctionEager.apply(x3, mode, weight, scalar, eps, with_log, True, backend)
        return PoolFunctionFwdAD.apply(x3, mode, weight, scalar, eps, with_log, True, backend)
    return _below_autograd(_pair(backend)[0], x3, mode, weight, scalar, eps, with_log, with_index)
