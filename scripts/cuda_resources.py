#!/usr/bin/env python
"""Registers, spills and shared memory of every CUDA kernel, from `nvcc -Xptxas -v`.

Compiles the kernel units csrc/cuda/*.cu (the host units, pool_cuda.cpp and token_cuda.cpp, have
no kernels) for each architecture (one nvcc call per architecture, object files in a temporary
directory) with the include directories, defines and flags of the real build (setup.py through
torch.utils.cpp_extension), parses ptxas' report per kernel, demangles the names
(cu++filt, else c++filt), writes a markdown table to docs/cuda_resources.md and exits 1 if any
kernel spills (spill stores or loads > 0 bytes) more than KNOWN_SPILLS allows: a new spill, or a
known one that grew, fails the check.

    CUDA_HOME=/usr/local/cuda python scripts/cuda_resources.py [--arch 80 90] [--out PATH]
        [--jobs 2]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as setup.py does

from torch.utils import cpp_extension  # noqa: E402


def nvcc_command(arch: str, sources: list[str], out_dir: str) -> list[str]:
    """setup.py's nvcc flags (CUDAExtension + BuildExtension on Linux) for one architecture."""
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        sys.exit("cuda_resources: no CUDA toolkit found (set CUDA_HOME)")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    includes = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths(device_type="cuda")
    cmd = [nvcc]
    cmd += [f"-I{d}" for d in includes]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += ["--compiler-options", "-fPIC"]
    cmd += [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_cuda",
        "-std=c++20",
    ]
    # setup.py's extra nvcc flags (cuda_extension: the stable ABI target, USE_CUDA)
    cmd += ["-O3", "-lineinfo", "-Xcompiler", "-fvisibility=hidden"]
    cmd += ["-DTORCH_TARGET_VERSION=0x020b000000000000", "-DUSE_CUDA"]
    cmd += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-Xptxas", "-v", "-c"]
    if len(sources) == 1:
        cmd += [sources[0], "-o", os.path.join(out_dir, f"sm_{arch}.o")]
    else:  # nvcc takes several sources with -c and an output directory
        cmd += sources + ["-odir", out_dir]
    return cmd


FUNCTION = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")
SMEM = re.compile(r"(\d+) bytes smem")


