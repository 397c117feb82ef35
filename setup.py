"""Build gapkernels: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and a
toolkit is found. Whether a GPU is visible never decides what is built.

Environment:
  GAPKERNELS_NO_CUDA=1      build the CPU kernels only
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST      GPU architectures; when set, it is used as given. Default: Ampere to
                            Hopper (8.0;8.6;8.9;9.0), plus Blackwell (10.0;12.0) when nvcc is 12.8
                            or newer, with +PTX on the newest so that later GPUs still run
  GAPKERNELS_NO_ACCEL=1     leave out gapkernels._C, the accelerator (torch's unstable API):
                            every library is then on the stable ABI, and a wheel is tagged abi3
                            (cp310-abi3), one wheel for every CPython >= 3.10 and torch >= 2.11
  GAPKERNELS_CPU_VARIANTS   which CPU kernel variants to build, comma-separated (default: all
                            that the machine architecture has: default,avx2,avx512 on x86-64,
                            default elsewhere). Restricting it only shortens the build (coverage
                            builds, development); the variant used is chosen at run time.

The CPU kernels (csrc/cpu/) are built once per instruction set into their own libraries,
gapkernels/_cpu_<variant>.abi3.so, each registering the same CPU kernels; gapkernels/_ext.py loads
exactly one at import, the best this CPU runs (the answer torch.backends.cpu.get_cpu_capability()
gives), or the one GAPKERNELS_CPU_CAPABILITY names. The op schemas are in their own library,
gapkernels/_ops.abi3.so (csrc/schemas.cpp), loaded first. gapkernels._C, the accelerator, holds
the C++ autograd and the eager entry (csrc/ops.cpp; torch's unstable API, no CUDA code): it is
optional, and gapkernels/_ext.py loads it only under the torch it was built against (recorded in
gapkernels/_build_info.json). The CUDA kernels are in their own library, gapkernels/_cuda.abi3.so.
The schema, CPU and CUDA kernel libraries are built on the LibTorch stable ABI for torch 2.11 and
later (TORCH_TARGET_VERSION): they need only libtorch_cpu and libc10 of torch (and libtorch_cuda
for the CUDA one; cudart is linked statically); gapkernels/_ext.py loads the CUDA one only where
torch is a CUDA build. Which machine builds never matters: every x86-64 build holds every variant.
"""

import glob
import json
import os
import platform
import re
import subprocess
import threading

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


# The CPU kernel variants: the kernels' vector type (csrc/cpu/simd.h) picks its width and
# intrinsics (and the inline namespace of the kernels' code) from CPU_CAPABILITY and the
# CPU_CAPABILITY_<ISA> macro, as ATen's own DEFAULT/AVX2/AVX512 builds do. AVX2 + FMA + F16C:
# every x86-64 CPU since 2013. AVX-512: the four subsets torch requires for its AVX512 capability
# (F, BW, VL, DQ), plus FMA and F16C, which every such CPU has. Not -mavx512bf16: some AVX-512
# CPUs lack it, torch's AVX512 capability does not require it, and its conversion flushes
# subnormals to zero (the kernels round to bfloat16 as torch does, in integer arithmetic).
CPU_VARIANTS = {
    # -Wno-psabi: GCC notes that 32-byte vectors pass differently with AVX; everything of the
    # vector type is inline, and no such vector crosses the library's interface.
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT", "-Wno-psabi"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
        *("-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
        # GCC 12's avx512fintrin.h warns thousands of times on its own _mm512_undefined_*()
        # (GCC bug 105593, fixed in later releases). The other variants compile the same
        # kernels with these warnings on, so nothing of ours goes unchecked.
        *("-Wno-uninitialized", "-Wno-maybe-uninitialized"),
    ],
}
X86_64 = ("x86_64", "AMD64")


