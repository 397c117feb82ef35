"""The public functions: argument checks, the 3-D view, backend choice, the op call.

Every check runs before any kernel does. See docs/DESIGN.md for the kernels' contract.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from gapkernels import autograd, backends, export, inline, reference, tokens
from gapkernels.autograd import pool_apply
from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, acc_dtype

Weight = float | torch.Tensor

INPUT_FORMATS = ("NCHW", "NHWC")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)  # a set lookup: cheaper than comparing with each


def _check_input(x, input_fmt: str, fn: str) -> tuple[int, int]:
    """Validates x and input_fmt; returns (N, C)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    nchw = input_fmt == "NCHW"
    if not nchw and input_fmt != "NHWC":
        raise ValueError(f"{fn}: input_fmt must be 'NCHW' or 'NHWC', got {input_fmt!r}")
    shape = x.shape
    if len(shape) < 3:
        layout = "(N, C, *spatial)" if nchw else "(N, *spatial, C)"
        raise ValueError(f"{fn}: x must have rank >= 3, {layout}; got shape {tuple(shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    spatial = shape[2:] if nchw else shape[1:-1]
    if 0 in spatial:
        raise ValueError(
            f"{fn}: x has empty spatial dims {tuple(spatial)} (shape "
            f"{tuple(shape)}, input_fmt={input_fmt!r}); global pooling needs S >= 1"
        )
    return shape[0], shape[1] if nchw else shape[-1]


def _check_weight(w, name: str, channels: int, x: torch.Tensor, fn: str) -> None:
    """alpha / p: a Python number, or a floating tensor of shape () or (C,) on x's device."""
    if isinstance(w, torch.Tensor):
        if not w.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {w.dtype}")
        if w.shape not in ((), (channels,)):
            raise ValueError(
                f"{fn}: {name} must have shape () or (C,) = ({channels},), got {tuple(w.shape)}"
            )
        if w.device != x.device:
            raise RuntimeError(
                f"{fn}: {name} is on {w.device} but x is on {x.device}; "
                "they must be on the same device"
            )
    elif isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(
            f"{fn}: {name} must be a float or a tensor of shape () or (C,), got {type(w).__name__}"
        )


def _check_gem_args(p, eps, fn: str, check_p_values: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"{fn}: eps must be a finite float > 0, got {eps!r}")
    if isinstance(p, torch.Tensor):
        # Never a host read of a device tensor (a sync, and no CUDA graph capture): a CPU p is
        # checked here; a GPU p on the device, raising at the next synchronizing point (a
        # device-side assert). Skipped inside torch.compile graphs, and by nn.GlobalPool, whose
        # parametrization keeps p > 0; and under torch.func transforms, where p may be batched
        # and its values cannot steer Python.
        if (
            not check_p_values
            or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
        ):
            return
        if p.device.type == "cpu":
            if bool((p <= 0).any()):
                raise ValueError(f"{fn}: p must be > 0 everywhere, got {p.detach()}")
        else:
            torch._assert_async(torch.all(p.detach() > 0), f"{fn}: p must be > 0 everywhere")
    elif not (0 < p < math.inf):
        raise ValueError(f"{fn}: p must be a finite number > 0, got {p!r}")


def _as_3d(x: torch.Tensor, input_fmt: str) -> torch.Tensor:
    """The (N, C, S) view of docs/DESIGN.md: NCS or NSC strides; a copy only for other strides.
    (The eager entry takes the same view in C++: `as_3d` in csrc/ops.cpp.)"""
    if input_fmt == "NHWC":
        x = x.movedim(-1, 1)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if x.is_contiguous():
        return x.view(n, c, s)
    channels_inner = x.movedim(1, -1)
    if channels_inner.is_contiguous():
        return channels_inner.view(n, s, c).transpose(1, 2)
    return x.contiguous().view(n, c, s)


def _finish(out: torch.Tensor, x: torch.Tensor, keepdim: bool, input_fmt: str) -> torch.Tensor:
    if not keepdim:
        return out
    ones = [1] * (x.dim() - 2)
    if input_fmt == "NHWC":
        return out.view(out.shape[0], *ones, out.shape[1])
    return out.view(out.shape[0], out.shape[1], *ones)


try:
    # What torch.onnx.is_in_onnx_export() reads, without the two imports it runs on every call
    # (they cost a third of a small pooling).
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _ONNX_GLOBALS
except ImportError:  # another torch's layout: its public function
    _ONNX_GLOBALS = None  # type: ignore[assignment]


def _onnx_exporting() -> bool:
    if torch.compiler.is_compiling() or _ONNX_GLOBALS is None:
        return export.onnx_exporting()  # Dynamo traces the public function, not the flags
    return bool(_ONNX_GLOBALS.in_onnx_export or _onnx_flags._is_onnx_exporting)


def _plain():
    """The plain-torch implementation: gapkernels.export's while torch.onnx exports (it
    translates to standard ONNX operators), else the reference."""
    return export if _onnx_exporting() else reference


def _run(
    x,
    mode: int,
    weight: Weight | None,
    eps: float,
    keepdim: bool,
    input_fmt: str,
    backend: str,
    fn: str,
    want_indices: bool,
):
    """Runs one pooling op on a non-reference backend; returns (out shaped for the user, the
    (N, C) indices of MAX_MODES, at least with `want_indices`), or None for the plain-torch path
    (backend 'reference', or an ONNX export). (No default arguments: under torch.compile each
    one read is a guard checked on every call.)"""
    if torch.compiler.is_compiling():
        return _run_traced(x, mode, weight, eps, keepdim, input_fmt, backend, fn, want_indices)
    # Eager: the cheapest route (this is most of a small call's Python).
    if _ONNX_GLOBALS is not None:
        if _ONNX_GLOBALS.in_onnx_export or _onnx_flags._is_onnx_exporting:
            return None
    elif export.onnx_exporting():
        return None
    name = backends.resolve(backend, x, input_fmt, fn)
    if name == "reference":
        return None
    w_tensor, scalar, with_log = (
        (None, 0.5, False) if weight is None else _op_weight(x, mode, weight)
    )
    if (  # autograd.entry_applies(x), inlined; not compiling here
        name != "triton"
        and autograd.ACCEL
        and type(x) is torch.Tensor
        and not torch._C._are_functorch_transforms_active()
        and fwAD._current_level < 0
        and not torch._C._is_torch_function_mode_enabled()
    ):
        nhwc = input_fmt == "NHWC"
        out, _, indices = autograd.cpp_entry(
            x, nhwc, mode, w_tensor, scalar, eps, with_log, want_indices
        )
    else:
        x3 = _as_3d(x, input_fmt)
        out, _, indices = pool_apply(x3, mode, w_tensor, scalar, eps, with_log, want_indices, name)
    if keepdim:
        out = _finish(out, x, keepdim, input_fmt)
    return out, indices


def _run_traced(x, mode, weight, eps, keepdim, input_fmt, backend, fn, want_indices):
    """_run inside torch.compile / torch.export: a small CPU input on backend "auto" is pooled by
    plain torch ops that Inductor fuses (gapkernels.inline), anything else by the op."""
    if backend == "auto" and x.is_cpu:  # inline.applies is False while exporting
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (isinstance(weight, torch.Tensor) and weight.requires_grad)
        )
        if inline.applies(x, mode, needs_grad):
            return inline.pool(x, mode, weight, eps, keepdim, input_fmt, needs_grad or want_indices)
    if export.onnx_exporting():
        return None
    name = backends.resolve(backend, x, input_fmt, fn, traced=True)
    if name == "reference":
        return None
    w_tensor, scalar, with_log = (
        (None, 0.5, False) if weight is None else _op_weight(x, mode, weight)
    )
    out, _, indices = pool_apply(
        _as_3d(x, input_fmt), mode, w_tensor, scalar, eps, with_log, want_indices, name
    )
    if keepdim:
        out = _finish(out, x, keepdim, input_fmt)
    return out, indices


