"""Loads the compiled libraries and says why when it cannot.

In this order, each after the one before it:

1. gapkernels/_ops.abi3.so: the op schemas (csrc/schemas.cpp), built on the LibTorch stable ABI,
   so that one build defines the ops under every torch from its target (setup.py) on.
2. The CPU kernels, built once per instruction set into gapkernels/_cpu_<variant>.abi3.so
   (setup.py; stable ABI, needing only libtorch_cpu and libc10), each registering the same CPU
   kernels; exactly one is loaded: the best this CPU runs, which is the answer torch gives
   (`torch.backends.cpu.get_cpu_capability()`, so ATEN_CPU_CAPABILITY lowers it too), or the one
   GAPKERNELS_CPU_CAPABILITY names. A request this CPU or this build cannot honour is an error at
   import, not a silent fallback.
3. The CUDA kernels, gapkernels/_cuda.abi3.so (stable ABI), only where torch is a CUDA build,
   since the library needs torch's libtorch_cuda.so; whether a GPU is visible does not matter.
4. gapkernels._C, the accelerator: the ops' autograd in C++ and the public functions' eager entry
   (`_C.pool`), on torch's unstable C++ API. It is loaded only under the torch it was built
   against (torch.__version__ and torch.version.git_version, recorded in
   gapkernels/_build_info.json by setup.py), and never with GAPKERNELS_NO_ACCEL=1. Without it
   the ops' autograd is registered from Python (gapkernels/ops.py, the same formulas) and the
   public functions call the ops themselves: the same results, more Python per call
   (docs/LATENCY.md). `accel_reason` says why it is not loaded.

A missing extension (never built) is a missing backend: `auto` falls back to another one.
A broken extension (built, but fails to load) is an error that `auto` does not hide.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the gapkernels checkout "
    "(set CUDA_HOME=/usr/local/cuda for the CUDA kernels)"
)

# The CPU kernel variants, lowest first, as setup.py builds them; torch's name for each.
CPU_VARIANTS = ("default", "avx2", "avx512")
TORCH_CAPABILITIES = {"DEFAULT": "default", "AVX2": "avx2", "AVX512": "avx512"}
CPU_ENV_VAR = "GAPKERNELS_CPU_CAPABILITY"


class CpuVariantError(RuntimeError):
    """GAPKERNELS_CPU_CAPABILITY asks for a CPU variant that cannot be loaded."""


def cpu_supported_variants() -> tuple[str, ...]:
    """The variants this CPU can execute (whatever ATEN_CPU_CAPABILITY says), lowest first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ("default",)
    # torch's capability is bounded by the hardware but lowered by ATEN_CPU_CAPABILITY; torch's
    # own checks (private, so not relied on to exist) read the hardware alone.
    capability = TORCH_CAPABILITIES.get(torch.backends.cpu.get_cpu_capability(), "default")
    supported = ["default"]
    for name in ("avx2", "avx512"):
        check = getattr(torch.cpu, f"_is_{name}_supported", None)
        if check is not None:
            runs = bool(check())
        else:
            runs = CPU_VARIANTS.index(name) <= CPU_VARIANTS.index(capability)
        if runs:
            supported.append(name)
    return tuple(supported)


def cpu_built_variants() -> tuple[str, ...]:
    """The variants whose library this installation holds, lowest first."""
    return tuple(v for v in CPU_VARIANTS if importlib.util.find_spec(f"gapkernels._cpu_{v}"))


def choose_cpu_variant(
    requested: str | None, torch_capability: str, supported: tuple[str, ...], built: tuple[str, ...]
) -> tuple[str | None, str]:
    """(variant, why): the CPU variant to load, or None when none is built.

    `requested` is GAPKERNELS_CPU_CAPABILITY (None or "" when unset); it may name any variant
    this CPU executes and this build holds, and anything else raises CpuVariantError. Unset, the
    choice is torch's capability (`torch_capability`, e.g. "AVX512"), or the best built variant
    below it."""
    if requested:
        name = requested.strip().lower()
        if name not in CPU_VARIANTS:
            raise CpuVariantError(
                f"{CPU_ENV_VAR}={requested!r} is not a CPU variant; expected one of "
                f"{', '.join(CPU_VARIANTS)} (or unset it: the best one this CPU runs is chosen)"
            )
        if name not in supported:
            raise CpuVariantError(
                f"{CPU_ENV_VAR}={requested!r}: this CPU ({platform.machine()}) cannot execute the "
                f"{name} kernels; it executes {', '.join(supported)}"
            )
        if name not in built:
            raise CpuVariantError(
                f"{CPU_ENV_VAR}={requested!r}: this gapkernels build has no {name} CPU kernels "
                f"(built: {', '.join(built) or 'none'}); rebuild without GAPKERNELS_CPU_VARIANTS"
            )
        return name, f"{CPU_ENV_VAR}={requested}"
    best = TORCH_CAPABILITIES.get(torch_capability, "default")
    why = f"torch's CPU capability is {torch_capability}"
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        why += f" (ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']})"
    usable = [
        v for v in CPU_VARIANTS[: CPU_VARIANTS.index(best) + 1] if v in built and v in supported
    ]
    if not usable:
        return None, why
    if usable[-1] != best:
        why += f"; {best} is not built (built: {', '.join(built)})"
    return usable[-1], why