def cpu_variants(machine: str | None = None) -> list[str]:
    """The CPU kernel variants this build makes: every one the architecture has, or those
    GAPKERNELS_CPU_VARIANTS names."""
    machine = machine or platform.machine()
    possible = list(CPU_VARIANTS) if machine in X86_64 else ["default"]
    if "GAPKERNELS_CPU_ISA" in os.environ:
        raise SystemExit(
            "gapkernels: GAPKERNELS_CPU_ISA is gone: every CPU variant is built and the best one "
            "is chosen at run time (GAPKERNELS_CPU_CAPABILITY forces one); to build fewer, set "
            f"GAPKERNELS_CPU_VARIANTS to some of {','.join(possible)}"
        )
    wanted = os.environ.get("GAPKERNELS_CPU_VARIANTS")
    if not wanted:
        return possible
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name not in possible]
    if unknown or not names:
        raise SystemExit(
            f"gapkernels: GAPKERNELS_CPU_VARIANTS={wanted!r}: expected a comma-separated list of "
            f"{', '.join(possible)} (the variants of {machine})"
        )
    return [name for name in possible if name in names]


# The LibTorch stable ABI: the oldest torch the CPU and CUDA kernel libraries run on, as
# TORCH_TARGET_VERSION ([major][minor][patch] bytes, then a 5-byte ABI tag). The same macro makes
# every ATen/c10 header refuse to compile, so nothing outside the stable surface can slip in.
STABLE_TARGET = "2.11"
STABLE_TARGET_FLAG = "-DTORCH_TARGET_VERSION=0x020b000000000000"
# The libraries on the stable ABI use no Python API (py_limited_api: cpp_extension builds them
# with Py_LIMITED_API for CPython 3.10, the oldest this package supports); a wheel that holds
# only them is tagged for it (GAPKERNELS_NO_ACCEL=1, with_accel()).
LIMITED_API_TAG = "cp310"

# The CPU libraries' link: torch_cpu (the stable C shim: registration, allocation,
# torch_parallel_for) and c10 (which cpp_extension always links; unused). Neither torch_python
# (py_limited_api) nor libtorch.so, nor OpenMP: the kernels run on torch's own thread pool.
CPU_LIBRARIES = ["c10", "torch_cpu"]


def cpu_flags(variant: str) -> list[str]:
    # The C++ standard: cpp_extension picks the one torch needs. No -fopenmp: the kernels split
    # their work with torch::stable::parallel_for, which runs on torch's own thread pool. Hidden
    # visibility: a variant's code (inline functions too) is never bound to from outside its
    # library; the STABLE_TORCH_LIBRARY_IMPL registration runs at load. -g0: Python's own CFLAGS
    # carry -g, which about doubles the compile time of each unit (and the size of each library)
    # for debug information a kernel library does not ship.
    flags = ["-O3", "-fno-math-errno", "-fvisibility=hidden", "-g0", STABLE_TARGET_FLAG]
    return flags + CPU_VARIANTS[variant]


def cpu_extensions() -> list:
    """One library per CPU variant: the kernels (every .cpp under csrc/cpu/) and the shared checks
    (csrc/checks.cpp), without the op schemas (gapkernels._ops defines them) or anything of CUDA, on
    the LibTorch stable ABI (gapkernels/_cpu_<variant>.abi3.so)."""
    sources = sorted(glob.glob("csrc/cpu/**/*.cpp", recursive=True)) + ["csrc/checks.cpp"]
    extensions = []
    for variant in cpu_variants():
        ext = CppExtension(
            f"gapkernels._cpu_{variant}",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            py_limited_api=True,  # no Python API: loaded with torch.ops.load_library
            extra_compile_args={"cxx": cpu_flags(variant)},
        )
        ext.libraries = list(CPU_LIBRARIES)
        extensions.append(ext)
    return extensions


# The checks every device shares (torch-free, on a TensorInfo each library fills): compiled into
# each CPU kernel library and into the CUDA library, not into gapkernels._C.
SHARED_SOURCES = ["csrc/checks.cpp"]
# The op schemas: gapkernels._ops alone.
SCHEMA_SOURCES = ["csrc/schemas.cpp"]


