"""Token pooling: the `mask=`, `lengths=`, `start=` and `input_fmt="NLC"` forms of the public
functions, and `varlen_pool` for packed batches (docs/DESIGN.md, "Token pooling").

The public functions branch here only when one of those arguments is given, so the plain path
is untouched. Here: every check (before any kernel), the backend choice, the normalized form
the kernels see (`spans`, `mask`; see gapkernels/token_ops.py) and the call.

Backends: the C++ CPU kernels and the C++ CUDA kernels (the same ops,
gapkernels::token_pool_forward/backward: csrc/cpu/token_*.cpp, csrc/cuda/token_cuda.cpp with the
CUDA pool kernels' templates) and Triton have token kernels. `auto` runs the CPU kernels on CPU
tensors (the plain-torch composite, gapkernels.reference_tokens, where the extension is not
built); on CUDA tensors it makes the pooling ops' choice (gapkernels.backends: the CUDA kernels,
then Triton, by the auto table), with Triton standing in for a CUDA library without token
kernels and the composite where neither can run. The C++ CUDA token kernels are compiled but
have not run on a GPU yet. Under torch.func transforms and forward-mode AD the composite runs
too (same math, every transform). While torch.onnx exports, the composite runs (plain torch ops).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from gapkernels import _ext, backends, export, reference, reference_tokens, token_ops
from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, acc_dtype

# pool_type -> (mode, how the weight is given: a fixed number, or the name of the argument)
POOL_TYPES: dict[str, tuple[int, float | str | None]] = {
    "avg": (MODE_AVG, None),
    "max": (MODE_MAX, None),
    "avgmax": (MODE_MIXED, 0.5),
    "catavgmax": (MODE_CAT, None),
    "mixed": (MODE_MIXED, "alpha"),
    "gem": (MODE_GEM, "p"),
}


def input_format(x, input_fmt: str, fn: str) -> str:
    """ "NLC" (rank-3 (N, L, C) input) is "NHWC"; other names pass through to the usual check."""
    if input_fmt != "NLC":
        return input_fmt
    if isinstance(x, torch.Tensor) and x.dim() != 3:
        raise ValueError(
            f"{fn}: input_fmt='NLC' names rank-3 (N, L, C) input, got shape {tuple(x.shape)}; "
            "use 'NHWC' for (N, *spatial, C)"
        )
    return "NHWC"


def _check_values(ok: torch.Tensor, message: str, detail=None) -> None:
    """Raises unless `ok` (a bool tensor) is all True, without ever reading the device on the
    host: for a CPU tensor in eager a host read (ValueError, `message` plus `detail()` when
    given); on a GPU, and inside torch.compile on any device, a device-side assert
    (`torch._assert_async`: RuntimeError(message), at once on the CPU, at the next synchronizing
    point on a GPU). Not checked only where `ok` is batched by torch.func.vmap (values that vary
    per sample: vmap cannot raise for one of them)."""
    if torch._C._are_functorch_transforms_active() and torch._C._functorch.is_batchedtensor(ok):
        return
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(message + (detail() if detail is not None else ""))
    else:
        torch._assert_async(ok.all(), message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_index_tensor(t, name: str, x: torch.Tensor, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{fn}: {name} must be an integer tensor (int32 or int64), got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(
            f"{fn}: {name} is on {t.device} but x is on {x.device}; they must be on the same device"
        )


def check_token_args(x, input_fmt: str, mask, lengths, start, fn: str) -> None:
    """mask / lengths / start against x (already checked, input_fmt already normalized)."""
    n = x.shape[0]
    spatial = tuple(x.shape[2:] if input_fmt == "NCHW" else x.shape[1:-1])
    s = math.prod(spatial)
    if not _is_int(start):
        raise TypeError(f"{fn}: start must be an int, got {type(start).__name__}")
    if not 0 <= start < s:
        raise ValueError(
            f"{fn}: start must be in [0, S) = [0, {s}) (S = prod{spatial}), got {start}"
        )
    if mask is not None and lengths is not None:
        raise ValueError(f"{fn}: give mask or lengths, not both")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{fn}: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{fn}: mask must be bool or an integer 0/1 tensor, got {mask.dtype}")
        if tuple(mask.shape) != (n, *spatial):
            raise ValueError(
                f"{fn}: mask must have shape (N, *spatial) = {(n, *spatial)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != x.device:
            raise RuntimeError(
                f"{fn}: mask is on {mask.device} but x is on {x.device}; "
                "they must be on the same device"
            )
    if lengths is not None:
        _check_index_tensor(lengths, "lengths", x, fn)
        if tuple(lengths.shape) != (n,):
            raise ValueError(
                f"{fn}: lengths must have shape (N,) = ({n},), got {tuple(lengths.shape)}"
            )
        _check_values(
            (lengths >= 0) & (lengths <= s),
            f"{fn}: lengths must be in [0, S] = [0, {s}] everywhere",
        )


def check_cu_seqlens(x, cu_seqlens, start, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{fn}: x must be the packed (total_tokens, C) batch, got shape {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{fn}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    _check_index_tensor(cu_seqlens, "cu_seqlens", x, fn)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{fn}: cu_seqlens must have shape (B + 1,), got {tuple(cu_seqlens.shape)}"
        )
    if not _is_int(start) or start < 0:
        raise ValueError(f"{fn}: start must be an int >= 0, got {start!r}")
    total = x.shape[0]
    _check_values(
        cu_seqlens[:1] == 0,
        f"{fn}: cu_seqlens must start at 0",
        lambda: f", got {cu_seqlens[:1].tolist()}",
    )
    _check_values(cu_seqlens[1:] >= cu_seqlens[:-1], f"{fn}: cu_seqlens must be non-decreasing")
    _check_values(
        cu_seqlens[-1:] == total,
        f"{fn}: cu_seqlens must end at total_tokens = x.shape[0] = {total}",
    )


FORWARD_OP = "gapkernels::token_pool_forward"


def _cpp_token_kernels(key: str) -> bool:
    """Whether the extension has the C++ token kernels for dispatch key `key` ("CPU", "CUDA");
    registers the op pair's fake kernels and autograd on the first call that finds them (one op
    pair, a kernel per device: backends "cpu" and "cuda" share the registration)."""
    name = key.lower()
    if name in token_ops._PAIRS:
        return True
    if not _ext.loaded() or not hasattr(torch.ops.gapkernels, "token_pool_forward"):
        return False
    if not torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, key):
        return False
    ops = torch.ops.gapkernels
    token_ops.register_token_ops(
        ops.token_pool_forward.default, ops.token_pool_backward.default, name
    )
    return True


def _cpu_token_kernels() -> bool:
    return _cpp_token_kernels("CPU")


def _cuda_token_kernels() -> bool:
    return _cpp_token_kernels("CUDA")


# At import, so that a first token call inside torch.compile finds the fake kernels registered.
_cpu_token_kernels()
_cuda_token_kernels()


def _auto_on_cuda(x: torch.Tensor, input_fmt: str, fn: str) -> str:
    """The pooling ops' auto choice for x (gapkernels.backends: by device, dtype, layout and size),
    with Triton standing in for a CUDA library that has no token kernels."""
    choice = backends.resolve("auto", x, input_fmt, fn, traced=torch.compiler.is_compiling())
    if choice == "cuda" and not _cuda_token_kernels():
        choice = "triton" if backends.unavailable_reason("triton", x) is None else "reference"
    return choice


def resolve(backend: str, x: torch.Tensor, fn: str, input_fmt: str = "NCHW") -> str:
    """'cpu', 'cuda', 'triton' or 'reference' (the composite) for a token call on x (laid out as
    input_fmt says: auto's choice on a GPU depends on the layout)."""
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(
            f"{fn}: backend must be one of {', '.join(map(repr, backends.BACKENDS))}, "
            f"got {backend!r}"
        )
    if backend == "auto":
        env = os.environ.get(backends.ENV_VAR)
        if env and env not in backends.BACKENDS:
            raise ValueError(
                f"{fn}: {backends.ENV_VAR}={env!r} is not a backend; expected one of "
                f"{', '.join(map(repr, backends.BACKENDS))}"
            )
        backend = env or "auto"
    if (
        export.onnx_exporting()
        or torch._C._are_functorch_transforms_active()
        or fwAD._current_level >= 0
    ):
        return "reference"
    if backend == "auto":
        if x.device.type == "cpu":
            return "cpu" if _cpu_token_kernels() else "reference"
        if x.device.type == "cuda":
            return _auto_on_cuda(x, input_fmt, fn)
        return "reference"
    reason = backends.unavailable_reason(backend, x)
    if reason is None and backend in ("cpu", "cuda") and not _cpp_token_kernels(backend.upper()):
        reason = "the extension was built without the token kernels; rebuild it"
    if reason is not None:
        raise RuntimeError(f"{fn}: backend={backend!r} is not available: {reason}")
    return backend


def _weight_arg(weight, mode: int, x: torch.Tensor):
    """(tensor or None, scalar, with_log) as the ops take alpha / p."""
    if isinstance(weight, torch.Tensor):
        w = weight.reshape(-1).to(acc_dtype(x.dtype)).contiguous()
        with_log = mode == MODE_GEM and weight.requires_grad and torch.is_grad_enabled()
        return w, 0.5, with_log
    return None, 0.5 if weight is None else float(weight), False


def _apply(x3, spans, mask, varlen, mode, weight, eps, backend: str):
    if backend == "triton":
        from gapkernels import triton as _gk_triton  # noqa: F401  (registers the token ops)
        from gapkernels.triton import tokens as _triton_tokens  # noqa: F401

    w, scalar, with_log = _weight_arg(weight, mode, x3)
    return token_ops.TokenPoolFunction.apply(
        x3, spans, mask, varlen, mode, w, scalar, float(eps), with_log, backend
    )


def padded_spans(n: int, s: int, device, mask, lengths, start: int):
    """(spans (N, 4) int64, mask (N, S) bool or None): the normalized form of mask / lengths /
    start. Ends are clamped into [start, S] (memory safety where values were not checked)."""
    begin = torch.full((n,), start, dtype=torch.int64, device=device)
    if lengths is None:
        end = torch.full((n,), s, dtype=torch.int64, device=device)
    else:
        end = lengths.to(torch.int64).clamp(min=start, max=s)
    flat_mask = None
    if mask is None:
        count = end - begin
    else:
        flat_mask = (mask.reshape(n, s) != 0).contiguous()
        count = (flat_mask & (torch.arange(s, device=device) >= start)).sum(1)
    origin = torch.zeros_like(begin)
    return torch.stack([begin, end, count, origin], 1).contiguous(), flat_mask


def varlen_spans(cu_seqlens: torch.Tensor, total: int, start: int) -> torch.Tensor:
    """spans (B, 4) int64 of a packed batch (clamped into [0, total] for memory safety)."""
    cu = cu_seqlens.to(torch.int64).clamp(min=0, max=total)
    origin = cu[:-1]
    end = torch.maximum(cu[1:], origin)
    begin = torch.minimum(origin + start, end)
    return torch.stack([begin, end, end - begin, origin], 1).contiguous()


def _plain(fn_name: str):
    from gapkernels import functional

    return getattr(functional, fn_name)


def pool(
    fn: str,
    x,
    pool_type: str,
    weight,
    eps: float,
    return_indices: bool,
    keepdim: bool,
    input_fmt: str,
    backend: str,
    mask,
    lengths,
    start,
    check_p_values: bool = True,
):
    """The public function `fn` with token arguments (or input_fmt="NLC")."""
    from gapkernels import functional

    fmt = input_format(x, input_fmt, fn)
    mode, fixed = POOL_TYPES[pool_type]
    if mask is None and lengths is None and isinstance(start, int) and start == 0:
        kw: dict[str, Any] = dict(keepdim=keepdim, input_fmt=fmt, backend=backend)
        if pool_type == "max":
            return functional.global_max_pool(x, return_indices, **kw)
        if pool_type in ("avgmax", "catavgmax"):
            return functional.global_avgmax_pool(x, pool_type == "catavgmax", **kw)
        if pool_type == "gem":
            return functional.gem_pool(x, weight, eps, keepdim, fmt, backend, check_p_values)
        if pool_type == "mixed":
            return functional.global_mixed_pool(x, weight, **kw)
        return functional.global_avg_pool(x, **kw)
    n, c = functional._check_input(x, fmt, fn)
    if isinstance(fixed, str):
        functional._check_weight(weight, fixed, c, x, fn)
        if mode == MODE_GEM:
            functional._check_gem_args(weight, eps, fn, check_p_values)
    else:
        weight = fixed
    check_token_args(x, fmt, mask, lengths, start, fn)
    name = resolve(backend, x, fn, fmt)
    if name == "reference":
        out, indices = reference_tokens.pool_padded(x, mode, weight, eps, fmt, mask, lengths, start)
    else:
        x3 = functional._as_3d(x, fmt)
        spans, flat_mask = padded_spans(n, x3.shape[2], x.device, mask, lengths, start)
        out, _, indices = _apply(x3, spans, flat_mask, False, mode, weight, eps, name)
    out = reference._finish(out, x, keepdim, fmt)
    if not return_indices:
        return out
    return out, indices.reshape(out.shape)


def varlen_pool(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pool_type: str = "avg",
    *,
    alpha=0.5,
    p=3.0,
    eps: float = 1e-6,
    start: int = 0,
    return_indices: bool = False,
    backend: str = "auto",
):
    """Pools a packed batch: `x` (total_tokens, C) holds B sequences back to back, sequence b
    at rows [cu_seqlens[b], cu_seqlens[b+1]) (flash-attention's convention; int32 or int64,
    cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total_tokens). Returns (B, C) ((B, 2C)
    for catavgmax), and with return_indices (max, mixed, avgmax, catavgmax) also the int64
    (B, C) index of the max within its sequence. The first `start` tokens of each sequence do
    not take part; an empty sequence gives 0 (index -1). pool_type: avg, max, avgmax,
    catavgmax, mixed (alpha), gem (p, eps)."""
    fn = "varlen_pool"
    if pool_type not in POOL_TYPES:
        raise ValueError(
            f"{fn}: pool_type must be one of {', '.join(map(repr, POOL_TYPES))}, got {pool_type!r}"
        )
    from gapkernels import functional

    check_cu_seqlens(x, cu_seqlens, start, fn)
    mode, fixed = POOL_TYPES[pool_type]
    c = x.shape[1]
    weight = fixed
    if fixed == "alpha":
        weight = alpha
    elif fixed == "p":
        weight = p
    if isinstance(fixed, str):
        functional._check_weight(weight, fixed, c, x, fn)
        if mode == MODE_GEM:
            functional._check_gem_args(weight, eps, fn, True)
    if return_indices and mode not in (MODE_MAX, MODE_MIXED, MODE_CAT):
        raise ValueError(f"{fn}: return_indices needs a pool_type with a max, got {pool_type!r}")
    # auto's layout is that of the (1, C, total) NSC view the kernels read (a view: no copy)
    name = resolve(backend, x.t().unsqueeze(0), fn)
    if name == "reference" or x.shape[0] == 0:
        out, indices = reference_tokens.pool_varlen(x, cu_seqlens, mode, weight, eps, start)
    else:
        x3 = x.contiguous().t().unsqueeze(0)  # (1, C, total), NSC strides
        spans = varlen_spans(cu_seqlens, x.shape[0], start)
        out, _, indices = _apply(x3, spans, None, True, mode, weight, eps, name)
    return (out, indices) if return_indices else out
