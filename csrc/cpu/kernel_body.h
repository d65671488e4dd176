// The CPU kernel body, written once over a "lane pack" V and compiled once per instruction set.
//
// Include this only after cpu_kernel.h, fedkseed/stream.h and the intrinsics headers, inside the
// file's `#pragma GCC target` region: everything here lands in an anonymous namespace, so each
// file gets its own copy compiled for its own ISA and no inline function is shared (and picked
// by the linker) across files compiled with different targets.
//
// V generates L Philox blocks at once (lanes = consecutive blocks) and provides the float32
// arithmetic as separately rounded vector operations in the order of stream.h (never FMA).
// The unit of work is a group of G = 4L elements whose global start is a multiple of G:
// L Gaussian blocks, or a 4L-bit slice of one Rademacher block (128 is a multiple of 4L).
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
  static constexpr int G = 4 * L;
  using F = typename V::F;
  using I = typename V::I;

  // One Rademacher tile: per seed, L blocks of 4 words ([seed][block][word]) in scratch.
  static void fill_tile(const Job& job, uint64_t block0, uint32_t* tile) {
    for (int64_t k = 0; k < job.num_seeds; ++k) {
      I w[4];
      V::philox(job.seeds[k], block0, st::kTagRademacher, w);
      V::interleave_store(w, tile + k * 4 * L);
    }
  }

  // The 4L-bit slice of Rademacher bits of the group starting at global index gs.
  static uint64_t rademacher_bits(const uint32_t* block_words, uint64_t gs) {
    // Bit k of the block is bit (k & 31) of word k >> 5; the G bits of a group lie inside one
    // 64-bit half of the block (G divides 64).
    const unsigned bit = static_cast<unsigned>(gs & 127u);
    const uint32_t* w = block_words + (bit >> 6) * 2;
    const uint64_t half = static_cast<uint64_t>(w[0]) | (static_cast<uint64_t>(w[1]) << 32);
    return half >> (bit & 63u);
  }

  // acc[v] = sum_k alphas[k] * z(seeds[k], gs + v*L + lane), in seed order, starting from 0.0f.
  static void accumulate(const Job& job, uint64_t gs, const uint32_t* tile, uint64_t tile_block, F acc[4]) {
    for (int v = 0; v < 4; ++v) acc[v] = V::zero();
    if (job.tag == st::kTagGaussian) {
      // Accumulate with lanes = blocks (the sum is element-wise, so lane order is free) and put
      // the elements in order once per group instead of once per seed.
      for (int64_t k = 0; k < job.num_seeds; ++k) {
        I w[4];
        F z[4];
        V::philox(job.seeds[k], gs >> st::kGaussianBlockShift, st::kTagGaussian, w);
        V::gaussian_by_block(w, z);
        const F a = V::set1(job.alphas[k]);
        for (int v = 0; v < 4; ++v) acc[v] = V::add(acc[v], V::mul(a, z[v]));
      }
      const F by_block[4] = {acc[0], acc[1], acc[2], acc[3]};
      V::interleave_ps(by_block, acc);
    } else {
      const uint64_t lane = (gs >> st::kRademacherBlockShift) - tile_block;
      for (int64_t k = 0; k < job.num_seeds; ++k) {
        const uint64_t bits = rademacher_bits(tile + (k * L + lane) * 4, gs);
        const F a = V::set1(job.alphas[k]), na = V::set1(job.neg_alphas[k]);
        // a * (+-1) is exactly +-a, so picking the sign is the multiply of spec section 7.
        for (int v = 0; v < 4; ++v) acc[v] = V::add(acc[v], V::pick(na, a, bits >> (v * L)));
      }
    }
  }

  // z(seed, gs + j) for the G elements of a group (noise_: the single seed, no accumulation).
  static void noise_group(const Job& job, uint64_t gs, const uint32_t* tile, uint64_t tile_block, float* out) {
    F z[4];
    if (job.tag == st::kTagGaussian) {
      I w[4];
      V::philox(job.seeds[0], gs >> st::kGaussianBlockShift, st::kTagGaussian, w);
      F by_block[4];
      V::gaussian_by_block(w, by_block);
      V::interleave_ps(by_block, z);
    } else {
      const uint64_t bits = rademacher_bits(tile + ((gs >> st::kRademacherBlockShift) - tile_block) * 4, gs);
      for (int v = 0; v < 4; ++v) z[v] = V::pick(V::set1(-1.0f), V::set1(1.0f), bits >> (v * L));
    }
    for (int v = 0; v < 4; ++v) V::store_f32(out + v * L, z[v]);
  }

  template <DType D, class T>
  static void update_group(const Job& job, const Chunk& c, uint64_t gs, const uint32_t* tile,
                           uint64_t tile_block, T* p) {
    F acc[4];
    accumulate(job, gs, tile, tile_block, acc);
    I words[4] = {};  // only read under stochastic rounding
    const bool sr = job.stochastic_rounding && D != DType::kFloat32;
    if (sr) {
      V::philox(job.rounding_seed, gs >> st::kRoundingBlockShift, st::kTagRounding, words);
      V::interleave(words);
    }
    const F d = V::set1(c.decay);
    for (int v = 0; v < 4; ++v) {
      F x = V::template load<D>(p + v * L);
      if (c.apply_decay) x = V::mul(x, d);
      F y = V::add(x, acc[v]);
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
        if (!have_tile || block - tile_block >= static_cast<uint64_t>(L)) {
          fill_tile(job, block, tile);
          tile_block = block;
          have_tile = true;
        }
      }
      const int64_t lo = j < 0 ? -j : 0;
      const int64_t hi = c.count - j < G ? c.count - j : G;
      if (lo == 0 && hi == G) {
        if (kCanNoise && job.noise) {
          noise_group(job, gs, tile, tile_block, reinterpret_cast<float*>(base + j));
        } else {
          update_group<D, T>(job, c, gs, tile, tile_block, base + j);
        }
        continue;
      }
      // A group cut by the chunk's ends: work on a copy and write back only the chunk's elements.
      T stage[G] = {};
      if (kCanNoise && job.noise) {
        noise_group(job, gs, tile, tile_block, reinterpret_cast<float*>(stage));
      } else {
        std::memcpy(stage + lo, base + j + lo, (hi - lo) * sizeof(T));
        update_group<D, T>(job, c, gs, tile, tile_block, stage);
      }
      std::memcpy(base + j + lo, stage + lo, (hi - lo) * sizeof(T));
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
