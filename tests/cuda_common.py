"""Set-up shared by the CUDA kernel test files (tests/test_cuda*.py, test_tokens_cuda*.py,
test_stable_cuda_lib.py): the mark that skips them without a GPU, the layouts, the skip where the
extension has no CUDA kernels, and the comparison of the CUDA and CPU kernels' check messages."""

from __future__ import annotations

import pytest
import torch

from gapkernels import _ext

CUDA_MARK = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYOUTS = ["contiguous", "channels_last"]


def skip_without_cuda_kernels():
    if _ext.unavailable_reason("CUDA") is not None:
        pytest.skip(_ext.unavailable_reason("CUDA"))


# redispatch runs one dispatch key's kernel whatever the tensors' devices, so the CUDA kernel's
# checks run on CPU (and meta) tensors without a GPU; a valid CPU input then stops at "must be a
# CUDA tensor", before anything touches CUDA.
CPU_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def assert_same_check_message(op, args, fragment):
    """The CPU and the CUDA kernel of `op` (an OpOverload) both refuse `args`, with the same
    message, which holds `fragment` and starts with the op's name."""
    with pytest.raises(RuntimeError) as cpu:
        op.redispatch(CPU_KEY, *args)
    with pytest.raises(RuntimeError) as cuda:
        op.redispatch(CUDA_KEY, *args)
    message = str(cpu.value)
    assert message.startswith(f"{op._schema.name}: ") and fragment in message, message
    assert str(cuda.value) == message
