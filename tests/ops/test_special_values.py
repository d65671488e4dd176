"""The float32 -> bfloat16/float16 conversion rule (docs/stream-spec.md#conversion) and the NaN
settling of the update, on every backend that runs here: reference, cpu on each ISA path and the
Triton interpreter, compared bit for bit against an independent numpy model of the rule.

The numpy model does not use bit tricks: it rounds the exact value with float64 arithmetic
(frexp / rint, exact for these sizes) and applies the NaN and overflow clauses literally.
Special values reach the kernels as parameters that hold them (NaN with several payloads,
signalling ones included, +-inf, max finite, subnormals), as a decay factor that puts float32
results between storage values (ties, overflow, subnormal results), as huge alphas (inf - inf)
and as float32-subnormal alphas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkseed import ParamSet, ops
from fedkseed import reference as R
from fedkseed.testing.backends import backend_on_this_machine

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN/overflow notes

LOW = [torch.bfloat16, torch.float16]
# (mantissa bits kept, smallest subnormal exponent, largest finite) of each storage dtype.
FORMATS = {torch.bfloat16: (8, -133, float.fromhex("0x1.fep127")), torch.float16: (11, -24, 65504.0)}


# ------------------------------------------------------------------------ the independent model
def f32_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


def model_convert(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The rule, written from its text: storage bits (int64) of float32 patterns ``bits``."""
    precision, min_exp, largest = FORMATS[dtype]
    out = np.empty(bits.shape, dtype=np.int64)
    for i, x in enumerate(bits.reshape(-1).tolist()):
        sign = x >> 31
        v = float(np.array([x], dtype=np.uint32).view(np.float32)[0])
        if math.isnan(v):
            if dtype == torch.bfloat16:
                out.flat[i] = (x >> 16) | 0x0040
            else:
                out.flat[i] = (sign << 15) | 0x7E00 | ((x >> 13) & 0x3FF)
            continue
        if math.isinf(v):
            r = v
        elif v == 0.0:
            r = v
        else:
            _, e = math.frexp(abs(v))  # |v| = m * 2^e, m in [0.5, 1)
            ulp = 2.0 ** max(e - precision, min_exp)
            r = math.copysign(float(np.rint(abs(v) / ulp)) * ulp, v)  # rint: ties to even
            if abs(r) > largest:
                r = math.copysign(math.inf, v)
        if dtype == torch.bfloat16:
            out.flat[i] = int(np.array([r], dtype=np.float32).view(np.uint32)[0]) >> 16
        else:
            half = np.array([r], dtype=np.float16)  # r is representable: this cast is exact
            out.flat[i] = int(half.view(np.uint16)[0])
    return out


