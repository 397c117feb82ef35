"""convert_model: swap a model's global pooling modules for gapkernels.nn.GlobalPool, in place."""

from __future__ import annotations

import sys

import torch
import torch.nn

from gapkernels import functional, tokens
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


# Token pooling of other libraries' modules, converted by giving the module (in place) a subclass
# of its own class that pools with gapkernels: everything else (config, save / load, repr,
# isinstance) stays the library's. The subclasses are made once per class and kept here under
# their own names (so that a pickled converted model finds them).
_TOKEN_CLASSES: dict[type, type] = {}
_ST_MODES = ("mean", "max", "mean_sqrt_len_tokens")
_TIMM_VIT_CLASSES = (
    ("timm.models.vision_transformer", "VisionTransformer"),
    ("timm.models.eva", "Eva"),
)
_TIMM_TOKEN_POOLS = {
    "avg": functional.global_avg_pool,
    "max": functional.global_max_pool,
    "avgmax": functional.global_avgmax_pool,
}


def _sentence_transformers_forward(self, features, **kwargs):
    """sentence-transformers' Pooling.forward for mean, max and mean_sqrt_len_tokens on
    gapkernels (padded: attention_mask as the mask; packed: cu_seq_lens_q with varlen_pool).
    Other inputs (token_weights_sum, an excluded prompt) take the library's own forward."""
    mode = self.pooling_mode
    prompt = not self.include_prompt and "prompt_length" in features
    if mode not in _ST_MODES or prompt or "token_weights_sum" in features:
        return super(type(self), self).forward(features, **kwargs)
    x = features["token_embeddings"]
    pool_type = "max" if mode == "max" else "avg"
    backend = self.gapkernels_backend
    if "cu_seq_lens_q" in features:
        cu = features["cu_seq_lens_q"]
        out = tokens.varlen_pool(x.squeeze(0), cu, pool_type, backend=backend)
        count = cu[1:] - cu[:-1]
    else:
        mask = features.get("attention_mask")
        if mask is None or mask.shape[-1] != x.shape[1]:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        fn = _TIMM_TOKEN_POOLS[pool_type]
        out = fn(x, input_fmt="NLC", mask=mask, backend=backend)
        count = (mask != 0).sum(1)
    if mode == "mean_sqrt_len_tokens":  # sum / sqrt(count) = avg * sqrt(count)
        scale = count.to(torch.float32 if x.dtype != torch.float64 else x.dtype).sqrt()
        out = (out.to(scale.dtype) * scale.unsqueeze(1)).to(x.dtype)
    features["sentence_embedding"] = out
    return features


def _timm_vit_pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """timm's VisionTransformer.pool / Eva.pool for avg, max and avgmax on gapkernels, with
    start = num_prefix_tokens (0 with pool_include_prefix); anything else is timm's own."""
    pool_type = self.global_pool if pool_type is None else pool_type
    start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    fn = _TIMM_TOKEN_POOLS.get(pool_type)
    if fn is None or self.attn_pool is not None or x.dim() != 3 or start >= x.shape[1]:
        return super(type(self), self).pool(x, pool_type)
    return fn(x, input_fmt="NLC", start=start, backend=self.gapkernels_backend)


def _token_override(module: torch.nn.Module):
    """(the method that pools on gapkernels, its name) for a module whose class pools tokens
    in a way gapkernels does, or None."""
    kind = type(module)
    if kind in _TOKEN_CLASSES.values():
        return None  # converted already
    if kind.__name__ == "Pooling" and kind.__module__.startswith("sentence_transformers."):
        if isinstance(module.pooling_mode, str) and module.pooling_mode in _ST_MODES:
            return _sentence_transformers_forward, "forward"
        return None
    for module_name, class_name in _TIMM_VIT_CLASSES:
        timm_module = sys.modules.get(module_name)
        if timm_module is not None and kind is getattr(timm_module, class_name, None):
            if (
                getattr(module, "attn_pool", None) is None
                and module.global_pool in _TIMM_TOKEN_POOLS
            ):
                return _timm_vit_pool, "pool"
    return None


def _convert_token_pooling(module: torch.nn.Module, backend: str) -> bool:
    """Gives `module` its gapkernels subclass, in place, if it pools tokens; returns whether."""
    override = _token_override(module)
    if override is None:
        return False
    method, name = override
    kind = type(module)
    if kind not in _TOKEN_CLASSES:
        new_name = f"Gapkernels{kind.__name__}"
        doc = f"{kind.__module__}.{kind.__name__} with its token pooling on gapkernels."
        _TOKEN_CLASSES[kind] = type(new_name, (kind,), {name: method, "__doc__": doc})
        _TOKEN_CLASSES[kind].__module__ = __name__
        globals()[new_name] = _TOKEN_CLASSES[kind]
    module.__class__ = _TOKEN_CLASSES[kind]
    module.__dict__["gapkernels_backend"] = backend
    return True


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

    Token pooling (counted as replaced): sentence-transformers' `Pooling` with pooling_mode
    mean, max or mean_sqrt_len_tokens (padded batches with their attention_mask, packed ones
    with cu_seq_lens_q; other modes are left alone), and timm's `VisionTransformer` and `Eva`
    whose global_pool is avg, max or avgmax (no attention pool), which then pool with
    start=num_prefix_tokens. These keep their class's behavior and data: the module is given,
    in place, a subclass of its own class whose pooling method calls gapkernels. Differences:
    an empty sequence gives 0 where sentence-transformers' max gives -inf and timm's mean NaN.
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

    converted = 0

    def visit(parent: torch.nn.Module) -> None:
        nonlocal converted
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is None:
                converted += _convert_token_pooling(child, backend)
                visit(child)
            else:
                setattr(parent, name, new)

    root = replacement(model)
    if root is not None:
        return root, 1
    converted += _convert_token_pooling(model, backend)
    visit(model)
    return model, len(replaced) + converted
