// The interface between the CPU operator glue (ops_cpu.cpp: checks, chunking, threading, ISA choice)
// and the kernel bodies compiled once per instruction set (kernel_scalar/avx2/avx512.cpp).
#pragma once

#include <cstdint>

#include <fedkseed/dtypes.h>
#include <fedkseed/mask.h>
#include <fedkseed/project.h>
#include <fedkseed/stream.h>

namespace fedkseed {
namespace cpu {

// For the SIMD paths' big per-group functions, which GCC would otherwise call out of line and
// then pass every vector through memory.
#define FKS_CPU_INLINE __attribute__((always_inline)) inline

using fedkseed::DType;  // the one dtype table (fedkseed/dtypes.h)
enum class Isa : int { kScalar, kAvx2, kAvx512 };

// A seed and its Philox key schedule (the key of each round), computed once per call so the
// SIMD paths broadcast round keys from memory instead of recomputing them per block.
struct SeedKeys {
  uint64_t seed;
  uint32_t round_key[stream::kPhiloxRounds][2];
};

inline SeedKeys seed_keys(uint64_t seed) {
  SeedKeys s{seed, {}};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < stream::kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += stream::kPhiloxW0;
      k1 += stream::kPhiloxW1;
    }
    s.round_key[round][0] = k0;
    s.round_key[round][1] = k1;
  }
  return s;
}

// What one call applies to every chunk.
struct Job {
  const SeedKeys* seeds;       // K seeds
  const float* alphas;         // K coefficients
  const float* neg_alphas;     // -alphas[k] (Rademacher picks +-alpha instead of multiplying by +-1)
  int64_t num_seeds;           // K
  uint32_t tag;                // stream tag: gaussian or rademacher
  bool noise;                  // write z(seed, i) as float32 instead of updating (noise_, K = 1)
  bool stochastic_rounding;
  SeedKeys rounding_seed;
};

// A contiguous run of one tensor's elements: data[0] has global index `global`.
struct Chunk {
  void* data;
  uint64_t global;
  int64_t count;
  DType dtype;
  bool apply_decay;  // false when the factor is 1 (the multiply is skipped, docs/stream-spec.md#accumulation)
  float decay;
  // A masked replay (docs/stream-spec.md#magnitude-mask): the tensor's mask bits, and the position
  // of data[0] in its tensor; elements whose bit is 0 are not written. nullptr: no mask.
  const uint8_t* mask;
  int64_t local;
};

// Scratch each thread needs for a job, in uint32 words (Rademacher keeps one tile of words per seed).
int64_t scratch_words(Isa isa, const Job& job);

// Apply the job to one chunk; `scratch` holds scratch_words() words owned by the calling thread.
void run_chunk_scalar(const Job& job, const Chunk& chunk, uint32_t* scratch);
void run_chunk_avx2(const Job& job, const Chunk& chunk, uint32_t* scratch);
void run_chunk_avx512(const Job& job, const Chunk& chunk, uint32_t* scratch);

// The projection (docs/stream-spec.md#projection): one chunk of project::kChunk global indices at a
// time. A piece is the part of one tensor inside the chunk, at position `slot` of the chunk.
struct ProjectPiece {
  const void* data;
  int64_t slot;
  int64_t count;
  DType dtype;
};

struct ProjectChunk {
  uint64_t chunk;     // chunk number: global indices chunk * kChunk .. + kChunk - 1
  int64_t first;      // its pieces: pieces[first .. first + count - 1]
  int64_t count;
};

struct ProjectJob {
  const SeedKeys* seeds;  // K seeds
  int64_t num_seeds;
  uint32_t tag;
  const ProjectPiece* pieces;
};

// Add the K chunk partials of `chunk` to acc (int64 [K][project::kWidth]); `scratch` holds
// kProjectScratchBytes bytes owned by the calling thread, 64-byte aligned (its layout is
// Kernel::project_chunk's in kernel_body.h).
void project_chunk_scalar(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc);
void project_chunk_avx2(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc);
void project_chunk_avx512(const ProjectJob& job, const ProjectChunk& chunk, void* scratch, int64_t* acc);

// Philox blocks each path generates at once (vector lanes x independent vectors in flight).
constexpr int kBlocksScalar = 1;
constexpr int kBlocksAvx2 = 16;
constexpr int kBlocksAvx512 = 32;

// Staged x (float[kChunk]) and one Rademacher tile of the widest path (4 words per block).
constexpr int64_t kProjectScratchBytes = project::kChunk * 4 + 4 * kBlocksAvx512 * 4;

}  // namespace cpu
}  // namespace fedkseed
