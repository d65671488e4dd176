// CPU implementations of fedkseed::replay_, fedkseed::noise_, fedkseed::project and
// fedkseed::magnitude_mask (schemas in csrc/ops.cpp).
//
// One call walks every tensor: the concatenated index space is cut into chunks (pieces of one
// tensor, aligned to kChunk in global index so no Philox block or SIMD group is split twice) and
// torch's thread pool runs them, so small tensors never serialise. The kernel body runs in the
// widest instruction set this CPU has, chosen once; FEDKSEED_CPU_ISA=scalar|avx2|avx512 (read
// once) caps it and fedkseed::set_cpu_isa switches it (tests force each path). Every path gives the same bits as fedkseed/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <fedkseed/project.h>
#include <fedkseed/stream.h>

#include "cpu_kernel.h"

namespace fedkseed {
namespace cpu {
namespace {

// Elements per chunk (a multiple of every group and tile: 128 Rademacher bits x 32 blocks).
constexpr int64_t kChunk = int64_t{1} << 15;

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  if (__builtin_cpu_supports("avx2") && f16c) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa parse_isa(const char* name, const char* what) {
  if (std::strcmp(name, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(name, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(name, "avx512") == 0) return Isa::kAvx512;
  TORCH_CHECK(false, what, " must be scalar, avx2 or avx512, got '", name, "'");
}

Isa capped(Isa want, Isa best) { return static_cast<int>(want) < static_cast<int>(best) ? want : best; }

Isa best_isa() {
  static const Isa best = detect_isa();
  return best;
}

// The path to run: the best the CPU supports, capped by FEDKSEED_CPU_ISA, both read once (a
// function-local static: thread-safe, and retried if a bad FEDKSEED_CPU_ISA made it throw).
// set_cpu_isa() changes it afterwards (tests force each path in one process).
std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{[] {
    const char* env = std::getenv("FEDKSEED_CPU_ISA");
    const Isa want = env == nullptr || *env == '\0' ? best_isa() : parse_isa(env, "FEDKSEED_CPU_ISA");
    return static_cast<int>(capped(want, best_isa()));
  }()};
  return slot;
}

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

using ChunkFn = void (*)(const Job&, const Chunk&, uint32_t*);

ChunkFn chunk_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return run_chunk_avx512;
    case Isa::kAvx2:
      return run_chunk_avx2;
    default:
      return run_chunk_scalar;
  }
}

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Cut elements [0, count) of a tensor whose first element has global index `global` into chunks
// that end on multiples of kChunk in global index (unsigned arithmetic: global + count <= 2^64).
// `mask`: the tensor's mask bits for a masked replay, else nullptr.
void add_chunks(std::vector<Chunk>& chunks, void* data, size_t elem_size, uint64_t global, int64_t count,
                DType dtype, bool apply_decay, float decay, const uint8_t* mask = nullptr) {
  int64_t j = 0;
  while (j < count) {
    const uint64_t g = global + static_cast<uint64_t>(j);
    const int64_t room = kChunk - static_cast<int64_t>(g & static_cast<uint64_t>(kChunk - 1));
    const int64_t n = count - j < room ? count - j : room;
    chunks.push_back(Chunk{static_cast<char*>(data) + j * elem_size, g, n, dtype, apply_decay, decay, mask, j});
    j += n;
  }
}

// The bytes a mask over these params has (docs/stream-spec.md#magnitude-mask).
int64_t mask_bytes(at::TensorList params) {
  int64_t total = 0;
  for (const at::Tensor& p : params) total += mask::bytes_for(p.numel());
  return total;
}

void check_mask(const at::Tensor& m, at::TensorList params) {
  TORCH_CHECK(m.device().is_cpu(), "mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kByte, "mask must be uint8, got ", m.scalar_type());
  TORCH_CHECK(m.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK(m.numel() == mask_bytes(params), "mask has ", m.numel(), " bytes, the params need ",
              mask_bytes(params));
}

void check_dist(int64_t dist) {
  TORCH_CHECK(dist == stream::kTagGaussian || dist == stream::kTagRademacher,
              "dist must be 0 (gaussian) or 1 (rademacher), got ", dist);
}

at::Tensor host_seeds(const at::Tensor& seeds, const char* what) {
  TORCH_CHECK(seeds.device().is_cpu(), what, " must be a CPU tensor, got ", seeds.device());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, what, " must be int64 (two's complement of uint64), got ",
              seeds.scalar_type());
  return seeds.contiguous();
}

// Chunks go to torch's intra-op thread pool (at::parallel_for: the runtime and thread count
// torch itself uses, never a second OpenMP runtime). A chunk's result does not depend on the
// thread that runs it, so the bits are the same for any thread count.
void run(const Job& job, const std::vector<Chunk>& chunks) {
  const Isa isa = active_isa();
  const ChunkFn fn = chunk_fn(isa);
  const int64_t words = scratch_words(isa, job);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> scratch(static_cast<size_t>(words));
    for (int64_t i = begin; i < end; ++i) fn(job, chunks[i], scratch.data());
  });
}

void replay_cpu(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> decay,
                const at::Tensor& seeds, const at::Tensor& alphas, int64_t dist,
                const std::optional<at::Tensor>& rounding_seed, const std::optional<at::Tensor>& mask) {
  // Every check comes before the first write: a call updates all tensors or none.
  check_dist(dist);
  TORCH_CHECK(offsets.size() == params.size(), "offsets has ", offsets.size(), " entries for ", params.size(),
              " params");
  TORCH_CHECK(decay.empty() || decay.size() == params.size(), "decay has ", decay.size(), " entries for ",
              params.size(), " params (want 0 or one per param)");
  const at::Tensor seeds_h = host_seeds(seeds, "seeds");
  TORCH_CHECK(alphas.device().is_cpu(), "alphas must be a CPU tensor, got ", alphas.device());
  TORCH_CHECK(alphas.scalar_type() == at::kFloat, "alphas must be float32, got ", alphas.scalar_type());
  TORCH_CHECK(alphas.numel() == seeds_h.numel(), "seeds and alphas differ in length: ", seeds_h.numel(), " vs ",
              alphas.numel());
  std::vector<DType> dtypes;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "params[", t, "] is on ", p.device(), "; the CPU kernel takes CPU tensors");
    TORCH_CHECK(p.is_contiguous(), "params[", t, "] is not contiguous");
    dtypes.push_back(dtype_of(p, "params"));
  }
  if (mask.has_value()) check_mask(*mask, params);
  Job job{};
  job.tag = static_cast<uint32_t>(dist);
  if (rounding_seed.has_value()) {
    const at::Tensor r = host_seeds(*rounding_seed, "rounding_seed");
    TORCH_CHECK(r.numel() == 1, "rounding_seed must hold one seed, got ", r.numel());
    job.stochastic_rounding = true;
    job.rounding_seed = seed_keys(static_cast<uint64_t>(r.data_ptr<int64_t>()[0]));
  }
  const int64_t k = seeds_h.numel();
  std::vector<SeedKeys> seed_values(k);
  std::vector<float> alpha_values(k), neg_alpha_values(k);
  const at::Tensor alphas_h = alphas.contiguous();
  for (int64_t i = 0; i < k; ++i) {
    seed_values[i] = seed_keys(static_cast<uint64_t>(seeds_h.data_ptr<int64_t>()[i]));
    alpha_values[i] = alphas_h.data_ptr<float>()[i];
    neg_alpha_values[i] = -alpha_values[i];
  }
  job.seeds = seed_values.data();
  job.alphas = alpha_values.data();
  job.neg_alphas = neg_alpha_values.data();
  job.num_seeds = k;

  std::vector<Chunk> chunks;
  const uint8_t* bits = mask.has_value() ? mask->data_ptr<uint8_t>() : nullptr;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    const float d = decay.empty() ? 1.0f : static_cast<float>(decay[t]);
    add_chunks(chunks, p.data_ptr(), p.element_size(), static_cast<uint64_t>(offsets[t]), p.numel(), dtypes[t],
               d != 1.0f, d, bits);
    if (bits != nullptr) bits += mask::bytes_for(p.numel());
  }
  run(job, chunks);
}

