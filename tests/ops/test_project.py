"""fedkseed.project (docs/stream-spec.md#projection): the reference against an independent float64
computation (numpy dot products of materialised noise) and against the spec's order rebuilt in
numpy with an exact rational sum; the CPU kernels (every SIMD path, several thread counts) and the
Triton interpreter against the reference bit for bit; sharded pieces summed through the exact
accumulator; non-finite inputs; opcheck; bad input."""

from __future__ import annotations

import itertools
import math
import re
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import fedkseed
from fedkseed import ParamSet, ops
from fedkseed import reference as R
from fedkseed.testing.backends import backend_on_this_machine

U64 = 1 << 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
ROOT = Path(__file__).resolve().parents[2]
needs_cpu_kernel = pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")


def f64_bits(t: torch.Tensor) -> list[int]:
    return [struct.unpack("<Q", struct.pack("<d", v))[0] for v in t.tolist()]


def seeds_of(k: int) -> list[int]:
    return [(0x9E3779B97F4A7C15 * (j + 1) + j) % U64 for j in range(k)]


def laid_out(shapes, dtypes, offsets, seed: int = 0) -> ParamSet:
    """A ParamSet of random tensors at the given global offsets (gaps and any order allowed)."""
    gen = torch.Generator().manual_seed(seed)
    pset = ParamSet([torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)])
    pset.offsets = list(offsets)
    return pset


# Odd shapes, mixed dtypes, chunks shared by two tensors, a gap, indices past 2^32 and 2^63 and
# a tensor ending exactly at 2^64.
MIXED = dict(
    shapes=[(), (5,), (33, 31), (127,), (4100,), (300,), (9,), (1000,)],
    dtypes=[*DTYPES, *DTYPES, torch.float32, torch.bfloat16],
    offsets=[0, 1, 6, 6 + 1023, 4096 * 5 - 7, (1 << 32) - 100, (1 << 63) + 3, U64 - 1000],
)


def mixed(seed: int = 0) -> ParamSet:
    return laid_out(MIXED["shapes"], MIXED["dtypes"], MIXED["offsets"], seed)


# ------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("dist", DISTS)
def test_reference_against_independent_float64_dot(dist):
    pset = mixed()
    seeds = seeds_of(3)
    got = R.project(pset.tensors, pset.offsets, seeds, dist)
    for k, seed in enumerate(seeds):
        total, magnitude = 0.0, 0.0
        for x, offset in zip(pset.tensors, pset.offsets):
            xs = x.float().double().numpy().reshape(-1)  # torch's widening: exact for finite values
            zs = fedkseed.noise(seed, x.numel(), offset, dist, backend="reference").double().numpy()
            total += float(np.dot(xs, zs))
            magnitude += float(np.abs(xs * zs).sum())
        assert abs(got[k].item() - total) <= 1e-12 * magnitude, (k, got[k].item(), total)


