"""Build gapkernels: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and a
toolkit is found. Whether a GPU is visible never decides what is built.

Environment:
  GAPKERNELS_NO_CUDA=1      build the CPU kernels only
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: 8.0;8.6;8.9;9.0+PTX)
  GAPKERNELS_CPU_ISA        x86-64 vector ISA for the CPU kernels: avx2 (default) or default
"""
import glob
import os
import platform

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch guesses from the PATH otherwise, and may pick a prefix it cannot link against.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("GAPKERNELS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cpu_flags() -> list[str]:
    # The C++ standard: cpp_extension picks the one torch needs. OpenMP: at::parallel_for is an
    # inline `#pragma omp parallel` in torch's headers, so without it every kernel runs on one thread.
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    isa = os.environ.get("GAPKERNELS_CPU_ISA", "avx2")
    if platform.machine() in ("x86_64", "AMD64") and isa == "avx2":
        # at::vec picks its implementation from these macros; AVX2 + FMA is every x86-64 CPU since 2013.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "gapkernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("GAPKERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cpu_flags(), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("gapkernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cpu_flags()}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
