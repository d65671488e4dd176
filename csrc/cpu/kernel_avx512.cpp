// The AVX-512 path (avx512f/bw/dq/vl): 16 Philox blocks per vector, two vectors in flight, so
// 128 Gaussian elements per group. Compiled for that target with a pragma (never -march), picked at run time in
// ops_cpu.cpp. The float32 arithmetic is the stream.h sequence, one separately rounded vector
// add/mul per scalar operation (no FMA is enabled for this target, and the build sets
// -ffp-contract=off); sqrt is the correctly rounded vsqrtps; Philox is exact 32x32->64 integer
// multiplication (vpmuludq on the even and the odd lanes).
#include <cstdint>
#include <cstring>

#include <fedkseed/stream.h>

#include "cpu_kernel.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
// GCC 12 reports its own intrinsics headers (_mm512_undefined_*) as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

namespace st = fedkseed::stream;
using fedkseed::cpu::DType;

struct Avx512 {
  static constexpr int L = 16;
  static constexpr int N = fedkseed::cpu::kBlocksAvx512 / L;
  using F = __m512;
  using I = __m512i;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static I iset1(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F pick(F when_clear, F when_set, uint64_t bits) {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), when_clear, when_set);
  }
  static void store_f32(float* p, F v) { _mm512_storeu_ps(p, v); }

  // (hi, lo) halves of m * c for every 32-bit lane: vpmuludq multiplies the even lanes, the odd
  // lanes are shifted down and multiplied separately; a masked pair swap puts each half home.
  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(c, m);
    const I odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
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
      c0[n] = _mm512_ternarylogic_epi32(hi1[n], c1[n], k0, 0x96);  // three-way xor
      c1[n] = lo1[n];
      c2[n] = _mm512_ternarylogic_epi32(hi0[n], c3[n], k1, 0x96);
      c3[n] = lo0[n];
    }
  }

  // Philox4x32-10 of blocks block0 .. block0 + N*L - 1 (lane l of vector n: block0 + n*L + l).
  FKS_CPU_INLINE static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block0, uint32_t tag, I w[4][N]) {
    const uint32_t lo = static_cast<uint32_t>(block0), hi = static_cast<uint32_t>(block0 >> 32);
    const I iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
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
        mulhilo(m0, _mm512_add_epi32(iset1(lo + static_cast<uint32_t>(n * L)), iota), hi0, lo0);
        c2[n] = _mm512_xor_si512(hi0, iset1(keys.round_key[0][1]));  // round 0: c3 = 0
        c3[n] = lo0;
      }
      for (int n = 0; n < N; ++n) {
        I hi1, lo1;
        mulhilo(m1, c2[n], hi1, lo1);
        c0[n] = _mm512_xor_si512(hi1, iset1(c1_after0 ^ keys.round_key[1][0]));
        c1[n] = lo1;
        c2[n] = _mm512_xor_si512(c3[n], iset1(static_cast<uint32_t>(p0 >> 32) ^ keys.round_key[1][1]));
        c3[n] = iset1(static_cast<uint32_t>(p0));
      }
    } else {  // the low words wrap inside this group: carry into the high word lane by lane
      alignas(64) uint32_t a0[N * L], a1[N * L];
      for (int l = 0; l < N * L; ++l) {
        const uint64_t b = block0 + static_cast<uint64_t>(l);
        a0[l] = static_cast<uint32_t>(b);
        a1[l] = static_cast<uint32_t>(b >> 32);
      }
      for (int n = 0; n < N; ++n) {
        c0[n] = _mm512_load_si512(a0 + n * L);
        c1[n] = _mm512_load_si512(a1 + n * L);
        c2[n] = iset1(tag);
        c3[n] = _mm512_setzero_si512();
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

  // Lanes are blocks, elements are (block, word): transpose 4 x 16 into element order.
  static void interleave_ps(const F in[4], F out[4]) {
    const F t0 = _mm512_unpacklo_ps(in[0], in[1]), t1 = _mm512_unpackhi_ps(in[0], in[1]);
    const F t2 = _mm512_unpacklo_ps(in[2], in[3]), t3 = _mm512_unpackhi_ps(in[2], in[3]);
    const F u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const F u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    // u_j holds blocks j, j+4, j+8, j+12 (one per 128-bit lane); gather them in block order.
    const F v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u0, u1, 0xEE);
    const F v2 = _mm512_shuffle_f32x4(u2, u3, 0x44), v3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
    out[0] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    out[1] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    out[2] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    out[3] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
  static void interleave(I w[4]) {
    F in[4], out[4];
    for (int i = 0; i < 4; ++i) in[i] = _mm512_castsi512_ps(w[i]);
    interleave_ps(in, out);
    for (int i = 0; i < 4; ++i) w[i] = _mm512_castps_si512(out[i]);
  }
  static void interleave_store(const I w[4], uint32_t* out) {
    I t[4] = {w[0], w[1], w[2], w[3]};
    interleave(t);
    for (int i = 0; i < 4; ++i) _mm512_storeu_si512(out + i * L, t[i]);
  }

  // n = 2*(w >> 9) + 1 = (w >> 8) | 1, the odd 24-bit numerator of U(w) = n * 2^-24.
  static I uniform_numerator(I w) { return _mm512_or_si512(_mm512_srli_epi32(w, 8), iset1(1)); }

  // sqrt(-2 ln U(w)) for R independent vectors, stepped in lockstep (stream::log_uniform).
  template <int R>
  static void radius(const I w[R], F r[R]) {
    // U = n * 2^-24 has the mantissa of float(n) (exact: n < 2^24) and its exponent minus 24.
    // log_uniform's split (m in [0.5, 1), halved exponent and doubled m when m < LOG_SQRT_HALF)
    // without a compare: adding 2^23 - mant(LOG_SQRT_HALF) to the bits carries into the exponent
    // exactly when mant(m) >= mant(LOG_SQRT_HALF); the low 23 bits plus bits(LOG_SQRT_HALF) are
    // then the bits of m (carry) or of m + m (no carry), both exact as in stream.h.
    const uint32_t sqrt_half = st::float_bits(st::kLogSqrtHalf);
    const I carry_in = iset1(0x00800000u - (sqrt_half & 0x007FFFFFu));
    I t[R];
    F x[R], z[R], p[R], ef[R];
    for (int i = 0; i < R; ++i) {
      t[i] = _mm512_add_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(uniform_numerator(w[i]))), carry_in);
    }
    for (int i = 0; i < R; ++i) {
      const I m = _mm512_add_epi32(_mm512_and_si512(t[i], iset1(0x007FFFFFu)), iset1(sqrt_half));
      x[i] = sub(_mm512_castsi512_ps(m), set1(1.0f));
      // e = biased exponent of U - 126 (minus 1 without carry) = (t >> 23) - 24 - 127.
      ef[i] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(t[i], 23), iset1(24 + 127)));
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
      r[i] = _mm512_sqrt_ps(mul(set1(-2.0f), ln));
    }
  }

  // stream::cos_sin_2pi for both odd = 0 (cos) and odd = 1 (sin) of R independent words: the two
  // share the reduction and both polynomials, and differ only in which polynomial and sign they take.
  template <int R>
  static void cos_sin(const I w[R], F cos_out[R], F sin_out[R]) {
    const I sign = iset1(0x80000000u);
    F x[R], z[R], s[R], c[R];
    for (int i = 0; i < R; ++i) {
      // m = n - q * 2^22 with q = (n + 2^21) >> 22 is n mod 2^22 read as a signed 22-bit number:
      // shift n's bit 21 into the sign bit ((w >> 8) << 10 keeps w's bits 8..29) and back.
      const I m = _mm512_srai_epi32(_mm512_or_si512(_mm512_slli_epi32(w[i], 2), iset1(1u << 10)), 10);
      x[i] = mul(_mm512_cvtepi32_ps(m), set1(st::kSincosScale));
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
      // q mod 4 sits in bits 31..30 of w + 2^29 (the rounding carry of n + 2^21), and q + 1 mod 4
      // in those of w + 3*2^29. cos: quadrant qq = q & 3; sin: qq = (q + 3) & 3. Odd qq takes the
      // sine polynomial; qq in {1, 2} negates, i.e. bit 1 of qq + 1: of q + 1 for cos, of q for sin.
      const I q = _mm512_add_epi32(w[i], iset1(1u << 29));
      const I q_plus_1 = _mm512_add_epi32(w[i], iset1(3u << 29));
      const __mmask16 odd_q = _mm512_test_epi32_mask(q, iset1(1u << 30));
      const I cos_v = _mm512_castps_si512(_mm512_mask_blend_ps(odd_q, c[i], s[i]));
      const I sin_v = _mm512_castps_si512(_mm512_mask_blend_ps(odd_q, s[i], c[i]));
      cos_out[i] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(cos_v, q_plus_1, sign, 0x78));  // a ^ (b & c)
      sin_out[i] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sin_v, q, sign, 0x78));
    }
  }

  // The Gaussian values of the N*L blocks: z[j][n] holds word-pair lane j of the blocks of vector n.
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
      return _mm512_loadu_ps(p);
    } else if constexpr (D == DType::kBFloat16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <DType D, class T>
  static void store(T* p, F y) {
    if constexpr (D == DType::kFloat32) {
      _mm512_storeu_ps(p, y);
    } else if constexpr (D == DType::kBFloat16) {
      // Round to nearest even by adding 0x7FFF + lsb; NaN becomes 0xFFFF (as torch's .to()).
      const I b = _mm512_castps_si512(y);
      const I lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), iset1(1));
      I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, iset1(0x7FFF)), lsb), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), iset1(0xFFFF));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }

  // stream::stochastic_round_bf16 / _fp16, lane-wise.
  template <DType D>
  static F stochastic_round(F y, I word) {
    const I b = _mm512_castps_si512(y);
    const __mmask16 finite =
        _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, iset1(0x7F800000u)), iset1(0x7F800000u));
    if constexpr (D == DType::kBFloat16) {
      const I r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_srli_epi32(word, 16)), iset1(0xFFFF0000u));
      return _mm512_mask_mov_ps(y, finite, _mm512_castsi512_ps(r));
    } else if constexpr (D == DType::kFloat16) {
      I e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 23), iset1(0xFF)), iset1(127));
      e = _mm512_max_epi32(e, _mm512_set1_epi32(-14));
      const F up = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(iset1(127 + 10), e), 23));
      const F ulp = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, iset1(127 - 10)), 23));
      const F s = mul(_mm512_castsi512_ps(_mm512_and_si512(b, iset1(0x7FFFFFFFu))), up);
      F q = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(s));
      const F frac = sub(s, q);
      const F u = mul(_mm512_cvtepi32_ps(_mm512_srli_epi32(word, 8)), set1(st::kUniformScale));
      q = _mm512_mask_add_ps(q, _mm512_cmp_ps_mask(frac, u, _CMP_GT_OQ), q, set1(1.0f));
      const F r = mul(q, ulp);  // >= 0: copying the sign bit of y is the negation
      const I signed_r = _mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(b, iset1(0x80000000u)));
      return _mm512_mask_mov_ps(y, finite, _mm512_castsi512_ps(signed_r));
    } else {
      return y;
    }
  }
};

}  // namespace

#include "kernel_body.h"

namespace fedkseed {
namespace cpu {

void run_chunk_avx512(const Job& job, const Chunk& chunk, uint32_t* scratch) {
  Kernel<Avx512>::run(job, chunk, scratch);
}

}  // namespace cpu
}  // namespace fedkseed

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never selects this path

namespace fedkseed {
namespace cpu {
void run_chunk_avx512(const Job& job, const Chunk& chunk, uint32_t* scratch) { run_chunk_scalar(job, chunk, scratch); }
}  // namespace cpu
}  // namespace fedkseed

#endif
