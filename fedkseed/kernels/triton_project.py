"""The Triton projection (docs/stream-spec.md#projection): p_k = sum_i x_i z(s_k, i) for K seeds.

The parameters are first staged, widened to float32 (exact), into one buffer of whole chunks of
4096 global indices (the chunks that hold an element; absent positions are 0), so a chunk shared
by several tensors, or dtypes, is one row. One program per chunk then loops over the seeds: the
chunk's z as a [rows, lanes] tile (one Philox block per row, as in ``triton_replay``), the exact
float64 products, the pairwise tree in index order written out level by level with reshape/split
(``tl.sum``'s order is unspecified, so it is never used on more than one element), and the chunk
partial added to the seed's exact accumulator with integer atomics (any order gives the same sums).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .. import reference as R
from ..seeds import to_int64
from . import triton_stream as ts

_CHUNK = tl.constexpr(R.PROJECT_CHUNK)
_LSB = tl.constexpr(R.PROJECT_LSB)
_WIDTH = tl.constexpr(R.PROJECT_WIDTH)
_NAN = tl.constexpr(R.PROJECT_NAN)
_POS_INF = tl.constexpr(R.PROJECT_POS_INF)
_NEG_INF = tl.constexpr(R.PROJECT_NEG_INF)


@triton.jit
def _halve(v):
    """One tree level: [n] -> [n / 2], element m = v[2m] + v[2m + 1]."""
    a, b = tl.split(tl.reshape(v, (v.shape[0] // 2, 2)))
    return a + b


@triton.jit
def _tree_4096(v):
    """The pairwise tree of a [4096] float64 vector in index order (12 levels)."""
    v = _halve(_halve(_halve(_halve(v))))  # 256
    v = _halve(_halve(_halve(_halve(v))))  # 16
    v = _halve(_halve(_halve(v)))  # 2
    a, b = tl.split(v)
    return a + b


@triton.jit
def _add_exact(acc, q):
    """Add the float64 chunk partial q to the accumulator row ``acc`` (reference.project_accumulator):
    q = m * 2^e placed at bit e + LSB, as three signed 32-bit digits."""
    b = q.to(tl.int64, bitcast=True)
    biased = (b >> 52) & 0x7FF
    fraction = b & 0xFFFFFFFFFFFFF
    if biased == 0x7FF:
        if fraction != 0:
            tl.atomic_add(acc + _NAN, 1)
        elif b < 0:
            tl.atomic_add(acc + _NEG_INF, 1)
        else:
            tl.atomic_add(acc + _POS_INF, 1)
    elif (b & 0x7FFFFFFFFFFFFFFF) != 0:
        m = tl.where(biased != 0, fraction | 0x10000000000000, fraction)
        p = tl.where(biased != 0, biased, 1) - 1075 + _LSB
        m = m >> tl.maximum(-p, 0)  # never drops a set bit (docs/stream-spec.md#projection)
        p = tl.maximum(p, 0)
        limb = p >> 5
        shift = p & 31
        lo = (m << shift) & 0xFFFFFFFF
        up = tl.where(shift == 0, m >> 32, m >> (32 - shift))
        sign = tl.where(b < 0, -1, 1).to(tl.int64)
        tl.atomic_add(acc + limb, sign * lo)
        tl.atomic_add(acc + limb + 1, sign * (up & 0xFFFFFFFF))
        tl.atomic_add(acc + limb + 2, sign * (up >> 32))


@triton.jit
def _project_kernel(xs, chunk_first, seeds, K, acc, TAG: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    first = tl.load(chunk_first + pid).to(tl.uint64, bitcast=True)
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, LANES)[None, :]
    x = tl.load(xs + pid.to(tl.int64) * _CHUNK + rows * LANES + cols).to(tl.float64)
    for k in range(K):
        seed = tl.load(seeds + k).to(tl.uint64, bitcast=True)
        z = ts.noise_tile(seed, first, rows, cols, TAG).to(tl.float64)
        q = _tree_4096(tl.reshape(x * z, (ROWS * LANES,)))  # products exact in float64
        _add_exact(acc + k * _WIDTH, q)


def _stage(tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [chunks * 4096] staged x, int64 [chunks] first global index of each chunk)."""
    shift, size = R.PROJECT_CHUNK_SHIFT, R.PROJECT_CHUNK
    spans = [(o >> shift, (o + t.numel() - 1) >> shift) for t, o in zip(tensors, offsets) if t.numel()]
    chunks = sorted({c for lo, hi in spans for c in range(lo, hi + 1)})
    device = tensors[0].device if tensors else torch.device("cpu")
    xs = torch.zeros(len(chunks) * size, dtype=torch.float32, device=device)
    for t, o in zip(tensors, offsets):
        if t.numel():
            # A tensor's chunks are consecutive in the sorted list, so it stages as one slice.
            start = bisect.bisect_left(chunks, o >> shift) * size + (o & (size - 1))
            xs[start : start + t.numel()] = t.detach().reshape(-1).float()  # exact widening
    first = torch.tensor([to_int64(c << shift) for c in chunks], dtype=torch.int64, device=device)
    return xs, first


def project(tensors: Sequence[torch.Tensor], offsets: Sequence[int], seeds: torch.Tensor, tag: int) -> torch.Tensor:
    """int64 [K, PROJECT_WIDTH] exact accumulator of the chunk partials of ``tensors``."""
    k = seeds.numel()
    xs, first = _stage(tensors, offsets)
    acc = torch.zeros(k, R.PROJECT_WIDTH, dtype=torch.int64, device=xs.device)
    if k == 0 or first.numel() == 0:
        return acc
    lanes = 4 if tag == 0 else 128
    rows = R.PROJECT_CHUNK // lanes
    _project_kernel[(first.numel(),)](
        xs, first, seeds, k, acc, TAG=tag, LANES=lanes, ROWS=rows, num_warps=8, enable_fp_fusion=False
    )
    return acc
