// The stream arithmetic of the SIMD paths (Philox, Box-Muller, the block/element transpose,
// stochastic rounding), written once over an instruction set's primitives P and compiled once
// per instruction set.
//
// Include it like kernel_body.h: after the ISA struct, inside the file's `#pragma GCC target`
// region. Everything lands in an anonymous namespace, so each file gets its own copy compiled for
// its own ISA and no inline function is shared (and picked by the linker) across targets.
//
// P provides L lanes of float32 (F) and uint32 (I) through thin primitives:
//   float:   zero set1 add sub mul sqrt, cvt (int32 -> float), as_f / as_i (bit casts)
//   integer: iset1 izero iota (0 .. L-1) iload (aligned) istore, iadd isub iand ior ixor imax,
//            srli slli srai (constant counts once inlined), cvtt (float -> int32, truncating),
//            mulhilo (32x32 -> 64 bits per lane), xor3 (a ^ b ^ c) and xor_and (a ^ (b & c)),
//            one ternary-logic op where P has it
//   masks (P's own type): bit_set(v, b) (lanes whose bit b is set), greater(a, b), nonfinite(y)
//            (lanes holding an infinity or NaN), is_nan(y), blend(mask, when_clear, when_set),
//            add_where(mask, a, b) (a + b in the mask's lanes, a elsewhere)
//   interleave_ps, the ISA's own 4 x L transpose.
// Every float operation is a separately rounded vector add/mul/sub in the order of stream.h
// (never FMA: the targets do not enable it and the build sets -ffp-contract=off), sqrt is the
// correctly rounded vsqrtps, and Philox is exact integer arithmetic.
//
// Simd<P> generates B = L * N Philox blocks at once as N vectors (lane l of vector n is block
// block0 + n*L + l), stepping the N independent dependency chains in lockstep.

namespace {

namespace st = fedkseed::stream;
using fedkseed::cpu::DType;

template <class P>
struct Simd : P {
  using typename P::F;
  using typename P::I;
  using P::L;
  using P::N;
  using P::add;
  using P::iadd;
  using P::iand;
  using P::ior;
  using P::iset1;
  using P::isub;
  using P::ixor;
  using P::mul;
  using P::mulhilo;
  using P::set1;
  using P::slli;
  using P::srai;
  using P::srli;
  using P::sub;

  // One Philox round on N independent vectors of counters.
  FKS_CPU_INLINE static void philox_round(I c0[N], I c1[N], I c2[N], I c3[N], const uint32_t key[2]) {
    const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
    const I k0 = iset1(key[0]), k1 = iset1(key[1]);
    I hi0[N], lo0[N], hi1[N], lo1[N];
    for (int n = 0; n < N; ++n) {
      mulhilo(m0, c0[n], hi0[n], lo0[n]);
      mulhilo(m1, c2[n], hi1[n], lo1[n]);
    }
    for (int n = 0; n < N; ++n) {
      c0[n] = P::xor3(hi1[n], c1[n], k0);
      c1[n] = lo1[n];
      c2[n] = P::xor3(hi0[n], c3[n], k1);
      c3[n] = lo0[n];
    }
  }

