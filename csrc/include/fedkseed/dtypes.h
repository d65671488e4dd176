// Storage dtypes of fedkseed parameters: the one dtype table (codes shared by the CPU and CUDA
// kernels; fedkseed/stream.py mirrors it as DTYPE_CODES and tests/test_stream.py checks they
// agree) and the one conversion rule between float32 results and bfloat16/float16 storage
// (docs/stream-spec.md#conversion). Torch-free, host and device.
//
// Every conversion works on bit patterns with integer operations only, so no backend depends on
// its hardware's NaN, rounding-mode or flush-to-zero behaviour.
#pragma once

#include <cstdint>

#include <fedkseed/stream.h>

namespace fedkseed {

enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

namespace convert {

constexpr uint32_t kF32QuietBit = 0x00400000u;
// The NaN an update produces from non-NaN operands (e.g. inf - inf), docs/stream-spec.md#conversion.
constexpr uint32_t kF32DefaultNaN = 0x7FC00000u;
// |x| >= 65520 (this float32 pattern) rounds to +-inf in float16.
constexpr uint32_t kF16OverflowBits = 0x477FF000u;

FKS_HD bool is_nan_bits(uint32_t x) { return (x & 0x7FFFFFFFu) > 0x7F800000u; }

// The float32 update y = x*d + acc settles its NaN bits explicitly, because hardware disagrees
// (x86 keeps the first NaN operand's payload, CUDA returns a canonical NaN, compilers may swap
// operands): a NaN result is x quieted when x (the loaded parameter) is NaN, else kF32DefaultNaN.
FKS_HD float settle_nan(float y, float x) {
  const uint32_t yb = stream::float_bits(y);
  if (!is_nan_bits(yb)) return y;
  const uint32_t xb = stream::float_bits(x);
  return stream::bits_float(is_nan_bits(xb) ? (xb | kF32QuietBit) : kF32DefaultNaN);
}

FKS_HD float bf16_to_f32(uint16_t h) { return stream::bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even on the bits; overflow rounds to +-inf, subnormals round (no flush); a NaN
// keeps its sign and top 7 payload bits and is quieted.
FKS_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = stream::float_bits(f);
  if (is_nan_bits(x)) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// Exact (every float16 is a float32); NaN payloads move up unchanged.
FKS_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return stream::bits_float(sign | 0x7F800000u | (man << 13));
  if (exp != 0) return stream::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return stream::bits_float(sign);
  // Subnormal man * 2^-24: normalise so the leading bit becomes the implicit one.
  uint32_t e = 113u;  // biased float32 exponent of 2^-14
  while ((man & 0x400u) == 0) {
    man <<= 1;
    --e;
  }
  return stream::bits_float(sign | (e << 23) | ((man & 0x3FFu) << 13));
}

// Round to nearest even with gradual underflow (float16 subnormals exact, float32 subnormal
// inputs are values); |x| >= 65520 becomes +-inf; a NaN keeps its sign and top 10 payload bits
// and is quieted.
FKS_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = stream::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u | static_cast<uint16_t>((a >> 13) & 0x3FFu);
  if (a >= kF16OverflowBits) return sign | 0x7C00u;  // >= 65520, and inf
  if (a >= 0x38800000u) {                       // normal float16 (>= 2^-14)
    return sign | static_cast<uint16_t>((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
  }
  // Subnormal float16 (or zero): |x| / 2^-24 = m * 2^-shift, rounded to an integer, ties to even.
  const uint32_t e = a >> 23;
  if (e < 102u) return sign;  // |x| < 2^-25: rounds to zero (the tie 2^-25 has e == 102)
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return sign | static_cast<uint16_t>(q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u));
}

}  // namespace convert
}  // namespace fedkseed
