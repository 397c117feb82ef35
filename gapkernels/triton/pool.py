"""The Triton op pair gapkernels_triton::pool_forward / pool_backward (schema: docs/DESIGN.md).

Defined with `torch.library.triton_op`, so torch.compile traces into the kernel launches.
triton_op registers its own implementation as the fake kernel; `register_pool_ops` then
replaces it (CustomOpDef.register_fake overrides, it does not add a second one) with the fake
kernel every backend shares, and adds the autograd formula.
"""

import contextlib

import torch
from torch.library import triton_op
from torch.library import wrap_triton as _torch_wrap_triton

from gapkernels import ops as gk_ops
from gapkernels.ops import MAX_MODES, MODE_CAT, MODE_GEM, MODE_MIXED, aux_columns
from gapkernels.triton import checks, configs
from gapkernels.triton.kernels import (
    WEIGHT_PER_CHANNEL,
    WEIGHT_SCALAR,
    WEIGHT_SHARED,
    pool_backward_kernel,
    pool_combine_kernel,
    pool_forward_kernel,
)

SUPPORTED_DTYPES = checks.SUPPORTED_DTYPES


def _device_of(x: torch.Tensor):
    """The guard every launch runs under: Triton launches on the *current* CUDA device (and its
    current stream), so that must be x's device."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel), through which every launch goes (torch.compile traces
    it); the kernel itself where it runs in Triton's interpreter and this torch refuses it
    (torch < 2.14 raises RuntimeError for an InterpretedFunction; newer ones return it)."""
    try:
        return _torch_wrap_triton(kernel)
    except RuntimeError:
        # imported here: the interpreter module needs numpy, and is loaded when a kernel is one
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            raise
        return kernel


def _weight_args(weight: torch.Tensor | None, mode: int, x: torch.Tensor):
    """(tensor, stride, kind) of alpha / p for the kernels: any strides are read correctly
    (per channel at `c * stride`; a 1-element weight at its storage offset)."""
    if mode not in (MODE_MIXED, MODE_GEM) or weight is None:
        return x, 0, WEIGHT_SCALAR.value
    if weight.numel() > 1:
        return weight, weight.stride(0), WEIGHT_PER_CHANNEL.value
    return weight, 0, WEIGHT_SHARED.value


def index_64(n: int, c: int, s: int, config: configs.LaunchConfig) -> bool:
    """Whether the kernels need int64 row and spatial indices: a spatial offset, a piece's end
    or the loop's step past it, or a row-indexed offset (aux: 3 columns; CAT's output: 2C; a
    channel block past C), could reach 2**31."""
    return s + config.s_per_program + config.block_s >= 2**31 or 3 * (n * c + config.rows) >= 2**31


def split_partials(splits: int, rows: int, mode: int, x: torch.Tensor):
    """(partial_stats, partial_index) of a forward split into `splits` pieces of its `rows` rows
    (rows.py's `_store_partials`); `x` (never read) where it does not split or has no max."""
    if splits <= 1:
        return x, x
    stats = torch.empty((splits, 3, rows), dtype=torch.float32, device=x.device)
    if mode not in MAX_MODES:
        return stats, x
    return stats, torch.empty((splits, rows), dtype=torch.int64, device=x.device)


