// The AVX2 path (avx2 + f16c): 8 Philox blocks per vector, so 32 Gaussian elements per group.
// Same rules as the AVX-512 path: target pragma instead of -march, run-time choice in
// ops_cpu.cpp, one separately rounded vector add/mul per stream.h operation (FMA is not enabled
// for this target), correctly rounded vsqrtps, exact vpmuludq Philox on even and odd lanes.
#include <cstdint>
#include <cstring>

#include <fedkseed/stream.h>

#include "cpu_kernel.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

namespace {

namespace st = fedkseed::stream;
using fedkseed::cpu::DType;

struct Avx2 {
  static constexpr int L = fedkseed::cpu::kLanesAvx2;
  using F = __m256;
  using I = __m256i;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static I iset1(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  // Lane l takes when_set where bit l of bits is set: move bit l to the sign bit of lane l.
  static F pick(F when_clear, F when_set, uint64_t bits) {
    const I to_sign = _mm256_sllv_epi32(iset1(static_cast<uint32_t>(bits)), _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
    return _mm256_blendv_ps(when_clear, when_set, _mm256_castsi256_ps(to_sign));
  }
  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }

  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(c, m);
    const I odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }

  // Philox4x32-10 of blocks block0 .. block0 + 7 (lane l = block0 + l).
  static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block0, uint32_t tag, I w[4]) {
    I c0, c1;
    const uint32_t lo = static_cast<uint32_t>(block0);
    if (lo <= 0xFFFFFFFFu - (L - 1)) {
      c0 = _mm256_add_epi32(iset1(lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      c1 = iset1(static_cast<uint32_t>(block0 >> 32));
    } else {  // the low words wrap inside this vector: carry into the high word lane by lane
      alignas(32) uint32_t a0[L], a1[L];
      for (int l = 0; l < L; ++l) {
        const uint64_t b = block0 + static_cast<uint64_t>(l);
        a0[l] = static_cast<uint32_t>(b);
        a1[l] = static_cast<uint32_t>(b >> 32);
      }
      c0 = _mm256_load_si256(reinterpret_cast<const I*>(a0));
      c1 = _mm256_load_si256(reinterpret_cast<const I*>(a1));
    }
    I c2 = iset1(tag), c3 = _mm256_setzero_si256();
    const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
    for (int round = 0; round < st::kPhiloxRounds; ++round) {
      I hi0, lo0, hi1, lo1;
      mulhilo(m0, c0, hi0, lo0);
      mulhilo(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), iset1(keys.round_key[round][0]));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), iset1(keys.round_key[round][1]));
      c3 = lo0;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
  }

  // Lanes are blocks, elements are (block, word): transpose 4 x 8 into element order.
  static void interleave_ps(const F in[4], F out[4]) {
    const F t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
    const F t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
    // u_j holds blocks j and j + 4 (one per 128-bit lane).
    const F u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const F u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const F u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const F u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    out[0] = _mm256_permute2f128_ps(u0, u1, 0x20);
    out[1] = _mm256_permute2f128_ps(u2, u3, 0x20);
    out[2] = _mm256_permute2f128_ps(u0, u1, 0x31);
    out[3] = _mm256_permute2f128_ps(u2, u3, 0x31);
  }
  static void interleave(I w[4]) {
    F in[4], out[4];
    for (int i = 0; i < 4; ++i) in[i] = _mm256_castsi256_ps(w[i]);
    interleave_ps(in, out);
    for (int i = 0; i < 4; ++i) w[i] = _mm256_castps_si256(out[i]);
  }
  static void interleave_store(const I w[4], uint32_t* out) {
    I t[4] = {w[0], w[1], w[2], w[3]};
    interleave(t);
    for (int i = 0; i < 4; ++i) _mm256_storeu_si256(reinterpret_cast<I*>(out + i * L), t[i]);
  }

