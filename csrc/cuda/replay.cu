// CUDA kernels of fedkseed: replay_ (perturb_ is K = 1), noise_ and magnitude_mask, bit-identical to
// fedkseed/reference.py through the shared core csrc/include/fedkseed/stream.h (built with
// -fmad=false; the core's float ops are __fadd_rn/__fmul_rn/__fsqrt_rn on the device anyway).
//
// Work split. A thread's unit is 8 consecutive GLOBAL indices starting at a multiple of 8: two
// whole Gaussian Philox blocks (each Box-Muller pair shares its logarithm and square root through
// stream::gaussian_pair_from_words), and one 16-byte vector of bfloat16/float16 (two of
// float32). Tensor t owns the units that overlap [offset[t], offset[t] + numel[t]); a unit
// straddling two tensors is handled once per tensor, each masking the other's elements.
// Rademacher: a Philox block holds 128 signs, the units of 16 threads. Each tensor's units are
// padded to whole blocks (padding units mask every element), so the 16 threads of each aligned
// half-warp share one block; for 16 seeds at a time, thread r of the half-warp computes the block
// of seed r into shared memory and all 16 read their 8 bits from it: one Philox call per 128
// signs, as on the CPU and in Triton. When a
// tensor's offset is a multiple of 8 and its storage 16-byte aligned, every whole unit is an
// aligned vector load/store; the rest (head, tail, odd offsets) goes element by element.
//
// Tensor table. One launch covers every tensor (and every dtype) of the call: pointers, numels,
// offsets, unit prefix sums, decay factors and dtypes travel BY VALUE as a __grid_constant__
// kernel parameter. That needs no device allocation, no host-to-device copy and no cache keyed
// on pointers, and a CUDA graph captures it as is. CUDA >= 12.1 allows 32,764 bytes of kernel
// parameters on Volta and newer, room for kMaxTensors = 640 tensors (SmolLM2-135M has 272,
// a 1.3B LLaMA about 220); only larger sets are split into several launches. Threads read the
// table through the constant cache: the lookups of a warp almost always hit the same tensor.
//
// Seeds. The K (seed, alpha) pairs are read from device tensors (no host synchronisation) into
// shared memory in chunks of kSeedChunk; each thread loops over them with its 8 accumulators in
// registers, summing in order k = 0..K-1 (docs/stream-spec.md#accumulation). The float32 result
// then goes through the shared conversion rule of fedkseed/dtypes.h (docs/stream-spec.md#conversion).
//
// Mask (docs/stream-spec.md#magnitude-mask). A masked replay reads each element's bit from the
// mask (tensor t's bits start at byte mask_base[t]) and writes only the selected elements; a unit
// with none selected computes nothing. magnitude_mask builds the mask with one thread per byte
// (8 elements) over a table of all tensors, as the replay's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include <fedkseed/dtypes.h>
#include <fedkseed/mask.h>
#include <fedkseed/stream.h>

