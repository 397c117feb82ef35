"""The compiles of gapkernels/triton/aot.py: which kernel variants, and the argument types of each
kernel (plain data, no Triton). Each pool kernel of gapkernels/triton/kernels.py is compiled:

- for every architecture, the forward and the backward kernel on every tile
  configs.tile_configs() lists (every tile the config chooser can return), in the modes whose
  code covers the others' (TILE_MODES: the forward's MIXED has every reduction of AVG, MAX and
  CAT; the backward's CAT every per-element term of AVG, MAX and MIXED; GEM has its own), in
  their heaviest variant (per-channel weight, GeM's log-sum); on the tiles where S can be split
  or reach 2**31 (TileConfig.max_block_s), also the SPLIT forward and INDEX_64 (int64 spatial
  offsets); and the combine kernel (one tile) in every mode;
- for the first architecture (sm_90 by default) also: INDEX_64 on every tile that N*C near
  2**31 can take (full-row NCS tiles, every NSC tile); every mode, x dtype, weight kind, a
  strided weight and N == 1 (Triton passes an int 1 as a constant) on the largest tile of each
  layout, and the combine kernel in every weight kind and output dtype.

The token kernels of gapkernels/triton/token_kernels.py share the pool kernels' tiles, stages and
math, so fewer of their variants are compiled (TOKEN_MODES, with a mask, in their heaviest
weight variant): for every architecture the SPLIT forward on the tiles where S can be split and
the combine kernel in every mode; for the first also the unsplit forward and the backward on the
largest tile of each layout, and VARLEN's forward (split) and backward on the largest NSC tile.

For the first architecture, every kernel is also compiled with its float arguments (scalar, eps)
typed fp64, as Inductor's launch of a user-defined kernel types a Python float (a direct launch
types it fp32): float64_jobs_for. aot.py fails any compile whose PTX computes in fp64.

Loaded by aot.py without importing torch (configs.py is imported relative to this module).
"""

from __future__ import annotations

from . import configs

MODES = {0: "avg", 1: "max", 2: "mixed", 3: "cat", 4: "gem"}
WEIGHT_KINDS = {0: "scalar", 1: "shared", 2: "channel"}


def _job(kernel, arch, dtype="fp32", num_warps=4, **const):
    """One compile: the kernel's name, the target, x's dtype, num_warps and the constexprs; the
    special keys `_n_one` (N == 1), `_s64` (S and s_per_* int64) and `_weight_stride` ('one':
    a contiguous weight, the constant 1; 'any': an int argument) describe the int arguments,
    `_floats` ('fp32' or 'fp64') the type of the float arguments."""
    return dict(kernel=kernel, arch=arch, dtype=dtype, num_warps=num_warps, const=const)


def _heaviest(mode):
    """Weight kind and WITH_LOG of a mode's heaviest variant."""
    return dict(WEIGHT_KIND=2 if mode in (2, 4) else 0, WITH_LOG=mode == 4)


# Per tile, the forward's and the backward's most complete modes: MIXED's forward has every
# reduction of AVG, MAX and CAT (sum, max, first/last index); CAT's backward has every per-element
# term of AVG, MAX and MIXED; GEM has its own code in both.
TILE_MODES = {"pool_forward_kernel": (2, 4), "pool_backward_kernel": (3, 4)}


def _tile_job(kernel, arch, tile, mode, dtype, const, flags):
    """A forward or backward compile on `tile`: its constexprs, then `const`, then `flags`."""
    tile_const = dict(MODE=mode, CHANNELS_LAST=tile.channels_last, ROWS=tile.rows)
    tile_const.update(BLOCK_S=tile.block_s, **const)
    if kernel.startswith("pool_"):
        tile_const.update(INDEX_64=False)
    tile_const.update(flags)
    return _job(kernel, arch, dtype, tile.num_warps, **tile_const)


def _forward(arch, tile, mode, dtype="fp32", **flags):
    const = dict(SPLIT=False, **_heaviest(mode))
    return _tile_job("pool_forward_kernel", arch, tile, mode, dtype, const, flags)


def _backward(arch, tile, mode, dtype="fp32", **flags):
    const = dict(WEIGHT_KIND=_heaviest(mode)["WEIGHT_KIND"], AUX_COLUMNS=3 if mode == 4 else 1)
    return _tile_job("pool_backward_kernel", arch, tile, mode, dtype, const, flags)


def _combine(arch, mode, dtype="fp32", kernel="pool_combine_kernel", **flags):
    const = dict(MODE=mode, **_heaviest(mode), ROWS=configs.COMBINE_ROWS)
    const.update(flags)
    return _job(kernel, arch, dtype, configs.COMBINE_WARPS, **const)


TOKEN_MODES = {"token_forward_kernel": (2, 4), "token_backward_kernel": (3, 4)}


