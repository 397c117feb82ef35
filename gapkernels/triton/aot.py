"""Ahead-of-time compilation of every Triton kernel for real GPUs, without a GPU.

    python gapkernels/triton/aot.py [--arch 90 --arch 80] [--jobs 2] [--json OUT] [--markdown OUT]

compiles (triton.compile on an ASTSource, as triton/tools/compile.py does, for
GPUTarget("cuda", arch, 32)) each kernel of gapkernels/triton/kernels.py and token_kernels.py in
the variants that aot_jobs.py lists (every tile the config chooser can return, every mode, dtype,
weight kind and index width that changes the code; fewer for the token kernels).

Each compile runs ptxas; its `-v` report gives registers, spill stores/loads (bytes) and the
compiled kernel's metadata its shared memory. A compile error is reported and makes the exit
status 1. Runs without TRITON_INTERPRET (which it removes from its environment) and without
importing torch: the kernel modules are loaded from this folder as a stand-in package
(`_load`), not as gapkernels.triton.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
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


_PACKAGE = "_gapkernels_aot"


def _load(name: str):
    """gapkernels/triton/<name>.py as a module of a stand-in package whose path is this folder:
    the kernel modules' relative imports work, and neither gapkernels nor torch is imported
    (triton resolves the kernels' globals through the modules in sys.modules)."""
    if _PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(_PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(HERE)]
        sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{_PACKAGE}.{name}")


jobs = _load("aot_jobs")


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


def _f64_instructions(ptx: str) -> list[str]:
    """The PTX instructions that compute in fp64: none may, whatever the float arguments' type
    (fp64 from Inductor's launch: gapkernels/triton/layout.py's `_float32`); an fp64 parameter
    and its conversion to f32 (cvt.rn.f32.f64) are allowed."""
    lines = (line.strip() for line in ptx.splitlines())
    return [
        line
        for line in lines
        if ".f64" in line and not line.startswith((".param", "ld.param", "cvt.rn.f32.f64", "//"))
    ]


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

    fn = next(getattr(m, job["kernel"]) for m in _KERNELS if hasattr(m, job["kernel"]))
    const = {k: v for k, v in job["const"].items() if not k.startswith("_")}
    n_one = job["const"].get("_n_one", False)
    s64 = job["const"].get("_s64", False)
    weight_one = job["const"].get("_weight_stride", "one") == "one"
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            constexprs[(i,)] = const[name]
            continue
        ty = jobs.arg_type(job["kernel"], name)
        if ty == "N":
            ty = "one" if n_one else "i32"
        elif ty == "S":
            ty = "i64" if s64 else "i32"
        elif ty == "W":
            ty = "one" if weight_one else "i32"
        elif ty == "*x":
            ty = "*" + job["dtype"]
        elif ty == "F":
            ty = job["const"].get("_floats", "fp32")
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
    result = dict(kernel=job["kernel"], arch=job["arch"], variant=jobs.describe(job))
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
    f64 = _f64_instructions(compiled.asm["ptx"])
    result["f64_instructions"] = len(f64)
    if f64:
        result["error"] = "fp64 arithmetic in the PTX: " + "; ".join(f64[:5])
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
    _KERNELS = (_load("kernels"), _load("token_kernels"))


_KERNELS: tuple = ()


def run(arches, jobs_count: int) -> list[dict]:
    """Compiles for each architecture; every variant on the first, the tiles on the others."""
    todo = [job for i, arch in enumerate(arches) for job in jobs.jobs_for(arch, i == 0)]
    # Heaviest first, so the pool's tail is short.
    todo.sort(key=lambda j: -(j["const"].get("ROWS", 1) * j["const"].get("BLOCK_S", 1)))
    if jobs_count <= 1:
        _init_worker()
        return [_compile(job) for job in todo]
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(jobs_count, mp_context=context, initializer=_init_worker) as pool:
        return list(pool.map(_compile, todo, chunksize=4))


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
        for kernel in jobs.KERNELS:
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