  // Philox4x32-10 of blocks block0 .. block0 + N*L - 1 (lane l of vector n: block0 + n*L + l).
  FKS_CPU_INLINE static void philox(const fedkseed::cpu::SeedKeys& keys, uint64_t block0, uint32_t tag, I w[4][N]) {
    const uint32_t lo = static_cast<uint32_t>(block0), hi = static_cast<uint32_t>(block0 >> 32);
    I c0[N], c1[N], c2[N], c3[N];
    if (lo <= 0xFFFFFFFFu - (N * L - 1)) {
      // Every lane has c1 = hi, c2 = tag, c3 = 0 at the start, so half of the products of rounds
      // 0 and 1 are the same in every lane: compute those once as scalars.
      const uint64_t p1 = static_cast<uint64_t>(st::kPhiloxM1) * tag;  // round 0, (hi1, lo1)
      const uint32_t c0_after0 = static_cast<uint32_t>(p1 >> 32) ^ hi ^ keys.round_key[0][0];
      const uint32_t c1_after0 = static_cast<uint32_t>(p1);
      const uint64_t p0 = static_cast<uint64_t>(st::kPhiloxM0) * c0_after0;  // round 1, (hi0, lo0)
      const I m0 = iset1(st::kPhiloxM0), m1 = iset1(st::kPhiloxM1);
      for (int n = 0; n < N; ++n) {
        I hi0, lo0;
        mulhilo(m0, iadd(iset1(lo + static_cast<uint32_t>(n * L)), P::iota()), hi0, lo0);
        c2[n] = ixor(hi0, iset1(keys.round_key[0][1]));  // round 0: c3 = 0
        c3[n] = lo0;
      }
      for (int n = 0; n < N; ++n) {
        I hi1, lo1;
        mulhilo(m1, c2[n], hi1, lo1);
        c0[n] = ixor(hi1, iset1(c1_after0 ^ keys.round_key[1][0]));
        c1[n] = lo1;
        c2[n] = ixor(c3[n], iset1(static_cast<uint32_t>(p0 >> 32) ^ keys.round_key[1][1]));
        c3[n] = iset1(static_cast<uint32_t>(p0));
      }
    } else {  // the low words wrap inside this group: carry into the high word lane by lane
      alignas(sizeof(I)) uint32_t a0[N * L], a1[N * L];
      for (int l = 0; l < N * L; ++l) {
        const uint64_t b = block0 + static_cast<uint64_t>(l);
        a0[l] = static_cast<uint32_t>(b);
        a1[l] = static_cast<uint32_t>(b >> 32);
      }
      for (int n = 0; n < N; ++n) {
        c0[n] = P::iload(a0 + n * L);
        c1[n] = P::iload(a1 + n * L);
        c2[n] = iset1(tag);
        c3[n] = P::izero();
      }
      philox_round(c0, c1, c2, c3, keys.round_key[0]);
      philox_round(c0, c1, c2, c3, keys.round_key[1]);
    }
    // Fully unrolled, so the four counter words rotate through registers without copies.
#pragma GCC unroll 8
    for (int round = 2; round < st::kPhiloxRounds; ++round) philox_round(c0, c1, c2, c3, keys.round_key[round]);
    for (int n = 0; n < N; ++n) {
      w[0][n] = c0[n];
      w[1][n] = c1[n];
      w[2][n] = c2[n];
      w[3][n] = c3[n];
    }
  }

  // Lanes are blocks, elements are (block, word): the integer words through the float transpose.
  static void interleave(I w[4]) {
    F in[4], out[4];
    for (int i = 0; i < 4; ++i) in[i] = P::as_f(w[i]);
    P::interleave_ps(in, out);
    for (int i = 0; i < 4; ++i) w[i] = P::as_i(out[i]);
  }
  static void interleave_store(const I w[4], uint32_t* out) {
    I t[4] = {w[0], w[1], w[2], w[3]};
    interleave(t);
    for (int i = 0; i < 4; ++i) P::istore(out + i * L, t[i]);
  }

  // n = 2*(w >> 9) + 1 = (w >> 8) | 1, the odd 24-bit numerator of U(w) = n * 2^-24.
  static I uniform_numerator(I w) { return ior(srli(w, 8), iset1(1)); }