def spec_in_numpy(pset: ParamSet, seeds: list[int], dist: str) -> list[float]:
    """docs/stream-spec.md#projection step by step in numpy, with an exact rational total."""
    chunk = 4096
    out = []
    for seed in seeds:
        rows: dict[int, np.ndarray] = {}
        for x, offset in zip(pset.tensors, pset.offsets):
            xs = x.float().double().numpy().reshape(-1)
            zs = fedkseed.noise(seed, x.numel(), offset, dist, backend="reference").double().numpy()
            for j, product in enumerate(xs * zs):
                g = offset + j
                rows.setdefault(g // chunk, np.zeros(chunk))[g % chunk] = product
        total = Fraction(0)
        for values in rows.values():
            while values.size > 1:
                values = values.reshape(-1, 2)[:, 0] + values.reshape(-1, 2)[:, 1]
            total += Fraction(float(values[0]))
        out.append(float(total))
    return out


@pytest.mark.parametrize("dist", DISTS)
def test_reference_is_the_spec_order_bit_for_bit(dist):
    pset = laid_out([(5000,), (77,), (3, 5)], DTYPES, [0, 6000, (1 << 40) - 8])
    seeds = seeds_of(2)
    want = torch.tensor(spec_in_numpy(pset, seeds, dist), dtype=torch.float64)
    assert f64_bits(R.project(pset.tensors, pset.offsets, seeds, dist)) == f64_bits(want)


def test_accumulator_is_exact_in_any_digit_form():
    partials = torch.tensor(
        [[1.0, -(2.0**-298)], [2.0**140, 2.0**-298], [-(2.0**140), 3.5], [0.1, -0.0]], dtype=torch.float64
    )
    acc = R.project_accumulator(partials)
    want = [float(sum(Fraction(v) for v in col)) for col in partials.t().tolist()]
    assert R.finish_projection(acc).tolist() == want == [1.1, 3.5]
    # Two accumulators of halves, added limb by limb (an all-reduce), round to the same bits.
    halves = R.project_accumulator(partials[:2]) + R.project_accumulator(partials[2:])
    assert f64_bits(R.finish_projection(halves)) == f64_bits(R.finish_projection(acc))


def test_header_constants_match_the_reference():
    header = (ROOT / "csrc" / "include" / "fedkseed" / "project.h").read_text()
    constants = {name: int(value) for name, value in re.findall(r"constexpr int k(\w+) = (\d+);", header)}
    assert constants["ChunkShift"] == R.PROJECT_CHUNK_SHIFT
    assert constants["Lsb"] == R.PROJECT_LSB
    assert constants["Limbs"] == R.PROJECT_LIMBS
    assert "kWidth = kLimbs + 3" in header and R.PROJECT_WIDTH == R.PROJECT_LIMBS + 3


# ------------------------------------------------------------------------------ every backend
BACKEND_CASES = ["cpu-scalar", "cpu-avx2", "cpu-avx512", "triton", "cuda"]


@pytest.fixture(params=BACKEND_CASES)
def backend(request, monkeypatch):
    yield from backend_on_this_machine(request.param, monkeypatch)


def assert_same_as_reference(pset: ParamSet, seeds, dist: str, backend_device) -> None:
    name, device = backend_device
    want = R.project(pset.tensors, pset.offsets, [s % U64 for s in seeds], dist)
    moved = ParamSet([t.to(device) for t in pset.tensors])
    moved.offsets = pset.offsets
    got = ops.project(moved, seeds, dist=dist, backend=name)
    assert got.dtype == torch.float64 and got.shape == (len(seeds),)
    assert f64_bits(got) == f64_bits(want), (got - want).abs().max()


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 7])
def test_backend_matches_reference_on_mixed_layouts(backend, dist, k):
    assert_same_as_reference(mixed(k), seeds_of(k), dist, backend)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference_per_dtype(backend, dtype, dist):
    pset = laid_out([(129,), (1001,), (4097,)], [dtype] * 3, [3, 200, 4096 * 3 + 1])
    assert_same_as_reference(pset, [0, U64 - 1, 12345], dist, backend)


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dist", DISTS)
def test_cpu_threads_and_1025_seeds(threads, dist):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if threads == 2:  # K = 1025 on few elements (the reference's cost is K x elements)
            pset, seeds = laid_out([(300,), (50,)], DTYPES[1:], [4096 - 150, 20000]), seeds_of(1025)
        else:
            pset, seeds = laid_out([(300,), (4000,), (50,)], DTYPES, [4096 - 150, 9000, 20000]), seeds_of(9)
        want = R.project(pset.tensors, pset.offsets, seeds, dist)
        assert f64_bits(ops.project(pset, seeds, dist=dist, backend="cpu")) == f64_bits(want)
    finally:
        torch.set_num_threads(before)


def test_int64_seed_tensor_is_twos_complement():
    pset = laid_out([(700,)], [torch.float32], [0])
    as_tensor = torch.tensor([0, -1, -(1 << 63), 12345], dtype=torch.int64)
    got = ops.project(pset, as_tensor)
    want = ops.project(pset, [0, U64 - 1, 1 << 63, 12345], backend="reference")
    assert f64_bits(got) == f64_bits(want)


# ------------------------------------------------------------------------------ shards
def accumulator(backend: str, tensors, offsets, seeds, dist) -> torch.Tensor:
    """One process's exact accumulator (what a sharded call all-reduces)."""
    if backend == "reference":
        return R.project_accumulator(R.project_partials(tensors, offsets, seeds, dist)[1])
    if not ops.has_kernel("CPU"):
        pytest.skip("fedkseed._C CPU kernels not built")
    seed_t = torch.tensor([fedkseed.seeds.to_int64(s) for s in seeds])
    return torch.ops.fedkseed.project(list(tensors), list(offsets), seed_t, fedkseed.stream.dist_tag(dist))


@pytest.mark.parametrize("which", ["reference", "cpu"])
@pytest.mark.parametrize("dist", DISTS)
def test_chunk_aligned_shards_sum_to_the_unsharded_bits(which, dist):
    """Each 'rank' holds a range of the global tensor at its global offset; the ranks' exact
    accumulators summed limb by limb (what the all-reduce does) round to the unsharded bits when
    the shard boundaries are multiples of 4096, as docs/stream-spec.md#projection says."""
    full = torch.randn(3 * 4096 + 500, generator=torch.Generator().manual_seed(5))
    base, seeds = 100_000 * 4096, seeds_of(3)
    want = R.project([full], [base], seeds, dist)

    def sharded(cuts):
        ranks = [accumulator(which, [full[a:b]], [base + a], seeds, dist) for a, b in itertools.pairwise(cuts)]
        return R.finish_projection(sum(ranks))

    assert f64_bits(sharded([0, 4096, 3 * 4096, full.numel()])) == f64_bits(want)
    # A boundary inside a chunk: that chunk is two trees instead of one, equal to rounding.
    magnitude = float(full.double().abs().sum()) * 6
    assert torch.allclose(sharded([0, 5000, full.numel()]), want, rtol=0, atol=1e-13 * magnitude)


