"""The Triton backend against the normative reference, bit for bit.

Without a GPU the kernels run in the Triton interpreter on CPU tensors: TRITON_INTERPRET=1 is set
for this module's tests only (triton reads it when the kernel module is first imported, which
happens on first use, inside these tests), so other modules see the environment they had. With a GPU
the same tests run the compiled kernels on CUDA tensors, and the GPU-only tests at the end also
compare the CUDA backend and capture a step in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

import fedkseed
from fedkseed import ParamSet
from fedkseed.ops import has_kernel

pytest.importorskip("triton")

HAS_GPU = torch.cuda.is_available()

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
SHAPES = [(), (1,), (3,), (5,), (127,), (129,), (31, 33)]  # odd sizes; 31*33 = 1023
U64 = 1 << 64
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(autouse=True, scope="module")
def interpret_without_gpu():
    if HAS_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 != 0.0 and NaN payloads count."""
    view = {4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().cpu().contiguous().view(view)


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"tensor {i}"
        diff = (bits(g) != bits(w)).sum().item()
        assert diff == 0, f"tensor {i} ({tuple(g.shape)}, {g.dtype}): {diff} elements differ"


def make_params(dtypes, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Named tensors of odd shapes; 2-D ones are "weights" (decayed), the rest biases/norms."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        name = f"layer{i}.weight" if len(shape) >= 2 else f"layer{i}.bias"
        named.append((name, torch.randn(shape, generator=gen).to(dtype).to(DEVICE)))
    return named


def run_both(named, seeds, alphas, dist, decay=None, rounding_seed=None):
    """The triton and reference results of replay_ on two copies of ``named``."""
    a = ParamSet([(n, t.clone()) for n, t in named])
    b = ParamSet([(n, t.clone()) for n, t in named])
    fedkseed.replay_(a, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend="triton")
    fedkseed.replay_(b, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend="reference")
    return a.tensors, b.tensors


# ------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize(
    "offset, count",
    [
        (0, 1),
        (0, 1000),
        (3, 129),
        (2**31 - 5, 300),
        (2**32 - 7, 300),
        (2**63 - 2, 260),
        (2**64 - 300, 300),
        (2**64 - 1, 1),
    ],
)
def test_noise_matches_reference(dist, offset, count):
    seed = 0xDEADBEEF12345678
    got = fedkseed.noise(seed, count, offset, dist, device=DEVICE, backend="triton")
    want = fedkseed.reference.noise(seed, count, offset, dist)
    assert got.device.type == DEVICE.type
    assert_same_bits([got], [want])


def test_noise_seed_as_device_tensor_past_2_63():
    seed = U64 - 12345
    seed_t = torch.tensor([seed - U64], dtype=torch.int64, device=DEVICE)
    got = fedkseed.noise(seed_t, 200, 17, device=DEVICE, backend="triton")
    assert_same_bits([got], [fedkseed.reference.noise(seed, 200, 17)])


# ----------------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 3])
def test_replay_matches_reference(dtype, dist, k):
    seeds = [7 + 1000 * j for j in range(k - 1)] + [U64 - 3]
    alphas = [0.25 * (-1) ** j / (j + 1) for j in range(k)]
    got, want = run_both(make_params([dtype]), seeds, alphas, dist)
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
def test_replay_with_decay_matches_reference(dtype, dist):
    got, want = run_both(make_params([dtype], seed=1), [11, 12, 13], [1e-2, -3e-3, 5e-4], dist, decay=0.97)
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 3])
def test_stochastic_rounding_matches_reference(dtype, dist, k):
    # Small alphas, so most updates fall below half an ulp and only stochastic rounding moves them.
    got, want = run_both(
        make_params([dtype], seed=2),
        list(range(5, 5 + k)),
        [1e-3] * k,
        dist,
        decay=0.999,
        rounding_seed=U64 - 99,
    )
    assert_same_bits(got, want)
    before = [t for _, t in make_params([dtype], seed=2)]
    if dtype != torch.float32:
        assert any(not torch.equal(g, b) for g, b in zip(got, before)), "rounding moved nothing"


def test_mixed_dtypes_one_call():
    named = make_params(DTYPES, seed=3)
    got, want = run_both(named, [1, 2], [0.5, -0.125], "gaussian", decay=0.9, rounding_seed=4)
    assert_same_bits(got, want)


def test_perturb_selects_triton_and_round_trips():
    named = make_params([torch.float32], seed=4)
    pset = ParamSet([(n, t.clone()) for n, t in named])
    want = ParamSet([(n, t.clone()) for n, t in named])
    fedkseed.perturb_(pset, 42, 1e-3, backend="triton")
    fedkseed.perturb_(want, 42, 1e-3, backend="reference")
    assert_same_bits(pset.tensors, want.tensors)
    assert "triton" in pset.cache


