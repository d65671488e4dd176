"""Every branch of the kernels, on every backend that runs here, bit for bit against the reference:
K seeds beyond one shared-memory chunk (1, 1025, 4096), more tensors than one CUDA launch's
parameter table holds (800), tensors at odd global offsets and on sliced (misaligned) storage,
and noise at odd offsets. Special values are in test_special_values.py.

Sizes are tiny because the Triton interpreter (the Triton case without a GPU) is slow; the
reference result of each case is computed once and shared by the backends.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fedkseed import ParamSet, ops
from fedkseed import reference as R
from fedkseed.testing.backends import backend_on_this_machine

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
U64 = 1 << 64


@pytest.fixture(params=["reference", "cpu-scalar", "cpu-avx2", "cpu-avx512", "triton", "cuda"])
def backend(request, monkeypatch):
    yield from backend_on_this_machine(request.param, monkeypatch)


def bits(t: torch.Tensor) -> torch.Tensor:
    view = torch.int32 if t.element_size() == 4 else torch.int16
    return t.detach().cpu().contiguous().view(view)


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"tensor {i}"
        diff = int((bits(g) != bits(w)).sum())
        assert diff == 0, f"tensor {i} {tuple(g.shape)} {g.dtype}: {diff} elements differ"


def make_params(sizes: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]


def seeds_and_alphas(k: int) -> tuple[list[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    seeds = [int(s) for s in torch.randint(0, 1 << 62, (k,), generator=gen)]
    seeds = [s * 3 % U64 for s in seeds]  # reach the top bits too
    return seeds, (torch.rand(k, generator=gen) - 0.5) * 1e-2


def replay_on(backend, params, seeds, alphas, dist, decay=None, start=None) -> list[torch.Tensor]:
    """Copies of ``params`` after one replay_ on ``backend``'s device; ``start`` shifts every
    tensor's global offset (odd offsets) by putting a padding tensor first."""
    name, device = backend
    tensors = [p.clone().to(device) for p in params]
    if start:
        tensors = [torch.zeros(start, device=device), *tensors]
    pset = ParamSet(tensors, decays=lambda n, t: _decayed(t))
    ops.replay_(pset, seeds, alphas, dist, decay, backend=name)
    out = [t.cpu() for t in tensors]
    return out[1:] if start else out


@functools.cache
def _expected(case: tuple) -> list[torch.Tensor]:
    """The case's result composed from noise as docs/stream-spec.md#accumulation defines it:
    acc = sum over k in order of alpha_k * z_k, y = x * d + acc (NaN settled), then the
    conversion rule. z comes from the CPU kernels' noise_ when built (checked bit for bit against
    the reference in test_cpu_backend.py), else from the reference: replaying thousands of seeds
    through the reference itself would take minutes."""
    kind, arg, dist = case
    params, seeds, alphas, decay, start = _case(kind, arg)
    noise_backend = "cpu" if ops.has_kernel("CPU") else "reference"
    total = start + sum(p.numel() for p in params)
    acc = torch.zeros(total, dtype=torch.float32)
    for seed, alpha in zip(seeds, alphas):
        acc = acc + alpha * ops.noise(seed, total, 0, dist, backend=noise_backend)
    out, at = [], start
    for p in params:
        x = R.to_float32(p)
        n = x.numel()
        y = x * torch.tensor(decay, dtype=torch.float32) if decay is not None and _decayed(p) else x
        y = R.settle_nan(y + acc[at : at + n], x)
        out.append(R.from_float32(y, p.dtype).reshape(p.shape))
        at += n
    return out


def _decayed(t: torch.Tensor) -> bool:
    return t.dim() > 0 and t.numel() % 2 == 1


def _case(kind: str, arg: int):
    if kind == "seeds":
        seeds, alphas = seeds_and_alphas(arg)
        return make_params([45, 3, 130], 1), seeds, alphas, None, 11
    if kind == "seeds-interpreted":  # one tensor: one Triton program, each a K-long loop in numpy
        seeds, alphas = seeds_and_alphas(arg)
        return make_params([45], 1), seeds, alphas, None, 0
    if kind == "tensors":
        sizes = [1 + (7 * i) % 13 for i in range(arg)]  # 800 tensors, odd sizes: odd offsets
        seeds, alphas = seeds_and_alphas(2)
        return make_params(sizes, 2), seeds, alphas, 0.75, 5
    raise ValueError(kind)


@pytest.mark.parametrize("k", [1, 1025, 4096])
@pytest.mark.parametrize("dist", DISTS)
def test_k_seeds_beyond_one_chunk(backend, k, dist):
    if backend[0] == "reference" and k > 1:
        pytest.skip("the reference has no K-dependent branch, and K = 1025 takes it minutes")
    if backend == ("triton", torch.device("cpu")) and (k > 1025 or (k > 1 and dist == "gaussian")):
        pytest.skip("Triton loops over K without chunks; the interpreter runs K = 1025 Rademacher only")
    kind = "seeds-interpreted" if backend == ("triton", torch.device("cpu")) else "seeds"
    params, seeds, alphas, decay, start = _case(kind, k)
    got = replay_on(backend, params, seeds, alphas, dist, decay, start)
    assert_same_bits(got, _expected((kind, k, dist)))


@pytest.mark.parametrize("dist", DISTS)
def test_800_tensors_with_decay(backend, dist):
    if backend[0] == "reference" and dist == "gaussian":
        pytest.skip("the reference has no tensor-count branch; one distribution is enough for it")
    if backend == ("triton", torch.device("cpu")):
        pytest.skip("Triton's tables have no tensor-count branch, and 800 programs take the interpreter minutes")
    params, seeds, alphas, decay, start = _case("tensors", 800)
    got = replay_on(backend, params, seeds, alphas, dist, decay, start)
    assert_same_bits(got, _expected(("tensors", 800, dist)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
def test_sliced_storage_at_odd_offsets(backend, dtype, dist):
    """Parameters that are views into one storage at element offsets 1, 4 and 9 (addresses not
    16-byte aligned): the update lands in each view only, with the reference's bits."""
    _name, _device = backend
    storage = torch.randn(400, generator=torch.Generator().manual_seed(4)).to(dtype)
    spans = [(1, 130), (134, 137), (141, 400)]  # lengths 129, 3, 259
    seeds, alphas = seeds_and_alphas(3)

    def run(on) -> torch.Tensor:
        base = storage.clone().to(on[1])
        views = [base[a:b] for a, b in spans]
        pset = ParamSet(views, decays=lambda n, t: True)
        ops.replay_(pset, seeds, alphas, dist, 0.5, backend=on[0])
        return base.cpu()

    got = run(backend)
    want = run(("reference", torch.device("cpu")))
    assert_same_bits([got], [want])
    untouched = torch.ones(400, dtype=torch.bool)
    for a, b in spans:
        untouched[a:b] = False
    assert torch.equal(bits(got)[untouched], bits(storage)[untouched])
    assert not torch.equal(bits(got)[~untouched], bits(storage)[~untouched])


@pytest.mark.parametrize("offset", [1, 3, 127, 129, (1 << 32) - 5, U64 - 300])
@pytest.mark.parametrize("dist", DISTS)
def test_noise_at_odd_offsets(backend, offset, dist):
    name, device = backend
    got = ops.noise(U64 - 7, 257, offset, dist, device=device, backend=name).cpu()
    want = ops.noise(U64 - 7, 257, offset, dist, backend="reference")
    assert_same_bits([got], [want])
