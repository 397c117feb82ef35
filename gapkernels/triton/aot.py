"""Ahead-of-time compilation of every Triton kernel for real GPUs, without a GPU.

    python gapkernels/triton/aot.py [--arch 90 --arch 80] [--jobs 2] [--json OUT] [--markdown OUT]

compiles (triton.compile on an ASTSource, as triton/tools/compile.py does, for
GPUTarget("cuda", arch, 32)) each kernel of gapkernels/triton/kernels.py:

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

Each compile runs ptxas; its `-v` report gives registers, spill stores/loads (bytes) and the
compiled kernel's metadata its shared memory. A compile error is reported and makes the exit
status 1. Runs without TRITON_INTERPRET (which it removes from its environment) and without
importing torch: kernels.py and configs.py are loaded from their files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gapkernels-aot-"))
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # every compile runs ptxas, so its report is fresh


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_gapkernels_aot_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # triton resolves the kernels' globals through the module
    spec.loader.exec_module(module)
    return module


configs = _load("configs")

MODES = {0: "avg", 1: "max", 2: "mixed", 3: "cat", 4: "gem"}
MAX_MODES = (1, 2, 3)
WEIGHT_KINDS = {0: "scalar", 1: "shared", 2: "channel"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _job(kernel, arch, dtype="fp32", num_warps=4, **const):
    """One compile: the kernel's name, the target, x's dtype, num_warps and the constexprs; the
    special keys `_n_one` (N == 1), `_s64` (S and s_per_* int64) and `_weight_stride` ('one':
    a contiguous weight, the constant 1; 'any': an int argument) describe the int arguments."""
    return dict(kernel=kernel, arch=arch, dtype=dtype, num_warps=num_warps, const=const)


def _heaviest(mode):
    """Weight kind and WITH_LOG of a mode's heaviest variant."""
    return dict(WEIGHT_KIND=2 if mode in (2, 4) else 0, WITH_LOG=mode == 4)


# Per tile, the forward's and the backward's most complete modes: MIXED's forward has every
# reduction of AVG, MAX and CAT (sum, max, first/last index); CAT's backward has every per-element
# term of AVG, MAX and MIXED; GEM has its own code in both.
TILE_MODES = {"pool_forward_kernel": (2, 4), "pool_backward_kernel": (3, 4)}


def _forward(arch, tile, mode, dtype="fp32", **flags):
    const = dict(
        MODE=mode,
        CHANNELS_LAST=tile.channels_last,
        ROWS=tile.rows,
        BLOCK_S=tile.block_s,
        SPLIT=False,
        INDEX_64=False,
        **_heaviest(mode),
    )
    const.update(flags)
    return _job("pool_forward_kernel", arch, dtype, tile.num_warps, **const)


def _backward(arch, tile, mode, dtype="fp32", **flags):
    const = dict(
        MODE=mode,
        CHANNELS_LAST=tile.channels_last,
        ROWS=tile.rows,
        BLOCK_S=tile.block_s,
        WEIGHT_KIND=_heaviest(mode)["WEIGHT_KIND"],
        AUX_COLUMNS=3 if mode == 4 else 1,
        INDEX_64=False,
    )
    const.update(flags)
    return _job("pool_backward_kernel", arch, dtype, tile.num_warps, **const)


