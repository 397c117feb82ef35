"""Small CPU inputs under torch.compile: the pooling as plain torch ops that Inductor fuses into its
own kernel, instead of a call of the custom op (see docs/LATENCY.md, "Under torch.compile").

On a batch-1 squeeze-excitation or head tensor, the kernel takes a fraction of a microsecond and a
compiled graph's cost is the calls around it: Inductor calls a custom op from its Python wrapper
(the boxed dispatcher call, a getitem and an assert per output), against its own generated C++
kernel with no Python between. So up to `MAX_ELEMENTS` elements (per mode, with or without a
backward; a static shape, known at trace time) the public functions on `backend="auto"` trace to
this module's math; above, where the kernels beat Inductor's code, to the op. The semantics are
the kernels': statistics in float32 (float64 for float64) rounded once to x's dtype; the max and
its gradient at the first maximum of a row, or at its last NaN (adaptive_max_pool's rule); GeM
with the eps clamp, relative to the row maximum (`reference.gem_stats`), +inf where that is +inf.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, gem_finish

# The largest input (N * C * S elements) pooled inline under torch.compile on the CPU, per mode, for
# a graph without a backward (False) and one with (True: an input requires grad). Measured with
# `python -m gapkernels.bench.latency --modes compile --apis fn --impls cpu,inline --no-models
# --shapes ...` from (1, 64, 7, 7) to (4, 2048, 7, 7) and (1, 64, 112, 112), float32, 1 thread
# (AMD EPYC, torch 2.14.1; docs/LATENCY.md). Below these Inductor's own kernel wins (the op's call
# costs some 10-20 us more); above them the custom op does: its backward for the max-based modes
# (Inductor's scatter of the max's gradient), its power function for GeM (Inductor's pow, and the
# max-relative form's second pass over x), its forward on long rows.
MAX_ELEMENTS = {
    False: {
        MODE_AVG: 1 << 20,
        MODE_MAX: 1 << 18,
        MODE_MIXED: 1 << 18,
        MODE_CAT: 1 << 18,
        MODE_GEM: 4096,
    },
    True: {
        MODE_AVG: 1 << 20,
        MODE_MAX: 1 << 16,
        MODE_MIXED: 1 << 16,
        MODE_CAT: 1 << 16,
        MODE_GEM: 4096,
    },
}


def applies(x: torch.Tensor, mode: int, needs_grad: bool) -> bool:
    """Whether a compiled graph pools `x` (a CPU tensor on backend "auto") inline: a static shape
    of at most MAX_ELEMENTS[needs_grad][mode] elements, not exporting, GAPKERNELS_BACKEND unset,
    the C++ CPU kernels built (else "auto" is the reference, plain torch too)."""
    # True only when it holds without a guard: a dynamic shape keeps the op (one graph for all).
    if not statically_known_true(x.numel() <= 1 << 20):  # the largest limit (asserted below)
        return False
    return _plan(mode, needs_grad, x.numel())


assert max(max(t.values()) for t in MAX_ELEMENTS.values()) <= 1 << 20


def _plan(mode: int, needs_grad: bool, numel: int) -> bool:
    """applies(), once the shape is known static. Evaluated once when Dynamo traces the call and
    taken as a constant (`torch.compiler.assume_constant_result`'s mark, set below without
    importing Dynamo): no guards on what it reads, which would cost more per call than the pooling
    (each guard is checked on every call of the compiled graph)."""
    from gapkernels import _ext, backends

    # torch.export (and AOTInductor) keeps the op. Asked here, where the call is real: Dynamo
    # replaces a traced torch.compiler.is_exporting() by a constant, True under torch.compile too
    # in torch 2.11 (pytorch/pytorch#176347, fixed by 2.13), which kept the op in every graph.
    if torch.compiler.is_exporting():
        return False
    if backends._env_backend() or _ext.unavailable_reason("CPU") is not None:
        return False
    return numel <= MAX_ELEMENTS[needs_grad][mode]


_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]


assert (MODE_AVG, MODE_MAX, MODE_MIXED, MODE_CAT, MODE_GEM) == (0, 1, 2, 3, 4)  # pool() below


def _max(xf: torch.Tensor):
    """(values, int64 indices) of the row maxima of (N, C, S) `xf` with adaptive_max_pool's rule,
    which the kernels follow: the first maximum, or the last NaN of a row that holds any
    (Tensor.max(dim) takes the first NaN). The values (and their gradient) come from the indices,
    found with float reductions: Inductor's argmax is several times slower."""
    big_m = xf.amax(dim=2, keepdim=True)
    s = xf.shape[2]
    pos = torch.arange(s, dtype=xf.dtype, device=xf.device)
    # A key per position, the largest wins: s + pos at a NaN (the last NaN), s - pos at the
    # maximum (the first maximum), 0 elsewhere. (Exact in float32 for s < 2**23.)
    key = torch.where(xf != xf, pos + s, torch.where(xf == big_m, s - pos, 0.0)).amax(dim=2)
    indices = torch.where(key >= s, key - s, s - key).long()
    return xf.gather(2, indices.unsqueeze(2)).squeeze(2), indices


def pool(x, mode: int, weight, eps: float, keepdim: bool, input_fmt: str, with_indices: bool):
    """(out shaped for the user, the (N, C) int64 indices of the max or None). `with_indices`:
    the indices are wanted, or a gradient (which goes to them).

    Written for Inductor's wrapper, which pays a Python call for every view it returns: the
    statistics reduce x's spatial dims in place (no (N, C, S) view, whose gradient would be
    viewed back), and nothing returned is a view. The reference's helpers are written out, and
    the modes are literals: each function called and each module constant read while Dynamo
    traces is a guard, checked on every call."""
    nhwc = input_fmt == "NHWC"
    spatial = tuple(range(1, x.dim() - 1)) if nhwc else tuple(range(2, x.dim()))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    indices = None
    # alpha / p as a (1, C) or () tensor in the acc dtype, or a float (reference._per_channel).
    w = weight
    if isinstance(weight, torch.Tensor):
        w = weight.to(acc).reshape(1, -1) if weight.dim() == 1 else weight.to(acc)
    if mode == 4:  # MODE_GEM: reference.gem_stats
        y = xa.clamp(min=eps)
        big_m = y.amax(dim=spatial).detach()
        pe = w  # p against y: (1, C) is already right for NHWC
        if isinstance(w, torch.Tensor) and not nhwc:
            pe = w.reshape(*w.shape, *([1] * len(spatial)))
        r = (y / y.amax(dim=spatial, keepdim=True).detach()).pow(pe).mean(dim=spatial)
        out = gem_finish(big_m, r, w)
    elif mode == 0:  # MODE_AVG
        out = xa.mean(dim=spatial)
    else:
        if with_indices:  # the index is the flat spatial offset: on the (N, C, S) view
            mx, indices = _max((xa.movedim(-1, 1) if nhwc else xa).flatten(2))
        else:
            mx = xa.amax(dim=spatial)
        if mode == 1:  # MODE_MAX
            out = mx
        elif mode == 3:  # MODE_CAT
            out = torch.cat([xa.mean(dim=spatial), mx], dim=1)
        else:
            out = w * mx + (1 - w) * xa.mean(dim=spatial)
    out = out.to(x.dtype)
    if keepdim:
        ones = [1] * (x.dim() - 2)
        out = out.reshape(out.shape[0], *ones, -1) if nhwc else out.reshape(*out.shape, *ones)
    return out, indices
