"""The argument checks of the Triton op pair: those of `csrc/ops.cpp` (check_forward_inputs,
check_backward_inputs), with the same messages, so every backend's ops refuse the same
arguments the same way (RuntimeError, as TORCH_CHECK raises), before any kernel runs.

Differences from the C++ ops, both deliberate:
- x may not be float64 (the Triton kernels accumulate in float32): TypeError, saying which
  backends take float64.
- `weight` may have any strides (expanded, sliced): the kernels read it through its stride.
"""

from __future__ import annotations

import torch

from gapkernels.ops import MAX_MODES, MODE_CAT, MODE_GEM, MODE_MIXED, acc_dtype

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FORWARD_OP = "gapkernels_triton::pool_forward"
BACKWARD_OP = "gapkernels_triton::pool_backward"


def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{op}: {message}")


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


_C10_NAMES = {
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float64: "Double",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it (Float, Half, BFloat16, Double, Long, ...)."""
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def check_forward_inputs(
    x: torch.Tensor, mode: int, weight: torch.Tensor | None, op: str = FORWARD_OP
) -> bool:
    """csrc/ops.cpp's check_forward_inputs; returns whether x has NSC (channels_last) strides."""
    _check(
        0 <= mode <= MODE_GEM,
        op,
        f"mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got {mode}",
    )
    _check(x.dim() == 3, op, f"x must be the 3-D (N, C, S) view, got {x.dim()} dims")
    _check(
        x.dtype in FLOAT_DTYPES,
        op,
        f"x must be float16, bfloat16, float32 or float64, got {_dtype(x.dtype)}",
    )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: x must be float16, bfloat16 or float32 (the Triton kernels "
            f"accumulate in float32), got {_dtype(x.dtype)}; the cuda and cpu "
            "backends take float64"
        )
    n, c, s = x.shape
    _check(s > 0, op, "the spatial size S must be > 0")
    channels_last = False
    if not x.is_contiguous():
        nsc = x.stride(1) == 1 and x.stride(2) == c and (n == 1 or x.stride(0) == s * c)
        _check(
            nsc,
            op,
            "x must have NCS (contiguous) or NSC (channels_last) strides, got "
            f"[{', '.join(str(d) for d in x.stride())}]",
        )
        channels_last = True
    if weight is not None and mode in (MODE_MIXED, MODE_GEM):
        _check(
            weight.dim() == 1 and weight.numel() in (1, c),
            op,
            f"weight must be 1-D with 1 or C={c} elements, got shape {_sizes(weight)}",
        )
        want = acc_dtype(x.dtype)
        _check(
            weight.dtype == want,
            op,
            f"weight must be {_dtype(want)} for x of {_dtype(x.dtype)}, got {_dtype(weight.dtype)}",
        )
        _check(weight.device == x.device, op, f"weight is on {weight.device}, x on {x.device}")
    return channels_last


def check_backward_inputs(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    aux: torch.Tensor,
    indices: torch.Tensor,
    mode: int,
    weight: torch.Tensor | None,
) -> bool:
    """csrc/ops.cpp's check_backward_inputs; returns whether x has NSC strides."""
    op = BACKWARD_OP
    channels_last = check_forward_inputs(x, mode, weight, op)
    n, c, _ = x.shape
    out_c = 2 * c if mode == MODE_CAT else c
    _check(
        grad_out.dim() == 2 and tuple(grad_out.shape) == (n, out_c),
        op,
        f"grad_out must be ({n}, {out_c}), got {_sizes(grad_out)}",
    )
    _check(
        grad_out.dtype == x.dtype,
        op,
        f"grad_out must be {_dtype(x.dtype)}, got {_dtype(grad_out.dtype)}",
    )
    _check(grad_out.is_contiguous(), op, "grad_out must be contiguous")
    _check(
        grad_out.device == x.device and aux.device == x.device and indices.device == x.device,
        op,
        f"every tensor must be on {x.device}",
    )
    if mode in MAX_MODES:
        _check(
            indices.dtype == torch.int64
            and indices.dim() == 2
            and tuple(indices.shape) == (n, c)
            and indices.is_contiguous(),
            op,
            "indices must be contiguous int64 (N, C), as pool_forward returns them with "
            "with_index=True",
        )
    if mode == MODE_GEM:
        _check(
            aux.dim() == 3
            and tuple(aux.shape[:2]) == (n, c)
            and aux.shape[2] >= 2
            and aux.dtype == acc_dtype(x.dtype)
            and aux.is_contiguous(),
            op,
            "aux must be the contiguous (N, C, K>=2) tensor pool_forward returned",
        )
    return channels_last
