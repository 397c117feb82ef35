"""Export support: what gapkernels computes while `torch.onnx.export` traces a model.

The fused kernels are `torch.library` custom ops. `torch.export` and AOTInductor keep them as
they are (the exported program and the compiled package call the fast kernels; the fake kernels
give the shapes, dynamic ones included). ONNX has no such operator, so while
`torch.onnx.export` runs (`torch.onnx.is_in_onnx_export()`, True for the whole export with
`dynamo=True` and with the TorchScript exporter alike), the public functions and
`gapkernels.nn.GlobalPool` compute with the plain-torch functions of this module instead. They
are written to translate to standard ONNX operators:

- avg: `ReduceMean` over the spatial axes; max: `ReduceMax` (`ArgMax` for the indices);
- avgmax / mixed: both, `Mul` / `Add`; catavgmax: `Concat`;
- GeM, in the stable form of `gapkernels.reference.gem_stats`: `Clip` (clamp to eps),
  `ReduceMax` (the row maximum M), `Div`, `Pow`, `ReduceMean`, `Pow`, `Mul` (M * r**(1/p)), and
  `IsInf` / `Where` for an infinite M;
- float16 / bfloat16 inputs are `Cast` to float32 and back, as the kernels accumulate;
- learnable `alpha` / `p` are initializers (folded with their sigmoid / softplus by the
  exporter's optimizer).

No argument is needed: `torch.onnx.export(model, (x,), dynamo=True)` of a model that uses the
functions, `GlobalPool` or `convert_model` gives a graph of standard operators. The results equal
the reference's (`gapkernels.reference`) up to float rounding; max's index, where returned, is the
first maximum (`ArgMax`), and a NaN's index is whatever the runtime's ArgMax gives.
"""

from __future__ import annotations

import torch


def onnx_exporting() -> bool:
    """Whether `torch.onnx.export` is tracing (either exporter)."""
    return torch.onnx.is_in_onnx_export()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(x: torch.Tensor, input_fmt: str) -> tuple[list[int], int]:
    """The spatial axes and the channel axis of x."""
    if input_fmt == "NHWC":
        return list(range(1, x.dim() - 1)), x.dim() - 1
    return list(range(2, x.dim())), 1


def _finish(out: torch.Tensor, x: torch.Tensor, keepdim: bool, input_fmt: str) -> torch.Tensor:
    """(N, C') statistics to the output shape and dtype, with Unsqueeze (no shape arithmetic)."""
    out = out.to(x.dtype)
    return _unreduce(out, x, input_fmt) if keepdim else out


def _unreduce(stat: torch.Tensor, x: torch.Tensor, input_fmt: str) -> torch.Tensor:
    """(N, C) to (N, C, 1, ...) or (N, 1, ..., C): broadcasts against x (Unsqueeze only; multi-axis
    squeeze and keepdim-then-flatten do not suit both exporters as well)."""
    for _ in range(x.dim() - 2):
        stat = stat.unsqueeze(1 if input_fmt == "NHWC" else -1)
    return stat


def _weight(w, acc: torch.dtype):
    """alpha / p: a float, or a () / (C,) tensor, in the acc dtype (broadcasts to (N, C))."""
    if isinstance(w, torch.Tensor):
        return w.to(acc)
    return float(w)


def _avg(xf, axes):
    return xf.mean(dim=axes)


def _max(xf, axes):
    return xf.amax(dim=axes)


def global_avg_pool(x, *, keepdim=False, input_fmt="NCHW"):
    axes, _ = _layout(x, input_fmt)
    return _finish(_avg(x.to(_acc(x.dtype)), axes), x, keepdim, input_fmt)


def global_max_pool(x, return_indices=False, *, keepdim=False, input_fmt="NCHW"):
    axes, c_axis = _layout(x, input_fmt)
    xf = x.to(_acc(x.dtype))
    values = _finish(_max(xf, axes), x, keepdim, input_fmt)
    if not return_indices:
        return values
    # (N, C, S): the flat spatial offset of the first maximum.
    rows = xf.movedim(c_axis, 1).flatten(2)
    indices = rows.argmax(dim=2)
    return values, (_unreduce(indices, x, input_fmt) if keepdim else indices)


def global_mixed_pool(x, alpha=0.5, *, keepdim=False, input_fmt="NCHW"):
    axes, _ = _layout(x, input_fmt)
    xf = x.to(_acc(x.dtype))
    a = _weight(alpha, xf.dtype)
    out = a * _max(xf, axes) + (1 - a) * _avg(xf, axes)
    return _finish(out, x, keepdim, input_fmt)