  // sqrt(-2 ln U(w)) for R independent vectors, stepped in lockstep (stream::log_uniform).
  template <int R>
  static void radius(const I w[R], F r[R]) {
    // U = n * 2^-24 has the mantissa of float(n) (exact: n < 2^24) and its exponent minus 24.
    // log_uniform's split (m in [0.5, 1), halved exponent and doubled m when m < LOG_SQRT_HALF)
    // without a compare: adding 2^23 - mant(LOG_SQRT_HALF) to the bits carries into the exponent
    // exactly when mant(m) >= mant(LOG_SQRT_HALF); the low 23 bits plus bits(LOG_SQRT_HALF) are
    // then the bits of m (carry) or of m + m (no carry), both exact as in stream.h.
    const uint32_t sqrt_half = st::float_bits(st::kLogSqrtHalf);
    const I carry_in = iset1(0x00800000u - (sqrt_half & 0x007FFFFFu));
    I t[R];
    F x[R], z[R], p[R], ef[R];
    for (int i = 0; i < R; ++i) t[i] = iadd(P::as_i(P::cvt(uniform_numerator(w[i]))), carry_in);
    for (int i = 0; i < R; ++i) {
      const I m = iadd(iand(t[i], iset1(0x007FFFFFu)), iset1(sqrt_half));
      x[i] = sub(P::as_f(m), set1(1.0f));
      // e = biased exponent of U - 126 (minus 1 without carry) = (t >> 23) - 24 - 127.
      ef[i] = P::cvt(isub(srli(t[i], 23), iset1(24 + 127)));
    }
    for (int i = 0; i < R; ++i) z[i] = mul(x[i], x[i]);
    for (int i = 0; i < R; ++i) p[i] = add(mul(set1(st::kLogP0), x[i]), set1(st::kLogP1));
    const float horner[] = {st::kLogP2, st::kLogP3, st::kLogP4, st::kLogP5, st::kLogP6, st::kLogP7, st::kLogP8};
    for (const float c : horner) {
      for (int i = 0; i < R; ++i) p[i] = add(mul(p[i], x[i]), set1(c));
    }
    for (int i = 0; i < R; ++i) {
      F y = mul(mul(p[i], x[i]), z[i]);
      y = add(y, mul(ef[i], set1(st::kLogLn2Lo)));
      y = sub(y, mul(set1(0.5f), z[i]));
      const F ln = add(add(x[i], y), mul(ef[i], set1(st::kLogLn2Hi)));
      r[i] = P::sqrt(mul(set1(-2.0f), ln));
    }
  }

