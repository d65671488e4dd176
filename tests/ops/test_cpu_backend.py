"""The C++ CPU kernels (csrc/cpu) against the normative reference, bit for bit, on every SIMD path
(FEDKSEED_CPU_ISA=scalar|avx2|avx512), dtype, distribution and thread count; index math past
2^31, 2^32 and 2^63 through noise offsets; opcheck; and bad input that must leave params alone."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fedkseed
from fedkseed import ops
from fedkseed import reference as R

pytestmark = pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")

U64 = 1 << 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
SHAPES = [(0,), (), (1,), (3,), (5,), (127,), (129,), (1001,), (33, 31)]
SEEDS3 = [0, 1 << 63, U64 - 1]


def _available_isas() -> list[str]:
    if not ops.has_kernel("CPU"):
        return ["scalar"]
    best = torch.ops.fedkseed.cpu_isa()
    return ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best) + 1]


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    if request.param not in _available_isas():
        pytest.skip(f"this CPU has no {request.param}")
    before = torch.ops.fedkseed.cpu_isa()
    assert torch.ops.fedkseed.set_cpu_isa(request.param) == request.param
    yield request.param
    torch.ops.fedkseed.set_cpu_isa(before)


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        diff = (_bits(g) != _bits(w)).reshape(-1)
        assert not bool(diff.any()), f"tensor {i} {tuple(g.shape)} {g.dtype}: {int(diff.sum())} elements differ"


def _params(shapes, dtypes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]


def _both(params, seeds, alphas, dist, decay=None, rounding_seed=None):
    """Run the CPU kernel and the reference on copies; return (cpu, reference) results."""
    got = [p.clone() for p in params]
    want = [p.clone() for p in params]
    ops.replay_(got, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend="cpu")
    ops.replay_(want, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend="reference")
    return got, want


# ------------------------------------------------------------------------------ bit-exact paths
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_matches_reference(isa, threads, dtype, dist):
    params = _params(SHAPES, [dtype] * len(SHAPES))
    _assert_same_bits(*_both(params, SEEDS3, [0.5, -1e-3, 3e-4], dist))


@pytest.mark.parametrize("k", [1, 3, 17])
@pytest.mark.parametrize("dist", DISTS)
def test_seed_counts(isa, dist, k):
    params = _params([(5,), (130,), (1003,)], [torch.float32, torch.bfloat16, torch.float16], seed=k)
    seeds = [(0x9E3779B97F4A7C15 * (j + 1)) % U64 for j in range(k)]
    alphas = [(-1) ** j * 10.0 ** -(j % 5) for j in range(k)]
    _assert_same_bits(*_both(params, seeds, alphas, dist))


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decay_and_stochastic_rounding(isa, dtype, dist):
    named = [
        ("w", torch.randn(37, 29).to(dtype)),
        ("norm.weight", torch.randn(29).to(dtype)),
        ("b", torch.randn(3, 5).to(dtype)),
    ]
    for rounding_seed in (None, 12345, U64 - 2):
        got = [(n, p.clone()) for n, p in named]
        want = [(n, p.clone()) for n, p in named]
        ops.replay_(got, [7, 8], [1e-2, -2e-3], dist, 0.99, rounding_seed=rounding_seed, backend="cpu")
        ops.replay_(want, [7, 8], [1e-2, -2e-3], dist, 0.99, rounding_seed=rounding_seed, backend="reference")
        _assert_same_bits([p for _, p in got], [p for _, p in want])


@pytest.mark.parametrize("dist", DISTS)
def test_mixed_dtypes_one_call(isa, threads, dist):
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 3
    shapes = [(1,), (63,), (65,), (200,), (7, 9), (2, 3, 5), (128,), (1,), (3000,)]
    params = _params(shapes, dtypes, seed=3)
    _assert_same_bits(*_both(params, [3, U64 - 7], [1e-2, 4e-3], dist, rounding_seed=99))


def test_decay_without_seeds(isa):
    # K = 0 with decay is a pure decay pass: y = x * d + 0.0.
    named = [("w", torch.randn(50, 3)), ("w16", torch.randn(9, 9).half())]
    got, want = [(n, p.clone()) for n, p in named], [(n, p.clone()) for n, p in named]
    ops.replay_(got, [], [], "gaussian", 0.5, backend="cpu")
    ops.replay_(want, [], [], "gaussian", 0.5, backend="reference")
    _assert_same_bits([p for _, p in got], [p for _, p in want])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_special_values_round_like_the_reference(isa, dtype):
    """NaN payloads, infinities, float16 overflow and subnormal edges convert as the reference does
    (docs/stream-spec.md#conversion; tests/ops/test_special_values.py checks the rule itself)."""
    specials = [
        0x7FC00001,
        0x7F800001,
        0xFFC00000,
        0x7FA00000,
        0x7F800000,
        0xFF800000,
        0x477FEFFF,
        0x477FF000,
        0x477FF001,
        0x33000000,
        0x33000001,
        0x387FFFFF,
        0x38800000,
        0x00000001,
        0x80000000,
    ]
    bits = torch.tensor(specials * 7, dtype=torch.int64)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    for rounding_seed in (None, 5):
        # alpha 0 keeps y = x + 0 * z (exact), so the conversion itself is what is compared
        got, want = _both([x.clone()], [11], [0.0], "gaussian", rounding_seed=rounding_seed)
        _assert_same_bits(got, want)
        got16 = [x.to(dtype)]
        got16, want16 = _both(got16, [11], [1e-3], "gaussian", rounding_seed=rounding_seed)
        _assert_same_bits(got16, want16)
    # float32 -> dtype through the kernel's store: a float32 param cannot show it, so replay into
    # a dtype param from values that only the update creates (x + alpha * z crosses the edges).
    y = torch.full((301,), 65519.0).to(dtype) if dtype == torch.float16 else torch.full((301,), 3.0e38).to(dtype)
    _assert_same_bits(*_both([y], [1], [40.0 if dtype == torch.float16 else 3.0e37], "gaussian"))


def test_int64_seed_tensor_is_twos_complement(isa):
    params = _params([(300,)], [torch.float32])
    as_tensor = torch.tensor([0, -1, -(1 << 63), 12345], dtype=torch.int64)
    as_ints = [0, U64 - 1, 1 << 63, 12345]
    a, b = [params[0].clone()], [params[0].clone()]
    ops.replay_(a, as_tensor, [1.0, 2.0, 3.0, 4.0], "gaussian", backend="cpu")
    ops.replay_(b, as_ints, [1.0, 2.0, 3.0, 4.0], "gaussian", backend="reference")
    _assert_same_bits(a, b)


# ------------------------------------------------------------------------- 64-bit index math
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize(
    "offset,count",
    [
        (0, 1),
        (3, 1000),
        ((1 << 31) - 5, 77),
        ((1 << 32) - 5, 133),
        ((1 << 34) - 20, 200),  # Gaussian block numbers wrap their low word inside one vector
        ((1 << 39) - 384, 2000),  # Rademacher block numbers wrap their low word inside one tile
        ((1 << 15) - 7, 70_001),  # crosses chunk boundaries, split between threads
        ((1 << 63) + 1, 300),
        (U64 - 1000, 1000),  # ends exactly at 2^64
        (U64 - 9, 9),
        (U64 - 1, 1),
    ],
)
def test_noise_offsets(isa, dist, offset, count):
    for seed in (0, U64 - 1):
        got = fedkseed.noise(seed, count, offset, dist, backend="cpu")
        want = R.noise(seed, count, offset, dist)
        _assert_same_bits([got], [want])


def test_noise_past_the_end_is_refused():
    with pytest.raises(ValueError, match="leave"):
        fedkseed.noise(1, 10, U64 - 9, backend="cpu")
    out = torch.empty(10)
    with pytest.raises(RuntimeError, match="leave"):
        torch.ops.fedkseed.noise_(out, torch.tensor([1]), -9, 0)


def test_replay_at_high_global_offsets(isa):
    """A ParamSet's offsets are small; the op itself takes any uint64 offset (two's complement)."""
    x = torch.randn(517)
    for offset in ((1 << 32) - 3, (1 << 63) + 5, U64 - 517):
        got = x.clone()
        signed = offset - U64 if offset >= 1 << 63 else offset
        torch.ops.fedkseed.replay_([got], [signed], [], torch.tensor([9]), torch.tensor([0.25]), 0, None)
        want = x.clone()
        R.replay_([want], [offset], [9], torch.tensor([0.25]), "gaussian")
        _assert_same_bits([got], [want])


# ----------------------------------------------------------------------------------- opcheck
def test_opcheck_replay():
    params = [torch.randn(7, 3), torch.randn(11).to(torch.bfloat16)]
    args = (params, [0, 21], [0.9, 1.0], torch.tensor([1, 2]), torch.tensor([0.1, 0.2]), 0, torch.tensor([5]))
    torch.library.opcheck(torch.ops.fedkseed.replay_.default, args)


def test_opcheck_noise():
    torch.library.opcheck(torch.ops.fedkseed.noise_.default, (torch.empty(33), torch.tensor([4]), 10, 1))


# ------------------------------------------------------------------------------- bad input
def _untouched_after(call, params, error, match):
    before = [p.clone() for p in params]
    with pytest.raises(error, match=match):
        call(params)
    _assert_same_bits(params, before)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda p: ops.replay_(p, [1, 2], [0.1], backend="cpu"), ValueError, "differ in length"),
        (lambda p: ops.replay_(p, [1], [math.nan], backend="cpu"), ValueError, "non-finite"),
        (lambda p: ops.replay_(p, [1], [math.inf], backend="cpu"), ValueError, "non-finite"),
        (lambda p: ops.replay_(p, [1], torch.tensor([math.nan]), backend="cpu"), ValueError, "NaN"),
        (lambda p: ops.replay_(p, [1], [1e39], backend="cpu"), ValueError, "overflow"),
        (lambda p: ops.perturb_(p, -1, 0.1, backend="cpu"), ValueError, "seed"),
        (lambda p: ops.perturb_(p, U64, 0.1, backend="cpu"), ValueError, "seed"),
        (lambda p: ops.perturb_(p, 1.5, 0.1, backend="cpu"), TypeError, "seed"),
        (lambda p: ops.perturb_(p, torch.tensor([1.0]), 0.1, backend="cpu"), TypeError, "int64"),
        (lambda p: ops.perturb_(p, 1, 0.1, "uniform", backend="cpu"), ValueError, "dist"),
        (lambda p: ops.perturb_(p, 1, 0.1, backend="cuda"), RuntimeError, "backend='cuda'"),
        (lambda p: ops.perturb_(p, 1, 0.1, backend="gpu"), ValueError, "backend"),
        (lambda p: ops.perturb_(p, 1, 0.1, rounding_seed=-3, backend="cpu"), ValueError, "seed"),
        (lambda p: ops.replay_(p, [1], [0.1], decay=math.nan, backend="cpu"), ValueError, "decay"),
    ],
)
def test_bad_arguments_leave_params_untouched(call, error, match):
    _untouched_after(call, [torch.randn(10, 4), torch.randn(9).half()], error, match)


