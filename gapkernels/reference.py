"""Plain-PyTorch global pooling: the oracle the tests compare every backend with.

Same signatures and semantics as the public functions (without `backend`). Statistics are
computed in float32 (float64 for float64) and rounded once to the input dtype, as the kernels do.
Max follows `adaptive_max_pool` exactly (it is computed with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gapkernels import reference_tokens
from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tokens(x, mode: int, weight, eps: float, keepdim: bool, input_fmt: str, tok: dict):
    """The token forms (mask / lengths / start / input_fmt="NLC"): gapkernels.reference_tokens;
    returns (out shaped for the user, indices (N, C) or None)."""
    fmt = "NHWC" if input_fmt == "NLC" else input_fmt
    out, indices = reference_tokens.pool_padded(x, mode, weight, eps, fmt, **tok)
    return _finish(out, x, keepdim, fmt), indices


def _token_args(input_fmt: str, mask, lengths, start) -> dict | None:
    if mask is None and lengths is None and not start and input_fmt != "NLC":
        return None
    return dict(mask=mask, lengths=lengths, start=start)


def _flat(x: torch.Tensor, input_fmt: str) -> torch.Tensor:
    """(N, C, S) in the accumulation dtype, whatever the input's format."""
    if input_fmt == "NHWC":
        x = x.movedim(-1, 1)
    return x.flatten(2).to(_acc(x.dtype))


def _finish(out: torch.Tensor, x: torch.Tensor, keepdim: bool, input_fmt: str) -> torch.Tensor:
    """(N, C') statistics to the output shape and dtype."""
    out = out.to(x.dtype)
    if not keepdim:
        return out
    ones = [1] * (x.dim() - 2)
    if input_fmt == "NHWC":
        return out.reshape(out.shape[0], *ones, out.shape[1])
    return out.reshape(out.shape[0], out.shape[1], *ones)


def _per_channel(w, like: torch.Tensor):
    """A float, or a () / (C,) tensor, shaped to broadcast against (N, C) statistics."""
    if isinstance(w, torch.Tensor):
        return w.to(like.dtype).reshape(1, -1) if w.dim() == 1 else w.to(like.dtype)
    return w


def _avg(xf: torch.Tensor) -> torch.Tensor:
    return xf.mean(dim=2)


def _max(xf: torch.Tensor):
    values, indices = F.adaptive_max_pool1d(xf, 1, return_indices=True)
    return values.squeeze(2), indices.squeeze(2)


def global_avg_pool(x, *, keepdim=False, input_fmt="NCHW", mask=None, lengths=None, start=0):
    tok = _token_args(input_fmt, mask, lengths, start)
    if tok is not None:
        return _tokens(x, MODE_AVG, None, 0.0, keepdim, input_fmt, tok)[0]
    return _finish(_avg(_flat(x, input_fmt)), x, keepdim, input_fmt)


def global_max_pool(
    x, return_indices=False, *, keepdim=False, input_fmt="NCHW", mask=None, lengths=None, start=0
):
    tok = _token_args(input_fmt, mask, lengths, start)
    if tok is not None:
        values, indices = _tokens(x, MODE_MAX, None, 0.0, keepdim, input_fmt, tok)
    else:
        values, indices = _max(_flat(x, input_fmt))
        values = _finish(values, x, keepdim, input_fmt)
    if return_indices:
        if keepdim:
            indices = indices.reshape(values.shape)
        return values, indices
    return values


def global_mixed_pool(
    x, alpha=0.5, *, keepdim=False, input_fmt="NCHW", mask=None, lengths=None, start=0
):
    tok = _token_args(input_fmt, mask, lengths, start)
    if tok is not None:
        return _tokens(x, MODE_MIXED, alpha, 0.0, keepdim, input_fmt, tok)[0]
    xf = _flat(x, input_fmt)
    a = _per_channel(alpha, xf)
    out = a * _max(xf)[0] + (1 - a) * _avg(xf)
    return _finish(out, x, keepdim, input_fmt)


def global_avgmax_pool(
    x, concat=False, *, keepdim=False, input_fmt="NCHW", mask=None, lengths=None, start=0
):
    tok = _token_args(input_fmt, mask, lengths, start)
    if tok is not None:
        mode, weight = (MODE_CAT, None) if concat else (MODE_MIXED, 0.5)
        return _tokens(x, mode, weight, 0.0, keepdim, input_fmt, tok)[0]
    xf = _flat(x, input_fmt)
    avg, mx = _avg(xf), _max(xf)[0]
    out = torch.cat([avg, mx], dim=1) if concat else 0.5 * (avg + mx)
    return _finish(out, x, keepdim, input_fmt)


def gem_stats(xf: torch.Tensor, p, eps: float):
    """GeM's statistics of (N, C, S) `xf` (acc dtype), computed relative to each row's maximum:
    M = max(y), r = mean((y/M)**p), with y = clamp(xf, min=eps). M is detached: the value
    M * r**(1/p) does not depend on which constant M is, so every derivative (of any order) is
    exact, and no power over- or underflows for finite inputs (y/M is in (0, 1])."""
    y = xf.clamp(min=eps)
    big_m = y.amax(dim=2, keepdim=True).detach()
    pe = p.unsqueeze(-1) if isinstance(p, torch.Tensor) else p
    r = (y / big_m).pow(pe).mean(dim=2)
    return big_m.squeeze(2), r


def global_gem_pool(
    x, p=3.0, eps=1e-6, *, keepdim=False, input_fmt="NCHW", mask=None, lengths=None, start=0
):
    tok = _token_args(input_fmt, mask, lengths, start)
    if tok is not None:
        return _tokens(x, MODE_GEM, p, eps, keepdim, input_fmt, tok)[0]
    xf = _flat(x, input_fmt)
    pc = _per_channel(p, xf)
    big_m, r = gem_stats(xf, pc, eps)
    out = big_m * r.pow(1.0 / pc)
    out = torch.where(torch.isinf(big_m), big_m, out)
    return _finish(out, x, keepdim, input_fmt)


def global_gem_pool_plain(x, p=3.0, eps=1e-6, *, keepdim=False, input_fmt="NCHW"):
    """The textbook formula mean(clamp(x, eps)**p)**(1/p): under- and overflows for large p
    (kept for tests that compare with it where it is finite)."""
    xf = _flat(x, input_fmt)
    pc = _per_channel(p, xf)
    pe = pc.unsqueeze(-1) if isinstance(pc, torch.Tensor) else pc
    out = xf.clamp(min=eps).pow(pe).mean(dim=2).pow(1.0 / pc)
    return _finish(out, x, keepdim, input_fmt)


def varlen_pool(
    x, cu_seqlens, pool_type="avg", *, alpha=0.5, p=3.0, eps=1e-6, start=0, return_indices=False
):
    """gapkernels.varlen_pool in plain torch (no checks)."""
    mode, weight = {
        "avg": (MODE_AVG, None),
        "max": (MODE_MAX, None),
        "avgmax": (MODE_MIXED, 0.5),
        "catavgmax": (MODE_CAT, None),
        "mixed": (MODE_MIXED, alpha),
        "gem": (MODE_GEM, p),
    }[pool_type]
    out, indices = reference_tokens.pool_varlen(x, cu_seqlens, mode, weight, eps, start)
    return (out, indices) if return_indices else out
