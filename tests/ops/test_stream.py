"""Perturbation stream v1: known answers, accuracy against float64, statistics, and the constants
shared by fedkseed/stream.py and csrc/include/fedkseed/stream.h."""

from __future__ import annotations

import math
import pathlib
import re
import struct

import pytest
import torch

from fedkseed import reference as R
from fedkseed import stream as S

HEADER = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "include" / "fedkseed" / "stream.h"

# Random123 tests/kat_vectors: philox4x32_10 (counter, key -> output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = R.philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_seed_is_key_and_block_is_counter():
    seed = 0x299F31D0A4093822
    block = 0x05A308D3243F6A88  # blocks stay below 2^62 (index >> 2)
    words = R.philox(seed, torch.tensor([block]), 0x13198A2E)
    direct = R.philox4x32(
        [torch.tensor([x]) for x in (0x243F6A88, 0x05A308D3, 0x13198A2E, 0)], (0xA4093822, 0x299F31D0)
    )
    assert [int(w) for w in words] == [int(w) for w in direct]


def test_uniform_range_is_open():
    w = torch.tensor([0, 0x1FF, 0x200, 0xFFFFFFFF], dtype=torch.int64)
    u = R.uniform(w)
    assert u[0].item() == 2.0**-24 and u[1].item() == 2.0**-24
    assert u[2].item() == 3 * 2.0**-24
    assert u[3].item() == 1.0 - 2.0**-24


def _float64_gaussian(wa: torch.Tensor, wb: torch.Tensor, odd: int) -> torch.Tensor:
    ua = R.uniform(wa).double()
    ub = R.uniform(wb).double()
    r = torch.sqrt(-2.0 * torch.log(ua))
    t = 2.0 * math.pi * ub
    return r * (torch.sin(t) if odd else torch.cos(t))


@pytest.mark.slow
def test_gaussian_matches_float64_formula():
    words = R.philox(2024, torch.arange(1 << 20, dtype=torch.int64), S.TAG_GAUSSIAN)
    # Words at the ends of the uniform range exercise the largest |z| and ln(u) near 0.
    extremes = torch.tensor([0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0x80000000, 0xFFFFFE00, 0xFFFFFFFF])
    pairs = [(words[0], words[1]), (words[2], words[3])]
    pairs += [(extremes, extremes.flip(0)), (extremes.flip(0), extremes)]
    for wa, wb in pairs:
        for odd in (0, 1):
            z = R.gaussian_from_words(wa, wb, odd).double()
            truth = _float64_gaussian(wa, wb, odd)
            err = ((z - truth).abs() / truth.abs().clamp(min=1.0)).max().item()
            assert err <= 1e-6, err


def test_log_and_sincos_cover_their_ranges():
    n = torch.arange(1, 1 << 24, 2, dtype=torch.int64)[::97]  # odd numerators over the range
    u = n.to(torch.float32) * S.UNIFORM_SCALE
    err = (R.log_uniform(u).double() - torch.log(u.double())).abs()
    assert (err / torch.log(u.double()).abs().clamp(min=1e-30)).max() < 4e-7
    t = 2 * math.pi * u.double()
    assert (R.cos_sin_2pi(n, 0).double() - torch.cos(t)).abs().max() < 2e-7
    assert (R.cos_sin_2pi(n, 1).double() - torch.sin(t)).abs().max() < 2e-7


N_STATS = 10_000_000


@pytest.fixture(scope="module")
def gaussian_samples() -> torch.Tensor:
    return R.noise(12345, N_STATS).double()


def _normal_tail(x: float) -> float:
    return math.erfc(x / math.sqrt(2.0))  # P(|z| > x)


@pytest.mark.slow
def test_gaussian_moments(gaussian_samples):
    z = gaussian_samples
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2.0 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15.0 / n)
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96.0 / n)


@pytest.mark.parametrize("x", [1.0, 2.0, 3.0, 4.0, 5.0])
@pytest.mark.slow
def test_gaussian_tail_frequencies(gaussian_samples, x):
    n = gaussian_samples.numel()
    p = _normal_tail(x)
    observed = (gaussian_samples.abs() > x).double().mean().item()
    assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n) + 1.0 / n


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).mean().item() / math.sqrt((a * a).mean().item() * (b * b).mean().item())


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 128])
@pytest.mark.slow
def test_gaussian_neighbouring_indices_uncorrelated(gaussian_samples, lag):
    z = gaussian_samples
    assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(z.numel())
    # The two halves of a Box-Muller pair are dependent in magnitude only: check squares too.
    assert abs(_corr(z[:-lag] ** 2, z[lag:] ** 2)) < 5 / math.sqrt(z.numel())


@pytest.mark.slow
def test_gaussian_neighbouring_seeds_uncorrelated(gaussian_samples):
    n = 2_000_000
    other = R.noise(12346, n).double()
    assert abs(_corr(gaussian_samples[:n], other)) < 5 / math.sqrt(n)
    far = R.noise(12345 + (1 << 32), n).double()  # differs only in the key's high word
    assert abs(_corr(gaussian_samples[:n], far)) < 5 / math.sqrt(n)