def model_decode(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 bit patterns of storage ``bits`` (exact; NaN payloads move up unchanged)."""
    if dtype == torch.bfloat16:
        return bits << 16
    out = np.empty(bits.shape, dtype=np.int64)
    for i, h in enumerate(bits.reshape(-1).tolist()):
        sign, exp, man = (h >> 15) << 31, (h >> 10) & 0x1F, h & 0x3FF
        if exp == 0x1F:
            out.flat[i] = sign | 0x7F800000 | (man << 13)
        else:
            v = math.ldexp(man, -24) if exp == 0 else math.ldexp(1024 + man, exp - 25)
            out.flat[i] = sign | int(f32_bits([v])[0])
    return out


def model_settle(y_bits: np.ndarray, x_bits: np.ndarray) -> np.ndarray:
    def is_nan(b):
        return (b & 0x7FFFFFFF) > 0x7F800000

    nan = np.where(is_nan(x_bits), x_bits | 0x00400000, 0x7FC00000)
    return np.where(is_nan(y_bits), nan, y_bits)


# ------------------------------------------------------------------------------ inputs
def special_float32() -> np.ndarray:
    """float32 patterns that exercise every clause of the rule for both storage dtypes."""
    pats = [
        0x7FC00000,
        0xFFC00000,
        0x7F800001,
        0xFF800001,
        0x7FA00000,
        0x7F812345,
        0xFFBFFFFF,
        0x7FFFFFFF,
        0x7F800000,
        0xFF800000,
        0x7F7FFFFF,
        0xFF7FFFFF,
        0x7F7F8000,
        0x7F7F7FFF,
        0x00000000,
        0x80000000,
        0x00000001,
        0x80000001,
        0x007FFFFF,
        0x00008000,
        0x00018000,
        0x00800000,
        0x3F808000,
        0x3F818000,
        0x3F808001,
        0x3F807FFF,
        0x477FEFFF,
        0x477FF000,
        0xC77FF000,
        0x477FE000,
        0x47800000,
        0x38800000,
        0x387FF000,
        0x33000000,
        0x33000001,
        0x32FFFFFF,
        0x33800000,
        0x33C00000,
        0x34200000,
        0x38001000,
        0x38003000,
        0x3F801000,
        0x3F803000,
        0x3F800FFF,
        0x00400000,
    ]
    rng = np.random.default_rng(7)
    random = rng.integers(0, 1 << 32, size=4000, dtype=np.int64)
    exps = rng.integers(96, 144, size=2000, dtype=np.int64) << 23  # near float16's range
    near = exps | rng.integers(0, 1 << 23, size=2000, dtype=np.int64) | (rng.integers(0, 2, 2000) << 31)
    return np.concatenate([np.array(pats, dtype=np.int64), random, near])


def storage_specials(dtype: torch.dtype) -> list[int]:
    """Storage bit patterns of parameters that already hold special values."""
    if dtype == torch.bfloat16:
        return [
            0x7FC0,
            0xFFC0,
            0x7F81,
            0xFF81,
            0x7FA5,
            0x7F80,
            0xFF80,
            0x7F7F,
            0xFF7F,
            0x0001,
            0x8001,
            0x007F,
            0x0080,
            0x3F80,
            0x3F81,
            0x0000,
            0x8000,
            0x4000,
        ]
    return [
        0x7E00,
        0xFE00,
        0x7C01,
        0xFC01,
        0x7D55,
        0x7C00,
        0xFC00,
        0x7BFF,
        0xFBFF,
        0x0001,
        0x8001,
        0x03FF,
        0x0400,
        0x3C00,
        0x3C01,
        0x0000,
        0x8000,
        0x4000,
    ]


def storage_tensor(bits: list[int], dtype: torch.dtype, cols: int = 6) -> torch.Tensor:
    t = torch.tensor([b - (1 << 16) if b >= 1 << 15 else b for b in bits], dtype=torch.int16)
    return t.view(dtype).reshape(-1, cols).clone()


def tensor_bits(t: torch.Tensor) -> np.ndarray:
    view = torch.int32 if t.dtype == torch.float32 else torch.int16
    mask = 0xFFFFFFFF if t.dtype == torch.float32 else 0xFFFF
    return t.detach().cpu().contiguous().view(view).reshape(-1).numpy().astype(np.int64) & mask


# ------------------------------------------------------------------------------ backends
BACKENDS = ["reference", "cpu-scalar", "cpu-avx2", "cpu-avx512", "triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """(backend, device) for every backend that runs on this machine."""
    yield from backend_on_this_machine(request.param, monkeypatch)


def _run(backend, tensors, seeds, alphas, dist="rademacher", decay=None, rounding_seed=None):
    """replay_ on ``backend``'s device; the CPU tensors get the result."""
    name, device = backend
    moved = [t.to(device) for t in tensors]
    pset = ParamSet(moved, decays=lambda n, t: True)
    ops.replay_(pset, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend=name)
    for t, m in zip(tensors, moved):
        t.copy_(m.cpu())


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", LOW)
def test_reference_rule_matches_the_model(dtype):
    bits = special_float32()
    y = torch.from_numpy((bits - ((bits >> 31) << 32)).astype(np.int32)).view(torch.float32)
    convert = R.f32_to_bf16_bits if dtype == torch.bfloat16 else R.f32_to_f16_bits
    got = convert(y).numpy()
    want = model_convert(bits, dtype)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("dtype", LOW)
def test_reference_decode_matches_the_model(dtype):
    h = np.arange(1 << 16, dtype=np.int64)
    decode = R.bf16_bits_to_f32 if dtype == torch.bfloat16 else R.f16_bits_to_f32
    got = decode(torch.from_numpy(h)).view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    assert np.array_equal(got, model_decode(h, dtype))


def _decay_case(dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Storage values times a factor that leaves results between storage values: ties (the
    factor 1 + 2^-k puts half-ulps in), overflow past the largest finite, subnormal results."""
    rng = np.random.default_rng(3)
    bits = storage_specials(dtype) + [int(b) for b in rng.integers(0, 1 << 16, size=162)]
    return storage_tensor(bits, dtype), (1.0 + 2.0**-8 if dtype == torch.bfloat16 else 1.0 + 2.0**-11)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("decay", ["tie", "shrink"])
def test_decay_results_follow_the_rule(backend, dtype, decay):
    x, factor = _decay_case(dtype)
    if decay == "shrink":
        factor = float.fromhex("0x1.8p-3")  # pushes normals into subnormal results
    x_bits = tensor_bits(x)
    x32 = model_decode(x_bits, dtype)
    y = (x32.astype(np.uint32).view(np.float32) * np.float32(factor)).astype(np.float32)
    y = y + np.float32(0.0)  # the update adds the (empty) accumulator
    want = model_convert(model_settle(f32_bits(y), x32), dtype)
    _run(backend, [x], [], [], decay=factor)
    got = tensor_bits(x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(x_bits[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("alpha", [0.0, 3.0e38, -3.0e38, 1.0e-40, float.fromhex("0x1p-25"), 0.75])
def test_special_parameters_and_alphas(backend, dtype, alpha):
    """Parameters holding NaN/inf/extremes, alphas that overflow (inf - inf makes the default NaN),
    that are float32 subnormals, or that land on ties; Rademacher z = +-1 makes acc = +-alpha."""
    if dtype == torch.float32:
        bits = [int(b) for b in f32_bits([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-45])]
        bits += [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7F800000, 0xFF800000]
        x = torch.tensor(np.array(bits, dtype=np.uint32).view(np.int32)).view(torch.float32).reshape(-1, 13).clone()
        x_bits = tensor_bits(x)
        x32 = x_bits
    else:
        x = storage_specials(dtype)
        x = storage_tensor(x, dtype)
        x_bits = tensor_bits(x)
        x32 = model_decode(x_bits, dtype)
    seed = 12345
    z = R.noise(seed, x.numel(), 0, "rademacher").numpy()
    acc = (np.float32(0.0) + np.float32(alpha) * z).astype(np.float32)
    y = x32.astype(np.uint32).view(np.float32) + acc
    settled = model_settle(f32_bits(y), x32)
    want = settled if dtype == torch.float32 else model_convert(settled, dtype)
    _run(backend, [x], [seed], [alpha])
    got = tensor_bits(x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(x_bits[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_special_values(backend, dtype):
    """Tag 2: NaN and +-inf take the round-to-nearest rule, a finite value rounded past the
    largest finite becomes +-inf; every element matches the reference's definition."""
    x = storage_specials(dtype)
    x = storage_tensor(x, dtype)
    want_x = x.clone()
    alpha = float(FORMATS[dtype][2]) / 300.0  # max finite +- a fraction of an ulp: overflow by chance
    _run(("reference", "cpu"), [want_x], [9], [alpha], rounding_seed=77)
    x_bits = tensor_bits(x)
    x32 = model_decode(x_bits, dtype)
    _run(backend, [x], [9], [alpha], rounding_seed=77)
    got = tensor_bits(x)
    assert np.array_equal(got, tensor_bits(want_x))
    # NaN and inf inputs stay NaN (quieted, payload kept) and inf, independent of the words.
    nonfinite = (x32 & 0x7F800000) == 0x7F800000
    assert np.array_equal(got[nonfinite], model_convert(model_settle(x32, x32), dtype)[nonfinite])
    # Something overflowed to inf from the largest finite value, or stayed finite (never NaN).
    top = np.isin(x_bits, [0x7F7F, 0x7BFF])
    assert set(got[top].tolist()) <= {0x7F80, 0x7F7F, 0x7C00, 0x7BFF}
