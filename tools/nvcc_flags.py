"""Print the nvcc flags the CUDA extension is built with, for ``make cuda-check``.

Build tooling, not part of the installed package: it reads the source tree. The device flags come
from setup.py's ``NVCC_FLAGS`` (read, not copied, so the check compiles exactly what the build
compiles), plus the defines and include paths torch's CUDAExtension adds, plus one ``-gencode``
per architecture in pyproject.toml's ``[tool.fedkseed] cuda-archs`` (the list setup.py uses too).
Usage: ``python tools/nvcc_flags.py [STUB_DIR]``.

A CPU-only torch wheel ships the c10/cuda headers but not the one CMake generates
(``c10/cuda/impl/cuda_cmake_macros.h``); given STUB_DIR, a stand-in with the content CMake writes
for a shared-library build is put there so the kernels still compile (never link) for the check.
"""

from __future__ import annotations

import ast
import os
import sys
import tomllib

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def setup_nvcc_flags(setup_py: str = os.path.join(ROOT, "setup.py")) -> list[str]:
    """The value of ``NVCC_FLAGS = [...]`` in setup.py."""
    with open(setup_py) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"no NVCC_FLAGS list in {setup_py}")


def cuda_archs(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """pyproject.toml's ``[tool.fedkseed] cuda-archs``, e.g. ``["8.0", "9.0"]``."""
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["tool"]["fedkseed"]["cuda-archs"])


def gencode_flags(archs: list[str]) -> list[str]:
    """``-gencode arch=compute_80,code=sm_80`` for ``"8.0"``: real code for each architecture, and
    PTX of the newest one, which the driver compiles for GPUs newer than the list (as
    TORCH_CUDA_ARCH_LIST's "+PTX" does in setup.py)."""
    flags = []
    for arch in archs:
        sm = arch.replace(".", "")
        if not sm.isdigit():
            raise ValueError(f"cuda-archs entry {arch!r} is not of the form MAJOR.MINOR")
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    newest = archs[-1].replace(".", "")
    return [*flags, "-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def stub_generated_headers(stub_dir: str) -> list[str]:
    """Include dirs supplying what a CPU-only torch lacks (empty when torch has CUDA headers)."""
    if any(os.path.exists(os.path.join(p, CMAKE_MACROS)) for p in cpp_extension.include_paths()):
        return []
    path = os.path.join(stub_dir, CMAKE_MACROS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [stub_dir]


def nvcc_flags(stub_dir: str | None = None) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [os.path.join(ROOT, "csrc", "include"), *cpp_extension.include_paths()]
    if stub_dir is not None:
        includes += stub_generated_headers(stub_dir)
    return [
        *(f"-I{p}" for p in includes),
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-Xcompiler",
        "-fPIC",
        *setup_nvcc_flags(),
        *gencode_flags(cuda_archs()),
    ]


if __name__ == "__main__":
    sys.stdout.write(" ".join(nvcc_flags(sys.argv[1] if len(sys.argv) > 1 else None)) + "\n")