def _token_job(kernel, arch, tile, mode, **flags):
    """A token forward or backward compile on `tile`, with a mask, in the heaviest weight
    variant; `flags` (SPLIT, VARLEN, ...) override."""
    const = dict(VARLEN=False, HAS_MASK=True, WEIGHT_KIND=_heaviest(mode)["WEIGHT_KIND"])
    if kernel == "token_forward_kernel":
        const.update(WITH_LOG=mode == 4, SPLIT=False)
    else:
        const.update(AUX_COLUMNS=3 if mode == 4 else 1)
    return _tile_job(kernel, arch, tile, mode, "fp32", const, flags)


def token_jobs_for(arch: int, all_variants: bool = True) -> list[dict]:
    """The token kernels' compiles for one architecture (see the module's docstring)."""
    forward, backward = "token_forward_kernel", "token_backward_kernel"
    tiles = [t for t in configs.tile_configs() if t.max_block_s]
    jobs = [
        _token_job(forward, arch, tile, mode, SPLIT=True)
        for tile in tiles
        for mode in TOKEN_MODES[forward]
    ]
    jobs += [_combine(arch, mode, kernel="token_combine_kernel") for mode in MODES]
    if not all_variants:
        return jobs
    for channels_last in (False, True):
        tile = max(
            (t for t in tiles if t.channels_last == channels_last),
            key=lambda t: (t.rows * t.block_s, t.block_s),
        )
        jobs += [_token_job(forward, arch, tile, mode) for mode in TOKEN_MODES[forward]]
        jobs += [_token_job(backward, arch, tile, mode) for mode in TOKEN_MODES[backward]]
    # varlen: NSC; the largest NSC tile with the longest BLOCK_S, the one a split takes
    jobs.append(_token_job(forward, arch, tile, 2, SPLIT=True, VARLEN=True, HAS_MASK=False))
    jobs.append(_token_job(backward, arch, tile, 3, VARLEN=True, HAS_MASK=False))
    return jobs


def float64_jobs_for(arch: int) -> list[dict]:
    """Every kernel with its float arguments (scalar, eps) typed fp64, as Inductor's launch of a
    user-defined kernel types a Python float (a direct launch: fp32), in the modes that use them
    (MIXED's alpha, GEM's p and eps; the weight given as `scalar`), on the smallest tile of each
    layout (the types do not depend on the tile)."""
    jobs = []
    for channels_last in (False, True):
        tile = min(
            (t for t in configs.tile_configs() if t.channels_last == channels_last),
            key=lambda t: (t.rows * t.block_s, t.block_s),
        )
        for mode in (2, 4):
            fp64 = dict(WEIGHT_KIND=0, _floats="fp64")
            jobs += [_forward(arch, tile, mode, **fp64), _backward(arch, tile, mode, **fp64)]
            token_fp64 = dict(fp64, VARLEN=channels_last, HAS_MASK=not channels_last)
            jobs.append(_token_job("token_forward_kernel", arch, tile, mode, **token_fp64))
            jobs.append(_token_job("token_backward_kernel", arch, tile, mode, **token_fp64))
            if not channels_last:
                jobs.append(_combine(arch, mode, **fp64))
                jobs.append(_combine(arch, mode, kernel="token_combine_kernel", **fp64))
    return jobs


def jobs_for(arch: int, all_variants: bool = True) -> list[dict]:
    """Every compile for one architecture: the pool kernels', then the token kernels'; with
    `all_variants`, also float64_jobs_for's."""
    jobs = pool_jobs_for(arch, all_variants) + token_jobs_for(arch, all_variants)
    return jobs + float64_jobs_for(arch) if all_variants else jobs