// Bytes [b0, b1) of one tensor's mask; the dtype is a template argument so the element loop has
// no branch on it.
template <DType D>
void build_mask(const void* data, int64_t numel, int64_t key, int64_t b0, int64_t b1, uint8_t* out) {
  const int64_t whole = std::min(b1, numel >> 3);  // bytes whose 8 elements all exist
  for (int64_t b = b0; b < whole; ++b) {
    uint32_t byte = 0;
    for (int e = 0; e < 8; ++e) {
      byte |= static_cast<uint32_t>(static_cast<int64_t>(mask::magnitude(data, 8 * b + e, D)) <= key) << e;
    }
    out[b] = static_cast<uint8_t>(byte);
  }
  for (int64_t b = std::max(b0, whole); b < b1; ++b) out[b] = mask::mask_byte(data, numel, D, key, b);
}

// docs/stream-spec.md#magnitude-mask: one bit per element, |x| <= thresholds[t], each tensor's bits
// from a byte boundary. Pieces of kChunk elements (whole bytes) go to torch's thread pool.
at::Tensor magnitude_mask_cpu(at::TensorList params, at::ArrayRef<double> thresholds) {
  TORCH_CHECK(thresholds.size() == params.size(), "thresholds has ", thresholds.size(), " entries for ",
              params.size(), " params");
  struct Piece {
    const void* data;
    int64_t numel, key, b0, b1;
    DType dtype;
    uint8_t* out;
  };
  std::vector<DType> dtypes;
  std::vector<int64_t> keys;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "params[", t, "] is on ", p.device(), "; the CPU kernel takes CPU tensors");
    TORCH_CHECK(p.is_contiguous(), "params[", t, "] is not contiguous");
    dtypes.push_back(dtype_of(p, "params"));
    TORCH_CHECK(!std::isnan(thresholds[t]), "thresholds[", t, "] is NaN");
    keys.push_back(mask::key(static_cast<float>(thresholds[t])));
  }
  at::Tensor out = at::empty({mask_bytes(params)}, at::kByte);
  std::vector<Piece> pieces;
  uint8_t* base = out.data_ptr<uint8_t>();
  constexpr int64_t kPieceBytes = kChunk / 8;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel(), bytes = mask::bytes_for(n);
    for (int64_t b = 0; b < bytes; b += kPieceBytes) {
      pieces.push_back(Piece{params[t].data_ptr(), n, keys[t], b, std::min(bytes, b + kPieceBytes), dtypes[t], base});
    }
    base += bytes;
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Piece& q = pieces[i];
      switch (q.dtype) {
        case DType::kFloat32:
          build_mask<DType::kFloat32>(q.data, q.numel, q.key, q.b0, q.b1, q.out);
          break;
        case DType::kBFloat16:
          build_mask<DType::kBFloat16>(q.data, q.numel, q.key, q.b0, q.b1, q.out);
          break;
        case DType::kFloat16:
          build_mask<DType::kFloat16>(q.data, q.numel, q.key, q.b0, q.b1, q.out);
          break;
      }
    }
  });
  return out;
}

