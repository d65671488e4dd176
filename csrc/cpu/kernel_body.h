// The CPU kernel body, written once over a "lane pack" V and compiled once per instruction set.
//
// Include this only after cpu_kernel.h, fedkseed/stream.h and the intrinsics headers, inside the
// file's `#pragma GCC target` region: everything here lands in an anonymous namespace, so each
// file gets its own copy compiled for its own ISA and no inline function is shared (and picked
// by the linker) across files compiled with different targets.
//
// V is Scalar (kernel_scalar.cpp) or Simd<P> (kernel_simd.h over an ISA's primitives P).
// V generates B = L * N Philox blocks at once: N vectors of L lanes each (lane l of vector n is
// block block0 + n*L + l), and provides the float32 arithmetic as separately rounded vector
// operations in the order of stream.h (never FMA). The N vectors are independent dependency
// chains that V steps in lockstep, so the out-of-order core always has work for every vector
// port while one chain waits on a multiply, a polynomial step or a sqrt.
// The unit of work is a group of G = 4B elements whose global start is a multiple of G:
// B Gaussian blocks, or a 4B-bit slice of one Rademacher block (G divides 128). Element vector
// v = 4n + j of a group holds elements v*L .. v*L + L - 1.
// Per group the seed loop is innermost: x is loaded once, the K perturbations accumulate in
// registers, y is stored once.

namespace {

using fedkseed::cpu::Chunk;
using fedkseed::cpu::DType;
using fedkseed::cpu::Job;
namespace st = fedkseed::stream;

template <class V>
struct Kernel {
  static constexpr int L = V::L;
  static constexpr int N = V::N;
  static constexpr int B = L * N;  // Philox blocks per group
  static constexpr int G = 4 * B;  // elements per group
  static constexpr int NV = 4 * N;  // element vectors per group
  static_assert(128 % G == 0, "a group must not straddle Rademacher blocks");
  using F = typename V::F;
  using I = typename V::I;

  // One Rademacher tile: per seed, B blocks of 4 words ([seed][block][word]) in scratch.
  static void fill_tile(const Job& job, uint64_t block0, uint32_t* tile) {
    for (int64_t k = 0; k < job.num_seeds; ++k) {
      I w[4][N];
      V::philox(job.seeds[k], block0, st::kTagRademacher, w);
      for (int n = 0; n < N; ++n) {
        const I by_block[4] = {w[0][n], w[1][n], w[2][n], w[3][n]};
        V::interleave_store(by_block, tile + (k * B + n * L) * 4);
      }
    }
  }

  // The L Rademacher bits of element vector v of the group starting at global index gs: bit k
  // of the block is bit (k & 31) of word k >> 5, and L divides 32, so they lie in one word.
  static uint32_t rademacher_bits(const uint32_t* block_words, uint64_t gs, int v) {
    const unsigned bit = static_cast<unsigned>(gs & 127u) + static_cast<unsigned>(v * L);
    return block_words[bit >> 5] >> (bit & 31u);
  }

  // acc[v] = sum_k alphas[k] * z(seeds[k], gs + v*L + lane), in seed order, starting from 0.0f.
  // The two distributions are separate functions so the light Rademacher loop does not carry the
  // register and stack footprint of the Gaussian one.
  static void accumulate(const Job& job, uint64_t gs, const uint32_t* tile, uint64_t tile_block, F acc[NV]) {
    if (job.tag == st::kTagGaussian) {
      accumulate_gaussian(job, gs, acc);
    } else {
      accumulate_rademacher(job, gs, tile, tile_block, acc);
    }
  }

  __attribute__((noinline)) static void accumulate_gaussian(const Job& job, uint64_t gs, F acc[NV]) {
    // Accumulate with lanes = blocks (the sum is element-wise, so lane order is free) and put
    // the elements in order once per group instead of once per seed.
    F by_block[4][N];
    for (int j = 0; j < 4; ++j)
      for (int n = 0; n < N; ++n) by_block[j][n] = V::zero();
    for (int64_t k = 0; k < job.num_seeds; ++k) {
      I w[4][N];
      F z[4][N];
      V::philox(job.seeds[k], gs >> st::kGaussianBlockShift, st::kTagGaussian, w);
      V::gaussian_by_block(w, z);
      const F a = V::set1(job.alphas[k]);
      for (int j = 0; j < 4; ++j)
        for (int n = 0; n < N; ++n) by_block[j][n] = V::add(by_block[j][n], V::mul(a, z[j][n]));
    }
    for (int n = 0; n < N; ++n) {
      const F in[4] = {by_block[0][n], by_block[1][n], by_block[2][n], by_block[3][n]};
      V::interleave_ps(in, acc + 4 * n);
    }
  }