def parse(log: str) -> dict[str, dict]:
    """Per mangled kernel name: arch, registers, stack, spill stores/loads, static shared bytes."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = FUNCTION.search(line)
        if m:
            current = kernels.setdefault(
                m.group(1),
                {
                    "arch": m.group(2),
                    "registers": 0,
                    "stack": 0,
                    "spill_stores": 0,
                    "spill_loads": 0,
                    "smem": 0,
                },
            )
            continue
        m = PROPERTIES.search(line)
        if m:
            current = kernels.get(m.group(1), current)
            continue
        if current is None:
            continue
        m = FRAME.search(line)
        if m:
            current["stack"] = int(m.group(1))
            current["spill_stores"] = int(m.group(2))
            current["spill_loads"] = int(m.group(3))
            continue
        m = USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = SMEM.search(m.group(2))
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run(
        [tool], input="\n".join(names), capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def short_name(full: str) -> str:
    """`void gapkernels::(anonymous namespace)::ncs_pool_forward_kernel<float,
    (gapkernels::Stat)4>(...)` -> `ncs_pool_forward_kernel<float, Pow>`."""
    name = full
    name = re.sub(r"^void ", "", name)
    name = name.replace("gapkernels::(anonymous namespace)::", "").replace("gapkernels::", "")
    name = re.sub(r"\(ForwardArgs<.*$|\(BackwardArgs<.*$", "", name)
    name = name.replace("__nv_bfloat16", "bfloat16").replace("__half", "half")
    name = name.replace("c10::Half", "half").replace("c10::BFloat16", "bfloat16")
    stats = ["Sum", "Max", "SumMax", "Pow", "PowLog"]
    grads = ["Uniform", "UniformPlusArgmax", "Gem"]
    name = re.sub(r"\(\w*Stat\)(\d)", lambda m: stats[int(m.group(1))], name)
    name = re.sub(r"\(\w*Grad\)(\d)", lambda m: grads[int(m.group(1))], name)
    name = re.sub(r"Stat::(\w+)|Grad::(\w+)", lambda m: m.group(1) or m.group(2), name)
    return name


# Spills accepted after a look: (kernel name substring, arch) -> bytes (stores or loads) at most.
# nsc_pool_forward<double, SumMax> on sm_80: ptxas keeps one cold value (n, stored once before the
# loop and loaded once after it) in local memory to stay at 64 registers; float64 only.
KNOWN_SPILLS = {("nsc_pool_forward_kernel<double, SumMax, AllPositions>", "80"): 4}


def known_spill(name: str, arch: str) -> int:
    return max(
        (limit for (part, a), limit in KNOWN_SPILLS.items() if a == arch and part in name),
        default=0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "cuda_resources.md"))
    parser.add_argument("--jobs", type=int, default=2, help="nvcc calls at a time (default 2)")
    args = parser.parse_args()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        sys.exit("cuda_resources: no csrc/cuda/*.cu")

    rows = []
    timings = []
    nvcc_version = ""
    with tempfile.TemporaryDirectory(prefix="gapkernels_res_") as out_dir:
        # One nvcc call per architecture, --jobs of them at a time (2 cores: both at once).
        pending = list(args.arch)
        running = {}
        finished = {}
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                arch = pending.pop(0)
                cmd = nvcc_command(arch, sources, out_dir)
                running[arch] = (
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                    ),
                    time.time(),
                    cmd,
                )
            arch = next(iter(running))
            proc, start, cmd = running.pop(arch)
            log, _ = proc.communicate()
            finished[arch] = (proc.returncode, log, time.time() - start, cmd)
        for arch in args.arch:
            returncode, log, elapsed, cmd = finished[arch]
            timings.append((arch, elapsed))
            if returncode != 0:
                sys.stderr.write(log)
                sys.stderr.write("cuda_resources: nvcc failed: " + " ".join(cmd) + "\n")
                return 2
            print(f"sm_{arch}: compiled in {elapsed:.0f} s", flush=True)
            kernels = parse(log)
            names = demangle(list(kernels))
            for mangled, info in kernels.items():
                rows.append((short_name(names[mangled]), arch, info))
        version = subprocess.run(
            [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        nvcc_version = version.stdout.strip().splitlines()[-1] if version.stdout else ""

    rows.sort(key=lambda row: (row[0], row[1]))
    spilling = [row for row in rows if row[2]["spill_stores"] > 0 or row[2]["spill_loads"] > 0]
    new_spills = [
        row
        for row in spilling
        if max(row[2]["spill_stores"], row[2]["spill_loads"]) > known_spill(row[0], row[1])
    ]
    lines = [
        "# CUDA kernel resources",
        "",
        "Generated by `scripts/cuda_resources.py` (ptxas `-v` with the real build's flags: "
        "`-O3 -lineinfo`, torch's include directories and defines). Do not edit by hand.",
        "",
        f"- compiler: {nvcc_version}",
        "- compile time (wall, one nvcc call per architecture, run side by side): "
        + ", ".join(f"sm_{a} {t:.0f} s" for a, t in timings),
        f"- kernels: {len(rows)}; spilling: {len(spilling)}",
        "- launch bounds: 256 threads per block for every kernel (at most 255 registers).",
        "",
        "| kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) "
        "| static smem (B) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, arch, info in rows:
        lines.append(
            f"| `{name}` | sm_{arch} | {info['registers']} | {info['spill_stores']} | "
            f"{info['spill_loads']} | {info['stack']} | {info['smem']} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}: {len(rows)} kernels")
    heaviest = sorted(rows, key=lambda row: -row[2]["registers"])[:8]
    for name, arch, info in heaviest:
        print(f"  {info['registers']:4d} regs  {info['smem']:6d} B smem  sm_{arch}  {name}")
    for name, arch, info in spilling:
        known = "" if (name, arch, info) in new_spills else " (known, allowed)"
        print(
            f"SPILL sm_{arch} {name}: {info['spill_stores']} B stores, "
            f"{info['spill_loads']} B loads{known}",
            file=sys.stderr,
        )
    return 1 if new_spills else 0


if __name__ == "__main__":
    sys.exit(main())