def _sharded_worker(rank: int, world: int, folder: str) -> None:
    """One rank: real DTensor shards (gloo), projected by fedkseed.project with its all-reduce."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(8, 1024, generator=gen)  # 4 rows per rank: shard boundary at 4096
        b = torch.randn(7, 300, generator=gen).bfloat16()  # rows 4/3: a boundary inside a chunk
        c = torch.randn(50, generator=gen)  # replicated: counted once
        placed = {
            "a": distribute_tensor(a, mesh, [Shard(0)]),
            "b": distribute_tensor(b, mesh, [Shard(0)]),
            "c": distribute_tensor(c, mesh, [Replicate()]),
        }
        seeds = seeds_of(3)
        out = {}
        for name, keys in (("aligned", "ac"), ("split", "abc")):
            out[name] = fedkseed.project(ParamSet([(k, placed[k]) for k in keys]), seeds)
            out[name + "_unsharded"] = fedkseed.project(ParamSet([{"a": a, "b": b, "c": c}[k] for k in keys]), seeds)
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@needs_cpu_kernel
@pytest.mark.slow
def test_sharded_dtensors_all_reduce(tmp_path):
    """Two gloo ranks holding Shard(0)/Replicate DTensors: every rank returns the same bits; they
    equal the unsharded result when the shard boundaries are multiples of 4096, and agree to
    rounding when a boundary splits a chunk (docs/stream-spec.md#projection)."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("aligned", "split"):
        assert f64_bits(ranks[0][name]) == f64_bits(ranks[1][name]), name
    assert f64_bits(ranks[0]["aligned"]) == f64_bits(ranks[0]["aligned_unsharded"])
    assert torch.allclose(ranks[0]["split"], ranks[0]["split_unsharded"], rtol=1e-12, atol=1e-9)


# ------------------------------------------------------------------------------ special inputs
NONFINITE = [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("inf")], [1e38, 3e38]]


@pytest.mark.parametrize("dist", DISTS)
def test_nonfinite_inputs_match_the_reference(backend, dist):
    for values in NONFINITE:
        pset = laid_out([(300,), (5,)], [torch.float32, torch.bfloat16], [0, 5000])
        pset.tensors[0][: len(values)] = torch.tensor(values)
        pset.tensors[1][0] = float("inf")
        assert_same_as_reference(pset, [1, 2, 3], dist, backend)


def test_nonfinite_rule_of_the_spec():
    nan = R.project([torch.tensor([float("nan"), 1.0])], [0], [7], "gaussian")
    assert f64_bits(nan) == [0x7FF8000000000000]
    # Two infinities in different chunks: opposite signs of z give NaN, equal signs an infinity.
    infs = [torch.tensor([float("inf")]), torch.tensor([float("inf")])]
    for seed in range(4):
        z = [R.noise(seed, 1, i, "rademacher").item() for i in (0, 8192)]
        got = R.project(infs, [0, 8192], [seed], "rademacher").item()
        assert math.isnan(got) if z[0] != z[1] else got == z[0] * math.inf
    huge = R.project([torch.full((4096,), 3e38)], [0], [1], "rademacher").item()  # no overflow in float64
    assert math.isfinite(huge)


def test_zero_seeds_and_empty_tensors():
    pset = laid_out([(0,), (10,)], [torch.float32, torch.float16], [0, 0])
    assert ops.project(pset, []).shape == (0,)
    zeros = ParamSet([torch.zeros(5000)])
    assert f64_bits(ops.project(zeros, [1, 2])) == [0, 0]  # +0.0, whatever the products' signs


def test_project_is_the_transpose_of_replay():
    """<x, sum_k a_k z_k> two ways: replay_ materialises the combination with the fused kernel,
    project gives the p_k; sum_k a_k p_k agrees to float32 rounding of the combination."""
    x = torch.randn(9000, generator=torch.Generator().manual_seed(2))
    seeds, alphas = seeds_of(5), [0.5, -1.0, 0.25, 2.0, -0.125]
    p = ops.project([x], seeds)
    combo = torch.zeros(9000)
    ops.replay_([combo], seeds, alphas)
    direct = float(np.dot(x.double().numpy(), combo.double().numpy()))
    assert abs(sum(a * pk for a, pk in zip(alphas, p.tolist())) - direct) <= 1e-5 * abs(direct) + 1e-3


# ------------------------------------------------------------------------------ op and errors
@needs_cpu_kernel
def test_opcheck():
    params = [torch.randn(100), torch.randn(7, 9).bfloat16()]
    args = (params, [0, 4090], torch.tensor([1, -2, 3]), 0)
    torch.library.opcheck(torch.ops.fedkseed.project.default, args)
    out = torch.ops.fedkseed.project(*args)
    assert out.dtype == torch.int64 and out.shape == (3, R.PROJECT_WIDTH)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dist": "uniform"}, ValueError, "dist"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.project([torch.randn(10)], [1], **kwargs)


def test_bad_seeds_are_named():
    with pytest.raises(TypeError, match="int64"):
        ops.project([torch.randn(10)], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        ops.project([torch.randn(10)], [-1])
