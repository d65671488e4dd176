// The projection p_k = sum_i x_i z(s_k, i) (docs/stream-spec.md#projection): its chunking and the
// exact accumulator the chunk partials are summed in. Torch-free, host and device; the Python
// mirror is the PROJECT_* constants of fedkseed/reference.py (tests/test_project.py checks they agree).
//
// Each chunk of kChunk global indices is summed in float64 by a fixed pairwise tree (the kernels);
// the chunk partials are then added EXACTLY into a fixed-point integer accumulator: kLimbs signed
// 32-bit digits held in int64 (value = sum_j acc[j] * 2^(32 j - kLsb)), then counters of NaN, +inf
// and -inf partials. Integer addition is associative, so threads, blocks, atomics and ranks (one
// all-reduce) may add in any order and still give the same bits; fedkseed/reference.py
// finish_projection rounds the accumulator once to float64.
#pragma once

#include <cstdint>
#include <cstring>

#include <fedkseed/stream.h>

namespace fedkseed {
namespace project {

constexpr int kChunkShift = 12;
constexpr int64_t kChunk = int64_t{1} << kChunkShift;  // elements per chunk
// Chunk partials are multiples of 2^-298 (sums of products of two float32) below 2^143 in
// magnitude, so q * 2^kLsb is an integer of at most 495 bits: limbs 0..15 hold it exactly.
constexpr int kLsb = 352;
constexpr int kLimbs = 16;
constexpr int kNaN = kLimbs, kPosInf = kLimbs + 1, kNegInf = kLimbs + 2;
constexpr int kWidth = kLimbs + 3;  // int64 entries per seed
// Each partial adds less than 2^32 to a limb, so int64 limbs are safe for 2^31 chunks per call.
constexpr int64_t kMaxChunks = int64_t{1} << 31;

FKS_HD uint64_t double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
#endif
}

// Add the chunk partial q to an accumulator through add(index, int64 value): q = m * 2^e with a
// 53-bit integer m, placed at bit e + kLsb of the fixed-point value (split over three limbs).
template <class Add>
FKS_HD void add_exact(double q, Add&& add) {
  const uint64_t b = double_bits(q);
  const uint32_t biased = static_cast<uint32_t>(b >> 52) & 0x7FFu;
  const uint64_t fraction = b & ((uint64_t{1} << 52) - 1);
  const bool negative = (b >> 63) != 0;
  if (biased == 0x7FFu) {
    add(fraction != 0 ? kNaN : negative ? kNegInf : kPosInf, 1);
    return;
  }
  if (biased == 0 && fraction == 0) return;  // +-0 adds nothing
  uint64_t m = biased != 0 ? (fraction | (uint64_t{1} << 52)) : fraction;
  int p = static_cast<int>(biased != 0 ? biased : 1) - 1075 + kLsb;  // bit position of m's lsb
  if (p < 0) {  // never drops a set bit: q is a multiple of 2^-298 (see kLsb)
    m >>= -p;
    p = 0;
  }
  const int limb = p >> 5, shift = p & 31;
  const uint64_t lo = (m << shift) & 0xFFFFFFFFu;
  const uint64_t up = shift == 0 ? m >> 32 : m >> (32 - shift);  // bits 32.. of m << shift (< 2^53)
  const int64_t sign = negative ? -1 : 1;
  add(limb, sign * static_cast<int64_t>(lo));
  add(limb + 1, sign * static_cast<int64_t>(up & 0xFFFFFFFFu));
  add(limb + 2, sign * static_cast<int64_t>(up >> 32));
}

}  // namespace project
}  // namespace fedkseed
