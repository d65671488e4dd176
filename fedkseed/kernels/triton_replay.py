"""The Triton backend: one kernel launch per dtype group replays K seeds over every tensor of a
ParamSet (``perturb_`` is K = 1), and the same kernel writes raw noise.

Tensors are reached through a device table of raw addresses (``data_ptr``), numels and global
offsets, plus a tile map (tensor id and first global index of every program). The tables are
built once per ParamSet and kept in ``pset.cache``, keyed on the tensors' addresses, so a
reallocated tensor rebuilds them; a call then costs one launch per dtype and no copy of the
parameters. Seeds, alphas and the rounding seed are read from device tensors inside the kernel
(no host synchronisation, so a step can be captured in a CUDA graph). A masked replay
(docs/stream-spec.md#magnitude-mask) reads each element's bit from the mask and stores only the
selected elements.

Tiles start at multiples of TILE in the global index space (not the tensor's), so each tile row
is one whole Philox block and the Philox call is shared by the elements of the block; elements
of a tile outside its tensor are masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference as R
from .. import stream as S
from ..paramset import ParamSet
from ..seeds import to_int64
from . import triton_stream as ts

TILE = 1024  # elements per program: a multiple of 128 (one Rademacher block per row)
# The dtype table (fedkseed/stream.py, mirroring csrc/include/fedkseed/dtypes.h).
_DTYPE_CODES = {getattr(torch, name): code for name, code in S.DTYPE_CODES.items()}
_BF16 = tl.constexpr(S.DTYPE_BFLOAT16)
_FP16 = tl.constexpr(S.DTYPE_FLOAT16)


@triton.jit
def _replay_kernel(
    ptrs,
    numels,
    offsets,
    decays,
    tile_tensor,
    tile_start,
    seeds,
    alphas,
    K,
    rounding_seed,
    mask,
    mask_base,
    DTYPE: tl.constexpr,
    TAG: tl.constexpr,
    LANES: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    ROUND: tl.constexpr,
    NOISE: tl.constexpr,
    MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    first = tl.load(tile_start + pid).to(tl.uint64, bitcast=True)
    numel = tl.load(numels + t).to(tl.uint64, bitcast=True)
    offset = tl.load(offsets + t).to(tl.uint64, bitcast=True)
    address = tl.load(ptrs + t)
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, LANES)[None, :]
    index = first + (rows * LANES + cols).to(tl.uint64)
    # Local index; below the tensor it wraps past numel, so one unsigned compare masks both ends.
    local = index - offset
    valid = local < numel
    local = tl.where(valid, local, 0).to(tl.int64)
    if MASK:  # only the selected elements are loaded and stored: the others keep their bits
        byte = tl.load(mask + tl.load(mask_base + t) + (local >> 3), mask=valid, other=0).to(tl.int32)
        valid = valid & (((byte >> (local & 7).to(tl.int32)) & 1) == 1)

    if NOISE:
        y = ts.noise_tile(tl.load(seeds).to(tl.uint64, bitcast=True), first, rows, cols, TAG)
    else:
        acc = tl.full([ROWS, LANES], 0.0, tl.float32)
        for k in range(K):
            seed = tl.load(seeds + k).to(tl.uint64, bitcast=True)
            alpha = tl.load(alphas + k)
            acc = acc + alpha * ts.noise_tile(seed, first, rows, cols, TAG)
        if DTYPE == _BF16:
            x = ts.bf16_bits_to_float(tl.load(address.to(tl.pointer_type(tl.uint16)) + local, mask=valid))
        elif DTYPE == _FP16:
            x = ts.fp16_bits_to_float(tl.load(address.to(tl.pointer_type(tl.uint16)) + local, mask=valid))
        else:
            x = tl.load(address.to(tl.pointer_type(tl.float32)) + local, mask=valid)
        y = x
        if HAS_DECAY:
            d = tl.load(decays + t)
            y = tl.where(d != 1.0, y * d, y)
        y = ts.settle_nan(y + acc, x)
        if ROUND:
            word = ts.rounding_word(tl.load(rounding_seed).to(tl.uint64, bitcast=True), index)
            if DTYPE == _BF16:
                y = ts.stochastic_round_bf16(y, word)
            else:
                y = ts.stochastic_round_fp16(y, word)

    if DTYPE == _BF16:
        tl.store(address.to(tl.pointer_type(tl.uint16)) + local, ts.float_to_bf16_bits(y), mask=valid)
    elif DTYPE == _FP16:
        tl.store(address.to(tl.pointer_type(tl.uint16)) + local, ts.float_to_fp16_bits(y), mask=valid)
    else:
        tl.store(address.to(tl.pointer_type(tl.float32)) + local, y, mask=valid)


class _Group(NamedTuple):
    """The device tables of the tensors of one dtype."""

    dtype: torch.dtype
    members: tuple[int, ...]  # positions in the ParamSet
    ptrs: torch.Tensor  # int64 [T] data_ptr
    numels: torch.Tensor  # int64 [T]
    offsets: torch.Tensor  # int64 [T], two's complement of the uint64 global offsets
    tile_tensor: torch.Tensor  # int32 [tiles], index into this group's tables
    tile_start: torch.Tensor  # int64 [tiles], first global index of each tile (two's complement)
    mask_base: torch.Tensor  # int64 [T], first byte of each tensor's bits in a magnitude mask


def _build_group(dtype, members, ptrs, numels, offsets, device, mask_base=None) -> _Group:
    first = [o - o % TILE for o in offsets]
    tiles = [-(-(o + n - f) // TILE) if n else 0 for f, o, n in zip(first, offsets, numels)]
    counts = torch.tensor(tiles, dtype=torch.int64)
    tile_tensor = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int32), counts)
    # Tile p of tensor t starts at first[t] + (p - tiles before t) * TILE; built in uint64 space
    # as int64 with wrapping, which torch's int64 arithmetic does.
    before = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(before, counts)
    first_signed = torch.tensor([to_int64(v) for v in first], dtype=torch.int64)
    starts = torch.repeat_interleave(first_signed, counts) + within * TILE

    def dev(values, dtype_):
        return torch.tensor(values, dtype=dtype_).to(device)

    return _Group(
        dtype,
        tuple(members),
        dev(ptrs, torch.int64),
        dev(numels, torch.int64),
        dev([to_int64(v) for v in offsets], torch.int64),
        tile_tensor.to(device),
        starts.to(device),
        dev(mask_base if mask_base is not None else [0] * len(members), torch.int64),
    )


def _groups(pset: ParamSet) -> list[_Group]:
    """The cached per-dtype tables of ``pset``, rebuilt when a tensor moved or was reallocated."""
    key = (str(pset.device), TILE, tuple(t.data_ptr() for t in pset.tensors))
    cached = pset.cache.get("triton")
    if cached is not None and cached[0] == key:
        return cached[1]
    groups = []
    sizes = R.mask_sizes(pset.numels)
    mask_base = [sum(sizes[:i]) for i in range(len(sizes))]
    for dtype in _DTYPE_CODES:
        members = [i for i, t in enumerate(pset.tensors) if t.dtype == dtype and t.numel() > 0]
        if members:
            groups.append(
                _build_group(
                    dtype,
                    members,
                    [pset.tensors[i].data_ptr() for i in members],
                    [pset.numels[i] for i in members],
                    [pset.offsets[i] for i in members],
                    pset.device,
                    [mask_base[i] for i in members],
                )
            )
    pset.cache["triton"] = (key, groups, {})
    return groups


def _decay_table(pset: ParamSet, group: _Group, decay: list[float]) -> torch.Tensor:
    """float32 decay factors of the group's tensors, cached per distinct factor list (a training
    run uses one), so steady-state calls copy nothing to the device."""
    tables = pset.cache["triton"][2]
    key = (group.members, tuple(decay[i] for i in group.members))
    table = tables.get(key)
    if table is None:
        if len(tables) >= 8:
            tables.clear()
        table = torch.tensor(key[1], dtype=torch.float32).to(pset.device)
        tables[key] = table
    return table


def _launch(group: _Group, seeds, alphas, k: int, tag: int, decays, rounding_seed, noise: bool, mask=None) -> None:
    lanes = 4 if tag == 0 else 128
    tiles = group.tile_tensor.numel()
    _replay_kernel[(tiles,)](
        group.ptrs,
        group.numels,
        group.offsets,
        decays if decays is not None else group.numels,  # unused when HAS_DECAY is False
        group.tile_tensor,
        group.tile_start,
        seeds,
        alphas,
        k,
        rounding_seed if rounding_seed is not None else seeds,  # unused when ROUND is False
        mask if mask is not None else seeds,  # unused when MASK is False
        group.mask_base,
        DTYPE=_DTYPE_CODES[group.dtype],
        TAG=tag,
        LANES=lanes,
        ROWS=TILE // lanes,
        HAS_DECAY=decays is not None,
        ROUND=rounding_seed is not None and group.dtype != torch.float32,
        NOISE=noise,
        MASK=mask is not None,
        num_warps=4,
        enable_fp_fusion=False,
    )


def replay_(
    pset: ParamSet,
    seeds: torch.Tensor,
    alphas: torch.Tensor,
    tag: int,
    decay: list[float] | None,
    rounding_seed: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> None:
    """theta <- theta * d + sum_k alphas[k] z(seeds[k]) over ``pset``: one launch per dtype;
    with ``mask`` only the elements whose bit is 1."""
    k = seeds.numel()
    for group in _groups(pset):
        decays = _decay_table(pset, group, decay) if decay is not None else None
        _launch(group, seeds, alphas, k, tag, decays, rounding_seed, noise=False, mask=mask)


def noise_(out: torch.Tensor, seed: torch.Tensor, offset: int, tag: int) -> None:
    """out[j] = z(seed, offset + j) for the contiguous float32 tensor ``out``."""
    n = out.numel()
    if n == 0:
        return
    group = _build_group(torch.float32, [0], [out.data_ptr()], [n], [offset], out.device)
    _launch(group, seed, seed, 1, tag, None, None, noise=True)