  static void accumulate_rademacher(const Job& job, uint64_t gs, const uint32_t* tile, uint64_t tile_block,
                                    F acc[NV]) {
    for (int v = 0; v < NV; ++v) acc[v] = V::zero();
    const uint64_t lane = (gs >> st::kRademacherBlockShift) - tile_block;
    for (int64_t k = 0; k < job.num_seeds; ++k) {
      const uint32_t* words = tile + (k * B + lane) * 4;
      const F a = V::set1(job.alphas[k]), na = V::set1(job.neg_alphas[k]);
      // a * (+-1) is exactly +-a, so picking the sign is the multiply of docs/stream-spec.md#accumulation.
      for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::pick(na, a, rademacher_bits(words, gs, v)));
    }
  }

  // z(seed, gs + j) for the G elements of a group (noise_: the single seed, no accumulation).
  static void noise_group(const Job& job, uint64_t gs, const uint32_t* tile, uint64_t tile_block, float* out) {
    F z[NV];
    if (job.tag == st::kTagGaussian) {
      I w[4][N];
      F by_block[4][N];
      V::philox(job.seeds[0], gs >> st::kGaussianBlockShift, st::kTagGaussian, w);
      V::gaussian_by_block(w, by_block);
      for (int n = 0; n < N; ++n) {
        const F in[4] = {by_block[0][n], by_block[1][n], by_block[2][n], by_block[3][n]};
        V::interleave_ps(in, z + 4 * n);
      }
    } else {
      const uint32_t* words = tile + ((gs >> st::kRademacherBlockShift) - tile_block) * 4;
      for (int v = 0; v < NV; ++v) z[v] = V::pick(V::set1(-1.0f), V::set1(1.0f), rademacher_bits(words, gs, v));
    }
    for (int v = 0; v < NV; ++v) V::store_f32(out + v * L, z[v]);
  }

  template <DType D, class T>
  static void update_group(const Job& job, const Chunk& c, uint64_t gs, const uint32_t* tile,
                           uint64_t tile_block, T* p) {
    F acc[NV];
    accumulate(job, gs, tile, tile_block, acc);
    I words[NV] = {};  // only read under stochastic rounding
    const bool sr = job.stochastic_rounding && D != DType::kFloat32;
    if (sr) {
      I w[4][N];
      V::philox(job.rounding_seed, gs >> st::kRoundingBlockShift, st::kTagRounding, w);
      for (int n = 0; n < N; ++n) {
        for (int j = 0; j < 4; ++j) words[4 * n + j] = w[j][n];
        V::interleave(words + 4 * n);
      }
    }
    const F d = V::set1(c.decay);
    for (int v = 0; v < NV; ++v) {
      const F x = V::template load<D>(p + v * L);
      F y = V::add(c.apply_decay ? V::mul(x, d) : x, acc[v]);
      y = V::settle_nan(y, x);
      if (sr) y = V::template stochastic_round<D>(y, words[v]);
      V::template store<D>(p + v * L, y);
    }
  }

