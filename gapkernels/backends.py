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


def _channels_inner(x: torch.Tensor, input_fmt: str) -> bool:
    """Whether x is stored channels-last (the NSC layout) rather than contiguous or otherwise."""
    x = x.movedim(-1, 1) if input_fmt == "NHWC" else x
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


# The choices are cached: what is available depends only on the backend, the device and the
# dtype (the extension and Triton are loaded once per process), and `auto` on a GPU also on the
# layout and the CUDA_TABLE row that the input's size falls in. An error is raised again on every
# call, never cached. A traced call (torch.compile, torch.export: `resolve(..., traced=True)`)
# neither reads nor writes them: Dynamo would guard on their contents, and the first eager call
# that fills them would recompile the graph.
_reasons: dict[tuple[str, torch.device, torch.dtype], str | None] = {}
_auto_choices: dict[tuple, str] = {}


def _cached_reason(name: str, x: torch.Tensor, traced: bool = False) -> str | None:
    if traced:
        return unavailable_reason(name, x)
    key = (name, x.device, x.dtype)
    if key not in _reasons:
        _reasons[key] = unavailable_reason(name, x)
    return _reasons[key]


def _first_available(candidates: tuple[str, ...], x: torch.Tensor, traced: bool = False) -> str:
    for name in candidates:
        reason = _cached_reason(name, x, traced)
        if reason is None:
            return name
        if name in ("cpu", "cuda") and _ext.broken(name.upper()):
            # A broken build is an error to fix, not a backend to skip silently.
            raise RuntimeError(reason)
    return "reference"


def _auto(x: torch.Tensor, input_fmt: str, traced: bool) -> str:
    if x.is_cpu:
        key: tuple = ("cpu",)
        candidates: tuple[str, ...] = ("cpu",)
    elif x.is_cuda:
        dtype = str(x.dtype).removeprefix("torch.")
        layout = "channels_last" if _channels_inner(x, input_fmt) else "contiguous"
        size = x.numel() * x.element_size()
        row, candidates = -1, ()
        for i, (row_dtype, row_layout, min_bytes, order) in enumerate(auto_table.CUDA_TABLE):
            if row_dtype in ("*", dtype) and row_layout in ("*", layout) and size >= min_bytes:
                row, candidates = i, order
                break
        key = (x.device, x.dtype, layout, row)
    else:
        return "reference"
    if traced:
        return _first_available(candidates, x, traced)
    choice = _auto_choices.get(key)
    if choice is None:
        choice = _auto_choices[key] = _first_available(candidates, x)
    return choice


# os.environ.get costs more than a small pooling's kernel (it encodes the key and raises KeyError
# when unset); os.environ's own dict, keyed by the encoded name, is read directly when present.
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR
_ENV_DATA = getattr(os.environ, "_data", None)


def _env_backend() -> str | None:
    if _ENV_DATA is None:
        return os.environ.get(ENV_VAR)
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def resolve(backend: str, x: torch.Tensor, input_fmt: str, fn: str, traced: bool = False) -> str:
    """The backend that runs `fn` on `x` (laid out as `input_fmt` says); raises if an explicitly
    named one cannot. `traced`: inside torch.compile / torch.export (the caches are skipped)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"{fn}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        )
    if backend == "auto":
        # _env_backend(), inlined: every call takes this path.
        env = os.environ.get(ENV_VAR) if _ENV_DATA is None else _ENV_DATA.get(_ENV_KEY)
        if env is not None and _ENV_DATA is not None:
            env = os.environ.decodevalue(env)
        if env:
            if env not in BACKENDS:
                raise ValueError(
                    f"{fn}: {ENV_VAR}={env!r} is not a backend; expected one of "
                    f"{', '.join(map(repr, BACKENDS))}"
                )
            backend = env
        if backend == "auto":
            return _auto(x, input_fmt, traced)
    reason = _cached_reason(backend, x, traced)
    if reason is not None:
        raise RuntimeError(f"{fn}: backend={backend!r} is not available: {reason}")
    return backend


def auto_chosen(backend: str) -> bool:
    """Whether the backend `resolve` gives for `backend` is `auto`'s choice (not one that the
    caller or GAPKERNELS_BACKEND named)."""
    return backend == "auto" and not _env_backend()


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on tensors of `device` in this process ("reference" always)."""
    x = torch.empty((1, 1, 1), device=device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, x) is None]