def jobs_for(arch: int, all_variants: bool = True) -> list[dict]:
    """The compiles for one architecture: every tile with TILE_MODES (SPLIT and INDEX_64 where
    reachable); with `all_variants`, also every mode, dtype, weight kind and int
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
        jobs.append(
            _job(
                "pool_combine_kernel",
                arch,
                "fp32",
                configs.COMBINE_WARPS,
                MODE=mode,
                **_heaviest(mode),
                ROWS=configs.COMBINE_ROWS,
            )
        )
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
                jobs.append(
                    _job(
                        "pool_combine_kernel",
                        arch,
                        "fp32",
                        configs.COMBINE_WARPS,
                        MODE=mode,
                        WEIGHT_KIND=kind,
                        WITH_LOG=with_log,
                        ROWS=configs.COMBINE_ROWS,
                    )
                )
    for mode in MODES:
        for dtype in ("fp16", "bf16"):
            jobs.append(
                _job(
                    "pool_combine_kernel",
                    arch,
                    dtype,
                    configs.COMBINE_WARPS,
                    MODE=mode,
                    **_heaviest(mode),
                    ROWS=configs.COMBINE_ROWS,
                )
            )
    return jobs


# Argument types, in the kernels' parameter order; "x" is x's element type, "int" an int
# argument (i32, or i64 with _s64), "one" the constant 1 under _n_one / _weight_stride.
_ARGS = {
    "pool_forward_kernel": dict(
        x_ptr="*x",
        weight_ptr="*fp32",
        out_ptr="*x",
        aux_ptr="*fp32",
        indices_ptr="*i64",
        partial_stats_ptr="*fp32",
        partial_index_ptr="*i64",
        N="N",
        C="i32",
        S="S",
        s_per_split="S",
        weight_stride="W",
        scalar="fp32",
        eps="fp32",
    ),
    "pool_combine_kernel": dict(
        partial_stats_ptr="*fp32",
        partial_index_ptr="*i64",
        weight_ptr="*fp32",
        out_ptr="*x",
        aux_ptr="*fp32",
        indices_ptr="*i64",
        N="i32",
        C="i32",
        S="i32",
        splits="i32",
        weight_stride="W",
        scalar="fp32",
    ),
    "pool_backward_kernel": dict(
        grad_out_ptr="*x",
        x_ptr="*x",
        aux_ptr="*fp32",
        indices_ptr="*i64",
        weight_ptr="*fp32",
        grad_x_ptr="*x",
        N="N",
        C="i32",
        S="S",
        s_per_program="S",
        weight_stride="W",
        scalar="fp32",
        eps="fp32",
    ),
}


def _describe(job) -> str:
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
    for flag in ("WITH_LOG", "SPLIT", "INDEX_64"):
        if c.pop(flag, False):
            parts.append(flag.lower())
    aux = c.pop("AUX_COLUMNS", None)
    if aux is not None and MODES[job["const"]["MODE"]] == "gem":
        parts.append(f"aux={aux}")
    if c.pop("_n_one", False):
        parts.append("N=1")
    if c.pop("_weight_stride", "one") == "any":
        parts.append("weight_stride=any")
    c.pop("_s64", None)
    return " ".join(parts)


def _ptxas_report(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not regs or not spill:
        raise RuntimeError(f"no register/spill report in the ptxas output:\n{log}")
    return dict(
        registers=int(regs.group(1)),
        spill_stores=int(spill.group(1)),
        spill_loads=int(spill.group(2)),
        stack=int(stack.group(1)) if stack else 0,
    )


def _ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` on the PTX, for Triton versions whose compile does not print its report."""
    candidates = [os.environ.get("GAPKERNELS_PTXAS"), "/usr/local/cuda/bin/ptxas"]
    try:
        from triton import knobs

        candidates.insert(1, knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001  (older knobs layout: fall back to the CUDA toolkit's)
        pass
    ptxas = next(p for p in candidates if p and os.path.exists(p))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp, "k.cubin"))],
            capture_output=True,
            text=True,
        )
        return done.stdout + done.stderr