  template <DType D, class T>
  static void run_typed(const Job& job, const Chunk& c, uint32_t* tile) {
    constexpr bool kCanNoise = D == DType::kFloat32;  // noise_ writes float32 only
    T* const base = static_cast<T*>(c.data);
    const uint64_t head = c.global & (G - 1);
    uint64_t gs = c.global - head;  // global start of the current group
    int64_t j = -static_cast<int64_t>(head);  // its position in the chunk (negative: before it)
    uint64_t tile_block = 0;
    bool have_tile = false;
    for (; j < c.count; j += G, gs += G) {
      if (job.tag == st::kTagRademacher) {
        const uint64_t block = gs >> st::kRademacherBlockShift;
        if (!have_tile || block - tile_block >= static_cast<uint64_t>(B)) {
          fill_tile(job, block, tile);
          tile_block = block;
          have_tile = true;
        }
      }
      const int64_t lo = j < 0 ? -j : 0;
      const int64_t hi = c.count - j < G ? c.count - j : G;
      uint64_t chosen[kWords] = {};  // a masked replay: bit e set if the group's element e is written
      const int64_t writes = c.mask == nullptr ? hi - lo : select(c, j, lo, hi, chosen);
      if (writes == 0) continue;  // the mask selects none of them: nothing to compute
      if (writes == G) {
        if (kCanNoise && job.noise) {
          noise_group(job, gs, tile, tile_block, reinterpret_cast<float*>(base + j));
        } else {
          update_group<D, T>(job, c, gs, tile, tile_block, base + j);
        }
        continue;
      }
      // A group cut by the chunk's ends or by the mask: work on a copy and write back only the
      // chunk's (selected) elements, so the others keep their stored bits.
      T stage[G] = {};
      if (kCanNoise && job.noise) {
        noise_group(job, gs, tile, tile_block, reinterpret_cast<float*>(stage));
      } else {
        std::memcpy(stage + lo, base + j + lo, (hi - lo) * sizeof(T));
        update_group<D, T>(job, c, gs, tile, tile_block, stage);
      }
      if (c.mask == nullptr) {
        std::memcpy(base + j + lo, stage + lo, (hi - lo) * sizeof(T));
      } else {
        // Unselected elements get their own stored value back; a select, not a branch (the
        // bits are as random as the weights' magnitudes, so a branch would be mispredicted).
        for (int64_t e = lo; e < hi; ++e) {
          const T kept = base[j + e];
          base[j + e] = (chosen[e >> 6] >> (e & 63)) & 1u ? stage[e] : kept;
        }
      }
    }
  }

  static constexpr int kWords = (G + 63) / 64;  // 64-bit words of one group's mask bits

  // The mask bits of the group's elements lo .. hi - 1 (the group starts at position j of the
  // chunk) into chosen[] (bit e of the group in word e >> 6); returns how many are set.
  static int64_t select(const Chunk& c, int64_t j, int64_t lo, int64_t hi, uint64_t chosen[kWords]) {
    int64_t count = 0;
    for (int q = 0; q < kWords; ++q) {
      const int64_t e0 = lo > 64 * q ? lo : 64 * q;
      const int64_t e1 = hi < 64 * q + 64 ? hi : 64 * q + 64;
      if (e0 >= e1) continue;
      chosen[q] = bits_at(c.mask, static_cast<uint64_t>(c.local + j + e0), static_cast<int>(e1 - e0)) << (e0 - 64 * q);
      count += __builtin_popcountll(chosen[q]);
    }
    return count;
  }

  // n <= 64 mask bits from bit l on (bit l lowest), reading only the bytes that hold them.
  static uint64_t bits_at(const uint8_t* mask, uint64_t l, int n) {
    uint64_t byte = l >> 3;
    uint64_t out = static_cast<uint64_t>(mask[byte++]) >> (l & 7u);
    for (int got = 8 - static_cast<int>(l & 7u); got < n; got += 8) out |= static_cast<uint64_t>(mask[byte++]) << got;
    return n < 64 ? out & ((uint64_t{1} << n) - 1) : out;
  }

  // ---------------------------------------------------------------------------- projection
  // docs/stream-spec.md#projection: chunk partials by the fixed pairwise tree, per seed.
  using ProjectJob = fedkseed::cpu::ProjectJob;
  using ProjectChunk = fedkseed::cpu::ProjectChunk;
  using ProjectPiece = fedkseed::cpu::ProjectPiece;
  static constexpr int64_t kChunk = fedkseed::project::kChunk;
  static_assert(kChunk % G == 0 && kChunk % 128 == 0, "a chunk is whole groups and Rademacher blocks");

  // Scratch layout (bytes): xs (float[kChunk]), then one Rademacher tile (4 * B words).
  static constexpr int64_t kScratchBytes = kChunk * 4 + 4 * B * 4;
  static_assert(kScratchBytes <= fedkseed::cpu::kProjectScratchBytes, "cpu_kernel.h sizes the scratch");

  static void stage(const ProjectPiece& p, float* out) {
    if (p.dtype == DType::kFloat32) {
      std::memcpy(out, p.data, p.count * sizeof(float));
      return;
    }
    const uint16_t* h = static_cast<const uint16_t*>(p.data);
    for (int64_t j = 0; j < p.count; ++j) {
      out[j] = p.dtype == DType::kBFloat16 ? fedkseed::convert::bf16_to_f32(h[j]) : fedkseed::convert::f16_to_f32(h[j]);
    }
  }

