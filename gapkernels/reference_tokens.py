"""Plain-PyTorch token pooling (mask / lengths / start, and packed varlen batches): the oracle the
tests compare every backend with, and the composite that runs where no fused kernel exists yet.

Semantics (docs/DESIGN.md, "Token pooling"): per output row, the positions that take part are
those of the flattened spatial index (of the row's sequence, for varlen) that are `>= start`,
`< lengths[n]` and True in `mask`. avg = their sum / their count; max = their maximum, with
torch's rules (the first maximum wins a tie, a NaN wins, the last NaN's index is kept) and the
index as a flat offset into the full grid (into the sequence, for varlen); mixed, avgmax,
catavgmax and GeM combine as the unmasked modes do. A row where no position takes part gives 0
in every mode, index -1 and zero gradient. Positions that do not take part are never used in a
way that reaches the result or a gradient (NaN there is harmless).

Everything is written with differentiable torch ops (any order, forward mode, torch.func):
statistics in float32 (float64 for float64), rounded once to the input dtype. The max's index is
computed apart (not differentiated), and its value taken at that index, so the gradient goes to
exactly that one position.
"""

from __future__ import annotations

import torch

from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, acc_dtype


class Dense:
    """Reductions of (N, C, S) values over the positions that take part, `valid` (N, S) bool.
    Statistics are (N, C); element positions are the flat offsets s."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid.unsqueeze(1)  # (N, 1, S)
        self.size = valid.shape[1]
        self.positions = torch.arange(self.size, device=valid.device).view(1, 1, -1)
        self.count = valid.sum(1, keepdim=True)  # (N, 1)
        self.origin = 0

    def where(self, cond, v, other):
        """v where the position takes part and `cond` holds (cond may be True), else other."""
        keep = self.valid if cond is True else self.valid & cond
        return torch.where(keep, v, other)

    def sum(self, v):
        return v.sum(2)

    def amax(self, v):
        return v.amax(2)

    def amin(self, v):
        return v.amin(2)

    def expand(self, stat):
        """(N, C) statistics to broadcast against the elements."""
        return stat.unsqueeze(2)

    def channel(self, w):
        """A (C,) weight to broadcast against the elements."""
        return w.view(1, -1, 1)

    def take(self, v, index):
        """v at each row's element position `index` (N, C)."""
        return torch.take_along_dim(v, index.unsqueeze(2), 2).squeeze(2)


class Segments:
    """Reductions of (T, C) token values into B sequences: token t belongs to `seg[t]` in
    [0, B), or to B (a scratch row, dropped) when it does not take part. Element positions are
    the token indices t; `origin` (B, 1) is each sequence's first token."""

    def __init__(self, seg: torch.Tensor, count: torch.Tensor, origin: torch.Tensor):
        self.seg = seg
        self.rows = count.shape[0]
        self.size = seg.shape[0]
        self.positions = torch.arange(self.size, device=seg.device).view(-1, 1)
        self.count = count.view(-1, 1)
        self.origin = origin.view(-1, 1)
        self.valid = (seg < self.rows).view(-1, 1)

    def where(self, cond, v, other):
        keep = self.valid if cond is True else self.valid & cond
        return torch.where(keep, v, other)

    def _index(self, v):
        return self.seg.view(-1, 1).expand(v.shape)

    def sum(self, v):
        return v.new_zeros((self.rows + 1, v.shape[1])).index_add(0, self.seg, v)[: self.rows]

    def _reduce(self, v, how: str, init):
        rows = v.new_full((self.rows + 1, v.shape[1]), init)
        return rows.scatter_reduce(0, self._index(v), v, how)[: self.rows]

    def amax(self, v):
        return self._reduce(v, "amax", float("-inf") if v.is_floating_point() else -1)

    def amin(self, v):
        return self._reduce(v, "amin", self.size)

    def expand(self, stat):
        padded = torch.cat([stat, stat.new_zeros((1, stat.shape[1]))])
        return padded.index_select(0, self.seg)

    def channel(self, w):
        return w.view(1, -1)

    def take(self, v, index):
        return v.gather(0, index)


def _weight(w, like: torch.Tensor):
    """alpha / p: a float, or a () / (C,) tensor in the acc dtype (a (C,) one as (1, C))."""
    if isinstance(w, torch.Tensor):
        w = w.to(like.dtype)
        return w.view(1, -1) if w.dim() == 1 else w
    return float(w)


def _max(red, xf, nonempty):
    """(values, positions) of each row's maximum by torch's rules; positions are element
    positions (valid only where `nonempty`)."""
    with torch.no_grad():
        masked = red.where(True, xf, float("-inf"))
        row_max = red.amax(masked)
        big = red.size
        first = red.amin(red.where(masked == red.expand(row_max), red.positions, big))
        last_nan = red.amax(red.where(torch.isnan(xf), red.positions, -1))
        index = torch.where(torch.isnan(row_max), last_nan, first)
        index = torch.where(nonempty, index, 0)
    values = torch.where(nonempty, red.take(xf, index), 0.0)
    return values, index


