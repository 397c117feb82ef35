"""Plain-PyTorch global pooling: the oracle the tests compare every backend with.

Same signatures and semantics as the public functions (without `backend`). Statistics are
computed in float32 (float64 for float64) and rounded once to the input dtype, as the kernels do.
Max follows `adaptive_max_pool` exactly (it is computed with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def global_avg_pool(x, *, keepdim=False, input_fmt="NCHW"):
    return _finish(_avg(_flat(x, input_fmt)), x, keepdim, input_fmt)


def global_max_pool(x, return_indices=False, *, keepdim=False, input_fmt="NCHW"):
    values, indices = _max(_flat(x, input_fmt))
    values = _finish(values, x, keepdim, input_fmt)
    if return_indices:
        if keepdim:
            indices = indices.reshape(values.shape)
        return values, indices
    return values


def global_mixed_pool(x, alpha=0.5, *, keepdim=False, input_fmt="NCHW"):
    xf = _flat(x, input_fmt)
    a = _per_channel(alpha, xf)
    out = a * _max(xf)[0] + (1 - a) * _avg(xf)
    return _finish(out, x, keepdim, input_fmt)


def global_avgmax_pool(x, concat=False, *, keepdim=False, input_fmt="NCHW"):
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


def global_gem_pool(x, p=3.0, eps=1e-6, *, keepdim=False, input_fmt="NCHW"):
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
