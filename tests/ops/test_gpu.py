"""GPU-only checks (skipped without a CUDA GPU): a ZO step with device seeds and alphas makes no
host synchronisation, captures into a CUDA graph and replays with new seeds, on the CUDA kernels
and compiled Triton, with the reference's bits. The bit-identity of every backend on the GPU over
the branch cases and special values is in test_branches.py and test_special_values.py, whose
backend lists include "cuda" and compiled "triton" when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from fedkseed import ParamSet, ops
from fedkseed.testing.backends import HAS_GPU

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")

GPU_BACKENDS = ["cuda", "triton"]
EPS = 1e-3


def _available(backend: str) -> None:
    if backend == "cuda" and not ops.has_kernel("CUDA"):
        pytest.skip("the extension was built without CUDA")
    if backend == "triton" and not ops.has_triton():
        pytest.skip("triton is not installed")


def _params(device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(129, 31), (7,), (1001,), (64, 65)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    return [torch.randn(s, generator=gen).to(d).to(device) for s, d in zip(shapes, dtypes)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def zo_step(pset: ParamSet, seed: torch.Tensor, eps: torch.Tensor, update: torch.Tensor, backend: str) -> None:
    """The parameter traffic of one MeZO step (the forward passes are not the kernels' business):
    +eps z, -2 eps z, +eps z, then the update -lr * g z, all with device scalars."""
    ops.perturb_(pset, seed, eps, "gaussian", backend=backend)
    ops.perturb_(pset, seed, -2 * eps, "gaussian", backend=backend)
    ops.perturb_(pset, seed, eps, "gaussian", backend=backend)
    ops.perturb_(pset, seed, update, "gaussian", backend=backend)


def _reference_step(params: list[torch.Tensor], seed: int, update: float) -> list[torch.Tensor]:
    ref = [p.cpu().clone() for p in params]
    pset = ParamSet(ref)
    for alpha in (EPS, -2 * EPS, EPS, update):
        ops.perturb_(pset, seed, torch.tensor([alpha]), "gaussian", backend="reference")
    return ref


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_device_seeds_and_alphas_make_no_host_sync(backend):
    _available(backend)
    pset = ParamSet(_params("cuda"))
    seeds = torch.tensor([3, -5, 7], dtype=torch.int64, device="cuda")
    alphas = torch.tensor([1e-3, 2e-3, -1e-3], device="cuda")
    ops.replay_(pset, seeds, alphas, "rademacher", backend=backend)  # warm-up: compile, tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.replay_(pset, seeds, alphas, "rademacher", backend=backend)
        ops.replay_(pset, seeds, alphas, "gaussian", backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_zo_step_captures_in_a_cuda_graph(backend):
    _available(backend)
    params = _params("cuda")
    start = [p.clone() for p in params]
    pset = ParamSet(params)
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    eps = torch.tensor([EPS], device="cuda")
    update = torch.tensor([-0.25], device="cuda")
    # Warm up on a side stream (Triton compiles, tables are built), then restore the weights.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        zo_step(pset, seed, eps, update, backend)
    torch.cuda.current_stream().wait_stream(side)
    for p, s in zip(params, start):
        p.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        zo_step(pset, seed, eps, update, backend)
    for p, s in zip(params, start):  # capture does not run the kernels; start from the start
        p.copy_(s)
    for step_seed, step_update in ((11, -0.25), (-(1 << 62), 0.5)):
        seed.fill_(step_seed)
        update.fill_(step_update)
        before = [p.clone() for p in params]
        graph.replay()
        torch.cuda.synchronize()
        want = _reference_step(before, step_seed % (1 << 64), step_update)
        for got, w in zip(params, want):
            assert torch.equal(_bits(got), _bits(w))


def test_backends_agree_on_a_large_set():
    """CUDA and compiled Triton against each other on a set large enough to use every block of
    the device (grid-stride loops) with mixed dtypes, K = 300, both distributions."""
    _available("cuda")
    _available("triton")
    gen = torch.Generator().manual_seed(1)
    base = [
        torch.randn(n, generator=gen).to(d)
        for n, d in ((3_000_017, torch.float32), (2_000_003, torch.bfloat16), (1_000_001, torch.float16))
    ]
    seeds = torch.randint(-(1 << 62), 1 << 62, (300,), generator=gen).cuda()
    alphas = (torch.rand(300, generator=gen) * 1e-3).cuda()
    for dist in ("gaussian", "rademacher"):
        outs = []
        for backend in GPU_BACKENDS:
            tensors = [b.cuda() for b in base]
            ops.replay_(tensors, seeds, alphas, dist, 0.9, backend=backend)
            outs.append([_bits(t) for t in tensors])
        for a, b in zip(*outs):
            assert torch.equal(a, b), dist


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_project_backends_agree_on_a_large_set(dist):
    """fedkseed.project (docs/stream-spec.md#projection) on CUDA and compiled Triton against the
    CPU kernels (bit-identical to the reference in test_project.py) on a set of several chunks
    per tensor, mixed dtypes, a chunk shared by two tensors and K = 300: the same float64 bits."""
    gen = torch.Generator().manual_seed(3)
    base = [
        torch.randn(n, generator=gen).to(d)
        for n, d in ((300_017, torch.float32), (200_003, torch.bfloat16), (100_001, torch.float16))
    ]
    offsets = [5, 300_022, (1 << 40) + 7]
    seeds = torch.randint(-(1 << 62), 1 << 62, (300,), generator=gen)
    cpu = ParamSet(base)
    cpu.offsets = offsets
    want = ops.project(cpu, seeds, dist=dist, backend="cpu")
    for backend in GPU_BACKENDS:
        _available(backend)
        pset = ParamSet([b.cuda() for b in base])
        pset.offsets = offsets
        got = ops.project(pset, seeds.cuda(), dist=dist, backend=backend)
        assert torch.equal(got.view(torch.int64), want.view(torch.int64)), backend
