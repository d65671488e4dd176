"""The normative pure-PyTorch implementation of perturbation stream v1.

Readable rather than fast: every kernel backend (C++ CPU, Triton, CUDA) is validated against
this module bit for bit. Integer work is done in int64 tensors holding unsigned 32-bit words
(products are split so nothing overflows); float work is a fixed sequence of float32 tensor
operations, each separately rounded, in exactly the order of ``csrc/include/fedkseed/stream.h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from . import stream as S
from .seeds import U64 as _U64
from .seeds import check_seed

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * c for a 32-bit constant a and words c, without overflow."""
    p_lo = c * (a & 0xFFFF)  # < 2^48
    p_hi = c * (a >> 16)  # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on counters (four int64 tensors of 32-bit words) with key (k0, k1)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(S.PHILOX_ROUNDS):
        if round_ > 0:
            k0 = (k0 + S.PHILOX_W0) & _MASK32
            k1 = (k1 + S.PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(S.PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(S.PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox(seed: int, blocks: torch.Tensor, tag: int) -> list[torch.Tensor]:
    """The stream's words: counters (lo32(b), hi32(b), tag, 0), key (lo32(seed), hi32(seed)).

    ``blocks`` is an int64 tensor of non-negative block numbers; returns four int64 tensors of
    words in [0, 2^32).
    """
    counter = [blocks & _MASK32, blocks >> 32, torch.full_like(blocks, tag), torch.zeros_like(blocks)]
    return philox4x32(counter, (seed & _MASK32, (seed >> 32) & _MASK32))


def uniform_numerator(w: torch.Tensor) -> torch.Tensor:
    """The odd integer n = 2*(w >> 9) + 1 < 2^24, so that U(w) = n * 2^-24 exactly."""
    return 2 * (w >> 9) + 1


def uniform(w: torch.Tensor) -> torch.Tensor:
    return uniform_numerator(w).to(torch.float32) * S.UNIFORM_SCALE


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 tensors holding 32-bit patterns as float32."""
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit patterns of a float32 tensor, as non-negative int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def log_uniform(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for float32 u in [2^-24, 1), cephes logf with an exact exponent split."""
    bits = _bits(u)
    e = ((bits >> 23) & 0xFF) - 126
    m = _as_float((bits & 0x007FFFFF) | 0x3F000000)  # [0.5, 1)
    small = m < S.LOG_SQRT_HALF
    e = e - small.to(torch.int64)
    x = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = x * x
    p = torch.full_like(x, S.LOG_POLY[0])
    for c in S.LOG_POLY[1:]:
        p = p * x + c
    y = (p * x) * z
    ef = e.to(torch.float32)
    y = y + ef * S.LOG_LN2_LO
    y = y - 0.5 * z
    r = x + y
    return r + ef * S.LOG_LN2_HI


def cos_sin_2pi(n: torch.Tensor, odd: torch.Tensor | int) -> torch.Tensor:
    """cos(2*pi*n*2^-24) where ``odd`` is 0 and sin(...) where it is 1, for odd 24-bit n."""
    q = (n + (1 << 21)) >> 22
    m = n - (q << 22)
    x = m.to(torch.float32) * S.SINCOS_SCALE
    z = x * x
    qq = (q + 3 * odd) & 3
    s = S.SIN_POLY[0] * z + S.SIN_POLY[1]
    s = s * z + S.SIN_POLY[2]
    s = (s * z) * x
    s = s + x
    c = S.COS_POLY[0] * z + S.COS_POLY[1]
    c = c * z + S.COS_POLY[2]
    c = (c * z) * z
    c = c - 0.5 * z
    c = c + 1.0
    v = torch.where((qq & 1) == 1, s, c)
    return torch.where((qq == 1) | (qq == 2), -v, v)


def gaussian_from_words(wa: torch.Tensor, wb: torch.Tensor, odd: int) -> torch.Tensor:
    # torch's float32 sqrt on CPU is not correctly rounded (about 0.7% of these inputs are off
    # by one ulp); float64 sqrt rounded to float32 is (53 >= 2*24 + 2: no double-rounding error).
    r = torch.sqrt((-2.0 * log_uniform(uniform(wa))).double()).float()
    return r * cos_sin_2pi(uniform_numerator(wb), odd)


def _block_range(offset: int, count: int, shift: int) -> torch.Tensor:
    first = offset >> shift
    last = (offset + count - 1) >> shift
    return torch.arange(first, last + 1, dtype=torch.int64)


def noise(seed: int, count: int, offset: int = 0, dist: str = "gaussian") -> torch.Tensor:
    """float32 values of z(seed, i) for the global indices i = offset .. offset + count - 1."""
    return noise_rows([seed], count, offset, dist)[0]


def noise_rows(seeds: Sequence[int], count: int, offset: int = 0, dist: str = "gaussian") -> torch.Tensor:
    """float32 [len(seeds), count]: row k holds z(seeds[k], i) for i = offset .. offset + count - 1
    (the same operations as for one seed, broadcast over a seed dimension)."""
    tag = S.dist_tag(dist)
    seeds = [check_seed(seed) for seed in seeds]
    if count < 0 or offset < 0 or offset + count > _U64:
        raise ValueError(f"indices offset={offset}, count={count} leave [0, 2^64)")
    if count == 0 or not seeds:
        return torch.empty(len(seeds), 0, dtype=torch.float32)
    # Keys as [K, 1] tensors of words, so the counters [blocks] broadcast to [K, blocks].
    key = (
        torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64).unsqueeze(1),
        torch.tensor([s >> 32 for s in seeds], dtype=torch.int64).unsqueeze(1),
    )
    shift = S.GAUSSIAN_BLOCK_SHIFT if tag == S.TAG_GAUSSIAN else S.RADEMACHER_BLOCK_SHIFT
    blocks = _block_range(offset, count, shift)
    counter = [blocks & _MASK32, blocks >> 32, torch.full_like(blocks, tag), torch.zeros_like(blocks)]
    w = philox4x32(counter, key)
    if tag == S.TAG_GAUSSIAN:
        values = torch.stack(
            [
                gaussian_from_words(w[0], w[1], 0),
                gaussian_from_words(w[0], w[1], 1),
                gaussian_from_words(w[2], w[3], 0),
                gaussian_from_words(w[2], w[3], 1),
            ],
            dim=-1,
        )  # [K, blocks, 4]
    else:
        words = torch.stack(w, dim=-1)  # [K, blocks, 4]
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1  # [K, blocks, 4, 32]
        values = torch.where(bits == 1, 1.0, -1.0).to(torch.float32)
    start = offset & ((1 << shift) - 1)
    return values.reshape(len(seeds), -1)[:, start : start + count]


def rounding_words(seed: int, count: int, offset: int = 0) -> torch.Tensor:
    """The tag-2 words of stochastic rounding for indices offset .. offset + count - 1."""
    shift = S.ROUNDING_BLOCK_SHIFT
    w = torch.stack(philox(seed, _block_range(offset, count, shift), S.TAG_ROUNDING), dim=1)
    start = offset & ((1 << shift) - 1)
    return w.reshape(-1)[start : start + count]


def stochastic_round(y: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 values that ``dtype`` holds exactly, rounded up with probability equal to the
    discarded fraction (docs/stream-spec.md#stochastic-rounding); a finite value rounded past the
    largest finite one becomes +-inf; NaN and +-inf pass through (the cast then applies the
    round-to-nearest rule to them)."""
    bits = _bits(y)
    finite = (bits & 0x7F800000) != 0x7F800000
    if dtype == torch.bfloat16:
        rounded = _as_float((bits + (words >> 16)) & 0xFFFF0000)
    elif dtype == torch.float16:
        e = torch.clamp(((bits >> 23) & 0xFF) - 127, min=-14)
        up = _as_float((127 + 10 - e) << 23)
        ulp = _as_float((127 - 10 + e) << 23)
        s = _as_float(bits & 0x7FFFFFFF) * up
        q = s.to(torch.int32).to(torch.float32)
        frac = s - q
        u = (words >> 8).to(torch.float32) * S.UNIFORM_SCALE
        q = torch.where(frac > u, q + 1.0, q)
        r = q * ulp
        rounded = torch.where((bits >> 31) == 1, -r, r)
    else:
        return y
    return torch.where(finite, rounded, y)


# ------------------------------------------------------------------------------ conversion
# float32 <-> bfloat16/float16 on bit patterns (docs/stream-spec.md#conversion), defined here
# with integer operations rather than delegated to torch's casts, whose NaN bits differ by
# device and vectorisation.
def _is_nan_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 0x7FFFFFFF) > 0x7F800000


def settle_nan(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The update's NaN bits: a NaN in ``y`` becomes ``x`` quieted where ``x`` is NaN, else the
    default NaN (hardware NaN propagation differs, so the stream fixes it)."""
    xb = _bits(x)
    nan = torch.where(_is_nan_bits(xb), xb | S.F32_QUIET_BIT, S.F32_DEFAULT_NAN)
    return torch.where(_is_nan_bits(_bits(y)), _as_float(nan), y)


def f32_to_bf16_bits(y: torch.Tensor) -> torch.Tensor:
    """bfloat16 bit patterns (int64) of float32 ``y``: round to nearest even on the bits (overflow
    to +-inf, no flush); a NaN keeps sign and top 7 payload bits, quieted."""
    x = _bits(y)
    rounded = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    return torch.where(_is_nan_bits(x), (x >> 16) | 0x0040, rounded)


def f32_to_f16_bits(y: torch.Tensor) -> torch.Tensor:
    """float16 bit patterns (int64) of float32 ``y``: round to nearest even with gradual underflow,
    |y| >= 65520 to +-inf; a NaN keeps sign and top 10 payload bits, quieted."""
    x = _bits(y)
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    normal = (a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13
    e = a >> 23
    shift = torch.clamp(126 - e, 14, 24)
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int64)
    sub = torch.where(e < 102, 0, sub)
    out = torch.where(a >= 0x38800000, normal, sub)
    out = torch.where(a >= S.FP16_OVERFLOW_BITS, 0x7C00, out)
    out = torch.where(a > 0x7F800000, 0x7E00 | ((a >> 13) & 0x3FF), out)
    return sign | out


def bf16_bits_to_f32(h: torch.Tensor) -> torch.Tensor:
    return _as_float((h & 0xFFFF) << 16)


def f16_bits_to_f32(h: torch.Tensor) -> torch.Tensor:
    """Exact float16 -> float32 (NaN payloads kept), on the bits."""
    h = h & 0xFFFF
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    wide = torch.where(exp == 0x1F, 0x7F800000 | (man << 13), ((exp + 112) << 23) | (man << 13))
    # Subnormal man * 2^-24: exact in float32 (a product of an integer < 2^10 and a power of 2).
    tiny = _bits(man.to(torch.float32) * float.fromhex("0x1p-24"))
    return _as_float(sign | torch.where(exp == 0, tiny, wide))


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 values of a float32/bfloat16/float16 tensor (flattened, on CPU), exactly."""
    flat = x.detach().reshape(-1).cpu()
    if flat.dtype == torch.float32:
        return flat.clone()
    bits = flat.view(torch.int16).to(torch.int64) & 0xFFFF
    if flat.dtype == torch.bfloat16:
        return bf16_bits_to_f32(bits)
    if flat.dtype == torch.float16:
        return f16_bits_to_f32(bits)
    raise TypeError(f"params must be float32, bfloat16 or float16, got {flat.dtype}")


def from_float32(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (float32) stored as ``dtype`` by the conversion rule."""
    if dtype == torch.float32:
        return y
    bits = f32_to_bf16_bits(y) if dtype == torch.bfloat16 else f32_to_f16_bits(y)
    signed = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)
    return signed.to(torch.int16).view(dtype)


@torch.no_grad()
def replay_(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    seeds: Sequence[int],
    alphas: torch.Tensor,
    dist: str = "gaussian",
    decay: Sequence[float] | None = None,
    rounding_seed: int | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """x <- cast(float32(x) * d + sum_k alphas[k] * z(seeds[k], i)) for every element, summing
    in order k = 0 .. K-1 (docs/stream-spec.md#accumulation); a NaN result is settled by
    ``settle_nan`` and the cast is ``from_float32`` (docs/stream-spec.md#conversion).
    ``alphas`` is float32; ``decay`` holds one float32 factor per tensor (None: no decay);
    ``rounding_seed`` selects stochastic rounding; ``mask`` (uint8, ``magnitude_mask``'s layout)
    restricts the update to the elements whose bit is 1, the others keep their stored bits
    (docs/stream-spec.md#magnitude-mask)."""
    alphas = alphas.to(torch.float32)
    selected = mask_bits(mask, [x.numel() for x in tensors]) if mask is not None else None
    for t, (x, offset) in enumerate(zip(tensors, offsets)):
        n = x.numel()
        if n == 0:
            continue
        acc = torch.zeros(n, dtype=torch.float32)
        for k, seed in enumerate(seeds):
            acc = acc + alphas[k] * noise(seed, n, offset, dist)
        x0 = to_float32(x)
        y = x0
        if decay is not None:
            d = torch.tensor(decay[t], dtype=torch.float32)
            if d.item() != 1.0:
                y = y * d
        y = settle_nan(y + acc, x0)
        if rounding_seed is not None:
            y = stochastic_round(y, rounding_words(rounding_seed, n, offset), x.dtype)
        out = from_float32(y, x.dtype)
        if selected is not None:  # unselected elements keep their stored bits, NaN payloads included
            ints = _STORAGE_INTS[x.dtype]
            kept = x.detach().reshape(-1).cpu().view(ints)
            out = torch.where(selected[t], out.view(ints), kept).view(x.dtype)
        x.copy_(out.reshape(x.shape))


# --------------------------------------------------------------------------- magnitude mask
# docs/stream-spec.md#magnitude-mask: per tensor a threshold tau_t (the k-th smallest |x|, NaN as
# +inf), one bit per element (|x| <= tau_t), each tensor's bits starting on a byte boundary.
_STORAGE_INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _check_density(density: float) -> Fraction:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1), got {type(density).__name__}")
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1) (1 means no mask: pass mask=None), got {density!r}")
    return Fraction(float(density))


def magnitude_thresholds(tensors: Sequence[torch.Tensor], density: float) -> list[float]:
    """tau_t for each tensor: the k_t-th smallest float32 |x| (NaN counted as +inf) with
    k_t = ceil(density * n_t) computed exactly and clamped to [1, n_t]; +0.0 for an empty tensor.
    An exact order statistic, computed on the tensor's device (torch.kthvalue)."""
    rho = _check_density(density)
    out = []
    for x in tensors:
        n = x.numel()
        if n == 0:
            out.append(0.0)
            continue
        k = min(max(math.ceil(rho * n), 1), n)
        a = x.detach().reshape(-1).float().abs()  # widening and |.| are exact
        a = torch.where(torch.isnan(a), math.inf, a)
        out.append(float(torch.kthvalue(a, k).values.item()))
    return out


def mask_sizes(numels: Sequence[int]) -> list[int]:
    """Bytes of each tensor's bits: ceil(n_t / 8); tensor t starts at the sum of those before it."""
    return [-(-n // 8) for n in numels]


def magnitude_mask(tensors: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """The uint8 mask (on the tensors' device): bit j & 7 of byte B_t + (j >> 3) is 1 iff
    |float32(x_j)| <= float32(thresholds[t]) (NaN never); unused high bits are 0."""
    device = tensors[0].device if tensors else torch.device("cpu")
    pieces = []
    for x, tau in zip(tensors, thresholds, strict=True):
        n = x.numel()
        tau32 = torch.tensor(float(tau), dtype=torch.float64).to(torch.float32)  # round to nearest even
        selected = to_float32(x).abs() <= tau32  # IEEE: NaN compares false, -0.0 == +0.0
        padded = torch.zeros(mask_sizes([n])[0] * 8, dtype=torch.int64)
        padded[:n] = selected.to(torch.int64)
        weights = 1 << torch.arange(8, dtype=torch.int64)  # element j is bit j & 7, LSB first
        pieces.append((padded.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8))
    out = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    return out.to(device)


def mask_bits(mask: torch.Tensor, numels: Sequence[int]) -> list[torch.Tensor]:
    """Each tensor's bits of ``mask`` as a bool tensor of its numel (CPU)."""
    flat = mask.detach().reshape(-1).cpu().to(torch.int64)
    out, start = [], 0
    for n, size in zip(numels, mask_sizes(numels)):
        bytes_ = flat[start : start + size]
        bits = (bytes_.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1
        out.append(bits.reshape(-1)[:n] == 1)
        start += size
    return out


def threshold_key(tau: float) -> int:
    """The integer the kernels compare bit patterns with: bits(|x|) <= key iff |x| <= float32(tau)
    for every x that is not NaN (docs/stream-spec.md#magnitude-mask); tau must not be NaN."""
    tau32 = torch.tensor(float(tau), dtype=torch.float64).to(torch.float32)
    if bool(tau32 < 0):
        return -1
    return int(_bits(tau32.reshape(1))[0]) & 0x7FFFFFFF


# ------------------------------------------------------------------------------ projection
# docs/stream-spec.md#projection: p_k = sum_i x_i z(s_k, i), with float64 products summed in a fixed
# pairwise tree over each chunk of PROJECT_CHUNK global indices, and the chunk partials summed
# exactly (then rounded once). The exact sum travels as a fixed-point integer accumulator:
# PROJECT_LIMBS signed 32-bit digits in int64 (value = sum_j limb[j] * 2^(32 j) * 2^-PROJECT_LSB),
# then three counters of NaN, +inf and -inf chunk partials. Any order of integer additions gives
# the same accumulator, so threads, blocks and ranks (one all-reduce) may add theirs in any order.
PROJECT_CHUNK_SHIFT = 12
PROJECT_CHUNK = 1 << PROJECT_CHUNK_SHIFT
PROJECT_LSB = 352  # chunk partials are multiples of 2^-298 (products of two float32): exact here
PROJECT_LIMBS = 16
PROJECT_NAN, PROJECT_POS_INF, PROJECT_NEG_INF = PROJECT_LIMBS, PROJECT_LIMBS + 1, PROJECT_LIMBS + 2
PROJECT_WIDTH = PROJECT_LIMBS + 3


def pairwise_tree(values: torch.Tensor) -> torch.Tensor:
    """The fixed pairwise sum over the last dimension (a power of 2): (v0 + v1) + (v2 + v3) ..."""
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values[..., 0]


def project_partials(
    tensors: Sequence[torch.Tensor], offsets: Sequence[int], seeds: Sequence[int], dist: str = "gaussian"
) -> tuple[list[int], torch.Tensor]:
    """(chunk numbers in increasing order, float64 [chunks, K] partials): every chunk of
    PROJECT_CHUNK global indices that holds an element of ``tensors``, and for each seed the
    pairwise tree of its float64 products x_i * z(s_k, i), absent elements counting as 0."""
    slots: dict[int, list[tuple[int, int, torch.Tensor, int]]] = {}  # chunk -> (slot, count, x, start)
    for x, offset in zip(tensors, offsets):
        n = x.numel()
        if n == 0:
            continue
        values = to_float32(x).double()
        j = 0
        while j < n:
            g = offset + j
            slot = g & (PROJECT_CHUNK - 1)
            count = min(n - j, PROJECT_CHUNK - slot)
            slots.setdefault(g >> PROJECT_CHUNK_SHIFT, []).append((slot, count, values, j))
            j += count
    chunks = sorted(slots)
    partials = torch.zeros(len(chunks), len(seeds), dtype=torch.float64)
    for first in range(0, len(seeds), 64):  # 64 seeds at a time bound the products' memory
        batch = seeds[first : first + 64]
        products = torch.zeros(len(batch), len(chunks), PROJECT_CHUNK, dtype=torch.float64)
        for row, chunk in enumerate(chunks):
            for slot, count, values, start in slots[chunk]:
                z = noise_rows(batch, count, (chunk << PROJECT_CHUNK_SHIFT) + slot, dist).double()
                products[:, row, slot : slot + count] = values[start : start + count] * z  # exact
        partials[:, first : first + len(batch)] = pairwise_tree(products).t()
    return chunks, partials


def project_accumulator(partials: torch.Tensor) -> torch.Tensor:
    """The exact sum of float64 chunk partials [chunks, K] as an int64 [K, PROJECT_WIDTH]
    accumulator (canonical digits: limbs 0..14 in [0, 2^32), limb 15 signed)."""
    acc = torch.zeros(partials.shape[1], PROJECT_WIDTH, dtype=torch.int64)
    for k, column in enumerate(partials.t().tolist()):
        total = 0
        for q in column:
            if math.isnan(q):
                acc[k, PROJECT_NAN] += 1
            elif math.isinf(q):
                acc[k, PROJECT_POS_INF if q > 0 else PROJECT_NEG_INF] += 1
            else:
                total += int(q * 2.0**PROJECT_LSB)  # exact: a power-of-2 scaling to an integer
        for j in range(PROJECT_LIMBS - 1):
            acc[k, j] = (total >> (32 * j)) & _MASK32
        acc[k, PROJECT_LIMBS - 1] = total >> (32 * (PROJECT_LIMBS - 1))
    return acc


def finish_projection(acc: torch.Tensor) -> torch.Tensor:
    """float64 [K] from int64 [K, PROJECT_WIDTH] accumulators (any digit form, e.g. a sum of
    several): NaN (0x7FF8000000000000) if a chunk partial was NaN or both infinities occurred,
    else the infinity that occurred, else the exact sum rounded to nearest, ties to even (+0.0
    when it is zero). Python's int / int division is correctly rounded."""
    out = []
    for row in acc.cpu().tolist():
        if row[PROJECT_NAN] or (row[PROJECT_POS_INF] and row[PROJECT_NEG_INF]):
            out.append(math.nan)
        elif row[PROJECT_POS_INF] or row[PROJECT_NEG_INF]:
            out.append(math.inf if row[PROJECT_POS_INF] else -math.inf)
        else:
            total = sum(limb << (32 * j) for j, limb in enumerate(row[:PROJECT_LIMBS]))
            out.append(total / (1 << PROJECT_LSB))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def project(
    tensors: Sequence[torch.Tensor], offsets: Sequence[int], seeds: Sequence[int], dist: str = "gaussian"
) -> torch.Tensor:
    """p_k = sum_i x_i z(seeds[k], i) over every element of ``tensors`` (docs/stream-spec.md#projection)."""
    _, partials = project_partials(tensors, offsets, seeds, dist)
    return finish_projection(project_accumulator(partials))
