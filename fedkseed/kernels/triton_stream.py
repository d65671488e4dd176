"""Perturbation stream v1 as Triton device functions, op for op the order of
``csrc/include/fedkseed/stream.h`` (and so of ``fedkseed.reference``).

Every float operation is a separately rounded float32 add/sub/mul (kernels are launched with
``enable_fp_fusion=False`` so nothing is contracted into an FMA), square roots are ``sqrt_rn``,
and integer work is uint32/uint64 with wrapping, so compiled kernels and the interpreter
(``TRITON_INTERPRET=1``, numpy semantics) give the reference's bits.

Tiles are 2-D ``[rows, lanes]``: one row per Philox block (lanes = 4 elements for Gaussian,
128 for Rademacher), so each Philox call is made once per block rather than once per element.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import stream as S

_M0 = tl.constexpr(S.PHILOX_M0)
_M1 = tl.constexpr(S.PHILOX_M1)
_W0 = tl.constexpr(S.PHILOX_W0)
_W1 = tl.constexpr(S.PHILOX_W1)
_ROUNDS = tl.constexpr(S.PHILOX_ROUNDS)
_TAG_GAUSSIAN = tl.constexpr(S.TAG_GAUSSIAN)
_TAG_ROUNDING = tl.constexpr(S.TAG_ROUNDING)
_GAUSSIAN_SHIFT = tl.constexpr(S.GAUSSIAN_BLOCK_SHIFT)
_RADEMACHER_SHIFT = tl.constexpr(S.RADEMACHER_BLOCK_SHIFT)
_ROUNDING_SHIFT = tl.constexpr(S.ROUNDING_BLOCK_SHIFT)
_UNIFORM_SCALE = tl.constexpr(S.UNIFORM_SCALE)
_LOG_SQRT_HALF = tl.constexpr(S.LOG_SQRT_HALF)
_LOG_P0 = tl.constexpr(S.LOG_POLY[0])
_LOG_P1 = tl.constexpr(S.LOG_POLY[1])
_LOG_P2 = tl.constexpr(S.LOG_POLY[2])
_LOG_P3 = tl.constexpr(S.LOG_POLY[3])
_LOG_P4 = tl.constexpr(S.LOG_POLY[4])
_LOG_P5 = tl.constexpr(S.LOG_POLY[5])
_LOG_P6 = tl.constexpr(S.LOG_POLY[6])
_LOG_P7 = tl.constexpr(S.LOG_POLY[7])
_LOG_P8 = tl.constexpr(S.LOG_POLY[8])
_LOG_LN2_LO = tl.constexpr(S.LOG_LN2_LO)
_LOG_LN2_HI = tl.constexpr(S.LOG_LN2_HI)
_SINCOS_SCALE = tl.constexpr(S.SINCOS_SCALE)
_SIN_P0 = tl.constexpr(S.SIN_POLY[0])
_SIN_P1 = tl.constexpr(S.SIN_POLY[1])
_SIN_P2 = tl.constexpr(S.SIN_POLY[2])
_COS_P0 = tl.constexpr(S.COS_POLY[0])
_COS_P1 = tl.constexpr(S.COS_POLY[1])
_COS_P2 = tl.constexpr(S.COS_POLY[2])
_F32_QUIET_BIT = tl.constexpr(S.F32_QUIET_BIT)
_F32_DEFAULT_NAN = tl.constexpr(S.F32_DEFAULT_NAN)
_FP16_OVERFLOW_BITS = tl.constexpr(S.FP16_OVERFLOW_BITS)
_TWO_M24 = tl.constexpr(float.fromhex("0x1p-24"))


@triton.jit
def philox(block, tag: tl.constexpr, seed):
    """Philox4x32-10 words for counters (lo32(block), hi32(block), tag, 0), key (lo32, hi32) of
    ``seed``; ``block`` and ``seed`` are uint64."""
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    # c0 * 0 rather than tl.zeros_like: library @jit helpers are compiled-only when triton was
    # imported before TRITON_INTERPRET was set, while builtins work either way.
    zero = c0 * 0
    c2 = zero + tag
    c3 = zero
    m0 = zero + _M0  # uint32 multiplier tensors for umulhi
    m1 = zero + _M1
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for r in tl.static_range(_ROUNDS):
        if r > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def uniform_numerator(w):
    """The odd integer n = 2*(w >> 9) + 1 < 2^24 (uint32), U(w) = n * 2^-24 exactly."""
    return 2 * (w >> 9) + 1


@triton.jit
def log_uniform(u):
    """ln(u) for float32 u in [2^-24, 1): cephes logf with an exact exponent split."""
    bits = u.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < _LOG_SQRT_HALF
    e = e - small.to(tl.int32)
    x = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = x * x
    p = x * _LOG_P0 + _LOG_P1
    p = p * x + _LOG_P2
    p = p * x + _LOG_P3
    p = p * x + _LOG_P4
    p = p * x + _LOG_P5
    p = p * x + _LOG_P6
    p = p * x + _LOG_P7
    p = p * x + _LOG_P8
    y = (p * x) * z
    ef = e.to(tl.float32)
    y = y + ef * _LOG_LN2_LO
    y = y - 0.5 * z
    r = x + y
    return r + ef * _LOG_LN2_HI


@triton.jit
def cos_sin_2pi(n):
    """(cos, sin) of 2*pi*n*2^-24 for the odd 24-bit integer n (uint32): the polynomials are
    evaluated once and each result picks its quadrant, as stream.h does for each separately."""
    q = (n + (1 << 21)) >> 22
    m = n.to(tl.int32) - (q << 22).to(tl.int32)
    x = m.to(tl.float32) * _SINCOS_SCALE
    z = x * x
    s = z * _SIN_P0 + _SIN_P1
    s = s * z + _SIN_P2
    s = (s * z) * x
    s = s + x
    c = z * _COS_P0 + _COS_P1
    c = c * z + _COS_P2
    c = (c * z) * z
    c = c - 0.5 * z
    c = c + 1.0
    qc = q & 3
    qs = (q + 3) & 3
    vc = tl.where((qc & 1) == 1, s, c)
    vs = tl.where((qs & 1) == 1, s, c)
    vc = tl.where((qc == 1) | (qc == 2), -vc, vc)
    vs = tl.where((qs == 1) | (qs == 2), -vs, vs)
    return vc, vs


@triton.jit
def radius(w):
    u = uniform_numerator(w).to(tl.float32) * _UNIFORM_SCALE
    return tl.sqrt_rn(-2.0 * log_uniform(u))


@triton.jit
def noise_tile(seed, first, rows, cols, TAG: tl.constexpr):
    """z(seed, first + rows * lanes + cols) as float32 ``[rows, lanes]``; ``first`` (uint64) is a
    multiple of the block size, ``rows`` is ``[R, 1]`` and ``cols`` ``[1, lanes]`` (int32)."""
    if TAG == _TAG_GAUSSIAN:
        block = (first >> _GAUSSIAN_SHIFT) + rows.to(tl.uint64)
        w0, w1, w2, w3 = philox(block, TAG, seed)
        r0 = radius(w0)
        r1 = radius(w2)
        c1, s1 = cos_sin_2pi(uniform_numerator(w1))
        c3, s3 = cos_sin_2pi(uniform_numerator(w3))
        z = tl.where(cols == 0, r0 * c1, r0 * s1)
        z = tl.where(cols >= 2, tl.where(cols == 2, r1 * c3, r1 * s3), z)
    else:
        block = (first >> _RADEMACHER_SHIFT) + rows.to(tl.uint64)
        w0, w1, w2, w3 = philox(block, TAG, seed)
        word = tl.where(cols < 64, tl.where(cols < 32, w0, w1), tl.where(cols < 96, w2, w3))
        bit = (word >> (cols & 31).to(tl.uint32)) & 1
        z = tl.where(bit == 1, 1.0, -1.0)
    return z


@triton.jit
def rounding_word(seed, index):
    """The tag-2 word of stochastic rounding for each uint64 global index."""
    w0, w1, w2, w3 = philox(index >> _ROUNDING_SHIFT, _TAG_ROUNDING, seed)
    lane = (index & 3).to(tl.int32)
    return tl.where(lane < 2, tl.where(lane == 0, w0, w1), tl.where(lane == 2, w2, w3))


@triton.jit
def is_finite_bits(bits):
    return (bits & 0x7F800000) != 0x7F800000


@triton.jit
def stochastic_round_bf16(y, word):
    bits = y.to(tl.uint32, bitcast=True)
    rounded = ((bits + (word >> 16)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(is_finite_bits(bits), rounded, y)


@triton.jit
def stochastic_round_fp16(y, word):
    bits = y.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -14)  # float16 subnormals share the ulp of 2^-14
    up = ((137 - e) << 23).to(tl.float32, bitcast=True)  # 2^(10-e)
    ulp = ((117 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e-10)
    s = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True) * up  # < 2^11, exact
    q = s.to(tl.int32).to(tl.float32)
    frac = s - q
    u = (word >> 8).to(tl.float32) * _UNIFORM_SCALE
    q = tl.where(frac > u, q + 1.0, q)
    r = q * ulp
    r = tl.where((bits >> 31) == 1, -r, r)
    return tl.where(is_finite_bits(bits), r, y)


# ------------------------------------------------------------------------------- conversion
# docs/stream-spec.md#conversion on bit patterns (csrc/include/fedkseed/dtypes.h): neither the
# interpreter's numpy casts nor the GPU's conversion instructions give the rule's NaN bits.
@triton.jit
def is_nan_bits(bits):
    return (bits & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def settle_nan(y, x):
    """A NaN update result becomes x quieted where x is NaN, else the default NaN."""
    xb = x.to(tl.uint32, bitcast=True)
    nan = tl.where(is_nan_bits(xb), xb | _F32_QUIET_BIT, _F32_DEFAULT_NAN)
    return tl.where(is_nan_bits(y.to(tl.uint32, bitcast=True)), nan.to(tl.float32, bitcast=True), y)


@triton.jit
def bf16_bits_to_float(h):
    return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def float_to_bf16_bits(y):
    """Round to nearest even into bfloat16 bits (uint16); a NaN keeps sign and top payload bits,
    quieted."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(is_nan_bits(bits), (bits >> 16) | 0x0040, rounded).to(tl.uint16)


