"""Build fedkseed's compiled operators: C++ CPU kernels always, CUDA kernels when torch has CUDA.

The arithmetic must stay exact (shared/perturbation-stream.md section 4): no -ffast-math,
contraction off on the host and -fmad=false on the device. SIMD paths are selected at run time
with per-function target attributes, so the build never assumes the build machine's CPU.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(HERE, "csrc", "include")]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("FEDKSEED_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    if _want_cuda():
        return cpp_extension.CUDAExtension(
            "fedkseed._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=INCLUDE,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "fedkseed._C",
        sources,
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="fedkseed",
    version="0.1.0",
    description="Fused, device-independent seed-based zeroth-order fine-tuning and FedKSeed",
    packages=find_packages(include=["fedkseed", "fedkseed.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "llm": ["transformers", "gguf", "accelerate", "safetensors", "rouge-score", "matplotlib", "tqdm"],
        "flower": ["flwr[simulation]>=1.21"],
    },
    entry_points={"console_scripts": ["fedkseed=fedkseed.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
