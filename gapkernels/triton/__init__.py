"""gapkernels' Triton backend: the op pair of docs/DESIGN.md as `torch.library.triton_op`s.

`pool_forward` / `pool_backward` are torch.ops.gapkernels_triton.pool_forward.default /
pool_backward.default (fake kernels and autograd registered by gapkernels.ops). Importing this
package raises ImportError, with the reason, when Triton is missing or too old; it never queries
CUDA. On the CPU the kernels run only in Triton's interpreter: TRITON_INTERPRET=1 must be set
before this package is first imported (the kernels are built as interpreted or compiled when
they are defined).
"""

from __future__ import annotations

import torch
from packaging.version import Version

MIN_TRITON = Version("3.6")

try:
    import triton
except ImportError as exc:
    raise ImportError(f"Triton is not installed ({exc}); `pip install 'triton>=3.6'`") from exc

if Version(triton.__version__).release < MIN_TRITON.release:
    raise ImportError(
        f"gapkernels needs Triton >= {MIN_TRITON}, found {triton.__version__}; "
        "`pip install -U 'triton>=3.6'`"
    )

from gapkernels.triton import kernels  # noqa: E402
from gapkernels.triton import pool as _pool  # noqa: E402,F401  (defines and registers the ops)

pool_forward = torch.ops.gapkernels_triton.pool_forward.default
pool_backward = torch.ops.gapkernels_triton.pool_backward.default

INTERPRETED = type(kernels.pool_forward_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(x: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on x, else why not and how to get them."""
    if x.dtype == torch.float64:
        return (
            "the Triton kernels do not support float64 (they accumulate in float32); "
            "use backend='cuda' or 'cpu' for float64, or cast x to float32"
        )
    if x.dtype not in _pool.SUPPORTED_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if INTERPRETED:
            return None
        return (
            "the Triton kernels run on CUDA tensors, and x is on the CPU; move x to a GPU, "
            "or set TRITON_INTERPRET=1 before gapkernels.triton is first imported to run "
            "them (slowly) in Triton's interpreter"
        )
    return f"the Triton kernels run on CUDA tensors, and x is on {x.device}"


__all__ = ["pool_backward", "pool_forward", "unavailable_reason"]
