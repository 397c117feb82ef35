"""Backend names, their availability, and the `auto` choice."""

from __future__ import annotations

import os

import torch

from gapkernels import _ext, auto_table

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "GAPKERNELS_BACKEND"


def _triton_unavailable_reason(x: torch.Tensor) -> str | None:
    try:
        from gapkernels import triton as gk_triton
    except ImportError as exc:
        return f"gapkernels' Triton kernels cannot be imported ({exc}); `pip install triton`"
    return gk_triton.unavailable_reason(x)


def unavailable_reason(backend: str, x: torch.Tensor) -> str | None:
    """None when `backend` can run on `x`, else why not and how to get it."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if x.device.type != "cpu":
            return (
                f"backend='cpu' runs on CPU tensors, and x is on {x.device}; "
                "use backend='cuda' or 'triton' for GPU tensors"
            )
        return _ext.unavailable_reason("CPU")
    if backend == "cuda":
        if x.device.type != "cuda":
            return (
                f"backend='cuda' runs on CUDA tensors, and x is on {x.device}; "
                "move x to a GPU, or use backend='cpu'"
            )
        return _ext.unavailable_reason("CUDA")
    if backend == "triton":
        return _triton_unavailable_reason(x)
    raise ValueError(f"unknown backend {backend!r}")


def _layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def _auto(x: torch.Tensor, channels_last: bool) -> str:
    candidates: tuple[str, ...]
    if x.device.type == "cpu":
        candidates = ("cpu",)
    elif x.device.type == "cuda":
        dtype = str(x.dtype).removeprefix("torch.")
        layout = _layout_name(channels_last)
        size = x.numel() * x.element_size()
        candidates = ()
        for row_dtype, row_layout, min_bytes, order in auto_table.CUDA_TABLE:
            if row_dtype in ("*", dtype) and row_layout in ("*", layout) and size >= min_bytes:
                candidates = order
                break
    else:
        candidates = ()
    for name in candidates:
        reason = unavailable_reason(name, x)
        if reason is None:
            return name
        if name in ("cpu", "cuda") and _ext.broken_reason is not None:
            # A broken build is an error to fix, not a backend to skip silently.
            raise RuntimeError(reason)
    return "reference"


def resolve(backend: str, x: torch.Tensor, channels_last: bool, fn: str) -> str:
    """The backend that runs `fn` on `x`; raises if an explicitly named one cannot."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"{fn}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        )
    if backend == "auto":
        env = os.environ.get(ENV_VAR)
        if env:
            if env not in BACKENDS:
                raise ValueError(
                    f"{fn}: {ENV_VAR}={env!r} is not a backend; expected one of "
                    f"{', '.join(map(repr, BACKENDS))}"
                )
            backend = env
    if backend == "auto":
        return _auto(x, channels_last)
    reason = unavailable_reason(backend, x)
    if reason is not None:
        raise RuntimeError(f"{fn}: backend={backend!r} is not available: {reason}")
    return backend


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on tensors of `device` in this process ("reference" always)."""
    x = torch.empty((1, 1, 1), device=device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, x) is None]