def test_bad_params_leave_params_untouched():
    good = torch.randn(12)
    for bad, error, match in [
        (torch.randn(6, 4).t(), ValueError, "contiguous"),
        (torch.arange(5), TypeError, "dtype"),
        (torch.randn(5, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(5, device="meta"), ValueError, "one device"),
    ]:
        before = good.clone()
        with pytest.raises(error, match=match):
            ops.perturb_([good, bad], 1, 0.1, backend="cpu")
        _assert_same_bits([good], [before])


def test_op_level_checks_come_before_writes():
    """The compiled op validates everything before the first write (callers may bypass ops.py)."""
    x, y = torch.randn(40), torch.randn(6, 2).t()
    op = torch.ops.fedkseed.replay_
    cases = [
        (lambda: op([x, y], [0, 40], [], torch.tensor([1]), torch.tensor([0.1]), 0, None), "contiguous"),
        (lambda: op([x, torch.arange(3)], [0, 40], [], torch.tensor([1]), torch.tensor([0.1]), 0, None), "float32"),
        (lambda: op([x], [0, 1], [], torch.tensor([1]), torch.tensor([0.1]), 0, None), "offsets"),
        (lambda: op([x], [0], [0.5, 0.5], torch.tensor([1]), torch.tensor([0.1]), 0, None), "decay"),
        (lambda: op([x], [0], [], torch.tensor([1.0]), torch.tensor([0.1]), 0, None), "int64"),
        (lambda: op([x], [0], [], torch.tensor([1]), torch.tensor([0.1], dtype=torch.float64), 0, None), "float32"),
        (lambda: op([x], [0], [], torch.tensor([1, 2]), torch.tensor([0.1]), 0, None), "differ in length"),
        (lambda: op([x], [0], [], torch.tensor([1]), torch.tensor([0.1]), 2, None), "dist"),
        (lambda: op([x], [0], [], torch.tensor([1]), torch.tensor([0.1]), 0, torch.tensor([1, 2])), "one seed"),
    ]
    for call, match in cases:
        before = x.clone()
        with pytest.raises(RuntimeError, match=match):
            call()
        _assert_same_bits([x], [before])


def test_unknown_isa_is_refused():
    before = torch.ops.fedkseed.cpu_isa()
    with pytest.raises(RuntimeError, match="isa must be scalar, avx2 or avx512, got 'sse9'"):
        torch.ops.fedkseed.set_cpu_isa("sse9")
    assert torch.ops.fedkseed.cpu_isa() == before


@pytest.mark.slow
def test_isa_environment_is_read_once_and_checked():
    """FEDKSEED_CPU_ISA is read at the first kernel call (a fresh process each case here)."""
    code = "import fedkseed, torch; fedkseed.noise(1, 10, backend='cpu'); print(torch.ops.fedkseed.cpu_isa())"
    bad = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, FEDKSEED_CPU_ISA="sse9"), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "FEDKSEED_CPU_ISA must be scalar, avx2 or avx512, got 'sse9'" in bad.stderr
    good = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, FEDKSEED_CPU_ISA="scalar"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert good.stdout.strip() == "scalar"