def _gem(red, xf, p, eps: float, nonempty, safe_count):
    """GeM relative to each row's maximum M (as reference.global_gem_pool), over the positions
    that take part; 0 for an empty row. Safe stand-ins (1) where a value is not used keep every
    derivative finite (no 0 * inf from a where)."""
    y = xf.clamp(min=eps)
    big_m = red.amax(red.where(True, y, 0.0)).detach()
    big_m = torch.where(nonempty, big_m, 1.0)
    z = red.where(True, y / red.where(True, red.expand(big_m), 1.0), 1.0)
    pe = red.channel(p.view(-1)) if isinstance(p, torch.Tensor) and p.dim() == 2 else p
    zp = red.where(True, z.pow(pe), 0.0)
    r = torch.where(nonempty, red.sum(zp) / safe_count, 1.0)
    out = big_m * r.pow(1.0 / p)
    out = torch.where(torch.isinf(big_m), big_m, out)
    return torch.where(nonempty, out, 0.0)


def pool(red, xf: torch.Tensor, mode: int, weight, eps: float):
    """(out (N, C'), indices (N, C) int64 or None) of `mode` over `red`'s rows, in xf's dtype
    (the acc dtype); indices are offsets from each row's origin, -1 for an empty row."""
    count = red.count.to(xf.dtype)
    nonempty = red.count > 0
    safe_count = count.clamp(min=1)
    w = _weight(weight, xf) if weight is not None else None
    if mode == MODE_GEM:
        return _gem(red, xf, w, eps, nonempty, safe_count), None
    avg = red.sum(red.where(True, xf, 0.0)) / safe_count
    if mode == MODE_AVG:
        return avg, None
    mx, index = _max(red, xf, nonempty)
    indices = torch.where(nonempty, index - red.origin, -1)
    if mode == MODE_MAX:
        out = mx
    elif mode == MODE_MIXED:
        assert w is not None
        out = w * mx + (1.0 - w) * avg
    else:
        assert mode == MODE_CAT
        out = torch.cat([avg, mx], dim=1)
    return out, indices


def dense_valid(n: int, s: int, device, mask=None, lengths=None, start: int = 0):
    """(N, S) bool: the positions that take part, from the user's mask / lengths / start."""
    positions = torch.arange(s, device=device)
    valid = (positions >= start).expand(n, s)
    if lengths is not None:
        valid = valid & (positions < lengths.view(-1, 1))
    if mask is not None:
        valid = valid & (mask.reshape(n, s) != 0)
    return valid


def pool_padded(x, mode: int, weight, eps: float, input_fmt: str, mask, lengths, start):
    """Token pooling of (N, C, *spatial) (or (N, *spatial, C) with "NHWC") x; returns
    (out (N, C') in x's dtype, indices (N, C) or None)."""
    x3 = x.movedim(-1, 1) if input_fmt == "NHWC" else x
    xf = x3.flatten(2).to(acc_dtype(x.dtype))
    n, _, s = xf.shape
    red = Dense(dense_valid(n, s, x.device, mask, lengths, start))
    out, indices = pool(red, xf, mode, weight, eps)
    return out.to(x.dtype), indices


def varlen_segments(cu_seqlens: torch.Tensor, total: int, start: int = 0) -> Segments:
    """The Segments of a packed batch with flash-attention offsets `cu_seqlens` (B + 1,)."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu[1:], tokens, right=True)
    rows = cu.shape[0] - 1
    seg = seg.clamp(max=rows)
    origin = cu[:-1]
    takes_part = tokens - origin.index_select(0, seg.clamp(max=rows - 1)) >= start
    seg = torch.where(takes_part, seg, rows) if rows else seg
    count = (cu[1:] - cu[:-1] - start).clamp(min=0)
    return Segments(seg, count, origin)


def pool_varlen(x, cu_seqlens, mode: int, weight, eps: float, start: int = 0):
    """Token pooling of a packed (total, C) batch into (B, C'); returns (out, indices)."""
    if x.shape[0] == 0:  # every sequence is empty
        rows = cu_seqlens.shape[0] - 1
        out = x.new_zeros((rows, x.shape[1] * (2 if mode == MODE_CAT else 1)))
        indices = None
        if mode not in (MODE_AVG, MODE_GEM):
            indices = torch.full((rows, x.shape[1]), -1, dtype=torch.int64, device=x.device)
        return out, indices
    red = varlen_segments(cu_seqlens, x.shape[0], start)
    out, indices = pool(red, x.to(acc_dtype(x.dtype)), mode, weight, eps)
    return out.to(x.dtype), indices
