"""The Triton token op pair gapkernels_triton::token_pool_forward / token_pool_backward (schema:
gapkernels/token_ops.py, docs/DESIGN.md "Token pooling"), as `torch.library.triton_op`s; their
fake kernels and autograd come from `token_ops.register_token_ops`.

The launch geometry is the pool kernels' (configs.forward_config / backward_config) for B output
rows of a typical length: S when padded, the mean sequence length total / B for varlen (known
without reading cu_seqlens). Where the pool forward would split S over several programs, the
token forward splits each row's own range into as many pieces and merges them with
token_combine_kernel (deterministic: the pieces depend on the spans only); the backward cuts each
row's own range into the pool backward's number of pieces. NOT MEASURED on a GPU.
"""

import torch
from torch.library import triton_op

from gapkernels import ops as gk_ops
from gapkernels import token_ops
from gapkernels.ops import MAX_MODES, MODE_CAT, MODE_GEM, aux_columns
from gapkernels.triton import checks, configs
from gapkernels.triton.pool import (
    _device_of,
    _weight_args,
    launch_combine,
    split_partials,
    wrap_triton,
)
from gapkernels.triton.token_kernels import (
    token_backward_kernel,
    token_combine_kernel,
    token_forward_kernel,
)

FORWARD_OP = "gapkernels_triton::token_pool_forward"
BACKWARD_OP = "gapkernels_triton::token_pool_backward"


def _check(x, spans, mask, varlen, mode, weight, op) -> bool:
    """The op's argument checks (RuntimeError, before any kernel); returns whether x is NSC."""
    channels_last = checks.check_forward_inputs(x, mode, weight, op)
    token_ops.check_token_inputs(x, spans, mask, varlen, op)
    return channels_last or varlen


def _mask_arg(mask, x):
    return x if mask is None else mask.view(torch.uint8)


def _launch(choose, x: torch.Tensor, rows_out: int, channels_last: bool) -> configs.LaunchConfig:
    """configs.forward_config or backward_config (`choose`) for `rows_out` output rows of the
    typical length: S (padded), or the mean sequence length (varlen)."""
    n, c, s = x.shape
    typical = max(1, s // max(rows_out, 1)) if n != rows_out else s
    return choose(rows_out, c, typical, channels_last)


@triton_op(FORWARD_OP, mutates_args=(), schema=token_ops.TOKEN_FORWARD_SCHEMA)
def token_pool_forward(
    x: torch.Tensor,
    spans: torch.Tensor,
    mask: torch.Tensor | None,
    varlen: bool,
    mode: int,
    weight: torch.Tensor | None,
    scalar: float,
    eps: float,
    with_log: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    channels_last = _check(x, spans, mask, varlen, mode, weight, FORWARD_OP)
    _, c, s = x.shape
    rows_out = spans.shape[0]
    with_log = with_log and mode == MODE_GEM
    out = torch.empty((rows_out, 2 * c if mode == MODE_CAT else c), dtype=x.dtype, device=x.device)
    aux = torch.empty(
        (rows_out, c, aux_columns(mode, with_log)), dtype=torch.float32, device=x.device
    )
    indices = torch.empty(
        (rows_out, c) if mode in MAX_MODES else (0,), dtype=torch.int64, device=x.device
    )
    if rows_out == 0 or c == 0:
        return out, aux, indices
    weight_arg, weight_stride, weight_kind = _weight_args(weight, mode, x)
    aux_arg = aux if aux.numel() else x
    indices_arg = indices if indices.numel() else x
    config = _launch(configs.forward_config, x, rows_out, channels_last)
    split = config.s_programs > 1
    partial_stats, partial_index = split_partials(config.s_programs, rows_out * c, mode, x)
    with _device_of(x):
        wrap_triton(token_forward_kernel)[(config.row_programs, config.s_programs)](
            x,
            spans,
            _mask_arg(mask, x),
            weight_arg,
            out,
            aux_arg,
            indices_arg,
            partial_stats,
            partial_index,
            rows_out,
            c,
            s,
            weight_stride,
            scalar,
            eps,
            MODE=mode,
            CHANNELS_LAST=channels_last,
            VARLEN=varlen,
            HAS_MASK=mask is not None,
            WEIGHT_KIND=weight_kind,
            WITH_LOG=with_log,
            SPLIT=split,
            ROWS=config.rows,
            BLOCK_S=config.block_s,
            num_warps=config.num_warps,
        )
        if split:
            launch_combine(
                token_combine_kernel,
                (partial_stats, partial_index, spans),
                (rows_out, c, s, config.s_programs),
                (weight_arg, weight_stride, scalar, weight_kind),
                (out, aux_arg, indices_arg),
                mode,
                with_log,
            )
    return out, aux, indices


@triton_op(BACKWARD_OP, mutates_args=(), schema=token_ops.TOKEN_BACKWARD_SCHEMA)
def token_pool_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    spans: torch.Tensor,
    mask: torch.Tensor | None,
    varlen: bool,
    aux: torch.Tensor,
    indices: torch.Tensor,
    mode: int,
    weight: torch.Tensor | None,
    scalar: float,
    eps: float,
) -> torch.Tensor:
    channels_last = _check(x, spans, mask, varlen, mode, weight, BACKWARD_OP)
    token_ops.check_token_backward_inputs(grad_out, x, spans, aux, indices, mode, BACKWARD_OP)
    _, c, s = x.shape
    rows_out = spans.shape[0]
    grad_x = gk_ops.grad_input_like(x)
    if rows_out == 0 or c == 0:
        return grad_x.zero_()
    config = _launch(configs.backward_config, x, rows_out, channels_last)
    weight_arg, weight_stride, weight_kind = _weight_args(weight, mode, x)
    with _device_of(x):
        wrap_triton(token_backward_kernel)[(config.row_programs, config.s_programs)](
            grad_out,
            x,
            spans,
            _mask_arg(mask, x),
            aux if aux.numel() else x,
            indices if indices.numel() else x,
            weight_arg,
            grad_x,
            rows_out,
            c,
            s,
            weight_stride,
            scalar,
            eps,
            MODE=mode,
            CHANNELS_LAST=channels_last,
            VARLEN=varlen,
            HAS_MASK=mask is not None,
            WEIGHT_KIND=weight_kind,
            AUX_COLUMNS=aux.shape[-1] if mode == MODE_GEM else 1,
            ROWS=config.rows,
            BLOCK_S=config.block_s,
            num_warps=config.num_warps,
        )
    return grad_x


token_ops.register_token_ops(token_pool_forward, token_pool_backward)
