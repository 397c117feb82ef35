"""Set-up shared by the CUDA kernel test files (tests/test_cuda*.py): the mark that skips them
without a GPU, the layouts, and the skip where the extension has no CUDA kernels."""

from __future__ import annotations

import pytest
import torch

from gapkernels import _ext

CUDA_MARK = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYOUTS = ["contiguous", "channels_last"]


def skip_without_cuda_kernels():
    if _ext.unavailable_reason("CUDA") is not None:
        pytest.skip(_ext.unavailable_reason("CUDA"))
