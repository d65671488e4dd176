"""Which kernel backends run on this machine, for the tests that compare all of them bit for bit
(tests/ops/: test_special_values.py, test_branches.py, test_gpu.py).

A backend case is a name: "reference", "cpu-<isa>" (the CPU kernels forced onto one instruction
set path), "triton" (compiled on a GPU, else the interpreter on CPU tensors) or "cuda".
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from fedkseed import ops

HAS_GPU = torch.cuda.is_available()
ISAS = ["scalar", "avx2", "avx512"]


def cpu_isas() -> list[str]:
    """The CPU kernel paths this CPU can run (none without the compiled extension)."""
    if not ops.has_kernel("CPU"):
        return []
    return ISAS[: ISAS.index(torch.ops.fedkseed.cpu_isa()) + 1]


def backend_on_this_machine(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, torch.device]]:
    """Yield (ops backend, device) for the case ``name``, or skip it; restores what it changed.

    For the Triton interpreter TRITON_INTERPRET=1 is set through ``monkeypatch`` (triton reads it
    when fedkseed's kernel module is first imported, which happens inside the test)."""
    cpu = torch.device("cpu")
    if name == "reference":
        yield "reference", cpu
    elif name.startswith("cpu-"):
        isa = name[4:]
        if isa not in cpu_isas():
            pytest.skip(f"no CPU kernel for {isa} here")
        before = torch.ops.fedkseed.cpu_isa()
        torch.ops.fedkseed.set_cpu_isa(isa)
        try:
            yield "cpu", cpu
        finally:
            torch.ops.fedkseed.set_cpu_isa(before)
    elif name == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if HAS_GPU:
            yield "triton", torch.device("cuda")
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            yield "triton", cpu
    elif name == "cuda":
        if not (HAS_GPU and ops.has_kernel("CUDA")):
            pytest.skip("needs a CUDA GPU and the CUDA kernels (none on this machine)")
        yield "cuda", torch.device("cuda")
    else:
        raise ValueError(f"unknown backend case {name!r}")