def global_avgmax_pool(x, concat=False, *, keepdim=False, input_fmt="NCHW"):
    axes, _ = _layout(x, input_fmt)
    xf = x.to(_acc(x.dtype))
    avg, mx = _avg(xf, axes), _max(xf, axes)
    out = torch.cat([avg, mx], dim=1) if concat else 0.5 * (avg + mx)
    return _finish(out, x, keepdim, input_fmt)


def global_gem_pool(x, p=3.0, eps=1e-6, *, keepdim=False, input_fmt="NCHW"):
    """M * mean((y / M)**p)**(1/p) with y = clamp(x, eps) and M = max(y), detached, per row
    (gapkernels.reference.gem_stats): no power over- or underflows for finite inputs."""
    axes, c_axis = _layout(x, input_fmt)
    xf = x.to(_acc(x.dtype))
    pw = _weight(p, xf.dtype)
    y = xf.clamp(min=eps)
    big_m = y.amax(dim=axes).detach()  # (N, C)
    if isinstance(pw, torch.Tensor) and pw.dim() == 1:
        # (C,) -> broadcast along the channel axis of the un-reduced input.
        pe = pw.reshape([-1] + [1] * (x.dim() - 1 - c_axis))
    else:
        pe = pw
    r = (y / _unreduce(big_m, x, input_fmt)).pow(pe).mean(dim=axes)
    out = big_m * r.pow(1.0 / pw)
    out = torch.where(torch.isinf(big_m), big_m, out)
    return _finish(out, x, keepdim, input_fmt)


# --- Programs exported with the kernels --------------------------------------------------------


def _pool_forward_decomposition(x, mode, weight, scalar, eps, with_log, with_index=True):
    """gapkernels' pool_forward (docs/DESIGN.md) in plain torch ops: (out, aux, indices) of an
    (N, C, S) input, for programs that torch.export captured with the kernels in them."""
    from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, aux_columns

    xf = x.to(_acc(x.dtype))
    n, c = xf.shape[0], xf.shape[1]
    w = scalar if weight is None else weight.to(xf.dtype).reshape(-1)
    no_aux = xf.new_zeros((n, c, aux_columns(mode, with_log)))
    no_indices = xf.new_zeros((0,), dtype=torch.int64)
    if mode == MODE_AVG:
        return xf.mean(dim=2).to(x.dtype), no_aux, no_indices
    if mode == MODE_GEM:
        y = xf.clamp(min=eps)
        big_m = y.amax(dim=2)
        pe = w.unsqueeze(-1) if isinstance(w, torch.Tensor) else w
        ratio = (y / big_m.unsqueeze(-1)).pow(pe)
        r = ratio.mean(dim=2)
        out = torch.where(torch.isinf(big_m), big_m, big_m * r.pow(1.0 / w))
        stats = [big_m, r]
        if with_log:
            stats.append((ratio * (y / big_m.unsqueeze(-1)).log()).mean(dim=2))
        return out.to(x.dtype), torch.stack(stats, dim=-1), no_indices
    avg, mx = xf.mean(dim=2), xf.amax(dim=2)
    indices = xf.argmax(dim=2) if with_index else no_indices
    if mode == MODE_MAX:
        return mx.to(x.dtype), no_aux, indices
    if mode == MODE_CAT:
        return torch.cat([avg, mx], dim=1).to(x.dtype), no_aux, indices
    if mode == MODE_MIXED:
        return (w * mx + (1 - w) * avg).to(x.dtype), (mx - avg).unsqueeze(-1), indices
    raise ValueError(f"gapkernels pool_forward: unknown mode {mode}")


def decompositions() -> dict:
    """A decomposition table that replaces gapkernels' custom ops (C++ and Triton) with plain
    torch ops, for a program already captured by `torch.export` with the kernels in it:

        ep = torch.export.export(model, (x,))            # runs the kernels (AOTInductor, ...)
        onnx_program = torch.onnx.export(ep.run_decompositions(gapkernels.export.decompositions()),
                                         dynamo=True)     # standard ONNX operators

    (Exporting the model itself, `torch.onnx.export(model, (x,), dynamo=True)`, needs nothing.)
    """
    table = {}
    if hasattr(torch.ops, "gapkernels") and hasattr(torch.ops.gapkernels, "pool_forward"):
        table[torch.ops.gapkernels.pool_forward.default] = _pool_forward_decomposition
    try:
        from gapkernels import triton as gk_triton
    except ImportError:
        pass
    else:
        table[gk_triton.pool_forward] = _pool_forward_decomposition
    return table
