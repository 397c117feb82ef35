"""gapkernels: fused global pooling (avg, max, mixed, avgmax, GeM) for PyTorch.

One pass over memory forward, one backward, on CUDA (C++ extension), Triton and CPU (C++).
"""

import warnings as _warnings

import torch as _torch
from packaging.version import InvalidVersion as _InvalidVersion
from packaging.version import Version as _Version

from gapkernels._version import __version__

TORCH_MIN = (2, 11)  # the oldest torch gapkernels runs with (pyproject.toml: torch>=2.11)
TORCH_TESTED_MAX = (2, 14)  # the newest torch it was tested with


def _check_torch(torch_version: str) -> None:
    """Refuse a torch older than TORCH_MIN with a message that says what to do; warn on one newer
    than TORCH_TESTED_MAX. Compared as versions (release numbers only, so that 2.11.0a0+git and
    2.14.1+cu130 count as 2.11 and 2.14), never as strings."""

    def name(release):
        return ".".join(map(str, release))

    supported = f"torch {name(TORCH_MIN)} through {name(TORCH_TESTED_MAX)} are supported"
    try:
        release = _Version(torch_version).release[:2]
    except _InvalidVersion:
        raise ImportError(
            f"gapkernels {__version__} cannot read the version of the installed "
            f"torch ({torch_version!r}); {supported}"
        ) from None
    if release < TORCH_MIN:
        raise ImportError(
            f"gapkernels {__version__} needs torch >= {name(TORCH_MIN)}, but torch "
            f"{torch_version} is installed; {supported}. Upgrade torch "
            f"(pip install 'torch>={name(TORCH_MIN)}'), then rebuild gapkernels against it."
        )
    if release > TORCH_TESTED_MAX:
        _warnings.warn(
            f"gapkernels {__version__} was tested with torch {name(TORCH_MIN)} through "
            f"{name(TORCH_TESTED_MAX)}, not with torch {torch_version}; build gapkernels "
            "against it (pip install --no-build-isolation) and report any problem",
            stacklevel=2,
        )


_check_torch(_torch.__version__)

from gapkernels import nn, reference  # noqa: E402
from gapkernels import ops as _ops  # noqa: E402, F401  (registers fake kernels and autograd)
from gapkernels.backends import available_backends  # noqa: E402
from gapkernels.convert import convert_model  # noqa: E402
from gapkernels.functional import (  # noqa: E402
    global_avg_pool,
    global_avgmax_pool,
    global_gem_pool,
    global_max_pool,
    global_mixed_pool,
)
from gapkernels.tokens import varlen_pool  # noqa: E402

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
    "varlen_pool",
]