namespace fedkseed {
namespace cuda {
namespace {

namespace S = fedkseed::stream;
namespace C = fedkseed::convert;

constexpr int kUnit = 8;
constexpr int kUnitShift = 3;
constexpr int kThreads = 256;
constexpr int kSeedChunk = 1024;  // 12 KiB of shared memory
constexpr int kSignGroup = 16;    // threads (units) per Rademacher block: 128 signs / kUnit
constexpr int kSignGroupShift = 4;
static_assert(kSignGroup * kUnit == (1 << S::kRademacherBlockShift), "a sign group is one Philox block");
#if CUDART_VERSION >= 12010
constexpr int kMaxTensors = 640;
constexpr size_t kParamLimit = 32764;
#else
constexpr int kMaxTensors = 80;
constexpr size_t kParamLimit = 4096;
#endif

using fedkseed::DType;  // the one dtype table (fedkseed/dtypes.h)

struct Table {
  uint64_t units;                       // units of this launch
  int count;                            // tensors of this launch
  void* ptr[kMaxTensors];
  uint64_t offset[kMaxTensors];         // global index of element 0
  uint64_t numel[kMaxTensors];
  uint64_t unit_end[kMaxTensors];       // inclusive prefix sum of units per tensor
  float decay[kMaxTensors];
  uint64_t mask_base[kMaxTensors];      // first byte of the tensor's bits in a masked replay's mask
  uint8_t dtype[kMaxTensors];
  uint8_t vector_ok[kMaxTensors];       // offset % 8 == 0 and 16-byte aligned storage
};
// The table and the kernel's other parameters (5 pointers and K, 48 bytes) share the limit.
static_assert(sizeof(Table) + 48 <= kParamLimit, "kernel parameter table exceeds the launch limit");

// First unit of a tensor at global offset `offset`: Rademacher units start on a block boundary.
template <uint32_t kTag>
__host__ __device__ __forceinline__ uint64_t first_unit(uint64_t offset) {
  return kTag == S::kTagRademacher ? (offset >> S::kRademacherBlockShift) << kSignGroupShift : offset >> kUnitShift;
}

// Units of a tensor: its 8-element units, padded to whole Rademacher blocks for Rademacher.
template <uint32_t kTag>
__host__ __device__ __forceinline__ uint64_t unit_count(uint64_t offset, uint64_t numel) {
  const uint64_t last = offset + numel - 1;
  const uint64_t end = kTag == S::kTagRademacher ? ((last >> S::kRademacherBlockShift) + 1) << kSignGroupShift
                                                 : (last >> kUnitShift) + 1;
  return end - first_unit<kTag>(offset);
}

// z(seed, g0 + e) for e < 8, g0 a multiple of 8 (Gaussian: two whole Philox blocks).
__device__ __forceinline__ void gaussian_unit(uint64_t seed, uint64_t g0, float z[kUnit]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const S::Words w = S::philox(seed, (g0 >> S::kGaussianBlockShift) + h, S::kTagGaussian);
    const S::Pair a = S::gaussian_pair_from_words(w.w[0], w.w[1]);
    const S::Pair b = S::gaussian_pair_from_words(w.w[2], w.w[3]);
    z[4 * h + 0] = a.even;
    z[4 * h + 1] = a.odd;
    z[4 * h + 2] = b.even;
    z[4 * h + 3] = b.odd;
  }
}

__device__ __forceinline__ float from_storage(uint16_t h, DType dtype) {
  return dtype == DType::kBFloat16 ? C::bf16_to_f32(h) : C::f16_to_f32(h);
}
__device__ __forceinline__ uint16_t to_storage(float y, DType dtype) {
  return dtype == DType::kBFloat16 ? C::f32_to_bf16(y) : C::f32_to_f16(y);
}

__device__ __forceinline__ float load_element(const void* base, uint64_t j, DType dtype) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[j];
  return from_storage(static_cast<const uint16_t*>(base)[j], dtype);
}

__device__ __forceinline__ void store_element(void* base, uint64_t j, DType dtype, float y) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[j] = y;
  } else {
    static_cast<uint16_t*>(base)[j] = to_storage(y, dtype);
  }
}

__device__ __forceinline__ void load_vector(const void* base, uint64_t j, DType dtype, float x[kUnit]) {
  if (dtype == DType::kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + j);
    const float4 a = p[0], b = p[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + j);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < kUnit; ++e) {
      const uint16_t h = static_cast<uint16_t>(words[e >> 1] >> (16 * (e & 1)));
      x[e] = from_storage(h, dtype);
    }
  }
}

