// The AVX-512 path (avx512f/bw/dq/vl): 16 Philox blocks per vector, so 64 Gaussian elements per
// group. Compiled for that target with a pragma (never -march), picked at run time in
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
  static constexpr int L = fedkseed::cpu::kLanesAvx512;
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

  // Philox4x32-10 of blocks block0 .. block0 + 15 (lane l = block0 + l).
  static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block0, uint32_t tag, I w[4]) {
    I c0, c1;
    const uint32_t lo = static_cast<uint32_t>(block0);
    if (lo <= 0xFFFFFFFFu - (L - 1)) {
      c0 = _mm512_add_epi32(iset1(lo), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      c1 = iset1(static_cast<uint32_t>(block0 >> 32));
    } else {  // the low words wrap inside this vector: carry into the high word lane by lane
      alignas(64) uint32_t a0[L], a1[L];
      for (int l = 0; l < L; ++l) {
        const uint64_t b = block0 + static_cast<uint64_t>(l);
        a0[l] = static_cast<uint32_t>(b);
        a1[l] = static_cast<uint32_t>(b >> 32);
      }
      c0 = _mm512_load_si512(a0);
      c1 = _mm512_load_si512(a1);
    }
    I c2 = iset1(tag), c3 = _mm512_setzero_si512();
    const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
    for (int round = 0; round < st::kPhiloxRounds; ++round) {
      I hi0, lo0, hi1, lo1;
      mulhilo(m0, c0, hi0, lo0);
      mulhilo(m1, c2, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, iset1(keys.round_key[round][0]), 0x96);  // three-way xor
      c1 = lo1;
      c2 = _mm512_ternarylogic_epi32(hi0, c3, iset1(keys.round_key[round][1]), 0x96);
      c3 = lo0;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
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

  static I uniform_numerator(I w) {
    return _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), iset1(1));
  }

  // stream::log_uniform, lane-wise.
  static F log_uniform(F u) {
    const I bits = _mm512_castps_si512(u);
    I e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), iset1(0xFF)), iset1(126));
    const F m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, iset1(0x007FFFFF)), iset1(0x3F000000)));
    const __mmask16 small = _mm512_cmp_ps_mask(m, set1(st::kLogSqrtHalf), _CMP_LT_OQ);
    e = _mm512_mask_sub_epi32(e, small, e, iset1(1));
    const F x = _mm512_mask_blend_ps(small, sub(m, set1(1.0f)), sub(add(m, m), set1(1.0f)));
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
    const F ef = _mm512_cvtepi32_ps(e);
    y = add(y, mul(ef, set1(st::kLogLn2Lo)));
    y = sub(y, mul(set1(0.5f), z));
    const F r = add(x, y);
    return add(r, mul(ef, set1(st::kLogLn2Hi)));
  }

  // sqrt(-2 ln U(w)).
  static F radius(I w) {
    const F u = mul(_mm512_cvtepi32_ps(uniform_numerator(w)), set1(st::kUniformScale));
    return _mm512_sqrt_ps(mul(set1(-2.0f), log_uniform(u)));
  }

  // stream::cos_sin_2pi for both odd = 0 (cos) and odd = 1 (sin) of the same word: the two share
  // the reduction and both polynomials, and differ only in which polynomial and sign they take.
  static void cos_sin(I w, F& cos_out, F& sin_out) {
    const I n = uniform_numerator(w);
    const I q = _mm512_srli_epi32(_mm512_add_epi32(n, iset1(1u << 21)), 22);
    const I m = _mm512_sub_epi32(n, _mm512_slli_epi32(q, 22));
    const F x = mul(_mm512_cvtepi32_ps(m), set1(st::kSincosScale));
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
    // cos: quadrant qq = q & 3; sin: qq = (q + 3) & 3. Odd qq takes the sine polynomial; qq in
    // {1, 2} negates, i.e. bit 1 of qq + 1: (q + 1) & 2 for cos, q & 2 for sin.
    const __mmask16 odd_q = _mm512_test_epi32_mask(q, iset1(1));
    const I cos_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, iset1(1)), iset1(2)), 30);
    const I sin_sign = _mm512_slli_epi32(_mm512_and_si512(q, iset1(2)), 30);
    cos_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd_q, c, s)), cos_sign));
    sin_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd_q, s, c)), sin_sign));
  }

  // The 64 Gaussian values of the 16 blocks: z[j] holds word-pair lane j of every block.
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