def test_seeds_and_alphas_as_device_tensors():
    named = make_params([torch.bfloat16], seed=5)
    seeds = [3, U64 - 1, 1 << 40]
    seed_t = torch.tensor([s - U64 if s >= 1 << 63 else s for s in seeds], dtype=torch.int64, device=DEVICE)
    alpha_t = torch.tensor([0.1, -0.2, 0.3], device=DEVICE)
    a = ParamSet([(n, t.clone()) for n, t in named])
    b = ParamSet([(n, t.clone()) for n, t in named])
    fedkseed.replay_(a, seed_t, alpha_t, "rademacher", backend="triton")
    fedkseed.replay_(b, seeds, [0.1, -0.2, 0.3], "rademacher", backend="reference")
    assert_same_bits(a.tensors, b.tensors)


def test_cache_rebuilt_when_a_tensor_is_reallocated():
    model = torch.nn.Linear(33, 5).to(DEVICE)
    pset = ParamSet(model)
    fedkseed.perturb_(pset, 1, 1e-2, backend="triton")
    old_key = pset.cache["triton"][0]
    old_weight = model.weight.data
    model.weight.data = model.weight.data.clone()  # same Parameter, new storage
    snapshot = old_weight.clone()
    want = [t.clone() for t in pset.tensors]
    fedkseed.perturb_(pset, 2, 1e-2, backend="triton")
    fedkseed.replay_(want, [2], [1e-2], backend="reference")
    assert pset.cache["triton"][0] != old_key
    assert torch.equal(old_weight, snapshot), "the kernel wrote to the freed storage"
    assert_same_bits(pset.tensors, want)


def test_empty_and_zero_size_tensors():
    named = [("a", torch.zeros(0, device=DEVICE)), ("b", torch.ones(5, device=DEVICE))]
    got, want = run_both(named, [9], [1.0], "gaussian")
    assert_same_bits(got, want)


# ------------------------------------------------------------------------------------ GPU only
@needs_gpu
@pytest.mark.parametrize("trial", range(4))
def test_gpu_backends_agree_bit_for_bit(trial):
    """cuda vs triton vs reference vs cpu, on random shapes, dtypes, K and options."""
    gen = torch.Generator().manual_seed(100 + trial)
    shapes = [
        tuple(torch.randint(1, 70, (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen).tolist())
        for _ in range(6)
    ]
    named = [
        (f"p{i}.weight", torch.randn(s, generator=gen).to(DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]))
        for i, s in enumerate(shapes)
    ]
    k = int(torch.randint(1, 6, (1,), generator=gen))
    seeds = torch.randint(-(2**62), 2**62, (k,), generator=gen).tolist()
    seeds = [s % U64 for s in seeds]
    alphas = (torch.randn(k, generator=gen) * 1e-2).tolist()
    dist = DISTS[trial % 2]
    opts = dict(decay=0.95 if trial % 2 else None, rounding_seed=trial if trial >= 2 else None)
    results = {}
    backends = ["reference", "triton"] + (["cuda"] if has_kernel("CUDA") else [])
    for backend in backends:
        pset = ParamSet([(n, t.clone().to(DEVICE)) for n, t in named])
        fedkseed.replay_(pset, seeds, alphas, dist, opts["decay"], rounding_seed=opts["rounding_seed"], backend=backend)
        results[backend] = pset.tensors
    if has_kernel("CPU"):
        pset = ParamSet([(n, t.clone()) for n, t in named])
        fedkseed.replay_(pset, seeds, alphas, dist, opts["decay"], rounding_seed=opts["rounding_seed"], backend="cpu")
        results["cpu"] = pset.tensors
    for backend, tensors in results.items():
        assert_same_bits(tensors, results["reference"]), backend


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_of_a_perturb_step(backend):
    if backend == "cuda" and not has_kernel("CUDA"):
        pytest.skip("the extension was built without CUDA")
    named = make_params([torch.bfloat16, torch.float32], seed=6)
    pset = ParamSet([(n, t.clone()) for n, t in named])
    seed_t = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    alpha_t = torch.tensor([1e-2], device=DEVICE)
    fedkseed.perturb_(pset, seed_t, alpha_t, backend=backend)  # warm-up: compile, build tables
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        fedkseed.perturb_(pset, seed_t, alpha_t, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    # Capture records without running: the warm-up applied seed 5; the replay, fed new device
    # values, applies seed 7 with no re-capture and no host synchronisation.
    seed_t.fill_(7)
    alpha_t.fill_(-3e-3)
    graph.replay()
    torch.cuda.synchronize()
    ref = ParamSet([(n, t.clone()) for n, t in named])
    fedkseed.perturb_(ref, 5, 1e-2, backend="reference")
    fedkseed.perturb_(ref, 7, -3e-3, backend="reference")
    assert_same_bits(pset.tensors, ref.tensors)
