"""Fake kernels and autograd for the pool op pairs (see docs/DESIGN.md).

`register_pool_ops(forward, backward)` serves every backend's pair: the C++ one
(torch.ops.gapkernels.pool_forward / pool_backward, CPU and CUDA kernels) and the Triton one.
"""

from __future__ import annotations

import torch

from gapkernels import _ext

# The mode numbers, defined here. csrc/ (enum class Mode) and gapkernels/triton/pool_math.py (which
# is loaded without torch for ahead-of-time compiles) mirror them; tests/test_definitions.py
# fails if any of them disagrees.
MODE_AVG, MODE_MAX, MODE_MIXED, MODE_CAT, MODE_GEM = range(5)
MODES = {"avg": MODE_AVG, "max": MODE_MAX, "mixed": MODE_MIXED, "cat": MODE_CAT, "gem": MODE_GEM}

# The op schemas (without the namespace), defined here for the Triton ops; csrc/ops.cpp registers
# the same text for the C++ ops, and tests/test_definitions.py compares the two.
FORWARD_SCHEMA = (
    "(Tensor x, int mode, Tensor? weight, float scalar, float eps, bool with_log, "
    "bool with_index=True) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor aux, Tensor indices, int mode, "
    "Tensor? weight, float scalar, float eps) -> Tensor"
)
MAX_MODES = (MODE_MAX, MODE_MIXED, MODE_CAT)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def aux_columns(mode: int, with_log: bool) -> int:
    if mode == MODE_MIXED:
        return 1
    if mode == MODE_GEM:
        return 3 if with_log else 2
    return 0


def indices_shape(n: int, c: int, mode: int, with_index: bool) -> tuple[int, ...]:
    """pool_forward's indices: (N, C) for the modes with a max when with_index, else (0,)."""
    return (n, c) if mode in MAX_MODES and with_index else (0,)


def pool_forward_fake(x, mode, weight, scalar, eps, with_log, with_index=True):
    n, c, _ = x.shape
    out = x.new_empty((n, 2 * c if mode == MODE_CAT else c))
    aux = x.new_empty((n, c, aux_columns(mode, with_log)), dtype=acc_dtype(x.dtype))
    indices = x.new_empty(indices_shape(n, c, mode, with_index), dtype=torch.int64)
    return out, aux, indices


def grad_input_like(x: torch.Tensor) -> torch.Tensor:
    """grad_x as the kernels allocate it: NCS when x is contiguous, else NSC."""
    n, c, s = x.shape
    if x.is_contiguous():
        return torch.empty((n, c, s), dtype=x.dtype, device=x.device)
    return torch.empty_strided((n, c, s), (s * c, 1, c), dtype=x.dtype, device=x.device)


def pool_backward_fake(grad_out, x, aux, indices, mode, weight, scalar, eps):
    return grad_input_like(x)


def reduce_to(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, C) per-sample weight gradients summed over N, then to weight's 1 or C elements."""
    grad = grad.sum(0)
    return grad.sum().reshape(1) if weight.numel() == 1 else grad


def weight_grad(mode, grad_out, aux, weight):
    """Gradient to alpha (MIXED) or p (GEM), from the statistics the forward saved in aux."""
    g = grad_out.to(aux.dtype)
    if mode == MODE_MIXED:
        return reduce_to(g * aux[..., 0], weight)
    if aux.shape[-1] < 3:
        raise RuntimeError(
            "gapkernels: the gradient to GeM's p needs the forward to run with with_log=True"
        )
    # aux = (M, r, l): the row maximum of y = clamp(x, eps), r = mean((y/M)**p) and
    # l = mean((y/M)**p * log(y/M)); out = M * r**(1/p), d out/d p = out * (l/(r p) - log(r)/p**2).
    p = weight if weight.numel() == 1 else weight.view(1, -1)
    big_m, r, lg = aux[..., 0], aux[..., 1], aux[..., 2]
    out = gem_finish(big_m, r, p)
    return reduce_to(g * out * (lg / (r * p) - r.log() / (p * p)), weight)


def gem_finish(big_m: torch.Tensor, r: torch.Tensor, p) -> torch.Tensor:
    """GeM's value from the row maximum M and r = mean((y/M)**p): M * r**(1/p) (M when M is inf)."""
    out = big_m * r.pow(1.0 / p)
    return torch.where(torch.isinf(big_m), big_m, out)


# What differentiating a backward op raises (as csrc/ops.cpp's PoolBackwardFunction does).
BACKWARD_OP_NOT_DIFFERENTIABLE = (
    "differentiating the backward op itself is not supported; differentiate through the forward "
    "(gapkernels' functions or pool_forward), whose backward is differentiable to any order"
)


def register_pool_ops(forward_op, backward_op, autograd: bool = True) -> None:
    """Registers the fake kernels and (with `autograd`) the Python autograd of one backend's
    (forward, backward) op pair. The C++ ops' autograd is the accelerator's (csrc/ops.cpp) where
    it is loaded, else gapkernels.autograd's `register_op_autograd`: never both."""
    torch.library.register_fake(forward_op)(pool_forward_fake)
    torch.library.register_fake(backward_op)(pool_backward_fake)
    if not autograd:
        return

    def setup_context(ctx, inputs, output):
        from gapkernels.autograd import save_pool_context

        save_pool_context(ctx, inputs, output)

    def backward(ctx, grad_out, _grad_aux, _grad_indices):
        from gapkernels.autograd import grads_from_context

        grad_x, grad_weight = grads_from_context(ctx, (forward_op, backward_op), grad_out)
        return grad_x, None, grad_weight, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

    def backward_of_backward(ctx, *grads):
        raise RuntimeError(f"{backward_op}: {BACKWARD_OP_NOT_DIFFERENTIABLE}")

    torch.library.register_autograd(backward_op, backward_of_backward)


if _ext.loaded():
    register_pool_ops(
        torch.ops.gapkernels.pool_forward.default,
        torch.ops.gapkernels.pool_backward.default,
        autograd=False,
    )
