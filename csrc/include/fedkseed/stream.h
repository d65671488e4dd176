// Perturbation stream v1: the header-only core every C++ and CUDA kernel of fedkseed includes.
//
// The contract is docs/stream-spec.md; fedkseed/reference.py is the normative
// implementation and fedkseed/stream.py holds the same constants for Python (a test checks they
// agree). Every function here is a fixed sequence of separately rounded float32 operations
// (add/sub/mul, correctly rounded sqrt, exact bit manipulation), so host and device code give the
// same bits. Float arithmetic goes through fks_add/fks_sub/fks_mul: on the device they are the
// explicitly rounded __fadd_rn/__fmul_rn (nvcc can never contract them into an FMA); on the host
// the build passes -ffp-contract=off and no -ffast-math.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define FKS_HD __host__ __device__ __forceinline__
#else
#define FKS_HD inline
#endif

namespace fedkseed {
namespace stream {

constexpr int kVersion = 1;

// Philox4x32-10.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Stream tags (third counter word).
constexpr uint32_t kTagGaussian = 0;
constexpr uint32_t kTagRademacher = 1;
constexpr uint32_t kTagRounding = 2;

// Elements per Philox call, as a shift of the global index.
constexpr int kGaussianBlockShift = 2;
constexpr int kRademacherBlockShift = 7;
constexpr int kRoundingBlockShift = 2;

constexpr float kUniformScale = 0x1p-24f;

// ln(u), cephes logf (see fedkseed/stream.py for the derivation of each constant).
constexpr float kLogSqrtHalf = 0x1.6a09e6p-1f;
constexpr float kLogP0 = 0x1.204376p-4f;
constexpr float kLogP1 = -0x1.d7a370p-4f;
constexpr float kLogP2 = 0x1.de4a34p-4f;
constexpr float kLogP3 = -0x1.fcba9ep-4f;
constexpr float kLogP4 = 0x1.23d37ep-3f;
constexpr float kLogP5 = -0x1.555ca0p-3f;
constexpr float kLogP6 = 0x1.999d58p-3f;
constexpr float kLogP7 = -0x1.fffff8p-3f;
constexpr float kLogP8 = 0x1.555554p-2f;
constexpr float kLogLn2Lo = -0x1.bd0106p-13f;
constexpr float kLogLn2Hi = 0x1.63p-1f;

// sin/cos of 2*pi*U(w), cephes sinf/cosf on |x| < pi/4.
constexpr float kSincosScale = 0x1.921fb6p-22f;
constexpr float kSinP0 = -0x1.9943f2p-13f;
constexpr float kSinP1 = 0x1.11073cp-7f;
constexpr float kSinP2 = -0x1.555546p-3f;
constexpr float kCosP0 = 0x1.99eb9cp-16f;
constexpr float kCosP1 = -0x1.6c0c34p-10f;
constexpr float kCosP2 = 0x1.55554ap-5f;

// ---------------------------------------------------------------------------------------------
// Exactly rounded float32 primitives.
FKS_HD float fks_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FKS_HD float fks_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FKS_HD float fks_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FKS_HD float fks_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
FKS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
FKS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10: counter (lo32(block), hi32(block), tag, 0), key (lo32(seed), hi32(seed)).
struct Words {
  uint32_t w[4];
};

FKS_HD Words philox(uint64_t seed, uint64_t block, uint32_t tag) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = tag, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// The odd integer n = 2*(w >> 9) + 1 < 2^24; U(w) = n * 2^-24 exactly.
FKS_HD uint32_t uniform_numerator(uint32_t w) { return 2u * (w >> 9) + 1u; }
FKS_HD float uniform(uint32_t w) {
  return fks_mul(static_cast<float>(uniform_numerator(w)), kUniformScale);
}

// ln(u) for u in [2^-24, 1): exponent/mantissa split by bits, cephes polynomial.
FKS_HD float log_uniform(float u) {
  const uint32_t bits = float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;
  const float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  float x;
  if (m < kLogSqrtHalf) {
    e -= 1;
    x = fks_sub(fks_add(m, m), 1.0f);
  } else {
    x = fks_sub(m, 1.0f);
  }
  const float z = fks_mul(x, x);
  float p = kLogP0;
  p = fks_add(fks_mul(p, x), kLogP1);
  p = fks_add(fks_mul(p, x), kLogP2);
  p = fks_add(fks_mul(p, x), kLogP3);
  p = fks_add(fks_mul(p, x), kLogP4);
  p = fks_add(fks_mul(p, x), kLogP5);
  p = fks_add(fks_mul(p, x), kLogP6);
  p = fks_add(fks_mul(p, x), kLogP7);
  p = fks_add(fks_mul(p, x), kLogP8);
  float y = fks_mul(fks_mul(p, x), z);
  const float ef = static_cast<float>(e);
  y = fks_add(y, fks_mul(ef, kLogLn2Lo));
  y = fks_sub(y, fks_mul(0.5f, z));
  const float r = fks_add(x, y);
  return fks_add(r, fks_mul(ef, kLogLn2Hi));
}

// (cos, sin) of 2*pi*n*2^-24 for the odd 24-bit integer n (docs/stream-spec.md#sincos), both
// from one evaluation of the two polynomials. Quadrant q and reduced argument
// x = (n - q*2^22) * pi*2^-23 are exact integer work; cos takes quadrant q mod 4 and, since
// sin(t) = cos(t + 3pi/2), sin takes (q + 3) mod 4: an odd quadrant uses the sine polynomial
// and quadrants 1 and 2 negate.
struct CosSin {
  float c, s;
};

FKS_HD CosSin cos_sin_2pi(uint32_t n) {
  const uint32_t q = (n + (1u << 21)) >> 22;
  const int32_t m = static_cast<int32_t>(n) - static_cast<int32_t>(q << 22);
  const float x = fks_mul(static_cast<float>(m), kSincosScale);
  const float z = fks_mul(x, x);
  float s = fks_add(fks_mul(kSinP0, z), kSinP1);
  s = fks_add(fks_mul(s, z), kSinP2);
  s = fks_mul(fks_mul(s, z), x);
  s = fks_add(s, x);
  float c = fks_add(fks_mul(kCosP0, z), kCosP1);
  c = fks_add(fks_mul(c, z), kCosP2);
  c = fks_mul(fks_mul(c, z), z);
  c = fks_sub(c, fks_mul(0.5f, z));
  c = fks_add(c, 1.0f);
  const uint32_t qc = q & 3u, qs = (q + 3u) & 3u;
  const float vc = (qc & 1u) ? s : c, vs = (qs & 1u) ? s : c;
  return CosSin{(qc == 1u || qc == 2u) ? -vc : vc, (qs == 1u || qs == 2u) ? -vs : vs};
}

// Box-Muller on the word pair (wa, wb): (r*cos(t), r*sin(t)), the pair's even and odd lanes.
struct Pair {
  float even, odd;
};

FKS_HD Pair gaussian_pair_from_words(uint32_t wa, uint32_t wb) {
  const float r = fks_sqrt(fks_mul(-2.0f, log_uniform(uniform(wa))));
  const CosSin t = cos_sin_2pi(uniform_numerator(wb));
  return Pair{fks_mul(r, t.c), fks_mul(r, t.s)};
}

FKS_HD float gaussian_from_words(uint32_t wa, uint32_t wb, uint32_t odd) {
  const Pair p = gaussian_pair_from_words(wa, wb);
  return odd ? p.odd : p.even;
}

FKS_HD float gaussian(uint64_t seed, uint64_t index) {
  const Words w = philox(seed, index >> kGaussianBlockShift, kTagGaussian);
  const uint32_t lane = static_cast<uint32_t>(index & 3u);
  const uint32_t pair = lane >> 1;
  return gaussian_from_words(w.w[2 * pair], w.w[2 * pair + 1], lane & 1u);
}

FKS_HD float rademacher_from_words(const Words& w, uint32_t bit) {
  return ((w.w[bit >> 5] >> (bit & 31u)) & 1u) ? 1.0f : -1.0f;
}

FKS_HD float rademacher(uint64_t seed, uint64_t index) {
  const Words w = philox(seed, index >> kRademacherBlockShift, kTagRademacher);
  return rademacher_from_words(w, static_cast<uint32_t>(index & 127u));
}

FKS_HD float perturbation(uint64_t seed, uint64_t index, uint32_t tag) {
  return tag == kTagGaussian ? gaussian(seed, index) : rademacher(seed, index);
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding (tag 2, docs/stream-spec.md#stochastic-rounding). Each returns a float32 that the
// target dtype represents exactly (or +-inf past its range), so the ordinary round-to-nearest
// cast that follows changes nothing; non-finite inputs pass through unchanged.
FKS_HD uint32_t rounding_word(uint64_t seed, uint64_t index) {
  const Words w = philox(seed, index >> kRoundingBlockShift, kTagRounding);
  return w.w[index & 3u];
}

FKS_HD bool is_finite_bits(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }

// bfloat16 keeps the top 16 bits of a float32: add 16 random bits below them, then truncate.
FKS_HD float stochastic_round_bf16(float y, uint32_t word) {
  const uint32_t bits = float_bits(y);
  if (!is_finite_bits(bits)) return y;
  return bits_float((bits + (word >> 16)) & 0xffff0000u);
}

// float16: scale |y| so that one float16 ulp is 1, split integer and fraction exactly, and
// round up when the fraction exceeds a 24-bit uniform in [0, 1).
FKS_HD float stochastic_round_fp16(float y, uint32_t word) {
  const uint32_t bits = float_bits(y);
  if (!is_finite_bits(bits)) return y;
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
  if (e < -14) e = -14;  // float16 subnormals share the ulp of 2^-14
  const float up = bits_float(static_cast<uint32_t>(127 + 10 - e) << 23);    // 2^(10-e)
  const float ulp = bits_float(static_cast<uint32_t>(127 - 10 + e) << 23);   // 2^(e-10)
  const float s = fks_mul(bits_float(bits & 0x7fffffffu), up);              // < 2^11, exact
  float q = static_cast<float>(static_cast<int32_t>(s));                    // floor (s >= 0)
  const float frac = fks_sub(s, q);                                           // exact
  const float u = fks_mul(static_cast<float>(word >> 8), kUniformScale);
  if (frac > u) q = fks_add(q, 1.0f);
  const float r = fks_mul(q, ulp);  // exact
  return (bits >> 31) ? -r : r;
}

}  // namespace stream
}  // namespace fedkseed
