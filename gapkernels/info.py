"""`python -m gapkernels.info`: what to paste into a bug report.

Versions (gapkernels, Python, torch, CUDA, Triton), what the extension was built with (CUDA
architectures, CPU kernel variants, the torch it was built against), which CPU kernel variant is
loaded and why, whether the accelerator (gapkernels._C) is loaded and why not, which backends load
on each device and why not, and where `auto`'s GPU table comes from.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

import gapkernels
from gapkernels import _ext, auto_table, backends

BUILD_INFO = _ext.BUILD_INFO


def build_info() -> dict | None:
    """What setup.py recorded when it built the extension, or None (not built, or built before
    the record existed)."""
    return _ext.read_build_info(BUILD_INFO)


def _triton_version() -> str:
    try:
        import triton
    except ImportError as exc:
        return f"not installed ({exc})"
    return triton.__version__


def _backend_lines(device: str) -> list[str]:
    x = torch.empty((1, 1, 1), device=device)
    lines = []
    for name in backends.BACKENDS[1:]:
        try:
            reason = backends.unavailable_reason(name, x)
        except Exception as exc:  # a report must not fail on one broken backend
            reason = f"error while checking: {exc!r}"
        lines.append(f"  {name:10s} {'available' if reason is None else 'no: ' + reason}")
    return lines


def _cpu_variant_lines() -> list[str]:
    """Which CPU kernel variant is loaded, why, and which others this CPU and build have."""
    env = os.environ.get(_ext.CPU_ENV_VAR)
    return [
        f"  CPU kernels: {_ext.cpu_variant or 'none'} ({_ext.cpu_variant_reason})"
        + (f" from {_ext.cpu_library}" if _ext.cpu_library else ""),
        f"  CPU variants: installed {', '.join(_ext.cpu_built_variants()) or 'none'}; this CPU "
        f"executes {', '.join(_ext.cpu_supported_variants())}; "
        + (f"{_ext.CPU_ENV_VAR}={env!r}" if env else f"{_ext.CPU_ENV_VAR} not set"),
    ]


def _cuda_library_line() -> str:
    """Whether the CUDA kernel library (gapkernels/_cuda, LibTorch stable ABI) is built and
    loaded, and why not."""
    if _ext.cuda_library is not None:
        return f"  CUDA kernels: loaded from {_ext.cuda_library}"
    reason = _ext.cuda_broken_reason or _ext.cuda_missing_reason
    return f"  CUDA kernels: not loaded: {reason}"


def _accel_line() -> str:
    """Whether the accelerator (gapkernels._C: the ops' C++ autograd and eager entry) is loaded,
    and why not."""
    if _ext.accel_loaded():
        return f"  accelerator (gapkernels._C): loaded from {getattr(_ext._C, '__file__', '?')}"
    return f"  accelerator (gapkernels._C): not loaded: {_ext.accel_reason}"


def _cuda_library_built(info: dict) -> str:
    """The CUDA library and its oldest torch, as the build record names them ("" in records of
    builds that had the CUDA kernels in _C)."""
    if not info.get("cuda_library"):
        return ""
    return f" ({info['cuda_library']}, stable ABI for torch >= {info.get('cuda_stable_target')})"


def report() -> str:
    info = build_info()
    lines = [
        f"gapkernels {gapkernels.__version__} ({os.path.dirname(gapkernels.__file__)})",
        f"python     {platform.python_version()} on {platform.platform()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"triton     {_triton_version()}"
        + (
            f", TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"
            if "TRITON_INTERPRET" in os.environ
            else ""
        ),
        "GPU        "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"),
        "",
        "extension:",
    ]
    if _ext.loaded():
        lines.append(f"  op schemas: loaded from {_ext.ops_library}")
        lines.append(f"  kernels: CPU {_ext.has_kernel('CPU')}, CUDA {_ext.has_kernel('CUDA')}")
        lines += _cpu_variant_lines()
        lines.append(_cuda_library_line())
        if _ext.broken_reason is not None:
            lines.append(f"  broken: {_ext.broken_reason}")
    else:
        lines.append(f"  not loaded: {_ext.broken_reason or _ext.missing_reason}")
    lines.append(_accel_line())
    if info is None:
        lines.append("  build record: none (gapkernels/_build_info.json is written by setup.py)")
    else:
        lines += [
            f"  built against torch {info.get('torch')} (git "
            f"{str(info.get('torch_git_version'))[:12]}) for {info.get('machine')}; stable "
            f"libraries for torch >= {info.get('stable_target') or '-'}",
            f"  CUDA kernels: {info.get('cuda_kernels')}{_cuda_library_built(info)}; "
            f"architectures {info.get('cuda_arch_list') or '-'}; nvcc {info.get('nvcc') or '-'}",
            "  CPU variants built: "
            + (
                ", ".join(info["cpu_variants"])
                if "cpu_variants" in info
                else f"{info.get('cpu_isa')} only (chosen at build time)"
            )
            + (
                f" (stable ABI for torch >= {info['cpu_stable_target']})"
                if info.get("cpu_stable_target")
                else ""
            ),
        ]
    lines += ["", "backends for CPU tensors:", *_backend_lines("cpu")]
    if torch.cuda.is_available():
        lines += ["backends for CUDA tensors:", *_backend_lines("cuda")]
    env = os.environ.get(backends.ENV_VAR)
    lines += [
        "",
        f"{backends.ENV_VAR}={env!r}" if env else f"{backends.ENV_VAR} not set",
        "auto's GPU table: "
        + (
            f"measured on {auto_table.MEASURED_ON}"
            if auto_table.MEASURED_ON
            else "not measured (CUDA kernels first, then Triton)"
        )
        + f" ({auto_table.PATH})",
    ]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