def cpu_vector_bytes(variant: str, machine: str | None = None) -> int:
    """The size in bytes of one vector of the CPU kernels (csrc/cpu/simd.h's Vec,
    GK_VECTOR_BYTES) in the CPU variant `variant` built for `machine` (this one by default): 64 for
    avx512, 16 for the default variant on aarch64, 32 otherwise (avx2, and the default variant of
    x86_64). The CPU kernels' chunk is two such vectors of the accumulator type (csrc/cpu/vec.h,
    ChunkIO); the path tests shape their inputs from it."""
    if variant not in CPU_VARIANTS:
        raise ValueError(f"{variant!r} is not a CPU variant; expected one of {CPU_VARIANTS}")
    if variant == "avx512":
        return 64
    if variant == "default" and (machine or platform.machine()) in ("aarch64", "arm64"):
        return 16
    return 32


ACCEL_ENV_VAR = "GAPKERNELS_NO_ACCEL"
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def read_build_info(path: str = BUILD_INFO) -> dict | None:
    """What setup.py recorded when it built the extension (gapkernels/_build_info.json), or None
    (not built, or built before the record existed)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def accel_mismatch(record: dict | None, version: str, git_version: str) -> str | None:
    """None when the build record says gapkernels._C was built against the torch whose
    `__version__` and `version.git_version` are given, else why it cannot be loaded."""
    rebuild = (
        "the ops run without it (their autograd in Python: the same results, slower small "
        "calls); to have it, rebuild gapkernels against this torch (`pip install "
        "--no-build-isolation .` in its checkout)"
    )
    if record is None:
        return f"no build record ({BUILD_INFO}) says which torch it was built against; {rebuild}"
    built, built_git = record.get("torch"), record.get("torch_git_version")
    if built is None or built_git is None:
        return f"the build record does not name the torch it was built against; {rebuild}"
    if (built, built_git) != (version, git_version):
        return (
            f"it was built against torch {built} (git {built_git[:12]}), and torch {version} "
            f"(git {git_version[:12]}) is running; {rebuild}"
        )
    return None


def accel_disabled(value: str | None) -> bool:
    """Whether GAPKERNELS_NO_ACCEL (`value`, None when unset) turns the accelerator off."""
    if value in (None, "", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(
        f"{ACCEL_ENV_VAR}={value!r}: expected 1 (do not load gapkernels._C, the accelerator) or "
        "0 / unset (load it where it matches the running torch)"
    )


_C = None  # the accelerator, when loaded
accel_reason: str | None = None  # why it is not loaded
ops_library: str | None = None  # the op schemas' file, when loaded
missing_reason: str | None = None  # the extension was never built
broken_reason: str | None = None  # it was built but does not load
cpu_variant: str | None = None  # the CPU kernels loaded: "default", "avx2" or "avx512"
cpu_variant_reason = ""  # why that one
cpu_library: str | None = None  # its file
cuda_library: str | None = None  # the CUDA kernels' file, when loaded
cuda_missing_reason: str | None = None  # why they are not loaded: not built, or a CPU torch
cuda_broken_reason: str | None = None  # they were built but failed to load


def _library_path(name: str) -> str | None:
    """The built library gapkernels/<name>.*.so, or None."""
    spec = importlib.util.find_spec(f"gapkernels.{name}")
    return spec.origin if spec is not None else None


def _load_ops() -> None:
    """Loads the op schemas, or records why not."""
    global ops_library, missing_reason, broken_reason
    path = _library_path("_ops")
    if path is None:
        missing_reason = (
            "the gapkernels C++ extension is not built (no gapkernels/_ops.*.so, the op schemas)"
        )
        return
    try:
        torch.ops.load_library(path)  # defines the ops (STABLE_TORCH_LIBRARY)
    except (OSError, RuntimeError) as exc:
        broken_reason = (
            f"the op schemas {path} failed to load under torch {torch.__version__} ({exc}); "
            "gapkernels supports torch >= 2.11"
        )
        return
    ops_library = path


def _load_cpu() -> None:
    """Loads the CPU kernels of the chosen variant, or records why not."""
    global cpu_variant, cpu_variant_reason, cpu_library, broken_reason
    cpu_variant, cpu_variant_reason = choose_cpu_variant(
        os.environ.get(CPU_ENV_VAR),
        torch.backends.cpu.get_cpu_capability(),
        cpu_supported_variants(),
        cpu_built_variants(),
    )
    if cpu_variant is None:
        return
    cpu_library = _library_path(f"_cpu_{cpu_variant}")
    try:
        torch.ops.load_library(cpu_library)  # registers the CPU kernels
    except (OSError, RuntimeError) as exc:
        broken_reason = (
            f"the CPU kernels {cpu_library} failed to load ({exc}); they were probably built "
            f"against another torch than {torch.__version__}"
        )


def cuda_library_path() -> str | None:
    """The built CUDA kernel library (gapkernels/_cuda.*.so), or None."""
    return _library_path("_cuda")


def _load_cuda() -> None:
    """Loads the CUDA kernels, or records why not."""
    global cuda_library, cuda_missing_reason, cuda_broken_reason
    path = cuda_library_path()
    if torch.version.cuda is None:
        cuda_missing_reason = (
            f"torch {torch.__version__} is a CPU-only build (no libtorch_cuda), so the CUDA "
            "kernels are not loaded"
            + (f" (built: {path})" if path else "")
            + "; install a CUDA build of torch"
        )
        return
    if path is None:
        cuda_missing_reason = (
            "the gapkernels CUDA kernels (gapkernels/_cuda.*.so) are not built: the build found "
            "no CUDA toolkit, its torch had no CUDA, or GAPKERNELS_NO_CUDA=1 was set; rebuild it "
            f"with a CUDA toolkit and a CUDA build of torch: {BUILD_HINT}"
        )
        return
    try:
        torch.ops.load_library(path)  # registers the CUDA kernels
    except (OSError, RuntimeError) as exc:
        cause = exc.__cause__ or exc
        cuda_broken_reason = (
            f"the CUDA kernels {path} failed to load under torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}): {cause}"
        )
        return
    cuda_library = path


def _load_accel() -> None:
    """Imports gapkernels._C where it matches the running torch, or records why not."""
    global _C, accel_reason
    if accel_disabled(os.environ.get(ACCEL_ENV_VAR)):
        accel_reason = f"{ACCEL_ENV_VAR}=1 is set"
        return
    if _library_path("_C") is None:
        accel_reason = "gapkernels._C is not built"
        return
    accel_reason = accel_mismatch(read_build_info(), torch.__version__, torch.version.git_version)
    if accel_reason is not None:
        return
    try:
        _C = importlib.import_module("gapkernels._C")  # registers the ops' C++ autograd
    except (ImportError, OSError) as exc:
        accel_reason = f"gapkernels._C failed to import ({exc})"


_load_ops()
if ops_library is not None:
    _load_cpu()
    _load_cuda()
    _load_accel()
else:
    accel_reason = "the op schemas (gapkernels/_ops) are not loaded"


def loaded() -> bool:
    """Whether the op schemas are loaded (gapkernels::* exist; which kernels: has_kernel)."""
    return ops_library is not None


def accel_loaded() -> bool:
    """Whether gapkernels._C (the ops' C++ autograd and the eager entry) is loaded."""
    return _C is not None


def broken(dispatch_key: str) -> bool:
    """Whether the kernels for `dispatch_key` were built but fail to load (an error that `auto`
    does not hide, unlike kernels that were never built)."""
    return broken_reason is not None or (dispatch_key == "CUDA" and cuda_broken_reason is not None)


# Read once here: the public functions consult it on every call, also inside torch.compile graphs.
KERNEL_KEYS = frozenset(
    key
    for key in ("CPU", "CUDA")
    if ops_library is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key("gapkernels::pool_forward", key)
)


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered kernels for a dispatch key ("CPU" or "CUDA")."""
    return dispatch_key in KERNEL_KEYS


def unavailable_reason(dispatch_key: str) -> str | None:
    """None when the extension has kernels for `dispatch_key`, else why not and how to fix it."""
    if broken_reason is not None:
        return f"{broken_reason}; rebuild it: {BUILD_HINT}"
    if missing_reason is not None:
        return f"{missing_reason}; {BUILD_HINT}"
    if not has_kernel(dispatch_key):
        if dispatch_key == "CPU":
            return (
                "the gapkernels CPU kernels (gapkernels/_cpu_*.abi3.so) are not built for this CPU "
                f"({cpu_variant_reason}); {BUILD_HINT}"
            )
        if dispatch_key == "CUDA" and cuda_broken_reason is not None:
            return f"{cuda_broken_reason}; rebuild it: {BUILD_HINT}"
        if dispatch_key == "CUDA" and cuda_missing_reason is not None:
            return cuda_missing_reason
        return (
            f"the gapkernels extension was built without {dispatch_key} kernels; "
            "rebuild it with a CUDA toolkit and a CUDA build of torch: " + BUILD_HINT
        )
    return None
