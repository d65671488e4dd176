"""Constants of perturbation stream v1 (``docs/stream-spec.md``).

This module and ``csrc/include/fedkseed/stream.h`` / ``dtypes.h`` are the only two places these
facts live; ``tests/ops/test_stream.py`` checks that they agree. Every float constant is written as the exact
float32 value it stands for (hex literal), so no backend rounds a constant differently.
"""

from __future__ import annotations

STREAM_VERSION = 1

# Philox4x32-10 (Salmon et al., SC'11; Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Stream tags: the third counter word, so distributions never share random words.
TAG_GAUSSIAN = 0
TAG_RADEMACHER = 1
TAG_ROUNDING = 2  # random bits of stochastic rounding (docs/stream-spec.md#stochastic-rounding)

DISTRIBUTIONS = {"gaussian": TAG_GAUSSIAN, "rademacher": TAG_RADEMACHER}

# Elements served by one Philox call, as a shift of the global index.
GAUSSIAN_BLOCK_SHIFT = 2  # 4 normals per call (two Box-Muller pairs)
RADEMACHER_BLOCK_SHIFT = 7  # 128 signs per call (one bit each)
ROUNDING_BLOCK_SHIFT = 2  # 4 rounding words per call (one 32-bit word each)

# Uniform: U(w) = float32(2*(w >> 9) + 1) * 2^-24, in [2^-24, 1 - 2^-24].
UNIFORM_SCALE = float.fromhex("0x1p-24")

# ln(u): cephes logf. u = m * 2^e with m in [sqrt(1/2), sqrt(2)); x = m - 1;
# ln u = x - x^2/2 + x^3 P(x) + e * (LOG_LN2_HI + LOG_LN2_LO) (Cody-Waite split of ln 2).
LOG_SQRT_HALF = float.fromhex("0x1.6a09e6p-1")
LOG_POLY = (  # Horner order, highest degree first
    float.fromhex("0x1.204376p-4"),
    float.fromhex("-0x1.d7a370p-4"),
    float.fromhex("0x1.de4a34p-4"),
    float.fromhex("-0x1.fcba9ep-4"),
    float.fromhex("0x1.23d37ep-3"),
    float.fromhex("-0x1.555ca0p-3"),
    float.fromhex("0x1.999d58p-3"),
    float.fromhex("-0x1.fffff8p-3"),
    float.fromhex("0x1.555554p-2"),
)
LOG_LN2_LO = float.fromhex("-0x1.bd0106p-13")
LOG_LN2_HI = float.fromhex("0x1.63p-1")

# sin/cos of 2*pi*U(w): the quadrant and the reduced argument come exactly from the integer
# n = 2*(w >> 9) + 1: q = (n + 2^21) >> 22, m = n - q*2^22 in (-2^21, 2^21), x = m * SINCOS_SCALE
# with |x| < pi/4 (SINCOS_SCALE = float32(pi * 2^-23)); then cephes sinf/cosf polynomials.
SINCOS_SCALE = float.fromhex("0x1.921fb6p-22")
SIN_POLY = (
    float.fromhex("-0x1.9943f2p-13"),
    float.fromhex("0x1.11073cp-7"),
    float.fromhex("-0x1.555546p-3"),
)
COS_POLY = (
    float.fromhex("0x1.99eb9cp-16"),
    float.fromhex("-0x1.6c0c34p-10"),
    float.fromhex("0x1.55554ap-5"),
)


# Storage dtypes: the codes of ``enum class DType`` in csrc/include/fedkseed/dtypes.h (Triton
# kernels take them as a constexpr). Names are torch's dtype names, so this module needs no torch.
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
DTYPE_FLOAT32 = DTYPE_CODES["float32"]
DTYPE_BFLOAT16 = DTYPE_CODES["bfloat16"]
DTYPE_FLOAT16 = DTYPE_CODES["float16"]

# float32 -> bfloat16/float16 conversion (docs/stream-spec.md#conversion).
F32_QUIET_BIT = 0x00400000
F32_DEFAULT_NAN = 0x7FC00000  # the NaN an update makes from non-NaN operands (inf - inf)
FP16_OVERFLOW_BITS = 0x477FF000  # |x| >= 65520 rounds to +-inf in float16


def dist_tag(dist: str) -> int:
    """The stream tag of a distribution name, with an error that lists the valid names."""
    try:
        return DISTRIBUTIONS[dist]
    except (KeyError, TypeError):
        raise ValueError(f"dist must be one of {sorted(DISTRIBUTIONS)}, got {dist!r}") from None
