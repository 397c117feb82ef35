"""Loads the compiled extension (gapkernels._C) and says why when it cannot.

A missing extension (never built) is a missing backend: `auto` falls back to another one.
A broken extension (built, but fails to load) is an error that `auto` does not hide.
"""

from __future__ import annotations

import importlib

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the gapkernels checkout "
    "(set CUDA_HOME=/usr/local/cuda for the CUDA kernels)"
)

_C = None
missing_reason: str | None = None  # the extension was never built
broken_reason: str | None = None  # it was built but does not load

try:
    _C = importlib.import_module("gapkernels._C")  # registers torch.ops.gapkernels.*
except ModuleNotFoundError as exc:
    if exc.name != "gapkernels._C":
        broken_reason = f"gapkernels._C failed to import: {exc!r}"
    else:
        missing_reason = "the gapkernels C++/CUDA extension (gapkernels._C) is not built"
except (ImportError, OSError) as exc:
    broken_reason = (
        f"gapkernels._C is present but failed to load ({exc}); it was probably built against "
        f"another torch than {torch.__version__}"
    )


def loaded() -> bool:
    return _C is not None


# Read once here: the public functions consult it on every call, also inside torch.compile graphs.
KERNEL_KEYS = frozenset(
    key
    for key in ("CPU", "CUDA")
    if _C is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key("gapkernels::pool_forward", key)
)


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered kernels for a dispatch key ("CPU" or "CUDA")."""
    return dispatch_key in KERNEL_KEYS


def unavailable_reason(dispatch_key: str) -> str | None:
    """None when the extension has kernels for `dispatch_key`, else why not and how to fix it."""
    if broken_reason is not None:
        return f"{broken_reason}; rebuild it: {BUILD_HINT}"
    if missing_reason is not None:
        return f"{missing_reason}; {BUILD_HINT}"
    if not has_kernel(dispatch_key):
        return (
            f"the gapkernels extension was built without {dispatch_key} kernels; "
            "rebuild it with a CUDA toolkit and a CUDA build of torch: " + BUILD_HINT
        )
    return None