def ops_extension():
    """gapkernels._ops: the op schemas (csrc/schemas.cpp) on the LibTorch stable ABI, so that one
    build defines the ops under every torch from STABLE_TARGET on; no Python API (py_limited_api,
    loaded with torch.ops.load_library) and nothing of CUDA."""
    ext = CppExtension(
        "gapkernels._ops",
        list(SCHEMA_SOURCES),
        py_limited_api=True,
        extra_compile_args={"cxx": ["-O2", "-g0", "-fvisibility=hidden", STABLE_TARGET_FLAG]},
    )
    ext.libraries = ["c10", "torch_cpu"]  # the stable C shim; not libtorch.so (cpp_extension's)
    return ext


def extension():
    # gapkernels._C, the accelerator: every .cpp under csrc/ at any depth (the C++ autograd and
    # eager entry in ops.cpp), except under csrc/cpu/ (cpu_extensions), csrc/cuda/
    # (cuda_extension), the schemas (ops_extension) and the shared checks, which only the kernel
    # libraries call. No CUDA code: a CppExtension that a CPU-only torch loads. MANIFEST.in ships
    # all of csrc/ in the sdist.
    sources = [
        f
        for f in sorted(glob.glob("csrc/**/*.cpp", recursive=True))
        if not f.startswith(("csrc/cpu/", "csrc/cuda/"))
        and f not in SHARED_SOURCES + SCHEMA_SOURCES
    ]
    return CppExtension(
        "gapkernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # baseline x86-64: no kernel runs in this library
        extra_compile_args={"cxx": ["-O3", "-fno-math-errno"]},
    )


# The CUDA library's link: torch_cuda (aoti_torch_get_current_cuda_stream), torch_cpu (the rest
# of the stable C shim), c10 (which cpp_extension always links; unused), and a static cudart, so
# that the library does not need the toolkit's libcudart.so next to whatever CUDA torch has.
# Neither torch_python (py_limited_api) nor c10_cuda nor libtorch.so: CUDAExtension's own list
# would name them all.
CUDA_LIBRARIES = ["c10", "torch_cpu", "torch_cuda", "cudart_static", "rt", "pthread", "dl"]


def cuda_extension():
    """gapkernels._cuda (None without CUDA): the CUDA kernels (csrc/cuda/: the .cu kernel units
    and the host side, pool_cuda.cpp) and the shared checks, on the LibTorch stable ABI. USE_CUDA
    declares the shim's CUDA calls (the current stream, the CUDA error text)."""
    if not with_cuda():
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the user's list, when given, always wins
        nvcc = nvcc_version(CUDA_HOME)
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(nvcc)
        print(
            f"gapkernels: nvcc {'.'.join(map(str, nvcc)) if nvcc else 'version unknown'}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (default)"
        )
    sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
    sources += sorted(glob.glob("csrc/cuda/**/*.cpp", recursive=True)) + SHARED_SOURCES
    stable = [STABLE_TARGET_FLAG, "-DUSE_CUDA"]
    ext = CUDAExtension(
        "gapkernels._cuda",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,  # no Python API: loaded with torch.ops.load_library
        extra_compile_args={
            "cxx": ["-O3", "-g0", "-fvisibility=hidden", *stable],
            "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-fvisibility=hidden", *stable],
        },
    )
    ext.libraries = list(CUDA_LIBRARIES)
    return ext


def build_info(cuda: bool) -> dict:
    """What this build compiled in, for `python -m gapkernels.info`
    (gapkernels/_build_info.json)."""
    nvcc = nvcc_version(CUDA_HOME) if cuda else None
    return {
        # the torch gapkernels._C (the accelerator, unstable API) is built against and loads
        # under: gapkernels/_ext.py compares both with the running torch's
        "torch": torch.__version__,
        "torch_git_version": torch.version.git_version,
        # the oldest torch the stable libraries (_ops, _cuda) load under
        "stable_target": STABLE_TARGET,
        "cuda_kernels": cuda,
        # the CUDA kernels' library and the oldest torch it loads under (the stable ABI target)
        "cuda_library": "gapkernels._cuda" if cuda else None,
        "cuda_stable_target": STABLE_TARGET if cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "nvcc": ".".join(map(str, nvcc)) if nvcc else None,
        "cpu_variants": cpu_variants(),
        # the oldest torch the CPU kernels' libraries load under (the stable ABI target)
        "cpu_stable_target": STABLE_TARGET,
        "machine": platform.machine(),
    }


