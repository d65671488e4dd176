// CUDA kernel of fedkseed::project (docs/stream-spec.md#projection): p_k = sum_i x_i z(s_k, i),
// returned as the exact accumulator of the chunk partials (csrc/include/fedkseed/project.h).
//
// Staging. The parameters are first widened to float32 (exact) into one buffer of whole chunks of
// 4096 global indices, with ATen copies on the device: only the chunks that hold an element, absent
// positions 0. A chunk shared by several tensors (or dtypes) is then one contiguous row.
//
// Work split. One block of 256 threads per chunk; thread t holds the chunk's elements 16t .. 16t+15
// in registers (four Gaussian Philox blocks) and loops over the seeds. For each seed it forms the
// 16 float64 products (exact) and sums them by the spec's pairwise tree: 4 levels in the thread,
// 5 across the warp (shuffle-down by 1, 2, 4, 8, 16: lane l adds lane l + s, so each level pairs
// neighbours in index order) and 3 across the 8 warps through shared memory. Seeds go in batches
// of kSeedBatch, so one barrier pair serves a batch; thread j of the block then finishes seed j of
// the batch and adds its chunk partial to the accumulator with integer atomics (any order of
// integer additions gives the same sums). Float64 arithmetic is __dmul_rn/__dadd_rn, never
// contracted (and the build passes -fmad=false).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include <fedkseed/project.h>
#include <fedkseed/stream.h>

namespace fedkseed {
namespace cuda {
namespace {

namespace S = fedkseed::stream;
namespace P = fedkseed::project;

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(P::kChunk) / kThreads;  // 16 elements
constexpr int kWarps = kThreads / 32;
constexpr int kSeedBatch = 32;
static_assert(kPerThread == 16, "the in-thread tree below has 4 levels");
static_assert(kWarps == 8, "the cross-warp tree below has 3 levels");

// z(seed, g0 + e) for the 16 elements e of a thread, g0 a multiple of 16.
template <uint32_t kTag>
__device__ __forceinline__ void noise16(uint64_t seed, uint64_t g0, float z[kPerThread]) {
  if (kTag == S::kTagGaussian) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const S::Words w = S::philox(seed, (g0 >> S::kGaussianBlockShift) + h, S::kTagGaussian);
      const S::Pair a = S::gaussian_pair_from_words(w.w[0], w.w[1]);
      const S::Pair b = S::gaussian_pair_from_words(w.w[2], w.w[3]);
      z[4 * h + 0] = a.even;
      z[4 * h + 1] = a.odd;
      z[4 * h + 2] = b.even;
      z[4 * h + 3] = b.odd;
    }
  } else {
    const S::Words w = S::philox(seed, g0 >> S::kRademacherBlockShift, S::kTagRademacher);
    const uint32_t bit = static_cast<uint32_t>(g0 & 127u);  // 16 bits inside one word
    const uint32_t bits = w.w[bit >> 5] >> (bit & 31u);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) z[e] = ((bits >> e) & 1u) ? 1.0f : -1.0f;
  }
}

template <uint32_t kTag>
__global__ void __launch_bounds__(kThreads) project_kernel(const float* __restrict__ xs,
                                                           const int64_t* __restrict__ chunk_first,
                                                           const int64_t* __restrict__ seeds, int64_t k_total,
                                                           unsigned long long* __restrict__ acc) {
  __shared__ double s_warp[kSeedBatch][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint64_t g0 = static_cast<uint64_t>(chunk_first[blockIdx.x]) + static_cast<uint64_t>(threadIdx.x) * kPerThread;
  double x[kPerThread];
  const float4* row = reinterpret_cast<const float4*>(xs + blockIdx.x * P::kChunk + threadIdx.x * kPerThread);
#pragma unroll
  for (int q = 0; q < kPerThread / 4; ++q) {
    const float4 v = row[q];
    x[4 * q + 0] = v.x;
    x[4 * q + 1] = v.y;
    x[4 * q + 2] = v.z;
    x[4 * q + 3] = v.w;
  }
  for (int64_t k0 = 0; k0 < k_total; k0 += kSeedBatch) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kSeedBatch), k_total - k0));
    for (int j = 0; j < n; ++j) {
      float z[kPerThread];
      noise16<kTag>(static_cast<uint64_t>(seeds[k0 + j]), g0, z);
      double v[kPerThread];
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) v[e] = __dmul_rn(x[e], static_cast<double>(z[e]));  // exact
#pragma unroll
      for (int width = kPerThread / 2; width >= 1; width >>= 1) {
#pragma unroll
        for (int m = 0; m < width; ++m) v[m] = __dadd_rn(v[2 * m], v[2 * m + 1]);
      }
      double s = v[0];
