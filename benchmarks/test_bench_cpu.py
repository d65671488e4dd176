"""pytest-benchmark versions of bench_cpu.py on a reduced Llama shape (2 layers of SmolLM2-135M,
vocab 4096: 9.4 M float32 elements). Not collected by `make test` (which runs tests/ only):
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import EPS, floor_pass, mezo_pass
from smollm2_shape import llama_shapes, make_params

from fedkseed import ops
from fedkseed.paramset import ParamSet

pytestmark = pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")


@pytest.fixture(scope="module")
def pset() -> ParamSet:
    return ParamSet(make_params(llama_shapes(2, 576, 1536, 9, 3, 4096, tied=True)))


def test_floor_add(benchmark, pset):
    benchmark(floor_pass, pset.tensors)


def test_mezo_pass(benchmark, pset):
    benchmark(mezo_pass, pset.tensors, 1)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_perturb(benchmark, pset, dist):
    benchmark(ops.perturb_, pset, 1, EPS, dist)


@pytest.mark.parametrize("k", [16, 256])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_replay(benchmark, pset, dist, k):
    seeds = list(range(1, k + 1))
    alphas = torch.full((k,), EPS)
    benchmark.pedantic(ops.replay_, args=(pset, seeds, alphas, dist), rounds=3, iterations=1)