__device__ __forceinline__ void store_vector(void* base, uint64_t j, DType dtype, const float y[kUnit]) {
  if (dtype == DType::kFloat32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + j);
    p[0] = make_float4(y[0], y[1], y[2], y[3]);
    p[1] = make_float4(y[4], y[5], y[6], y[7]);
  } else {
    uint32_t words[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float lo = y[2 * q], hi = y[2 * q + 1];
      const uint32_t a = to_storage(lo, dtype);
      const uint32_t b = to_storage(hi, dtype);
      words[q] = a | (b << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + j) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// The tensor owning unit w: first t with unit_end[t] > w (binary search in the parameter table).
__device__ __forceinline__ int find_tensor(const Table& table, uint64_t w) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (table.unit_end[mid] > w) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// kNoise: write z(seeds[0], i) (float32 tables only); otherwise replay the K seeds.
template <bool kNoise, uint32_t kTag>
__global__ void __launch_bounds__(kThreads) replay_kernel(
    const __grid_constant__ Table table, const int64_t* __restrict__ seeds,
    const float* __restrict__ alphas, int64_t k_total, const int64_t* __restrict__ rounding_seed,
    const uint8_t* __restrict__ mask) {
  __shared__ uint64_t s_seed[kSeedChunk];
  __shared__ float s_alpha[kSeedChunk];
  // Rademacher: per half-warp, the 4 words of its block for up to kSignGroup seeds.
  __shared__ uint32_t s_words[kThreads / kSignGroup][kSignGroup][4];
  const int64_t chunks = kNoise ? 1 : (k_total + kSeedChunk - 1) / kSeedChunk;
  auto load_chunk = [&](int64_t c) {
    const int64_t first = c * kSeedChunk;
    const int64_t n = kNoise ? 1 : min(static_cast<int64_t>(kSeedChunk), k_total - first);
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      s_seed[k] = static_cast<uint64_t>(seeds[first + k]);
      s_alpha[k] = kNoise ? 1.0f : alphas[first + k];
    }
  };
  if (chunks == 1) {
    load_chunk(0);
    __syncthreads();
  }
  const bool rounding = !kNoise && rounding_seed != nullptr;
  const uint64_t round_seed = rounding ? static_cast<uint64_t>(*rounding_seed) : 0;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  // Every thread runs the same number of rounds, so the chunk barriers below are uniform.
  for (uint64_t base = static_cast<uint64_t>(blockIdx.x) * blockDim.x; base < table.units; base += stride) {
    const uint64_t w = base + threadIdx.x;
    const bool active = w < table.units;
    const int t = active ? find_tensor(table, w) : 0;
    const uint64_t offset = table.offset[t], numel = table.numel[t];
    const uint64_t unit_begin = t == 0 ? 0 : table.unit_end[t - 1];
    const uint64_t g0 = (first_unit<kTag>(offset) + (w - unit_begin)) << kUnitShift;
    const uint64_t j0 = g0 - offset;  // wraps below the tensor: then the element checks j < numel apply
    // Bit e: element j0 + e is in the tensor and (in a masked replay) selected.
    uint32_t chosen = 0;
    if (active) {
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        const uint64_t j = j0 + e;
        if (j < numel && (mask == nullptr || mask::selected(mask + table.mask_base[t], j))) chosen |= 1u << e;
      }
    }
    float acc[kUnit];
#pragma unroll
    for (int e = 0; e < kUnit; ++e) acc[e] = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      if (chunks > 1) {
        __syncthreads();
        load_chunk(c);
        __syncthreads();
      }
      const int n = kNoise ? 1 : static_cast<int>(min(static_cast<int64_t>(kSeedChunk), k_total - c * kSeedChunk));
      if (kTag == S::kTagGaussian) {
        if (chosen == 0) continue;
        for (int k = 0; k < n; ++k) {
          float z[kUnit];
          gaussian_unit(s_seed[k], g0, z);
          const float alpha = s_alpha[k];
#pragma unroll
          for (int e = 0; e < kUnit; ++e) {
            acc[e] = kNoise ? z[e] : S::fks_add(acc[e], S::fks_mul(alpha, z[e]));
          }
        }
      } else {
        // Every lane takes part (whole half-warps are active or padding alike, since units come
        // in whole blocks; the warp barriers need all 32 lanes). alpha * (+-1) is exactly +-alpha.
        const int group = threadIdx.x >> kSignGroupShift, r = threadIdx.x & (kSignGroup - 1);
        const uint64_t block = g0 >> S::kRademacherBlockShift;
        const uint32_t word = static_cast<uint32_t>(g0 & 127u) >> 5, shift = static_cast<uint32_t>(g0 & 31u);
        for (int k0 = 0; k0 < n; k0 += kSignGroup) {
          const int m = min(kSignGroup, n - k0);
          if (r < m) {
            const S::Words w4 = S::philox(s_seed[k0 + r], block, S::kTagRademacher);
#pragma unroll
            for (int q = 0; q < 4; ++q) s_words[group][r][q] = w4.w[q];
          }
          __syncwarp();
          for (int j = 0; j < m; ++j) {
            const uint32_t bits = s_words[group][j][word] >> shift;
            const float alpha = s_alpha[k0 + j];
#pragma unroll
            for (int e = 0; e < kUnit; ++e) {
              const bool plus = (bits >> e) & 1u;
              acc[e] = kNoise ? (plus ? 1.0f : -1.0f) : S::fks_add(acc[e], plus ? alpha : -alpha);
            }
          }
          __syncwarp();
        }
      }
    }
    if (chosen == 0) continue;

    void* data = table.ptr[t];
    const DType dtype = static_cast<DType>(table.dtype[t]);
    const bool whole = chosen == (1u << kUnit) - 1;  // every element in the tensor and selected
    float y[kUnit];
    if (kNoise) {
#pragma unroll
      for (int e = 0; e < kUnit; ++e) y[e] = acc[e];
    } else {
      if (whole && table.vector_ok[t]) {
        load_vector(data, j0, dtype, y);
      } else {
#pragma unroll
        for (int e = 0; e < kUnit; ++e) y[e] = (chosen >> e) & 1u ? load_element(data, j0 + e, dtype) : 0.0f;
      }
      const float d = table.decay[t];
      uint32_t words[kUnit];
      if (rounding && dtype != DType::kFloat32) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const S::Words r = S::philox(round_seed, (g0 >> S::kRoundingBlockShift) + h, S::kTagRounding);
#pragma unroll
          for (int q = 0; q < 4; ++q) words[4 * h + q] = r.w[q];
        }
      }
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        const float x = y[e];
        float v = S::fks_add(d != 1.0f ? S::fks_mul(x, d) : x, acc[e]);
        v = C::settle_nan(v, x);
        if (rounding && dtype == DType::kBFloat16) v = S::stochastic_round_bf16(v, words[e]);
        if (rounding && dtype == DType::kFloat16) v = S::stochastic_round_fp16(v, words[e]);
        y[e] = v;
      }
    }
    if (whole && table.vector_ok[t]) {
      store_vector(data, j0, dtype, y);
    } else {
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        if ((chosen >> e) & 1u) store_element(data, j0 + e, dtype, y[e]);
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// Host side.
struct Entry {
  void* ptr;
  uint64_t offset, numel;
  float decay;
  DType dtype;
  uint64_t mask_base;  // first byte of the tensor's bits in the mask (masked replay)
};

DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "fedkseed: params must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Blocks to fill the device once (grid-stride beyond that), cached per device. The cache is
// atomic: concurrent first calls may both query the device, and both store the same value.
int grid_limit(int device) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached] = {};
  if (device >= 0 && device < kCached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int blocks = sms * std::max(1, threads_per_sm / kThreads);
  if (device >= 0 && device < kCached) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <bool kNoise>
void launch(const std::vector<Entry>& entries, int64_t tag, const int64_t* seeds, const float* alphas,
            int64_t k, const int64_t* rounding_seed, const uint8_t* mask, int device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int limit = grid_limit(device);
  for (size_t start = 0; start < entries.size(); start += kMaxTensors) {
    Table table{};
    uint64_t units = 0;
    const size_t end = std::min(entries.size(), start + kMaxTensors);
    for (size_t i = start; i < end; ++i) {
      const Entry& e = entries[i];
      const int t = static_cast<int>(i - start);
      units += tag == S::kTagGaussian ? unit_count<S::kTagGaussian>(e.offset, e.numel)
                                      : unit_count<S::kTagRademacher>(e.offset, e.numel);
      table.ptr[t] = e.ptr;
      table.offset[t] = e.offset;
      table.numel[t] = e.numel;
      table.unit_end[t] = units;
      table.decay[t] = e.decay;
      table.mask_base[t] = e.mask_base;
      table.dtype[t] = static_cast<uint8_t>(e.dtype);
      table.vector_ok[t] = (e.offset % kUnit == 0) && (reinterpret_cast<uintptr_t>(e.ptr) % 16 == 0);
    }
    table.count = static_cast<int>(end - start);
    table.units = units;
    const uint64_t wanted = (units + kThreads - 1) / kThreads;
    const int blocks = static_cast<int>(std::min<uint64_t>(wanted, static_cast<uint64_t>(limit)));
    if (tag == S::kTagGaussian) {
      replay_kernel<kNoise, S::kTagGaussian>
          <<<blocks, kThreads, 0, stream>>>(table, seeds, alphas, k, rounding_seed, mask);
    } else {
      replay_kernel<kNoise, S::kTagRademacher>
          <<<blocks, kThreads, 0, stream>>>(table, seeds, alphas, k, rounding_seed, mask);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_dist(int64_t dist) {
  TORCH_CHECK(dist == S::kTagGaussian || dist == S::kTagRademacher,
              "fedkseed: dist must be 0 (gaussian) or 1 (rademacher), got ", dist);
}

void replay_cuda(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> decay,
                 const at::Tensor& seeds, const at::Tensor& alphas, int64_t dist,
                 const std::optional<at::Tensor>& rounding_seed, const std::optional<at::Tensor>& mask) {
  check_dist(dist);
  TORCH_CHECK(offsets.size() == params.size(), "fedkseed: offsets has ", offsets.size(),
              " entries for ", params.size(), " params");
  TORCH_CHECK(decay.empty() || decay.size() == params.size(), "fedkseed: decay has ", decay.size(),
              " entries for ", params.size(), " params");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.device() == device && seeds.is_contiguous(),
              "fedkseed: seeds must be a contiguous int64 tensor on ", device);
  TORCH_CHECK(alphas.scalar_type() == at::kFloat && alphas.device() == device && alphas.is_contiguous(),
              "fedkseed: alphas must be a contiguous float32 tensor on ", device);
  TORCH_CHECK(seeds.numel() == alphas.numel(), "fedkseed: seeds and alphas differ in length: ",
              seeds.numel(), " vs ", alphas.numel());
  const int64_t* round_ptr = nullptr;
  if (rounding_seed.has_value()) {
    const at::Tensor& r = *rounding_seed;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.device() == device && r.numel() == 1,
                "fedkseed: rounding_seed must be one int64 on ", device);
    round_ptr = r.data_ptr<int64_t>();
  }
  std::vector<Entry> entries;
  entries.reserve(params.size());
  uint64_t mask_base = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device() == device, "fedkseed: params[", t, "] is on ", p.device(), ", not ", device);
    TORCH_CHECK(p.is_contiguous(), "fedkseed: params[", t, "] is not contiguous");
    const DType code = dtype_code(p);
    const uint64_t base = mask_base;
    mask_base += static_cast<uint64_t>(mask::bytes_for(p.numel()));
    if (p.numel() == 0) continue;
    entries.push_back(Entry{p.data_ptr(), static_cast<uint64_t>(offsets[t]), static_cast<uint64_t>(p.numel()),
                            decay.empty() ? 1.0f : static_cast<float>(decay[t]), code, base});
  }
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kByte && m.device() == device && m.is_contiguous(),
                "fedkseed: mask must be a contiguous uint8 tensor on ", device);
    TORCH_CHECK(static_cast<uint64_t>(m.numel()) == mask_base, "fedkseed: mask has ", m.numel(),
                " bytes, the params need ", mask_base);
    mask_ptr = m.data_ptr<uint8_t>();
  }
  if (entries.empty() || (seeds.numel() == 0 && decay.empty())) return;
  const c10::cuda::CUDAGuard guard(device);
  launch<false>(entries, dist, seeds.data_ptr<int64_t>(), alphas.data_ptr<float>(), seeds.numel(), round_ptr,
                mask_ptr, device.index());
}

