// The portable path: one lane, the stream.h functions themselves. Also the ground truth the SIMD
// paths are checked against in tests (FEDKSEED_CPU_ISA=scalar).
#include <cstdint>
#include <cstring>

#include <fedkseed/dtypes.h>
#include <fedkseed/stream.h>

#include "cpu_kernel.h"

namespace {

namespace st = fedkseed::stream;
using fedkseed::cpu::DType;

struct Scalar {
  static constexpr int L = 1;
  static constexpr int N = fedkseed::cpu::kBlocksScalar;
  static_assert(N == 1, "the scalar path generates one block at a time");
  using F = float;
  using I = uint32_t;

  static F zero() { return 0.0f; }
  static F set1(float a) { return a; }
  static F add(F a, F b) { return st::fks_add(a, b); }
  static F mul(F a, F b) { return st::fks_mul(a, b); }
  static F pick(F when_clear, F when_set, uint64_t bits) { return (bits & 1u) ? when_set : when_clear; }
  static void store_f32(float* p, F v) { *p = v; }
  static F settle_nan(F y, F x) { return fedkseed::convert::settle_nan(y, x); }

  static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block, uint32_t tag, I w[4][N]) {
    const st::Words words = st::philox(keys.seed, block, tag);
    for (int i = 0; i < 4; ++i) w[i][0] = words.w[i];
  }
  // One block: words and values are already in element order.
  static void interleave(I[4]) {}
  static void interleave_ps(const F in[4], F out[4]) { std::memcpy(out, in, 4 * sizeof(F)); }
  static void interleave_store(const I w[4], uint32_t* out) { std::memcpy(out, w, 4 * sizeof(I)); }
  static void gaussian_by_block(const I w[4][N], F z[4][N]) {
    const st::Pair a = st::gaussian_pair_from_words(w[0][0], w[1][0]);
    const st::Pair b = st::gaussian_pair_from_words(w[2][0], w[3][0]);
    z[0][0] = a.even;
    z[1][0] = a.odd;
    z[2][0] = b.even;
    z[3][0] = b.odd;
  }

  template <DType D, class T>
  static F load(const T* p) {
    if constexpr (D == DType::kFloat32) return *p;
    if constexpr (D == DType::kBFloat16) return fedkseed::convert::bf16_to_f32(*p);
    if constexpr (D == DType::kFloat16) return fedkseed::convert::f16_to_f32(*p);
  }
  template <DType D, class T>
  static void store(T* p, F y) {
    if constexpr (D == DType::kFloat32) *p = y;
    if constexpr (D == DType::kBFloat16) *p = fedkseed::convert::f32_to_bf16(y);
    if constexpr (D == DType::kFloat16) *p = fedkseed::convert::f32_to_f16(y);
  }
  template <DType D>
  static F stochastic_round(F y, I word) {
    if constexpr (D == DType::kBFloat16) return st::stochastic_round_bf16(y, word);
    if constexpr (D == DType::kFloat16) return st::stochastic_round_fp16(y, word);
    return y;
  }
};

}  // namespace

#include "kernel_body.h"

namespace fedkseed {
namespace cpu {

void run_chunk_scalar(const Job& job, const Chunk& chunk, uint32_t* scratch) {
  Kernel<Scalar>::run(job, chunk, scratch);
}

void project_chunk_scalar(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc) {
  Kernel<Scalar>::project_chunk(job, chunk, scratch, acc);
}

}  // namespace cpu
}  // namespace fedkseed
