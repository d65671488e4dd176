// The AVX2 path (avx2 + f16c): 8 Philox blocks per vector, two vectors in flight, so 64 Gaussian
// elements per group.
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
  static constexpr int L = 8;
  static constexpr int N = fedkseed::cpu::kBlocksAvx2 / L;
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

  // One Philox round on N independent vectors of counters.
  FKS_CPU_INLINE static void philox_round(I c0[N], I c1[N], I c2[N], I c3[N], const uint32_t key[2]) {
    const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
    const I k0 = iset1(key[0]), k1 = iset1(key[1]);
    I hi0[N], lo0[N], hi1[N], lo1[N];
    for (int n = 0; n < N; ++n) {
      mulhilo(m0, c0[n], hi0[n], lo0[n]);
      mulhilo(m1, c2[n], hi1[n], lo1[n]);
    }
    for (int n = 0; n < N; ++n) {
      c0[n] = _mm256_xor_si256(_mm256_xor_si256(hi1[n], c1[n]), k0);
      c1[n] = lo1[n];
      c2[n] = _mm256_xor_si256(_mm256_xor_si256(hi0[n], c3[n]), k1);
      c3[n] = lo0[n];
    }
  }

  // Philox4x32-10 of blocks block0 .. block0 + N*L - 1 (lane l of vector n: block0 + n*L + l).
  FKS_CPU_INLINE static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block0, uint32_t tag, I w[4][N]) {
    const uint32_t lo = static_cast<uint32_t>(block0), hi = static_cast<uint32_t>(block0 >> 32);
    const I iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    I c0[N], c1[N], c2[N], c3[N];
    if (lo <= 0xFFFFFFFFu - (N * L - 1)) {
      // Every lane has c1 = hi, c2 = tag, c3 = 0 at the start, so half of the products of rounds
      // 0 and 1 are the same in every lane: compute those once as scalars.
      const uint64_t p1 = static_cast<uint64_t>(st::kPhiloxM1) * tag;  // round 0, (hi1, lo1)
      const uint32_t c0_after0 = static_cast<uint32_t>(p1 >> 32) ^ hi ^ keys.round_key[0][0];
      const uint32_t c1_after0 = static_cast<uint32_t>(p1);
      const uint64_t p0 = static_cast<uint64_t>(st::kPhiloxM0) * c0_after0;  // round 1, (hi0, lo0)
      const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
      for (int n = 0; n < N; ++n) {
        I hi0, lo0;
        mulhilo(m0, _mm256_add_epi32(iset1(lo + static_cast<uint32_t>(n * L)), iota), hi0, lo0);
        c2[n] = _mm256_xor_si256(hi0, iset1(keys.round_key[0][1]));  // round 0: c3 = 0
        c3[n] = lo0;
      }
      for (int n = 0; n < N; ++n) {
        I hi1, lo1;
        mulhilo(m1, c2[n], hi1, lo1);
        c0[n] = _mm256_xor_si256(hi1, iset1(c1_after0 ^ keys.round_key[1][0]));
        c1[n] = lo1;
        c2[n] = _mm256_xor_si256(c3[n], iset1(static_cast<uint32_t>(p0 >> 32) ^ keys.round_key[1][1]));
        c3[n] = iset1(static_cast<uint32_t>(p0));
      }
    } else {  // the low words wrap inside this group: carry into the high word lane by lane
      alignas(32) uint32_t a0[N * L], a1[N * L];
      for (int l = 0; l < N * L; ++l) {
        const uint64_t b = block0 + static_cast<uint64_t>(l);
        a0[l] = static_cast<uint32_t>(b);
        a1[l] = static_cast<uint32_t>(b >> 32);
      }
      for (int n = 0; n < N; ++n) {
        c0[n] = _mm256_load_si256(reinterpret_cast<const I*>(a0 + n * L));
        c1[n] = _mm256_load_si256(reinterpret_cast<const I*>(a1 + n * L));
        c2[n] = iset1(tag);
        c3[n] = _mm256_setzero_si256();
      }
      philox_round(c0, c1, c2, c3, keys.round_key[0]);
      philox_round(c0, c1, c2, c3, keys.round_key[1]);
    }
    // Fully unrolled, so the four counter words rotate through registers without copies.
#pragma GCC unroll 8
    for (int round = 2; round < st::kPhiloxRounds; ++round) philox_round(c0, c1, c2, c3, keys.round_key[round]);
    for (int n = 0; n < N; ++n) {
      w[0][n] = c0[n];
      w[1][n] = c1[n];
      w[2][n] = c2[n];
      w[3][n] = c3[n];
    }
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

  // n = 2*(w >> 9) + 1 = (w >> 8) | 1, the odd 24-bit numerator of U(w) = n * 2^-24.
  static I uniform_numerator(I w) { return _mm256_or_si256(_mm256_srli_epi32(w, 8), iset1(1)); }

  // sqrt(-2 ln U(w)) for R independent vectors in lockstep; the exponent/mantissa split is the
  // carry trick explained in kernel_avx512.cpp.
  template <int R>
  static void radius(const I w[R], F r[R]) {
    const uint32_t sqrt_half = st::float_bits(st::kLogSqrtHalf);
    const I carry_in = iset1(0x00800000u - (sqrt_half & 0x007FFFFFu));
    I t[R];
    F x[R], z[R], p[R], ef[R];
    for (int i = 0; i < R; ++i) {
      t[i] = _mm256_add_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(uniform_numerator(w[i]))), carry_in);
    }
    for (int i = 0; i < R; ++i) {
      const I m = _mm256_add_epi32(_mm256_and_si256(t[i], iset1(0x007FFFFFu)), iset1(sqrt_half));
      x[i] = sub(_mm256_castsi256_ps(m), set1(1.0f));
      ef[i] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(t[i], 23), iset1(24 + 127)));
    }
    for (int i = 0; i < R; ++i) z[i] = mul(x[i], x[i]);
    for (int i = 0; i < R; ++i) p[i] = add(mul(set1(st::kLogP0), x[i]), set1(st::kLogP1));
    const float horner[] = {st::kLogP2, st::kLogP3, st::kLogP4, st::kLogP5, st::kLogP6, st::kLogP7, st::kLogP8};
    for (const float c : horner) {
      for (int i = 0; i < R; ++i) p[i] = add(mul(p[i], x[i]), set1(c));
    }
    for (int i = 0; i < R; ++i) {
      F y = mul(mul(p[i], x[i]), z[i]);
      y = add(y, mul(ef[i], set1(st::kLogLn2Lo)));
      y = sub(y, mul(set1(0.5f), z[i]));
      const F ln = add(add(x[i], y), mul(ef[i], set1(st::kLogLn2Hi)));
      r[i] = _mm256_sqrt_ps(mul(set1(-2.0f), ln));
    }
  }

  // stream::cos_sin_2pi for odd = 0 and odd = 1 of R words (derivation in kernel_avx512.cpp).
  template <int R>
  static void cos_sin(const I w[R], F cos_out[R], F sin_out[R]) {
    const I sign = iset1(0x80000000u);
    F x[R], z[R], s[R], c[R];
    for (int i = 0; i < R; ++i) {
      const I m = _mm256_srai_epi32(_mm256_or_si256(_mm256_slli_epi32(w[i], 2), iset1(1u << 10)), 10);
      x[i] = mul(_mm256_cvtepi32_ps(m), set1(st::kSincosScale));
    }
    for (int i = 0; i < R; ++i) z[i] = mul(x[i], x[i]);
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(set1(st::kSinP0), z[i]), set1(st::kSinP1));
      c[i] = add(mul(set1(st::kCosP0), z[i]), set1(st::kCosP1));
    }
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(s[i], z[i]), set1(st::kSinP2));
      c[i] = add(mul(c[i], z[i]), set1(st::kCosP2));
    }
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(mul(s[i], z[i]), x[i]), x[i]);
      c[i] = mul(mul(c[i], z[i]), z[i]);
      c[i] = add(sub(c[i], mul(set1(0.5f), z[i])), set1(1.0f));
    }
    for (int i = 0; i < R; ++i) {
      const I q = _mm256_add_epi32(w[i], iset1(1u << 29));          // bits 31..30: q mod 4
      const I q_plus_1 = _mm256_add_epi32(w[i], iset1(3u << 29));   // bits 31..30: q + 1 mod 4
      const F odd_q = _mm256_castsi256_ps(_mm256_slli_epi32(q, 1));  // sign bit = q & 1
      const I cos_v = _mm256_castps_si256(_mm256_blendv_ps(c[i], s[i], odd_q));
      const I sin_v = _mm256_castps_si256(_mm256_blendv_ps(s[i], c[i], odd_q));
      cos_out[i] = _mm256_castsi256_ps(_mm256_xor_si256(cos_v, _mm256_and_si256(q_plus_1, sign)));
      sin_out[i] = _mm256_castsi256_ps(_mm256_xor_si256(sin_v, _mm256_and_si256(q, sign)));
    }
  }

  FKS_CPU_INLINE static void gaussian_by_block(const I w[4][N], F z[4][N]) {
    I radius_words[2 * N], angle_words[2 * N];
    for (int n = 0; n < N; ++n) {
      radius_words[n] = w[0][n];
      radius_words[N + n] = w[2][n];
      angle_words[n] = w[1][n];
      angle_words[N + n] = w[3][n];
    }
    F r[2 * N], cos_v[2 * N], sin_v[2 * N];
    radius<2 * N>(radius_words, r);
    cos_sin<2 * N>(angle_words, cos_v, sin_v);
    for (int n = 0; n < N; ++n) {
      z[0][n] = mul(r[n], cos_v[n]);
      z[1][n] = mul(r[n], sin_v[n]);
      z[2][n] = mul(r[N + n], cos_v[N + n]);
      z[3][n] = mul(r[N + n], sin_v[N + n]);
    }
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