def _compile(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _KERNELS
    fn = getattr(kernels, job["kernel"])
    const = {k: v for k, v in job["const"].items() if not k.startswith("_")}
    n_one = job["const"].get("_n_one", False)
    s64 = job["const"].get("_s64", False)
    weight_one = job["const"].get("_weight_stride", "one") == "one"
    signature, constexprs, attrs = {}, {}, {}
    types = _ARGS[job["kernel"]]
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            constexprs[(i,)] = const[name]
            continue
        ty = types[name]
        if ty == "N":
            ty = "one" if n_one else "i32"
        elif ty == "S":
            ty = "i64" if s64 else "i32"
        elif ty == "W":
            ty = "one" if weight_one else "i32"
        elif ty == "*x":
            ty = "*" + job["dtype"]
        if ty == "one":
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
            continue
        signature[name] = ty
        if ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
    target = GPUTarget("cuda", job["arch"], 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": job["num_warps"], "num_stages": 3})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    result = dict(kernel=job["kernel"], arch=job["arch"], variant=_describe(job))
    began = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001  (every failure is reported, with its job)
        result["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
        return result
    report = log.getvalue()
    if "Used" not in report:
        report = _ptxas(compiled.asm["ptx"], job["arch"])
    try:
        result.update(_ptxas_report(report))
    except RuntimeError as exc:
        result["error"] = str(exc)
    result["shared"] = int(compiled.metadata.shared)
    result["seconds"] = round(time.perf_counter() - began, 3)
    return result


def _init_worker():
    global _KERNELS
    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas run prints its -v report
    except (ImportError, AttributeError):
        pass
    _KERNELS = _load("kernels")


_KERNELS = None


def run(arches, jobs_count: int) -> list[dict]:
    """Compiles for each architecture; every variant on the first, the tiles on the others."""
    jobs = [job for i, arch in enumerate(arches) for job in jobs_for(arch, i == 0)]
    # Heaviest first, so the pool's tail is short.
    jobs.sort(key=lambda j: -(j["const"].get("ROWS", 1) * j["const"].get("BLOCK_S", 1)))
    if jobs_count <= 1:
        _init_worker()
        return [_compile(job) for job in jobs]
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(jobs_count, mp_context=context, initializer=_init_worker) as pool:
        return list(pool.map(_compile, jobs, chunksize=4))


def markdown(results: list[dict], triton_version: str, seconds: float) -> str:
    ok = [r for r in results if "error" not in r]
    lines = [
        "# Triton kernels: registers, spills and shared memory",
        "",
        "Generated by `python gapkernels/triton/aot.py --markdown docs/triton_resources.md` "
        f"(Triton {triton_version}, ptxas -v of each compile, no GPU needed; "
        f"{len(results)} compiles in {seconds:.0f} s). tests/test_triton_compile.py runs the same "
        "compiles and fails on any error. Spills are bytes of spill stores / loads; "
        "shared is the compiled kernel's shared memory in bytes.",
        "",
        "Variant: mode, layout (NCS / NSC), tile ROWS x BLOCK_S, num_warps, x's dtype, then the "
        "flags that are set.",
        "",
        "## Heaviest (most registers) per kernel and architecture",
        "",
        "| arch | kernel | variant | registers | spills | shared |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for arch in sorted({r["arch"] for r in ok}, reverse=True):
        for kernel in _ARGS:
            rows = sorted(
                (r for r in ok if r["arch"] == arch and r["kernel"] == kernel),
                key=lambda r: -r["registers"],
            )[:5]
            for r in rows:
                lines.append(
                    f"| sm_{arch} | {kernel} | {r['variant']} | {r['registers']} | "
                    f"{r['spill_stores']} / {r['spill_loads']} | {r['shared']} |"
                )
    spilled = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
    lines += [
        "",
        f"Kernels that spill: {len(spilled)} of {len(ok)}.",
        "",
        "## Every compile",
        "",
        "| arch | kernel | variant | registers | spills | shared |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in sorted(ok, key=lambda r: (-r["arch"], r["kernel"], r["variant"])):
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['variant']} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['shared']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (80, 90)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", help="write every result to this JSON file")
    parser.add_argument("--markdown", help="write the resource tables to this Markdown file")
    args = parser.parse_args(argv)
    import triton

    began = time.perf_counter()
    results = run(args.arch or [90, 80], args.jobs)
    seconds = time.perf_counter() - began
    errors = [r for r in results if "error" in r]
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(triton=triton.__version__, seconds=seconds, results=results), indent=1)
        )
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, triton.__version__, seconds))
    for r in errors:
        print(f"FAILED sm_{r['arch']} {r['kernel']} {r['variant']}:\n{r['error']}\n")
    print(f"{len(results) - len(errors)} of {len(results)} compiles succeeded in {seconds:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
