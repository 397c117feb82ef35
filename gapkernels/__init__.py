"""gapkernels: fused global pooling (avg, max, mixed, avgmax, GeM) for PyTorch.

One pass over memory forward, one backward, on CUDA (C++ extension), Triton and CPU (C++).
"""
from gapkernels import ops as _ops  # noqa: F401  (registers fake kernels and autograd)
from gapkernels import nn, reference
from gapkernels.backends import available_backends
from gapkernels.convert import convert_model
from gapkernels.functional import (
    global_avg_pool,
    global_avgmax_pool,
    global_gem_pool,
    global_max_pool,
    global_mixed_pool,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "convert_model",
    "global_avg_pool",
    "global_avgmax_pool",
    "global_gem_pool",
    "global_max_pool",
    "global_mixed_pool",
    "nn",
    "reference",
]