@pytest.mark.slow
def test_rademacher_statistics():
    z = R.noise(99, N_STATS, dist="rademacher").double()
    n = z.numel()
    assert set(torch.unique(z).tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    for lag in (1, 31, 32, 127, 128):
        assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(n)
    other = R.noise(100, n, dist="rademacher").double()
    assert abs(_corr(z, other)) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("offset", [0, 1, 3, 127, 129, 1000])
def test_noise_depends_only_on_global_index(dist, offset):
    whole = R.noise(7, 2000, 0, dist)
    assert torch.equal(R.noise(7, 500, offset, dist), whole[offset : offset + 500])


@pytest.mark.parametrize("dist,shift", [("gaussian", 2), ("rademacher", 7)])
@pytest.mark.parametrize("index", [2**31 - 3, 2**32 + 5, 2**63 + 1, 2**64 - 9])
def test_index_math_past_32_and_63_bits(dist, shift, index):
    seed = 2**64 - 1
    values = R.noise(seed, 9, index, dist)
    assert values.numel() == 9 and torch.isfinite(values).all()
    for j in range(9):
        i = index + j
        words = R.philox(seed, torch.tensor([i >> shift]), S.dist_tag(dist))
        if dist == "gaussian":
            pair, lane = (i & 3) >> 1, i & 1
            expected = R.gaussian_from_words(words[2 * pair], words[2 * pair + 1], lane)
        else:
            k = i & 127
            expected = torch.tensor([1.0 if (int(words[k >> 5]) >> (k & 31)) & 1 else -1.0])
        assert values[j].item() == expected.item()


def test_seed_range_is_checked():
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            R.noise(bad, 4)
    with pytest.raises(TypeError, match="seed"):
        R.noise(1.5, 4)
    with pytest.raises(ValueError, match="2\\^64"):
        R.noise(1, 10, 2**64 - 5)
    with pytest.raises(ValueError, match="dist"):
        R.noise(1, 4, dist="uniform")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_representable(dtype):
    y = torch.tensor([1.0 + 2**-10, -3.14159, 1e-6, 6.1e-5, 2.0**-20, 0.0, -0.0], dtype=torch.float32)
    trials = 20000
    ys = y.repeat(trials)
    out = R.stochastic_round(ys, R.rounding_words(5, ys.numel()), dtype)
    assert torch.equal(out.to(dtype).float(), out)  # exactly representable
    columns = out.view(trials, -1).double()
    gap = columns.max(0).values - columns.min(0).values  # the two neighbours of each y
    assert all(column.unique().numel() <= 2 for column in columns.T)
    assert ((columns.mean(0) - y.double()).abs() <= 5 * gap / math.sqrt(trials) + 1e-30).all()
    assert torch.equal(torch.signbit(out[:7]), torch.signbit(y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_passes_non_finite_through(dtype):
    y = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = R.stochastic_round(y, R.rounding_words(1, 3), dtype)
    assert out[0].item() == float("inf") and out[1].item() == float("-inf") and out[2].isnan()


def _header_constants() -> dict[str, float]:
    text = HEADER.read_text()
    values: dict[str, float] = {}
    for name, literal in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([^;]+);", text):
        literal = literal.strip().rstrip("fu").rstrip("u")
        values[name] = float.fromhex(literal) if "p" in literal else float(int(literal, 0))
    return values


def test_header_and_python_constants_agree():
    h = _header_constants()
    expected = {
        "kVersion": S.STREAM_VERSION,
        "kPhiloxM0": S.PHILOX_M0,
        "kPhiloxM1": S.PHILOX_M1,
        "kPhiloxW0": S.PHILOX_W0,
        "kPhiloxW1": S.PHILOX_W1,
        "kPhiloxRounds": S.PHILOX_ROUNDS,
        "kTagGaussian": S.TAG_GAUSSIAN,
        "kTagRademacher": S.TAG_RADEMACHER,
        "kTagRounding": S.TAG_ROUNDING,
        "kGaussianBlockShift": S.GAUSSIAN_BLOCK_SHIFT,
        "kRademacherBlockShift": S.RADEMACHER_BLOCK_SHIFT,
        "kRoundingBlockShift": S.ROUNDING_BLOCK_SHIFT,
        "kUniformScale": S.UNIFORM_SCALE,
        "kLogSqrtHalf": S.LOG_SQRT_HALF,
        "kLogLn2Lo": S.LOG_LN2_LO,
        "kLogLn2Hi": S.LOG_LN2_HI,
        "kSincosScale": S.SINCOS_SCALE,
    }
    expected.update({f"kLogP{i}": c for i, c in enumerate(S.LOG_POLY)})
    expected.update({f"kSinP{i}": c for i, c in enumerate(S.SIN_POLY)})
    expected.update({f"kCosP{i}": c for i, c in enumerate(S.COS_POLY)})
    assert set(h) == set(expected)
    for name, value in expected.items():
        assert h[name] == value, name


DTYPES_HEADER = HEADER.with_name("dtypes.h")


def test_dtype_table_and_conversion_constants_agree():
    text = DTYPES_HEADER.read_text()
    enum = re.search(r"enum class DType : \w+ \{([^}]*)\}", text)
    assert enum is not None, "dtypes.h has no enum class DType"
    codes = {}
    for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum.group(1)):
        codes[name.lower()] = int(value)
    assert codes == S.DTYPE_CODES
    consts = {n: int(v.rstrip("u"), 0) for n, v in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([^;]+);", text)}
    assert consts == {
        "kF32QuietBit": S.F32_QUIET_BIT,
        "kF32DefaultNaN": S.F32_DEFAULT_NAN,
        "kF16OverflowBits": S.FP16_OVERFLOW_BITS,
    }
    # 65520 is the first float32 that rounds to float16 infinity; the one below it does not.
    assert struct.unpack("<I", struct.pack("<f", 65520.0))[0] == S.FP16_OVERFLOW_BITS


def test_float_constants_are_float32_values():
    import struct

    floats = [S.UNIFORM_SCALE, S.LOG_SQRT_HALF, S.LOG_LN2_LO, S.LOG_LN2_HI, S.SINCOS_SCALE]
    for c in floats + list(S.LOG_POLY + S.SIN_POLY + S.COS_POLY):
        assert struct.unpack("f", struct.pack("f", c))[0] == c