#pragma unroll
      for (int step = 1; step < 32; step <<= 1) s = __dadd_rn(s, __shfl_down_sync(0xFFFFFFFFu, s, step));
      if (lane == 0) s_warp[j][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < n) {
      double* w = s_warp[threadIdx.x];
      const double q = __dadd_rn(__dadd_rn(__dadd_rn(w[0], w[1]), __dadd_rn(w[2], w[3])),
                                 __dadd_rn(__dadd_rn(w[4], w[5]), __dadd_rn(w[6], w[7])));
      unsigned long long* a = acc + (k0 + threadIdx.x) * P::kWidth;
      P::add_exact(q, [a](int j, int64_t value) { atomicAdd(a + j, static_cast<unsigned long long>(value)); });
    }
    __syncthreads();
  }
}

at::Tensor project_cuda(at::TensorList params, at::IntArrayRef offsets, const at::Tensor& seeds, int64_t dist) {
  TORCH_CHECK(dist == S::kTagGaussian || dist == S::kTagRademacher,
              "fedkseed: dist must be 0 (gaussian) or 1 (rademacher), got ", dist);
  TORCH_CHECK(offsets.size() == params.size(), "fedkseed: offsets has ", offsets.size(), " entries for ",
              params.size(), " params");
  // The seeds' device: a rank of a sharded set may hold no tensor of its own to project.
  const at::Device device = seeds.device();
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "fedkseed: seeds must be an int64 tensor, got ", seeds.scalar_type());
  const int64_t k = seeds.numel();
  // The chunks holding an element, in order; each tensor's chunks are consecutive among them.
  std::vector<uint64_t> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device() == device, "fedkseed: params[", t, "] is on ", p.device(), ", not ", device);
    TORCH_CHECK(p.is_contiguous(), "fedkseed: params[", t, "] is not contiguous");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "fedkseed: params must be float32, bfloat16 or float16, got ", p.scalar_type());
    if (p.numel() == 0) continue;
    const uint64_t first = static_cast<uint64_t>(offsets[t]), count = static_cast<uint64_t>(p.numel());
    TORCH_CHECK(first == 0 || count <= 0 - first, "fedkseed: params[", t, "] leaves [0, 2^64)");
    for (uint64_t c = first >> P::kChunkShift; c <= (first + count - 1) >> P::kChunkShift; ++c) chunks.push_back(c);
  }
  std::sort(chunks.begin(), chunks.end());
  chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
  TORCH_CHECK(static_cast<int64_t>(chunks.size()) < P::kMaxChunks, "fedkseed: project: ", chunks.size(),
              " chunks exceed the accumulator's limit of 2^31 per call");
  at::Tensor acc = at::zeros({k, P::kWidth}, at::TensorOptions().dtype(at::kLong).device(device));
  if (k == 0 || chunks.empty()) return acc;
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(chunks.size());
  at::Tensor xs = at::zeros({n * P::kChunk}, at::TensorOptions().dtype(at::kFloat).device(device));
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    if (p.numel() == 0) continue;
    const uint64_t first = static_cast<uint64_t>(offsets[t]);
    const int64_t row = std::lower_bound(chunks.begin(), chunks.end(), first >> P::kChunkShift) - chunks.begin();
    const int64_t start = row * P::kChunk + static_cast<int64_t>(first & (P::kChunk - 1));
    xs.narrow(0, start, p.numel()).copy_(p.reshape(-1).to(at::kFloat));  // exact widening
  }
  std::vector<int64_t> first_index(n);
  for (int64_t i = 0; i < n; ++i) first_index[i] = static_cast<int64_t>(chunks[i] << P::kChunkShift);
  const at::Tensor chunk_first =
      at::tensor(first_index, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/false);
  const at::Tensor seeds_c = seeds.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto* out = reinterpret_cast<unsigned long long*>(acc.data_ptr<int64_t>());
  if (dist == S::kTagGaussian) {
    project_kernel<S::kTagGaussian><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        xs.data_ptr<float>(), chunk_first.data_ptr<int64_t>(), seeds_c.data_ptr<int64_t>(), k, out);
  } else {
    project_kernel<S::kTagRademacher><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        xs.data_ptr<float>(), chunk_first.data_ptr<int64_t>(), seeds_c.data_ptr<int64_t>(), k, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return acc;
}

}  // namespace
}  // namespace cuda
}  // namespace fedkseed

TORCH_LIBRARY_IMPL(fedkseed, CUDA, m) { m.impl("project", &fedkseed::cuda::project_cuda); }
