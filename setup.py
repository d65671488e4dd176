"""Build fedkseed's compiled operators: C++ CPU kernels always, CUDA kernels when torch has CUDA.

Everything else about the package (metadata, version, dependencies, entry points, package data)
is declared in pyproject.toml; this file holds only what must be code. torch is a build
requirement there, so importing it here works under a PEP 517 build, isolated or not.

The arithmetic must stay exact (docs/stream-spec.md#arithmetic): no -ffast-math, contraction off
on the host and -fmad=false on the device. SIMD paths are selected at run time with per-function
target attributes, so the build never assumes the build machine's CPU. tools/nvcc_flags.py reads
NVCC_FLAGS from this file, so `make cuda-check` compiles exactly what the build compiles.
"""

import glob
import os
import tomllib

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(HERE, "csrc", "include")]
# -fopenmp at compile time only: at::parallel_for then runs on torch's own OpenMP pool (libtorch_cpu
# brings the runtime); linking -fopenmp ourselves could load a second OpenMP runtime beside it.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]


def cuda_archs() -> list[str]:
    """The GPU architectures to compile for: pyproject.toml's [tool.fedkseed] cuda-archs."""
    with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["tool"]["fedkseed"]["cuda-archs"])


def _files(*patterns: str) -> list[str]:
    # Relative paths: setuptools requires them for sources and puts `depends` into the sdist.
    paths = (p for pattern in patterns for p in glob.glob(os.path.join(HERE, pattern), recursive=True))
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("FEDKSEED_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = ["csrc/ops.cpp", *_files("csrc/cpu/*.cpp")]
    # Headers: a change rebuilds the extension, and the sdist ships them.
    headers = _files("csrc/**/*.h", "csrc/**/*.cuh")
    if _want_cuda():
        # Without this, torch compiles for the GPU it sees, or for every architecture it supports.
        # Real code for each listed GPU, plus PTX of the newest so later GPUs JIT-compile it.
        archs = cuda_archs()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join([*archs[:-1], archs[-1] + "+PTX"]))
        return cpp_extension.CUDAExtension(
            "fedkseed._C",
            sources + _files("csrc/cuda/*.cu"),
            include_dirs=INCLUDE,
            depends=headers,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    return cpp_extension.CppExtension(
        "fedkseed._C",
        sources,
        include_dirs=INCLUDE,
        depends=headers,
        extra_compile_args={"cxx": CXX_FLAGS},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