def _op_weight(x, mode: int, weight: Weight) -> tuple[torch.Tensor | None, float, bool]:
    """(weight tensor or None, scalar weight, with_log) as the ops take them. The one place a
    weight is normalized: any strides (expanded, sliced) become a contiguous 1-D tensor of 1 or
    C elements in the acc dtype, so no backend sees other strides."""
    if isinstance(weight, torch.Tensor):
        w_tensor = weight.reshape(-1).to(acc_dtype(x.dtype)).contiguous()
        with_log = mode == MODE_GEM and weight.requires_grad and torch.is_grad_enabled()
        return w_tensor, 0.5, with_log
    return None, float(weight), False


def _token_form(fn, x, pool_type, weight, eps, return_indices, keepdim, input_fmt, backend, *tok):
    """tokens.pool(...) when a token argument is given (mask, lengths, start; `tok` holds them
    and check_p_values) or input_fmt is "NLC", else None (the global pooling path)."""
    mask, lengths, start = tok[:3]
    if mask is None and lengths is None and not start and input_fmt != "NLC":
        return None
    return tokens.pool(
        fn, x, pool_type, weight, eps, return_indices, keepdim, input_fmt, backend, *tok
    )


def global_avg_pool(
    x: torch.Tensor,
    *,
    keepdim: bool = False,
    input_fmt: str = "NCHW",
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Mean over every spatial dim: (N, C) (or (N, C, 1, ...) with keepdim). Token forms
    (mask / lengths / start / input_fmt="NLC"): gapkernels.tokens."""
    fn = "global_avg_pool"
    tok = _token_form(
        fn, x, "avg", None, 0.0, False, keepdim, input_fmt, backend, mask, lengths, start
    )
    if tok is not None:
        return tok
    _check_input(x, input_fmt, fn)
    result = _run(x, MODE_AVG, None, 0.0, keepdim, input_fmt, backend, fn, False)
    if result is None:
        return _plain().global_avg_pool(x, keepdim=keepdim, input_fmt=input_fmt)
    return result[0]


def global_max_pool(
    x: torch.Tensor,
    return_indices: bool = False,
    *,
    keepdim: bool = False,
    input_fmt: str = "NCHW",
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    start: int = 0,
):
    """Max over every spatial dim, with `adaptive_max_pool2d`'s semantics (first max wins a tie,
    NaN wins); with return_indices, also the int64 flat spatial offset of the max."""
    fn = "global_max_pool"
    tok = _token_form(
        fn, x, "max", None, 0.0, return_indices, keepdim, input_fmt, backend, mask, lengths, start
    )
    if tok is not None:
        return tok
    _check_input(x, input_fmt, fn)
    result = _run(x, MODE_MAX, None, 0.0, keepdim, input_fmt, backend, fn, return_indices)
    if result is None:
        return _plain().global_max_pool(x, return_indices, keepdim=keepdim, input_fmt=input_fmt)
    if return_indices:
        out, indices = result
        return out, indices.view(out.shape)
    return result[0]


def global_mixed_pool(
    x: torch.Tensor,
    alpha: Weight = 0.5,
    *,
    keepdim: bool = False,
    input_fmt: str = "NCHW",
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """alpha * max + (1 - alpha) * avg; alpha a float or a () / (C,) tensor (learnable)."""
    fn = "global_mixed_pool"
    tok = _token_form(
        fn, x, "mixed", alpha, 0.0, False, keepdim, input_fmt, backend, mask, lengths, start
    )
    if tok is not None:
        return tok
    _, c = _check_input(x, input_fmt, fn)
    _check_weight(alpha, "alpha", c, x, fn)
    result = _run(x, MODE_MIXED, alpha, 0.0, keepdim, input_fmt, backend, fn, False)
    if result is None:
        return _plain().global_mixed_pool(x, alpha, keepdim=keepdim, input_fmt=input_fmt)
    return result[0]


def global_avgmax_pool(
    x: torch.Tensor,
    concat: bool = False,
    *,
    keepdim: bool = False,
    input_fmt: str = "NCHW",
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """0.5 * (avg + max) (timm's avgmax); with concat=True, cat([avg, max], dim=1) (catavgmax)."""
    fn = "global_avgmax_pool"
    pool_type = "catavgmax" if concat else "avgmax"
    tok = _token_form(
        fn, x, pool_type, None, 0.0, False, keepdim, input_fmt, backend, mask, lengths, start
    )
    if tok is not None:
        return tok
    _check_input(x, input_fmt, fn)
    mode, weight = (MODE_CAT, None) if concat else (MODE_MIXED, 0.5)
    result = _run(x, mode, weight, 0.0, keepdim, input_fmt, backend, fn, False)
    if result is None:
        return _plain().global_avgmax_pool(x, concat, keepdim=keepdim, input_fmt=input_fmt)
    return result[0]


def global_gem_pool(
    x: torch.Tensor,
    p: Weight = 3.0,
    eps: float = 1e-6,
    *,
    keepdim: bool = False,
    input_fmt: str = "NCHW",
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Generalized mean, mean(clamp(x, min=eps) ** p) ** (1 / p); p a float or a () / (C,)
    tensor (learnable), > 0. Computed relative to each row's maximum (finite for any p in
    [1, 100] and any finite input)."""
    return gem_pool(x, p, eps, keepdim, input_fmt, backend, True, mask, lengths, start)


def gem_pool(
    x, p, eps, keepdim, input_fmt, backend, check_p_values: bool, mask=None, lengths=None, start=0
) -> torch.Tensor:
    """global_gem_pool, for callers that keep p > 0 themselves (nn.GlobalPool's
    parametrization) and skip checking its values."""
    fn = "global_gem_pool"
    tok = _token_form(
        fn,
        x,
        "gem",
        p,
        eps,
        False,
        keepdim,
        input_fmt,
        backend,
        mask,
        lengths,
        start,
        check_p_values,
    )
    if tok is not None:
        return tok
    _, c = _check_input(x, input_fmt, fn)
    _check_weight(p, "p", c, x, fn)
    _check_gem_args(p, eps, fn, check_p_values)
    result = _run(x, MODE_GEM, p, float(eps), keepdim, input_fmt, backend, fn, False)
    if result is None:
        return _plain().global_gem_pool(x, p, eps, keepdim=keepdim, input_fmt=input_fmt)
    return result[0]