void noise_cpu(const at::Tensor& out, const at::Tensor& seed, int64_t offset, int64_t dist) {
  check_dist(dist);
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const at::Tensor seed_h = host_seeds(seed, "seed");
  TORCH_CHECK(seed_h.numel() == 1, "noise_ takes one seed, got ", seed_h.numel());
  const uint64_t first = static_cast<uint64_t>(offset);
  const uint64_t count = static_cast<uint64_t>(out.numel());
  TORCH_CHECK(first == 0 || count <= 0 - first, "indices offset=", first, ", count=", count, " leave [0, 2^64)");
  const SeedKeys seed_value = seed_keys(static_cast<uint64_t>(seed_h.data_ptr<int64_t>()[0]));
  const float one = 1.0f, minus_one = -1.0f;
  Job job{};
  job.seeds = &seed_value;
  job.alphas = &one;
  job.neg_alphas = &minus_one;
  job.num_seeds = 1;
  job.tag = static_cast<uint32_t>(dist);
  job.noise = true;
  std::vector<Chunk> chunks;
  add_chunks(chunks, out.data_ptr(), sizeof(float), first, out.numel(), DType::kFloat32, false, 1.0f);
  run(job, chunks);
}

using ProjectFn = void (*)(const ProjectJob&, const ProjectChunk&, void*, int64_t*);

ProjectFn project_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return project_chunk_avx512;
    case Isa::kAvx2:
      return project_chunk_avx2;
    default:
      return project_chunk_scalar;
  }
}

