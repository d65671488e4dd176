// The AVX2 path (avx2 + f16c): 8 Philox blocks per vector, two vectors in flight, so 64 Gaussian
// elements per group. Built like the AVX-512 path: a target pragma instead of -march, run-time
// choice in ops_cpu.cpp, this instruction set's primitives and dtype loads/stores here, the
// stream arithmetic in kernel_simd.h and the group loop in kernel_body.h.
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
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F as_f(I a) { return _mm256_castsi256_ps(a); }
  static I as_i(F a) { return _mm256_castps_si256(a); }
  static I iset1(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static I izero() { return _mm256_setzero_si256(); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I iload(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const I*>(p)); }
  static void istore(uint32_t* p, I a) { _mm256_storeu_si256(reinterpret_cast<I*>(p), a); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I xor3(I a, I b, I c) { return ixor(ixor(a, b), c); }
  static I xor_and(I a, I b, I c) { return ixor(a, iand(b, c)); }
  static I srli(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I slli(I a, int n) { return _mm256_slli_epi32(a, n); }
  static I srai(I a, int n) { return _mm256_srai_epi32(a, n); }
  static I imax(I a, I b) { return _mm256_max_epi32(a, b); }
  static I cvtt(F a) { return _mm256_cvttps_epi32(a); }
  // A lane mask is a float vector whose sign bits select (blendv reads only those).
  static F bit_set(I a, int bit) { return as_f(slli(a, 31 - bit)); }
  static F greater(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static F blend(F mask, F when_clear, F when_set) { return _mm256_blendv_ps(when_clear, when_set, mask); }
  static F add_where(F mask, F a, F b) { return blend(mask, a, add(a, b)); }
  static F is_nan(F y) { return _mm256_cmp_ps(y, y, _CMP_UNORD_Q); }
  static F nonfinite(F y) {
    const I exponent = iset1(0x7F800000u);
    return as_f(_mm256_cmpeq_epi32(iand(as_i(y), exponent), exponent));
  }
  // Lane l takes when_set where bit l of bits is set: move bit l to the sign bit of lane l.
  static F pick(F when_clear, F when_set, uint64_t bits) {
    const I to_sign = _mm256_sllv_epi32(iset1(static_cast<uint32_t>(bits)), _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
    return blend(as_f(to_sign), when_clear, when_set);
  }
  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }

  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(c, m);
    const I odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
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
      // NaN: sign and top payload bits, quieted (fedkseed/dtypes.h).
      const I nan = _mm256_or_si256(_mm256_srli_epi32(b, 16), iset1(0x0040));
      r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(is_nan(y)));
      // Pack the 32-bit lanes (all <= 0xFFFF) to 16 bits; packus works per 128-bit half.
      const I packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

}  // namespace

#include "kernel_simd.h"
#include "kernel_body.h"

namespace fedkseed {
namespace cpu {

void run_chunk_avx2(const Job& job, const Chunk& chunk, uint32_t* scratch) {
  Kernel<Simd<Avx2>>::run(job, chunk, scratch);
}

void project_chunk_avx2(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc) {
  Kernel<Simd<Avx2>>::project_chunk(job, chunk, scratch, acc);
}

}  // namespace cpu
}  // namespace fedkseed

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never selects this path

namespace fedkseed {
namespace cpu {
void run_chunk_avx2(const Job& job, const Chunk& chunk, uint32_t* scratch) { run_chunk_scalar(job, chunk, scratch); }
void project_chunk_avx2(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc) {
  project_chunk_scalar(job, chunk, scratch, acc);
}
}  // namespace cpu
}  // namespace fedkseed

#endif