def launch_combine(kernel, leading, sizes, weights, outputs, mode: int, with_log: bool) -> None:
    """A combine kernel (pool_combine_kernel; token_combine_kernel, whose `leading` tensors also
    hold the spans) over N*C rows: `leading` its first tensor arguments, `sizes` = (N, C, S,
    splits), `weights` = (weight_arg, weight_stride, scalar, weight_kind), `outputs` = (out, aux,
    indices) as the forward kernel got them."""
    n, c, s, splits = sizes
    weight_arg, weight_stride, scalar, weight_kind = weights
    wrap_triton(kernel)[(-(-n * c // configs.COMBINE_ROWS),)](
        *leading,
        weight_arg,
        *outputs,
        n,
        c,
        s,
        splits,
        weight_stride,
        scalar,
        MODE=mode,
        WEIGHT_KIND=weight_kind,
        WITH_LOG=with_log,
        ROWS=configs.COMBINE_ROWS,
        num_warps=configs.COMBINE_WARPS,
    )


FORWARD_SCHEMA, BACKWARD_SCHEMA = gk_ops.FORWARD_SCHEMA, gk_ops.BACKWARD_SCHEMA


# torch < 2.14 ignores `schema` and infers one from the annotations (with `SymInt mode`).
@triton_op("gapkernels_triton::pool_forward", mutates_args=(), schema=FORWARD_SCHEMA)
def pool_forward(
    x: torch.Tensor,
    mode: int,
    weight: torch.Tensor | None,
    scalar: float,
    eps: float,
    with_log: bool,
    with_index: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    channels_last = checks.check_forward_inputs(x, mode, weight)
    n, c, s = x.shape
    with_log = with_log and mode == MODE_GEM
    out = torch.empty((n, 2 * c if mode == MODE_CAT else c), dtype=x.dtype, device=x.device)
    aux = torch.empty((n, c, aux_columns(mode, with_log)), dtype=torch.float32, device=x.device)
    # The kernel finds the max's index in any case (not yet tuned without it): without
    # with_index it goes to a scratch tensor, and a (0,) one is returned.
    indices = torch.empty((n, c) if mode in MAX_MODES else (0,), dtype=torch.int64, device=x.device)
    returned = indices if with_index else indices.new_empty((0,))
    if n == 0 or c == 0:
        return out, aux, returned
    # Tensors a mode does not use are passed as `x`: never read or written (constexpr-pruned).
    weight_arg, weight_stride, weight_kind = _weight_args(weight, mode, x)
    aux_arg = aux if aux.numel() else x
    indices_arg = indices if indices.numel() else x
    config = configs.forward_config(n, c, s, channels_last)
    split = config.s_programs > 1
    partial_stats, partial_index = split_partials(config.s_programs, n * c, mode, x)
    index_64_ = index_64(n, c, s, config)
    with _device_of(x):
        wrap_triton(pool_forward_kernel)[(config.row_programs, config.s_programs)](
            x,
            weight_arg,
            out,
            aux_arg,
            indices_arg,
            partial_stats,
            partial_index,
            n,
            c,
            s,
            config.s_per_program,
            weight_stride,
            scalar,
            eps,
            MODE=mode,
            CHANNELS_LAST=channels_last,
            WEIGHT_KIND=weight_kind,
            WITH_LOG=with_log,
            SPLIT=split,
            INDEX_64=index_64_,
            ROWS=config.rows,
            BLOCK_S=config.block_s,
            num_warps=config.num_warps,
        )
        if split:
            launch_combine(
                pool_combine_kernel,
                (partial_stats, partial_index),
                (n, c, s, config.s_programs),
                (weight_arg, weight_stride, scalar, weight_kind),
                (out, aux_arg, indices_arg),
                mode,
                with_log,
            )
    return out, aux, returned


@triton_op("gapkernels_triton::pool_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def pool_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    aux: torch.Tensor,
    indices: torch.Tensor,
    mode: int,
    weight: torch.Tensor | None,
    scalar: float,
    eps: float,
) -> torch.Tensor:
    channels_last = checks.check_backward_inputs(grad_out, x, aux, indices, mode, weight)
    n, c, s = x.shape
    grad_x = gk_ops.grad_input_like(x)
    if n == 0 or c == 0:
        return grad_x
    config = configs.backward_config(n, c, s, channels_last)
    weight_arg, weight_stride, weight_kind = _weight_args(weight, mode, x)
    index_64_ = index_64(n, c, s, config)
    with _device_of(x):
        wrap_triton(pool_backward_kernel)[(config.row_programs, config.s_programs)](
            grad_out,
            x,
            aux if aux.numel() else x,
            indices if indices.numel() else x,
            weight_arg,
            grad_x,
            n,
            c,
            s,
            config.s_per_program,
            weight_stride,
            scalar,
            eps,
            MODE=mode,
            CHANNELS_LAST=channels_last,
            WEIGHT_KIND=weight_kind,
            AUX_COLUMNS=aux.shape[-1] if mode == MODE_GEM else 1,
            INDEX_64=index_64_,
            ROWS=config.rows,
            BLOCK_S=config.block_s,
            num_warps=config.num_warps,
        )
    return grad_x


gk_ops.register_pool_ops(pool_forward, pool_backward)
