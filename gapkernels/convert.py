"""convert_model: swap a model's global pooling modules for gapkernels.nn.GlobalPool, in place."""

from __future__ import annotations

import sys

import torch
import torch.nn

from gapkernels.nn import GlobalPool

# torch's adaptive pools: class -> (pool_type, number of spatial dims)
_TORCH_POOLS = {
    torch.nn.AdaptiveAvgPool1d: ("avg", 1),
    torch.nn.AdaptiveAvgPool2d: ("avg", 2),
    torch.nn.AdaptiveAvgPool3d: ("avg", 3),
    torch.nn.AdaptiveMaxPool1d: ("max", 1),
    torch.nn.AdaptiveMaxPool2d: ("max", 2),
    torch.nn.AdaptiveMaxPool3d: ("max", 3),
}

_TIMM_POOL_MODULE = "timm.layers.adaptive_avgmax_pool"


def _is_global(output_size, spatial_dims: int) -> bool:
    """Whether an adaptive pool's output_size is 1 in every spatial dim (1, (1, 1), ...)."""
    if isinstance(output_size, (tuple, list, torch.Size)):
        return len(output_size) == spatial_dims and all(s == 1 for s in output_size)
    return output_size == 1


def _fmt_of_dims(dims) -> tuple[str, int] | None:
    """timm's fast pools reduce `dims` (from get_spatial_dim): (2, 3) is NCHW, (1, 2) NHWC,
    (2,) NCL, (1,) NLC. GlobalPool's NCHW / NHWC, and the number of spatial dims."""
    dims = tuple(dims)
    k = len(dims)
    if k and dims == tuple(range(2, 2 + k)):
        return "NCHW", k
    if k and dims == tuple(range(1, 1 + k)):
        return "NHWC", k
    return None


def _timm_spec(module, timm_pools) -> dict | None:
    """GlobalPool arguments for one of timm's global pools, or None if it is not one."""
    kind = type(module)
    if kind in (timm_pools.AdaptiveAvgMaxPool2d, timm_pools.AdaptiveCatAvgMaxPool2d):
        if not _is_global(module.output_size, 2):
            return None
        pool_type = "avgmax" if kind is timm_pools.AdaptiveAvgMaxPool2d else "catavgmax"
        return dict(pool_type=pool_type, flatten=False, input_fmt="NCHW", spatial_dims=2)
    fast = {
        timm_pools.FastAdaptiveAvgPool: ("avg", "dim"),
        timm_pools.FastAdaptiveMaxPool: ("max", "dim"),
        timm_pools.FastAdaptiveAvgMaxPool: ("avgmax", "dim"),
        timm_pools.FastAdaptiveCatAvgMaxPool: ("catavgmax", "dim_reduce"),
    }
    if kind in fast:
        pool_type, dim_attr = fast[kind]
        fmt = _fmt_of_dims(getattr(module, dim_attr))
        if fmt is None:
            return None
        return dict(
            pool_type=pool_type, flatten=bool(module.flatten), input_fmt=fmt[0], spatial_dims=fmt[1]
        )
    if kind is timm_pools.SelectAdaptivePool2d:
        if module.is_identity():
            return None
        inner = _spec(module.pool, timm_pools)
        if inner is None:
            return None
        if type(module.flatten) is torch.nn.Flatten:
            if (module.flatten.start_dim, module.flatten.end_dim) != (1, -1):
                return None
            inner["flatten"] = True
        elif type(module.flatten) is not torch.nn.Identity:
            return None
        return inner
    return None


def _spec(module: torch.nn.Module, timm_pools) -> dict | None:
    """GlobalPool arguments with the same math as `module`, or None to leave it alone."""
    kind = type(module)
    if kind in _TORCH_POOLS:
        pool_type, k = _TORCH_POOLS[kind]
        if getattr(module, "return_indices", False) or not _is_global(module.output_size, k):
            return None
        return dict(pool_type=pool_type, flatten=False, input_fmt="NCHW", spatial_dims=k)
    if timm_pools is not None:
        return _timm_spec(module, timm_pools)
    return None


def convert_model(model: torch.nn.Module, backend: str = "auto") -> tuple[torch.nn.Module, int]:
    """Replaces, in place, every global pooling module of `model` with a GlobalPool of the same
    math and output shape, and returns `(model, number of modules replaced)`.

    Replaced: `nn.AdaptiveAvgPool{1,2,3}d` and `nn.AdaptiveMaxPool{1,2,3}d` with output size 1
    (and return_indices=False for max); timm's `SelectAdaptivePool2d` (every pool_type but the
    identity ''), `AdaptiveAvgMaxPool2d` / `AdaptiveCatAvgMaxPool2d` with output size 1, and its
    `FastAdaptive{Avg,Max,AvgMax,CatAvgMax}Pool`. Exact classes only: subclasses, which may
    override forward, are left alone, as is every other module. A module shared by several
    parents becomes one shared GlobalPool. If `model` itself is such a pool, the returned model is
    its replacement. The replacements take `backend` (see gapkernels.functional).
    """
    # A model holding timm's modules has imported timm; otherwise there is nothing of timm's to
    # convert, and timm (an optional dependency) is not imported.
    timm_pools = sys.modules.get(_TIMM_POOL_MODULE)
    # id(old) -> (old, new); holding old keeps its id from being reused during the walk.
    replaced: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def replacement(module: torch.nn.Module) -> torch.nn.Module | None:
        if id(module) not in replaced:
            spec = _spec(module, timm_pools)
            if spec is None:
                return None
            new = GlobalPool(backend=backend, **spec).train(module.training)
            replaced[id(module)] = (module, new)
        return replaced[id(module)][1]

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is None:
                visit(child)
            else:
                setattr(parent, name, new)

    root = replacement(model)
    if root is not None:
        return root, 1
    visit(model)
    return model, len(replaced)