void noise_cuda(at::Tensor out, const at::Tensor& seed, int64_t offset, int64_t dist) {
  check_dist(dist);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "fedkseed: out must be contiguous float32");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == out.device(),
              "fedkseed: seed must be one int64 on ", out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const std::vector<Entry> entries{
      Entry{out.data_ptr(), static_cast<uint64_t>(offset), static_cast<uint64_t>(out.numel()), 1.0f, DType::kFloat32, 0}};
  launch<true>(entries, dist, seed.data_ptr<int64_t>(), nullptr, 1, nullptr, nullptr, out.device().index());
}

// --------------------------------------------------------------------------------------------
// magnitude_mask: one thread per mask byte (8 elements of one tensor), over a table of tensors.
struct MaskTable {
  uint64_t bytes;                      // mask bytes of this launch
  int count;
  const void* ptr[kMaxTensors];
  uint64_t numel[kMaxTensors];
  uint64_t byte_end[kMaxTensors];      // inclusive prefix sum of bytes per tensor
  int64_t key[kMaxTensors];            // mask::key of the tensor's threshold
  uint8_t dtype[kMaxTensors];
};
static_assert(sizeof(MaskTable) + 8 <= kParamLimit, "mask table exceeds the launch limit");

__global__ void __launch_bounds__(kThreads) mask_kernel(const __grid_constant__ MaskTable table, uint8_t* __restrict__ out) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t w = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < table.bytes; w += stride) {
    int lo = 0, hi = table.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (table.byte_end[mid] > w) hi = mid; else lo = mid + 1;
    }
    const uint64_t first = lo == 0 ? 0 : table.byte_end[lo - 1];
    out[w] = mask::mask_byte(table.ptr[lo], static_cast<int64_t>(table.numel[lo]), static_cast<DType>(table.dtype[lo]),
                             table.key[lo], static_cast<int64_t>(w - first));
  }
}