  // The pairwise tree over v[0 .. n - 1] (n a power of 2): each level pairs neighbours, (v0 + v1),
  // (v2 + v3), ..., into a new array (so the compiler can vectorise it). Every sum is one float64
  // add however the loops are vectorised, since no sum is regrouped (no -ffast-math).
  template <int64_t n>
  static double tree(const double* __restrict v) {
    if constexpr (n == 1) {
      return v[0];
    } else {
      alignas(64) double half[n / 2];
      for (int64_t m = 0; m < n / 2; ++m) half[m] = v[2 * m] + v[2 * m + 1];
      return tree<n / 2>(half);
    }
  }

  // One group's subtree: the G products x[i] * z[i] (each exact in float64), summed by the tree.
  static double group_sum(const float* __restrict x, const float* __restrict z) {
    if constexpr (G == 1) {
      return static_cast<double>(x[0]) * static_cast<double>(z[0]);
    } else {
      alignas(64) double half[G / 2];
      for (int m = 0; m < G / 2; ++m) {
        half[m] = static_cast<double>(x[2 * m]) * static_cast<double>(z[2 * m]) +
                  static_cast<double>(x[2 * m + 1]) * static_cast<double>(z[2 * m + 1]);
      }
      return tree<G / 2>(half);
    }
  }

  // The chunk's x is staged once as float32 (absent elements 0); per seed each group's z is
  // generated into a small buffer and its subtree summed while it is in L1, then the group sums
  // (groups are aligned subtrees of the chunk's tree) are summed by the rest of the tree and the
  // chunk partial goes into the seed's exact accumulator.
  static void project_chunk(const ProjectJob& pj, const ProjectChunk& c, void* scratch, int64_t* acc) {
    namespace pr = fedkseed::project;
    constexpr int64_t kGroups = kChunk / G;
    float* xs = static_cast<float*>(scratch);
    uint32_t* tile = reinterpret_cast<uint32_t*>(xs + kChunk);
    std::memset(xs, 0, kChunk * sizeof(float));
    bool present[kGroups] = {};
    for (int64_t p = c.first; p < c.first + c.count; ++p) {
      const ProjectPiece& piece = pj.pieces[p];
      stage(piece, xs + piece.slot);
      for (int64_t g = piece.slot / G; g <= (piece.slot + piece.count - 1) / G; ++g) present[g] = true;
    }
    Job job{};
    job.num_seeds = 1;
    job.tag = pj.tag;
    job.noise = true;
    const uint64_t base = c.chunk << pr::kChunkShift;
    alignas(64) float z[G];
    alignas(64) double sums[kGroups];
    for (int64_t k = 0; k < pj.num_seeds; ++k) {
      job.seeds = pj.seeds + k;
      uint64_t tile_block = 0;
      bool have_tile = false;
      for (int64_t g = 0; g < kGroups; ++g) {
        sums[g] = 0.0;
        if (!present[g]) continue;  // every x there is 0: its products add nothing
        const uint64_t gs = base + static_cast<uint64_t>(g * G);
        if (job.tag == st::kTagRademacher) {
          const uint64_t block = gs >> st::kRademacherBlockShift;
          if (!have_tile || block - tile_block >= static_cast<uint64_t>(B)) {
            fill_tile(job, block, tile);
            tile_block = block;
            have_tile = true;
          }
        }
        noise_group(job, gs, tile, tile_block, z);
        sums[g] = group_sum(xs + g * G, z);
      }
      int64_t* row = acc + k * pr::kWidth;
      pr::add_exact(tree<kGroups>(sums), [row](int j, int64_t v) { row[j] += v; });
    }
  }

  static void run(const Job& job, const Chunk& c, uint32_t* scratch) {
    switch (c.dtype) {
      case DType::kFloat32:
        run_typed<DType::kFloat32, float>(job, c, scratch);
        break;
      case DType::kBFloat16:
        run_typed<DType::kBFloat16, uint16_t>(job, c, scratch);
        break;
      case DType::kFloat16:
        run_typed<DType::kFloat16, uint16_t>(job, c, scratch);
        break;
    }
  }
};

}  // namespace
