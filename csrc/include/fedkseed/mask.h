// The magnitude mask (docs/stream-spec.md#magnitude-mask): which elements a masked replay updates.
// Torch-free, host and device: the CPU and CUDA kernels share these definitions.
//
// The bit of element j is |widen(x_j)| <= tau as an IEEE comparison. On values that are not NaN
// that comparison is the comparison of bit patterns, so the kernels compare
// bits(widen(x_j)) & 0x7FFFFFFF with a key made once from tau. That needs no floating-point
// compare, so no flush-to-zero or denormals-are-zero mode can change a bit, and a NaN (whose
// pattern is above every key) is never selected.
#pragma once

#include <cstdint>

#include <fedkseed/dtypes.h>
#include <fedkseed/stream.h>

namespace fedkseed {
namespace mask {

// The key of a float32 threshold that is not NaN: -1 (nothing selected) below zero, else the bits
// of |tau| (so -0.0 and +0.0 give 0, +inf gives 0x7F800000).
FKS_HD int64_t key(float tau) {
  const uint32_t b = stream::float_bits(tau);
  if ((b & 0x80000000u) != 0 && (b & 0x7FFFFFFFu) != 0) return -1;
  return static_cast<int64_t>(b & 0x7FFFFFFFu);
}

// The magnitude bits of a stored element: bits(|widen(x)|) (exact: widening is exact).
FKS_HD uint32_t magnitude(const void* data, int64_t j, DType dtype) {
  if (dtype == DType::kFloat32) return stream::float_bits(static_cast<const float*>(data)[j]) & 0x7FFFFFFFu;
  const uint16_t h = static_cast<const uint16_t*>(data)[j];
  if (dtype == DType::kBFloat16) return (static_cast<uint32_t>(h) << 16) & 0x7FFFFFFFu;
  return stream::float_bits(convert::f16_to_f32(h)) & 0x7FFFFFFFu;
}

// Byte b of a tensor's mask (elements 8b .. 8b + 7, bit j & 7, least significant first); bits of
// elements past numel are 0.
FKS_HD uint8_t mask_byte(const void* data, int64_t numel, DType dtype, int64_t key, int64_t b) {
  uint32_t byte = 0;
  const int64_t first = b << 3;
  const int64_t count = numel - first < 8 ? numel - first : 8;
  for (int64_t e = 0; e < count; ++e) {
    if (static_cast<int64_t>(magnitude(data, first + e, dtype)) <= key) byte |= 1u << e;
  }
  return static_cast<uint8_t>(byte);
}

// Whether element j of a tensor whose bits start at `bits` is selected.
FKS_HD bool selected(const uint8_t* bits, uint64_t j) { return (bits[j >> 3] >> (j & 7u)) & 1u; }

// Bytes of a tensor's bits: ceil(numel / 8).
FKS_HD int64_t bytes_for(int64_t numel) { return (numel + 7) >> 3; }

}  // namespace mask
}  // namespace fedkseed
