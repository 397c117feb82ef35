"""GlobalPool: a drop-in for nn.AdaptiveAvgPool2d(1) and timm's SelectAdaptivePool2d."""

from __future__ import annotations

import math

import torch
import torch.nn
import torch.nn.functional

from gapkernels import backends, export, functional

POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "mixed", "gem")
LEARNABLE_POOL_TYPES = ("mixed", "gem")
# timm's SelectAdaptivePool2d names for its "fast" (mean / amax over the spatial dims) pools: the
# same math, so the same GlobalPool. timm's "fast" alone is avg.
TIMM_POOL_TYPES = {
    "fast": "avg",
    "fastavg": "avg",
    "fastmax": "max",
    "fastavgmax": "avgmax",
    "fastcatavgmax": "catavgmax",
}

# GeM's p is softplus(p_raw) + P_MIN: strictly positive whatever an optimizer does to p_raw.
P_MIN = 1e-3


def _alpha_from_raw(raw: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(raw)


def _p_from_raw(raw: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(raw) + P_MIN


def _alpha_raw(alpha: float) -> torch.Tensor:
    """logit(alpha), computed in float64; +-inf for alpha 1 and 0 (fixed, not learnable)."""
    if alpha in (0.0, 1.0):
        return torch.tensor(math.inf if alpha else -math.inf)
    return torch.tensor(math.log(alpha / (1.0 - alpha)))


def _p_raw(p: float) -> torch.Tensor:
    """The inverse of softplus(.) + P_MIN, computed in float64 (softplus is linear above 20)."""
    shifted = p - P_MIN
    return torch.tensor(shifted if shifted > 20.0 else math.log(math.expm1(shifted)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class GlobalPool(torch.nn.Module):
    """Global pooling over every spatial dim, on gapkernels' fused kernels.

    Args:
        pool_type: "avg", "max", "avgmax" (0.5 * (avg + max)), "catavgmax" (cat([avg, max]), doubles
            the channels), "mixed" (alpha * max + (1 - alpha) * avg) or "gem" (generalized mean).
            timm's names "fast" (avg), "fastavg", "fastmax", "fastavgmax" and "fastcatavgmax" are
            accepted too, and stored as the plain name (`.pool_type == "avg"` for "fast").
        flatten: True gives (N, C'); False keeps the spatial dims as ones, like
            `nn.AdaptiveAvgPool2d(1)`: (N, C', 1, 1) for NCHW input, (N, 1, 1, C') for NHWC.
        input_fmt: "NCHW" (channels at dim 1, any memory format) or "NHWC" (channels last dim).
        backend: passed to the functional API ("auto", "cuda", "triton", "cpu", "reference").
        channels: the number of channels C; needed with per_channel=True.
        per_channel: one alpha / p per channel instead of one per layer.
        alpha: mixed's initial weight of max, in [0, 1] ((0, 1) when learnable).
        p: GeM's initial exponent, > P_MIN.
        eps: GeM's clamp floor.
        learnable: alpha / p are parameters (else buffers). They are stored unconstrained, as
            alpha = sigmoid(alpha_raw) and p = softplus(p_raw) + P_MIN, so that any optimizer step
            leaves alpha in [0, 1] and p > 0; `.alpha` / `.p` give the constrained values, which
            start at the given alpha / p up to float rounding (an ulp or two of the raw dtype).
        spatial_dims: the number of spatial dims the input must have (None: any, all dims but N
            and C are pooled). With it, an input with one dim less is taken as unbatched, as
            torch's adaptive pools do; convert_model sets it to keep their behavior exactly.
        start: the first `start` positions of the flattened spatial index never take part
            (class / register tokens of a vision transformer); forward also takes mask /
            lengths / start (gapkernels.tokens). input_fmt "NLC" names (N, L, C) input.
    """

    def __init__(
        self,
        pool_type: str = "avg",
        flatten: bool = True,
        input_fmt: str = "NCHW",
        backend: str = "auto",
        channels: int | None = None,
        per_channel: bool = False,
        alpha: float = 0.5,
        p: float = 3.0,
        eps: float = 1e-6,
        learnable: bool = True,
        spatial_dims: int | None = None,
        start: int = 0,
    ):
        super().__init__()
        if isinstance(pool_type, str) and pool_type in TIMM_POOL_TYPES:
            pool_type = TIMM_POOL_TYPES[pool_type]
        if pool_type not in POOL_TYPES:
            raise ValueError(
                f"GlobalPool: pool_type must be one of "
                f"{', '.join(map(repr, POOL_TYPES + tuple(TIMM_POOL_TYPES)))}, "
                f"got {pool_type!r}"
            )
        if input_fmt not in (*functional.INPUT_FORMATS, "NLC"):
            raise ValueError(
                f"GlobalPool: input_fmt must be 'NCHW', 'NHWC' or 'NLC', got {input_fmt!r}"
            )
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"GlobalPool: start must be an int >= 0, got {start!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(
                f"GlobalPool: backend must be one of "
                f"{', '.join(map(repr, backends.BACKENDS))}, got {backend!r}"
            )
        if spatial_dims is not None and (not isinstance(spatial_dims, int) or spatial_dims < 1):
            raise ValueError(
                f"GlobalPool: spatial_dims must be None or an int >= 1, got {spatial_dims!r}"
            )
        if per_channel:
            if pool_type not in LEARNABLE_POOL_TYPES:
                raise ValueError(
                    f"GlobalPool: per_channel=True applies to pool_type 'mixed' or "
                    f"'gem', got pool_type={pool_type!r}"
                )
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ValueError(
                    f"GlobalPool: per_channel=True needs channels=C (an int >= 1), "
                    f"got channels={channels!r}"
                )
        self.pool_type = pool_type
        self.flatten = bool(flatten)
        self.input_fmt = input_fmt
        self.backend = backend
        self.channels = channels
        self.per_channel = bool(per_channel)
        self.learnable = bool(learnable)
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.start = start
        if pool_type == "mixed":
            in_range = _is_number(alpha) and (
                0.0 < alpha < 1.0 if learnable else 0.0 <= alpha <= 1.0
            )
            if not in_range:
                accepted = "(0, 1) when learnable" if learnable else "[0, 1]"
                raise ValueError(f"GlobalPool: alpha must be a float in {accepted}, got {alpha!r}")
            self._register_raw("alpha_raw", _alpha_raw(float(alpha)))
        elif pool_type == "gem":
            if not _is_number(p) or not (P_MIN < p < math.inf):
                raise ValueError(f"GlobalPool: p must be a finite float > {P_MIN}, got {p!r}")
            if not _is_number(eps) or not (0.0 < eps < math.inf):
                raise ValueError(f"GlobalPool: eps must be a finite float > 0, got {eps!r}")
            self._register_raw("p_raw", _p_raw(float(p)))

    def _register_raw(self, name: str, raw: torch.Tensor) -> None:
        if self.per_channel:
            assert self.channels is not None  # checked in __init__ with per_channel
            raw = raw.expand(self.channels).clone()
        if self.learnable:
            self.register_parameter(name, torch.nn.Parameter(raw))
        else:
            self.register_buffer(name, raw)

    def _raw(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor), name
        return value

    @property
    def alpha(self) -> torch.Tensor:
        """mixed's weight of max, sigmoid(alpha_raw): shape () or (C,), in [0, 1]."""
        if self.pool_type != "mixed":
            raise AttributeError(f"GlobalPool(pool_type={self.pool_type!r}) has no alpha")
        return _alpha_from_raw(self._raw("alpha_raw"))

    @property
    def p(self) -> torch.Tensor:
        """GeM's exponent, softplus(p_raw) + P_MIN: shape () or (C,), > 0."""
        if self.pool_type != "gem":
            raise AttributeError(f"GlobalPool(pool_type={self.pool_type!r}) has no p")
        return _p_from_raw(self._raw("p_raw"))

    def feat_mult(self) -> int:
        """How many times the input's channels the output has (2 for catavgmax), as in timm."""
        return 2 if self.pool_type == "catavgmax" else 1

    def is_identity(self) -> bool:
        return False

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything.
        raise RuntimeError(
            "GlobalPool does not support TorchScript (torch.jit.script), which PyTorch has "
            "deprecated. Use torch.export.export(model, (x,)) (and AOTInductor: "
            "torch._inductor.aoti_compile_and_package) or torch.onnx.export(model, (x,), "
            "dynamo=True) to deploy a model that uses gapkernels; see README.md, 'Deploying'."
        )

    def _export_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The same math in plain torch ops, which torch.onnx translates to standard operators."""
        functional._check_input(x, self.input_fmt, "GlobalPool")
        kw: dict = dict(keepdim=not self.flatten, input_fmt=self.input_fmt)
        if self.pool_type == "avg":
            return export.global_avg_pool(x, **kw)
        if self.pool_type == "max":
            return export.global_max_pool(x, **kw)
        if self.pool_type in ("avgmax", "catavgmax"):
            return export.global_avgmax_pool(x, concat=self.pool_type == "catavgmax", **kw)
        if self.pool_type == "mixed":
            return export.global_mixed_pool(x, self.alpha, **kw)
        return export.global_gem_pool(x, self.p, self.eps, **kw)

    def _pool(self, x: torch.Tensor, tok=None) -> torch.Tensor:
        if export.onnx_exporting() and tok is None:
            return self._export_pool(x)
        keepdim, fmt, backend = not self.flatten, self.input_fmt, self.backend
        tok = tok or {}
        if self.pool_type == "avg":
            return functional.global_avg_pool(
                x, keepdim=keepdim, input_fmt=fmt, backend=backend, **tok
            )
        if self.pool_type == "max":
            return functional.global_max_pool(
                x, keepdim=keepdim, input_fmt=fmt, backend=backend, **tok
            )
        if self.pool_type in ("avgmax", "catavgmax"):
            return functional.global_avgmax_pool(
                x,
                self.pool_type == "catavgmax",
                keepdim=keepdim,
                input_fmt=fmt,
                backend=backend,
                **tok,
            )
        if self.pool_type == "mixed":
            return functional.global_mixed_pool(
                x, self.alpha, keepdim=keepdim, input_fmt=fmt, backend=backend, **tok
            )
        return functional.gem_pool(x, self.p, self.eps, keepdim, fmt, backend, False, **tok)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        start: int | None = None,
    ) -> torch.Tensor:
        """Pools x; `mask`, `lengths` and `start` (default: the module's) as the functions
        take them. (Not keyword-only: torch.onnx's TorchScript exporter passes every default
        positionally.)"""
        start = self.start if start is None else start
        if mask is not None or lengths is not None or start or self.input_fmt == "NLC":
            return self._pool(x, dict(mask=mask, lengths=lengths, start=start))
        if self.spatial_dims is None:
            return self._pool(x)
        if x.dim() == self.spatial_dims + 2:
            return self._pool(x)
        if x.dim() == self.spatial_dims + 1:
            return self._pool(x.unsqueeze(0)).squeeze(0)
        raise ValueError(
            f"GlobalPool(spatial_dims={self.spatial_dims}): expected a "
            f"{self.spatial_dims + 1}-D (unbatched) or {self.spatial_dims + 2}-D "
            f"(batched) input, got shape {tuple(x.shape)}"
        )

    def _weight_repr(self, name: str, value: torch.Tensor) -> str:
        kind = "learnable" if self.learnable else "fixed"
        if value.dim() == 0:
            return f"{name}={value.item():.4g} ({kind})"
        return f"{name}=per-channel {tuple(value.shape)} ({kind})"

    def extra_repr(self) -> str:
        parts = [
            f"pool_type={self.pool_type!r}",
            f"flatten={self.flatten}",
            f"input_fmt={self.input_fmt!r}",
        ]
        with torch.no_grad():
            if self.pool_type == "mixed":
                parts.append(self._weight_repr("alpha", self.alpha))
            elif self.pool_type == "gem":
                parts.append(self._weight_repr("p", self.p))
                parts.append(f"eps={self.eps:g}")
        if self.spatial_dims is not None:
            parts.append(f"spatial_dims={self.spatial_dims}")
        if self.start:
            parts.append(f"start={self.start}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