@triton.jit
def fp16_bits_to_float(h):
    """Exact float16 -> float32 on the bits (NaN payloads kept)."""
    h32 = h.to(tl.uint32)
    sign = (h32 & 0x8000) << 16
    exp = (h32 >> 10) & 0x1F
    man = h32 & 0x3FF
    wide = tl.where(exp == 0x1F, 0x7F800000 | (man << 13), ((exp + 112) << 23) | (man << 13))
    tiny = (man.to(tl.float32) * _TWO_M24).to(tl.uint32, bitcast=True)  # exact
    return (sign | tl.where(exp == 0, tiny, wide)).to(tl.float32, bitcast=True)


@triton.jit
def float_to_fp16_bits(y):
    """Round to nearest even into float16 bits (uint16) with gradual underflow; |y| >= 65520 to
    +-inf; a NaN keeps sign and top 10 payload bits, quieted."""
    x = y.to(tl.uint32, bitcast=True)
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    normal = (a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13
    e = (a >> 23).to(tl.int32)
    shift = tl.minimum(tl.maximum(126 - e, 14), 24).to(tl.uint32)
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> shift
    rem = m & ((q * 0 + 1) << shift) - 1
    half = (q * 0 + 1) << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = tl.where(e < 102, 0, q + up.to(tl.uint32))
    out = tl.where(a >= 0x38800000, normal, sub)
    out = tl.where(a >= _FP16_OVERFLOW_BITS, 0x7C00, out)
    out = tl.where(a > 0x7F800000, 0x7E00 | ((a >> 13) & 0x3FF), out)
    return (sign | out).to(tl.uint16)
