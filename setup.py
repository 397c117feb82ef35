"""Build gapkernels: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and a
toolkit is found. Whether a GPU is visible never decides what is built.

Environment:
  GAPKERNELS_NO_CUDA=1      build the CPU kernels only
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST      GPU architectures; when set, it is used as given. Default: Ampere to
                            Hopper (8.0;8.6;8.9;9.0), plus Blackwell (10.0;12.0) when nvcc is 12.8
                            or newer, with +PTX on the newest so that later GPUs still run
  GAPKERNELS_CPU_ISA        x86-64 vector ISA for the CPU kernels: avx2 (default) or default
"""

import glob
import json
import os
import platform
import re
import subprocess

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch guesses from the PATH otherwise, and may pick a prefix it cannot link against.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("GAPKERNELS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


BASE_ARCHS = ["8.0", "8.6", "8.9", "9.0"]  # Ampere (A100, RTX 30), Ada (RTX 40, L4), Hopper
BLACKWELL_ARCHS = ["10.0", "12.0"]  # B200/GB200, RTX 50/RTX PRO; nvcc supports them from 12.8 on
BLACKWELL_MIN_NVCC = (12, 8)


def nvcc_version(cuda_home: str | None) -> tuple[int, int] | None:
    """(major, minor) of `cuda_home`/bin/nvcc, or None when it cannot be run or read."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def default_cuda_arch_list(nvcc: tuple[int, int] | None) -> str:
    """The architectures built when TORCH_CUDA_ARCH_LIST is not set, for this nvcc version."""
    archs = list(BASE_ARCHS)
    if nvcc is not None and nvcc >= BLACKWELL_MIN_NVCC:
        archs += BLACKWELL_ARCHS
    archs[-1] += "+PTX"  # PTX of the newest: a GPU newer than every listed one JIT-compiles it
    return ";".join(archs)


def cpu_flags() -> list[str]:
    # The C++ standard: cpp_extension picks the one torch needs. OpenMP: at::parallel_for is an
    # inline `#pragma omp parallel` in torch's headers, so without it every kernel runs on one
    # thread.
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    isa = os.environ.get("GAPKERNELS_CPU_ISA", "avx2")
    if platform.machine() in ("x86_64", "AMD64") and isa == "avx2":
        # at::vec picks its implementation from these macros; AVX2 + FMA is every x86-64 CPU
        # since 2013.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def extension():
    # Every .cpp under csrc/ at any depth, except under csrc/cuda/, whose files (.cu, and .cpp that
    # need the CUDA headers) are built only with CUDA. MANIFEST.in ships all of csrc/ in the sdist.
    everything = sorted(glob.glob("csrc/**/*", recursive=True))
    in_cuda = [f for f in everything if f.startswith("csrc/cuda/")]
    sources = [f for f in everything if f.endswith(".cpp") and f not in in_cuda]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda():
        sources += [f for f in in_cuda if f.endswith((".cu", ".cpp"))]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the user's list, when given, always wins
            nvcc = nvcc_version(CUDA_HOME)
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(nvcc)
            print(
                f"gapkernels: nvcc {'.'.join(map(str, nvcc)) if nvcc else 'version unknown'}, "
                f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (default)"
            )
        return CUDAExtension(
            "gapkernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("GAPKERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cpu_flags(), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "gapkernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cpu_flags()},
        extra_link_args=["-fopenmp"],
    )


def build_info(cuda: bool) -> dict:
    """What this build compiled in, for `python -m gapkernels.info`
    (gapkernels/_build_info.json)."""
    nvcc = nvcc_version(CUDA_HOME) if cuda else None
    return {
        "torch": torch.__version__,
        "cuda_kernels": cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "nvcc": ".".join(map(str, nvcc)) if nvcc else None,
        "cpu_isa": os.environ.get("GAPKERNELS_CPU_ISA", "avx2")
        if platform.machine() in ("x86_64", "AMD64")
        else "default",
        "machine": platform.machine(),
    }


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, which also writes gapkernels/_build_info.json next to the built
    library (in the source tree for in-place and editable builds)."""

    def run(self):
        target = ROOT if self.inplace else self.build_lib
        os.makedirs(os.path.join(target, "gapkernels"), exist_ok=True)
        with open(os.path.join(target, "gapkernels", "_build_info.json"), "w") as f:
            json.dump(build_info(with_cuda()), f, indent=2)
        super().run()


if __name__ == "__main__":  # every build frontend runs this file as __main__; tests import it
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtensionWithInfo},
    )