at::Tensor magnitude_mask_cuda(at::TensorList params, at::ArrayRef<double> thresholds) {
  TORCH_CHECK(thresholds.size() == params.size(), "fedkseed: thresholds has ", thresholds.size(), " entries for ",
              params.size(), " params");
  TORCH_CHECK(!params.empty(), "fedkseed: magnitude_mask needs at least one tensor");
  const at::Device device = params[0].device();
  uint64_t total = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device() == device, "fedkseed: params[", t, "] is on ", p.device(), ", not ", device);
    TORCH_CHECK(p.is_contiguous(), "fedkseed: params[", t, "] is not contiguous");
    dtype_code(p);
    TORCH_CHECK(!std::isnan(thresholds[t]), "fedkseed: thresholds[", t, "] is NaN");
    total += static_cast<uint64_t>(mask::bytes_for(p.numel()));
  }
  at::Tensor out = at::empty({static_cast<int64_t>(total)}, params[0].options().dtype(at::kByte));
  if (total == 0) return out;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int limit = grid_limit(device.index());
  uint8_t* base = out.data_ptr<uint8_t>();
  for (size_t start = 0; start < params.size(); start += kMaxTensors) {
    MaskTable table{};
    uint64_t bytes = 0;
    const size_t end = std::min(params.size(), start + kMaxTensors);
    for (size_t i = start; i < end; ++i) {
      const int t = static_cast<int>(i - start);
      bytes += static_cast<uint64_t>(mask::bytes_for(params[i].numel()));
      table.ptr[t] = params[i].data_ptr();
      table.numel[t] = static_cast<uint64_t>(params[i].numel());
      table.byte_end[t] = bytes;
      table.key[t] = mask::key(static_cast<float>(thresholds[i]));
      table.dtype[t] = static_cast<uint8_t>(dtype_code(params[i]));
    }
    table.count = static_cast<int>(end - start);
    table.bytes = bytes;
    if (bytes > 0) {
      const uint64_t wanted = (bytes + kThreads - 1) / kThreads;
      const int blocks = static_cast<int>(std::min<uint64_t>(wanted, static_cast<uint64_t>(limit)));
      mask_kernel<<<blocks, kThreads, 0, stream>>>(table, base);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    base += bytes;
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fedkseed

TORCH_LIBRARY_IMPL(fedkseed, CUDA, m) {
  m.impl("replay_", &fedkseed::cuda::replay_cuda);
  m.impl("noise_", &fedkseed::cuda::noise_cuda);
  m.impl("magnitude_mask", &fedkseed::cuda::magnitude_mask_cuda);
}