  // stream::cos_sin_2pi for both odd = 0 (cos) and odd = 1 (sin) of R independent words: the two
  // share the reduction and both polynomials, and differ only in which polynomial and sign they take.
  template <int R>
  static void cos_sin(const I w[R], F cos_out[R], F sin_out[R]) {
    const I sign = iset1(0x80000000u);
    F x[R], z[R], s[R], c[R];
    for (int i = 0; i < R; ++i) {
      // m = n - q * 2^22 with q = (n + 2^21) >> 22 is n mod 2^22 read as a signed 22-bit number:
      // shift n's bit 21 into the sign bit ((w >> 8) << 10 keeps w's bits 8..29) and back.
      const I m = srai(ior(slli(w[i], 2), iset1(1u << 10)), 10);
      x[i] = mul(P::cvt(m), set1(st::kSincosScale));
    }
    for (int i = 0; i < R; ++i) z[i] = mul(x[i], x[i]);
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(set1(st::kSinP0), z[i]), set1(st::kSinP1));
      c[i] = add(mul(set1(st::kCosP0), z[i]), set1(st::kCosP1));
    }
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(s[i], z[i]), set1(st::kSinP2));
      c[i] = add(mul(c[i], z[i]), set1(st::kCosP2));
    }
    for (int i = 0; i < R; ++i) {
      s[i] = add(mul(mul(s[i], z[i]), x[i]), x[i]);
      c[i] = mul(mul(c[i], z[i]), z[i]);
      c[i] = add(sub(c[i], mul(set1(0.5f), z[i])), set1(1.0f));
    }
    for (int i = 0; i < R; ++i) {
      // q mod 4 sits in bits 31..30 of w + 2^29 (the rounding carry of n + 2^21), and q + 1 mod 4
      // in those of w + 3*2^29. cos: quadrant qq = q & 3; sin: qq = (q + 3) & 3. Odd qq takes the
      // sine polynomial; qq in {1, 2} negates, i.e. bit 1 of qq + 1: of q + 1 for cos, of q for sin.
      const I q = iadd(w[i], iset1(1u << 29));
      const I q_plus_1 = iadd(w[i], iset1(3u << 29));
      const auto odd_q = P::bit_set(q, 30);
      const I cos_v = P::as_i(P::blend(odd_q, c[i], s[i]));
      const I sin_v = P::as_i(P::blend(odd_q, s[i], c[i]));
      cos_out[i] = P::as_f(P::xor_and(cos_v, q_plus_1, sign));
      sin_out[i] = P::as_f(P::xor_and(sin_v, q, sign));
    }
  }

  // convert::settle_nan, lane-wise: a NaN update result is x quieted when x is NaN, else the
  // default NaN, whatever NaN the hardware produced.
  static F settle_nan(F y, F x) {
    const F from_x = P::as_f(ior(P::as_i(x), iset1(fedkseed::convert::kF32QuietBit)));
    const F nan = P::blend(P::is_nan(x), P::as_f(iset1(fedkseed::convert::kF32DefaultNaN)), from_x);
    return P::blend(P::is_nan(y), y, nan);
  }

  // stream::stochastic_round_bf16 / _fp16, lane-wise; infinities and NaN pass through.
  template <DType D>
  static F stochastic_round(F y, I word) {
    const I b = P::as_i(y);
    const auto nonfinite = P::nonfinite(y);
    if constexpr (D == DType::kBFloat16) {
      const I r = iand(iadd(b, srli(word, 16)), iset1(0xFFFF0000u));
      return P::blend(nonfinite, P::as_f(r), y);
    } else if constexpr (D == DType::kFloat16) {
      I e = isub(iand(srli(b, 23), iset1(0xFF)), iset1(127));
      e = P::imax(e, iset1(static_cast<uint32_t>(-14)));
      const F up = P::as_f(slli(isub(iset1(127 + 10), e), 23));
      const F ulp = P::as_f(slli(iadd(e, iset1(127 - 10)), 23));
      const F s = mul(P::as_f(iand(b, iset1(0x7FFFFFFFu))), up);
      F q = P::cvt(P::cvtt(s));
      const F frac = sub(s, q);
      const F u = mul(P::cvt(srli(word, 8)), set1(st::kUniformScale));
      q = P::add_where(P::greater(frac, u), q, set1(1.0f));
      const F r = mul(q, ulp);  // >= 0: copying the sign bit of y is the negation
      const I signed_r = ior(P::as_i(r), iand(b, iset1(0x80000000u)));
      return P::blend(nonfinite, P::as_f(signed_r), y);
    } else {
      return y;
    }
  }

  // The Gaussian values of the N*L blocks: z[j][n] holds word-pair lane j of the blocks of vector n.
  FKS_CPU_INLINE static void gaussian_by_block(const I w[4][N], F z[4][N]) {
    I radius_words[2 * N], angle_words[2 * N];
    for (int n = 0; n < N; ++n) {
      radius_words[n] = w[0][n];
      radius_words[N + n] = w[2][n];
      angle_words[n] = w[1][n];
      angle_words[N + n] = w[3][n];
    }
    F r[2 * N], cos_v[2 * N], sin_v[2 * N];
    radius<2 * N>(radius_words, r);
    cos_sin<2 * N>(angle_words, cos_v, sin_v);
    for (int n = 0; n < N; ++n) {
      z[0][n] = mul(r[n], cos_v[n]);
      z[1][n] = mul(r[n], sin_v[n]);
      z[2][n] = mul(r[N + n], cos_v[N + n]);
      z[3][n] = mul(r[N + n], sin_v[N + n]);
    }
  }
};

}  // namespace