  static I uniform_numerator(I w) {
    return _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(w, 9), 1), iset1(1));
  }

  // stream::log_uniform, lane-wise.
  static F log_uniform(F u) {
    const I bits = _mm256_castps_si256(u);
    I e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), iset1(0xFF)), iset1(126));
    const F m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, iset1(0x007FFFFF)), iset1(0x3F000000)));
    const F small = _mm256_cmp_ps(m, set1(st::kLogSqrtHalf), _CMP_LT_OQ);
    e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // all-ones lanes are -1
    const F x = _mm256_blendv_ps(sub(m, set1(1.0f)), sub(add(m, m), set1(1.0f)), small);
    const F z = mul(x, x);
    F p = set1(st::kLogP0);
    p = add(mul(p, x), set1(st::kLogP1));
    p = add(mul(p, x), set1(st::kLogP2));
    p = add(mul(p, x), set1(st::kLogP3));
    p = add(mul(p, x), set1(st::kLogP4));
    p = add(mul(p, x), set1(st::kLogP5));
    p = add(mul(p, x), set1(st::kLogP6));
    p = add(mul(p, x), set1(st::kLogP7));
    p = add(mul(p, x), set1(st::kLogP8));
    F y = mul(mul(p, x), z);
    const F ef = _mm256_cvtepi32_ps(e);
    y = add(y, mul(ef, set1(st::kLogLn2Lo)));
    y = sub(y, mul(set1(0.5f), z));
    const F r = add(x, y);
    return add(r, mul(ef, set1(st::kLogLn2Hi)));
  }

  static F radius(I w) {
    const F u = mul(_mm256_cvtepi32_ps(uniform_numerator(w)), set1(st::kUniformScale));
    return _mm256_sqrt_ps(mul(set1(-2.0f), log_uniform(u)));
  }

  // stream::cos_sin_2pi for odd = 0 and odd = 1 of the same word (see kernel_avx512.cpp).
  static void cos_sin(I w, F& cos_out, F& sin_out) {
    const I n = uniform_numerator(w);
    const I q = _mm256_srli_epi32(_mm256_add_epi32(n, iset1(1u << 21)), 22);
    const I m = _mm256_sub_epi32(n, _mm256_slli_epi32(q, 22));
    const F x = mul(_mm256_cvtepi32_ps(m), set1(st::kSincosScale));
    const F z = mul(x, x);
    F s = add(mul(set1(st::kSinP0), z), set1(st::kSinP1));
    s = add(mul(s, z), set1(st::kSinP2));
    s = mul(mul(s, z), x);
    s = add(s, x);
    F c = add(mul(set1(st::kCosP0), z), set1(st::kCosP1));
    c = add(mul(c, z), set1(st::kCosP2));
    c = mul(mul(c, z), z);
    c = sub(c, mul(set1(0.5f), z));
    c = add(c, set1(1.0f));
    const F odd_q = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));  // sign bit = q & 1
    const I cos_sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, iset1(1)), iset1(2)), 30);
    const I sin_sign = _mm256_slli_epi32(_mm256_and_si256(q, iset1(2)), 30);
    cos_out = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(c, s, odd_q)), cos_sign));
    sin_out = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(s, c, odd_q)), sin_sign));
  }

  static void gaussian_by_block(const I w[4], F z[4]) {
    const F ra = radius(w[0]), rb = radius(w[2]);
    cos_sin(w[1], z[0], z[1]);
    cos_sin(w[3], z[2], z[3]);
    z[0] = mul(ra, z[0]);
    z[1] = mul(ra, z[1]);
    z[2] = mul(rb, z[2]);
    z[3] = mul(rb, z[3]);
  }

  template <DType D, class T>
  static F load(const T* p) {
    if constexpr (D == DType::kFloat32) {
      return _mm256_loadu_ps(p);
    } else if constexpr (D == DType::kBFloat16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  template <DType D, class T>
  static void store(T* p, F y) {
    if constexpr (D == DType::kFloat32) {
      _mm256_storeu_ps(p, y);
    } else if constexpr (D == DType::kBFloat16) {
      const I b = _mm256_castps_si256(y);
      const I lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), iset1(1));
      I r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, iset1(0x7FFF)), lsb), 16);
      r = _mm256_blendv_epi8(r, iset1(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
      // Pack the 32-bit lanes (all <= 0xFFFF) to 16 bits; packus works per 128-bit half.
      const I packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }

  template <DType D>
  static F stochastic_round(F y, I word) {
    const I b = _mm256_castps_si256(y);
    const F not_finite = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_and_si256(b, iset1(0x7F800000u)), iset1(0x7F800000u)));
    if constexpr (D == DType::kBFloat16) {
      const I r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_srli_epi32(word, 16)), iset1(0xFFFF0000u));
      return _mm256_blendv_ps(_mm256_castsi256_ps(r), y, not_finite);
    } else if constexpr (D == DType::kFloat16) {
      I e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 23), iset1(0xFF)), iset1(127));
      e = _mm256_max_epi32(e, _mm256_set1_epi32(-14));
      const F up = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(iset1(127 + 10), e), 23));
      const F ulp = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, iset1(127 - 10)), 23));
      const F s = mul(_mm256_castsi256_ps(_mm256_and_si256(b, iset1(0x7FFFFFFFu))), up);
      F q = _mm256_cvtepi32_ps(_mm256_cvttps_epi32(s));
      const F frac = sub(s, q);
      const F u = mul(_mm256_cvtepi32_ps(_mm256_srli_epi32(word, 8)), set1(st::kUniformScale));
      q = _mm256_blendv_ps(q, add(q, set1(1.0f)), _mm256_cmp_ps(frac, u, _CMP_GT_OQ));
      const F r = mul(q, ulp);  // >= 0: copying the sign bit of y is the negation
      const I signed_r = _mm256_or_si256(_mm256_castps_si256(r), _mm256_and_si256(b, iset1(0x80000000u)));
      return _mm256_blendv_ps(_mm256_castsi256_ps(signed_r), y, not_finite);
    } else {
      return y;
    }
  }
};

}  // namespace

#include "kernel_body.h"

namespace fedkseed {
namespace cpu {

void run_chunk_avx2(const Job& job, const Chunk& chunk, uint32_t* scratch) {
  Kernel<Avx2>::run(job, chunk, scratch);
}

}  // namespace cpu
}  // namespace fedkseed

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never selects this path

namespace fedkseed {
namespace cpu {
void run_chunk_avx2(const Job& job, const Chunk& chunk, uint32_t* scratch) { run_chunk_scalar(job, chunk, scratch); }
}  // namespace cpu
}  // namespace fedkseed

#endif