def pool_jobs_for(arch: int, all_variants: bool = True) -> list[dict]:
    """The pool kernels' compiles for one architecture: every tile with TILE_MODES (SPLIT and
    INDEX_64 where reachable); with `all_variants`, also every mode, dtype, weight kind and int
    specialization on the largest tile of each layout, and the combine kernel's variants."""
    jobs = []
    tiles = configs.tile_configs()
    for tile in tiles:
        for mode in TILE_MODES["pool_forward_kernel"]:
            jobs.append(_forward(arch, tile, mode))
            if tile.max_block_s:
                jobs.append(_forward(arch, tile, mode, SPLIT=True))
        for mode in TILE_MODES["pool_backward_kernel"]:
            jobs.append(_backward(arch, tile, mode))
        if tile.max_block_s:  # S near or past 2**31 can only take these tiles
            for mode in (2, 4):
                jobs.append(_forward(arch, tile, mode, SPLIT=True, INDEX_64=True, _s64=True))
            jobs.append(_forward(arch, tile, 2, INDEX_64=True, _s64=True))
            for mode in TILE_MODES["pool_backward_kernel"]:
                jobs.append(_backward(arch, tile, mode, INDEX_64=True, _s64=True))
    for mode in MODES:  # the combine kernel's one tile
        jobs.append(_combine(arch, mode))
    if not all_variants:
        return jobs
    for tile in tiles:  # N*C near 2**31 / 3: every tile with full rows (INDEX_64 from the rows)
        if tile.channels_last or tile.rows * tile.block_s == configs.TILE_ELEMENTS:
            for mode in TILE_MODES["pool_forward_kernel"]:
                jobs.append(_forward(arch, tile, mode, INDEX_64=True))
            for mode in TILE_MODES["pool_backward_kernel"]:
                jobs.append(_backward(arch, tile, mode, INDEX_64=True))
    for channels_last in (False, True):
        tile = max(
            (t for t in tiles if t.channels_last == channels_last),
            key=lambda t: (t.rows * t.block_s, t.block_s),
        )
        for mode in MODES:
            if mode not in TILE_MODES["pool_forward_kernel"]:
                jobs.append(_forward(arch, tile, mode))
            if mode not in TILE_MODES["pool_backward_kernel"]:
                jobs.append(_backward(arch, tile, mode))
        for dtype in ("fp16", "bf16"):
            for mode in TILE_MODES["pool_forward_kernel"]:
                jobs.append(_forward(arch, tile, mode, dtype))
            for mode in TILE_MODES["pool_backward_kernel"]:
                jobs.append(_backward(arch, tile, mode, dtype))
        if channels_last:
            continue
        for mode in (2, 4):
            for kind in (0, 1):
                jobs.append(_forward(arch, tile, mode, "fp16", WEIGHT_KIND=kind, WITH_LOG=False))
                jobs.append(
                    _backward(
                        arch,
                        tile,
                        mode,
                        "fp16",
                        WEIGHT_KIND=kind,
                        AUX_COLUMNS=2 if mode == 4 else 1,
                    )
                )
            jobs.append(_forward(arch, tile, mode, "fp16", _weight_stride="any"))
            jobs.append(_backward(arch, tile, mode, "fp16", _weight_stride="any"))
        jobs.append(_forward(arch, tile, 4, "fp16", SPLIT=True, _n_one=True))
        jobs.append(_backward(arch, tile, 3, "fp16", _n_one=True))
    for mode in (2, 4):
        for kind in (0, 1, 2):
            for with_log in (False, True) if mode == 4 else (False,):
                if kind == 2 and with_log == (mode == 4):
                    continue  # compiled above
                jobs.append(_combine(arch, mode, WEIGHT_KIND=kind, WITH_LOG=with_log))
    for mode in MODES:
        for dtype in ("fp16", "bf16"):
            jobs.append(_combine(arch, mode, dtype))
    return jobs


KERNELS = (
    "pool_forward_kernel",
    "pool_combine_kernel",
    "pool_backward_kernel",
    "token_forward_kernel",
    "token_combine_kernel",
    "token_backward_kernel",
)

# Argument types by name: "*x" a pointer to x's element type; "N" (N, and the token kernels' B),
# "S" (S and s_per_*) an int argument, i32, but the constant 1 under _n_one (N) and i64 under _s64
# (S); "W" the weight stride, the constant 1 unless _weight_stride is 'any'; "F" a float argument
# (scalar, eps), fp32 unless _floats is 'fp64'. The combine kernels' N, B and S are plain i32.
# The token kernels' mask is passed as uint8.
_ARG_TYPES = dict(
    x_ptr="*x",
    grad_out_ptr="*x",
    out_ptr="*x",
    grad_x_ptr="*x",
    weight_ptr="*fp32",
    aux_ptr="*fp32",
    partial_stats_ptr="*fp32",
    indices_ptr="*i64",
    partial_index_ptr="*i64",
    spans_ptr="*i64",
    mask_ptr="*u8",
    N="N",
    B="N",
    C="i32",
    S="S",
    s_per_split="S",
    s_per_program="S",
    splits="i32",
    weight_stride="W",
    scalar="F",
    eps="F",
)


def arg_type(kernel: str, name: str) -> str:
    if kernel in ("pool_combine_kernel", "token_combine_kernel") and name in ("N", "B", "S"):
        return "i32"
    return _ARG_TYPES[name]


def describe(job) -> str:
    c = dict(job["const"])
    parts = [MODES[c.pop("MODE")]]
    if "CHANNELS_LAST" in c:
        parts.append("NSC" if c.pop("CHANNELS_LAST") else "NCS")
    if "ROWS" in c:
        rows = c.pop("ROWS")
        block = c.pop("BLOCK_S", None)
        parts.append(f"{rows}x{block}" if block else f"rows={rows}")
    parts.append(f"w{job['num_warps']}")
    parts.append(job["dtype"])
    kind = c.pop("WEIGHT_KIND", 0)
    if kind:
        parts.append(f"weight={WEIGHT_KINDS[kind]}")
    for flag in ("WITH_LOG", "SPLIT", "INDEX_64", "HAS_MASK", "VARLEN"):
        if c.pop(flag, False):
            parts.append(flag.lower())
    aux = c.pop("AUX_COLUMNS", None)
    if aux is not None and MODES[job["const"]["MODE"]] == "gem":
        parts.append(f"aux={aux}")
    if c.pop("_n_one", False):
        parts.append("N=1")
    if c.pop("_weight_stride", "one") == "any":
        parts.append("weight_stride=any")
    floats = c.pop("_floats", "fp32")
    if floats != "fp32":
        parts.append(f"floats={floats}")
    c.pop("_s64", None)
    return " ".join(parts)