// p_k = sum_i x_i z(seeds[k], i) (docs/stream-spec.md#projection), returned as the exact
// accumulator int64 [K, project::kWidth] (fedkseed/reference.py finish_projection rounds it).
// The pieces of every tensor are grouped by chunk of global indices, so a chunk shared by
// several tensors is summed in one tree; chunks go to torch's thread pool, each thread adds into
// its own accumulator and the threads' accumulators are added at the end (integers: any order).
at::Tensor project_cpu(at::TensorList params, at::IntArrayRef offsets, const at::Tensor& seeds, int64_t dist) {
  namespace pr = fedkseed::project;
  check_dist(dist);
  TORCH_CHECK(offsets.size() == params.size(), "offsets has ", offsets.size(), " entries for ", params.size(),
              " params");
  const at::Tensor seeds_h = host_seeds(seeds, "seeds");
  const int64_t k = seeds_h.numel();
  std::vector<std::pair<uint64_t, ProjectPiece>> located;  // (chunk, piece)
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "params[", t, "] is on ", p.device(), "; the CPU kernel takes CPU tensors");
    TORCH_CHECK(p.is_contiguous(), "params[", t, "] is not contiguous");
    const DType dtype = dtype_of(p, "params");
    const uint64_t first = static_cast<uint64_t>(offsets[t]);
    const uint64_t count = static_cast<uint64_t>(p.numel());
    TORCH_CHECK(first == 0 || count <= 0 - first, "params[", t, "]: indices offset=", first, ", count=", count,
                " leave [0, 2^64)");
    int64_t j = 0;
    while (j < p.numel()) {
      const uint64_t g = first + static_cast<uint64_t>(j);
      const int64_t slot = static_cast<int64_t>(g & static_cast<uint64_t>(pr::kChunk - 1));
      const int64_t n = std::min(p.numel() - j, pr::kChunk - slot);
      located.push_back({g >> pr::kChunkShift,
                         ProjectPiece{static_cast<const char*>(p.data_ptr()) + j * p.element_size(), slot, n, dtype}});
      j += n;
    }
  }
  std::sort(located.begin(), located.end(),
            [](const auto& a, const auto& b) { return a.first != b.first ? a.first < b.first : a.second.slot < b.second.slot; });
  std::vector<ProjectPiece> pieces;
  std::vector<ProjectChunk> chunks;
  for (const auto& [chunk, piece] : located) {
    if (chunks.empty() || chunks.back().chunk != chunk) {
      chunks.push_back(ProjectChunk{chunk, static_cast<int64_t>(pieces.size()), 0});
    }
    pieces.push_back(piece);
    ++chunks.back().count;
  }
  TORCH_CHECK(static_cast<int64_t>(chunks.size()) < pr::kMaxChunks, "project: ", chunks.size(),
              " chunks exceed the accumulator's limit of 2^31 per call");
  std::vector<SeedKeys> keys(k);
  for (int64_t i = 0; i < k; ++i) keys[i] = seed_keys(static_cast<uint64_t>(seeds_h.data_ptr<int64_t>()[i]));
  const ProjectJob job{keys.data(), k, static_cast<uint32_t>(dist), pieces.data()};

  at::Tensor out = at::zeros({k, pr::kWidth}, at::kLong);
  if (k == 0 || chunks.empty()) return out;
  int64_t* total = out.data_ptr<int64_t>();
  std::mutex merge;
  const ProjectFn fn = project_fn(active_isa());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> acc(static_cast<size_t>(k * pr::kWidth), 0);
    void* scratch = std::aligned_alloc(64, kProjectScratchBytes);
    TORCH_CHECK(scratch != nullptr, "project: out of memory for the scratch");
    for (int64_t i = begin; i < end; ++i) fn(job, chunks[i], scratch, acc.data());
    std::free(scratch);
    const std::lock_guard<std::mutex> lock(merge);
    for (size_t i = 0; i < acc.size(); ++i) total[i] += acc[i];
  });
  return out;
}

std::string cpu_isa() { return isa_name(active_isa()); }

// Use `name` (capped to what the CPU supports) from now on; returns the path now in use.
std::string set_cpu_isa(const std::string& name) {
  isa_slot().store(static_cast<int>(capped(parse_isa(name.c_str(), "isa"), best_isa())));
  return cpu_isa();
}

}  // namespace

int64_t scratch_words(Isa isa, const Job& job) {
  if (job.tag != stream::kTagRademacher) return 0;
  const int blocks = isa == Isa::kAvx512 ? kBlocksAvx512 : isa == Isa::kAvx2 ? kBlocksAvx2 : kBlocksScalar;
  return job.num_seeds * 4 * blocks;
}

}  // namespace cpu
}  // namespace fedkseed

// A diagnostic: which instruction set the CPU kernels use now ("scalar", "avx2", "avx512").
// set_cpu_isa(name) switches path in a running process (tests and benchmarks compare them).
TORCH_LIBRARY_FRAGMENT(fedkseed, m) {
  m.def("cpu_isa() -> str", &fedkseed::cpu::cpu_isa);
  m.def("set_cpu_isa(str name) -> str", &fedkseed::cpu::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(fedkseed, CPU, m) {
  m.impl("replay_", &fedkseed::cpu::replay_cpu);
  m.impl("noise_", &fedkseed::cpu::noise_cpu);
  m.impl("project", &fedkseed::cpu::project_cpu);
  m.impl("magnitude_mask", &fedkseed::cpu::magnitude_mask_cpu);
}
