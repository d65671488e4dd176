// Bit-exact float32 <-> bfloat16/float16 conversions matching torch's CPU `.to()` (checked in
// tests/test_cpu_backend.py): round to nearest even; a NaN becomes 0xFFFF in bfloat16 (ATen's
// vectorised conversion) and keeps its sign and top payload bits, quieted, in float16 (the
// hardware VCVTPS2PH result torch uses). The SIMD paths implement the same rules in registers.
#pragma once

#include <cstdint>

#include <fedkseed/stream.h>

namespace fedkseed {
namespace cpu {

inline float bf16_to_f32(uint16_t h) { return stream::bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t b = stream::float_bits(f);
  if (f != f) return 0xFFFFu;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1Fu) return stream::bits_float(sign | 0x7F800000u | (man << 13));
  if (exp != 0) return stream::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal (or zero): man * 2^-24, exact in float32.
  const float v = static_cast<float>(man) * 0x1p-24f;
  return stream::bits_float(sign | stream::float_bits(v));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t b = stream::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u | static_cast<uint16_t>((a >> 13) & 0x3FFu);
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 (and inf) rounds to inf
  if (a >= 0x38800000u) {                       // normal float16 (>= 2^-14)
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
  }
  // Subnormal float16: round |f| * 2^24 to an integer, ties to even (exact float arithmetic:
  // adding 2^23 to a value below 2^10 rounds it to an integer in the current RNE mode).
  const float scaled = stream::bits_float(a) * 0x1p24f;
  const float rounded = (scaled + 0x1p23f) - 0x1p23f;
  return sign | static_cast<uint16_t>(rounded);
}

}  // namespace cpu
}  // namespace fedkseed
