// The AVX-512 path (avx512f/bw/dq/vl): 16 Philox blocks per vector, two vectors in flight, so
// 128 Gaussian elements per group. Compiled for that target with a pragma (never -march), picked
// at run time in ops_cpu.cpp. This file holds the instruction set's primitives and its dtype
// loads/stores; the stream arithmetic over them is kernel_simd.h (its rules: no FMA, correctly
// rounded vsqrtps, exact vpmuludq Philox) and the group loop is kernel_body.h.
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
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F as_f(I a) { return _mm512_castsi512_ps(a); }
  static I as_i(F a) { return _mm512_castps_si512(a); }
  static I iset1(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static I izero() { return _mm512_setzero_si512(); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I iload(const uint32_t* p) { return _mm512_load_si512(p); }
  static void istore(uint32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static I xor_and(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x78); }
  static I srli(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I slli(I a, int n) { return _mm512_slli_epi32(a, n); }
  static I srai(I a, int n) { return _mm512_srai_epi32(a, n); }
  static I imax(I a, I b) { return _mm512_max_epi32(a, b); }
  static I cvtt(F a) { return _mm512_cvttps_epi32(a); }
  static __mmask16 bit_set(I a, int bit) { return _mm512_test_epi32_mask(a, iset1(1u << bit)); }
  static __mmask16 greater(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static F blend(__mmask16 mask, F when_clear, F when_set) { return _mm512_mask_blend_ps(mask, when_clear, when_set); }
  static F add_where(__mmask16 mask, F a, F b) { return _mm512_mask_add_ps(a, mask, a, b); }
  static __mmask16 is_nan(F y) { return _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q); }
  static __mmask16 nonfinite(F y) {
    const I exponent = iset1(0x7F800000u);
    return _mm512_cmpeq_epi32_mask(iand(as_i(y), exponent), exponent);
  }
  static F pick(F when_clear, F when_set, uint64_t bits) { return blend(static_cast<__mmask16>(bits), when_clear, when_set); }
  static void store_f32(float* p, F v) { _mm512_storeu_ps(p, v); }

  // (hi, lo) halves of m * c for every 32-bit lane: vpmuludq multiplies the even lanes, the odd
  // lanes are shifted down and multiplied separately; a masked pair swap puts each half home.
  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(c, m);
    const I odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
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
      // Round to nearest even by adding 0x7FFF + lsb; a NaN keeps its sign and top payload bits,
      // quieted (fedkseed/dtypes.h).
      const I b = _mm512_castps_si512(y);
      const I lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), iset1(1));
      I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, iset1(0x7FFF)), lsb), 16);
      r = _mm512_mask_mov_epi32(r, is_nan(y), _mm512_or_si512(_mm512_srli_epi32(b, 16), iset1(0x0040)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

}  // namespace

#include "kernel_simd.h"
#include "kernel_body.h"

namespace fedkseed {
namespace cpu {

void run_chunk_avx512(const Job& job, const Chunk& chunk, uint32_t* scratch) {
  Kernel<Simd<Avx512>>::run(job, chunk, scratch);
}

void project_chunk_avx512(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc) {
  Kernel<Simd<Avx512>>::project_chunk(job, chunk, scratch, acc);
}

}  // namespace cpu
}  // namespace fedkseed

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never selects this path

namespace fedkseed {
namespace cpu {
void run_chunk_avx512(const Job& job, const Chunk& chunk, uint32_t* scratch) { run_chunk_scalar(job, chunk, scratch); }
void project_chunk_avx512(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc) {
  project_chunk_scalar(job, chunk, scratch, acc);
}
}  // namespace cpu
}  // namespace fedkseed

#endif