# Each thread's own temporary folder while it builds one library (build_ext -j builds several
# libraries at once, on threads that share one command object).
_LIBRARY_TEMP = threading.local()


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, which also writes gapkernels/_build_info.json next to the built
    libraries (in the source tree for in-place and editable builds), and builds each library in
    its own temporary folder: the CPU variants compile the same sources with other flags, and
    sharing one folder would make them overwrite each other's objects (and rebuild every time).

    The libraries are independent, so `build_ext -j N` (or GAPKERNELS_BUILD_JOBS=N, which reaches
    pip builds too) builds N of them at once, each with its own ninja of MAX_JOBS compilers: on a
    machine with many cores the build takes about as long as its slowest library, not the sum.
    GAPKERNELS_BUILD_KEEP_GOING=1 reports a library that fails to build and goes on with the
    others (gapkernels.info then says which is missing and why); for a machine where one build
    attempt is all there is (scripts/gpu_validate.sh)."""

    @property
    def build_temp(self):
        return getattr(_LIBRARY_TEMP, "path", None) or self.__dict__.get("_shared_build_temp")

    @build_temp.setter
    def build_temp(self, value):
        self.__dict__["_shared_build_temp"] = value

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel and os.environ.get("GAPKERNELS_BUILD_JOBS"):
            self.parallel = int(os.environ["GAPKERNELS_BUILD_JOBS"])

    def build_extension(self, ext):
        _LIBRARY_TEMP.path = os.path.join(
            self.__dict__["_shared_build_temp"], ext.name.rpartition(".")[2]
        )
        try:
            super().build_extension(ext)
        except Exception as error:
            if os.environ.get("GAPKERNELS_BUILD_KEEP_GOING", "0") != "1":
                raise
            print(f"gapkernels: BUILD FAILED for {ext.name} ({error}); going on without it")
        finally:
            _LIBRARY_TEMP.path = None

    def run(self):
        target = ROOT if self.inplace else self.build_lib
        os.makedirs(os.path.join(target, "gapkernels"), exist_ok=True)
        with open(os.path.join(target, "gapkernels", "_build_info.json"), "w") as f:
            json.dump(build_info(with_cuda()), f, indent=2)
        remove_unstable_cpu_libraries(os.path.join(target, "gapkernels"))
        super().run()


def remove_unstable_cpu_libraries(folder: str) -> None:
    """Removes CPU kernel libraries of older builds, tagged with the Python version
    (_cpu_<variant>.cpython-*.so, ATen-based) rather than abi3: Python's import machinery prefers
    that tag, so in an in-place build a stale one would be loaded instead of the new one."""
    for path in glob.glob(os.path.join(folder, "_cpu_*.cpython-*")):
        print(f"gapkernels: removing {path} (an older, version-tagged build of the CPU kernels)")
        os.remove(path)


def with_accel() -> bool:
    """Whether to build gapkernels._C, the accelerator (torch's unstable C++ API). Without it
    (GAPKERNELS_NO_ACCEL=1 at build time, the same variable that keeps it from loading) every
    library is on the stable ABI and Python's limited API, so the wheel is tagged abi3: one wheel
    for every CPython from 3.10 and every torch from STABLE_TARGET on."""
    return os.environ.get("GAPKERNELS_NO_ACCEL", "0") != "1"


def setup_arguments() -> dict:
    """setup()'s arguments for this environment (the libraries to build, the wheel's tag)."""
    accel = with_accel()
    arguments: dict = {
        "ext_modules": [
            ops_extension(),
            *([extension()] if accel else []),
            *cpu_extensions(),
            *[ext for ext in [cuda_extension()] if ext is not None],
        ],
        "cmdclass": {"build_ext": BuildExtensionWithInfo},
    }
    if not accel:
        arguments["options"] = {"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}}
    return arguments


if __name__ == "__main__":  # every build frontend runs this file as __main__; tests import it
    setup(**setup_arguments())
