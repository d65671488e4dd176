"""The Triton magnitude mask (docs/stream-spec.md#magnitude-mask): one bit per element, set iff
|float32(x)| <= float32(tau_t), each tensor's bits from a byte boundary.

One launch per dtype. Each program writes BYTES consecutive bytes of one tensor's bits (8 * BYTES
elements). It compares bit patterns with the threshold's key (``reference.threshold_key``), as
the C++ kernels do, so no floating-point compare or flush-to-zero mode is involved. It ORs bit
``lane`` of every byte in an unrolled loop over the 8 lanes, and uses no library @jit helper
(``tl.sum``, ``tl.zeros``): under TRITON_INTERPRET=1 those fail ("Cannot call @triton.jit'd
outside of the scope of a kernel") when triton was imported before the variable was set, as any
torch.optim import does (triton_stream.py avoids them for the same reason).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as R
from .. import stream as S
from ..paramset import ParamSet
from . import triton_stream as ts

BYTES = 128  # mask bytes per program (1024 elements)
_DTYPE_CODES = {getattr(torch, name): code for name, code in S.DTYPE_CODES.items()}
_BF16 = tl.constexpr(S.DTYPE_BFLOAT16)
_FP16 = tl.constexpr(S.DTYPE_FLOAT16)


@triton.jit
def _mask_kernel(ptrs, numels, keys, bases, tile_tensor, tile_byte, out, DTYPE: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    numel = tl.load(numels + t)
    key = tl.load(keys + t)
    address = tl.load(ptrs + t)
    byte = tl.load(tile_byte + pid) + tl.arange(0, BYTES).to(tl.int64)  # within the tensor's bits
    packed = (byte * 0).to(tl.int32)  # not tl.zeros: a library @jit helper (see the module docstring)
    for lane in tl.static_range(8):  # bit `lane` of every byte: no reduction op (see the module docstring)
        j = byte * 8 + lane
        valid = j < numel
        if DTYPE == _BF16:
            bits = tl.load(address.to(tl.pointer_type(tl.uint16)) + j, mask=valid, other=0).to(tl.uint32) << 16
        elif DTYPE == _FP16:
            h = tl.load(address.to(tl.pointer_type(tl.uint16)) + j, mask=valid, other=0)
            bits = ts.fp16_bits_to_float(h).to(tl.uint32, bitcast=True)
        else:
            bits = tl.load(address.to(tl.pointer_type(tl.uint32)) + j, mask=valid, other=0)
        magnitude = (bits & 0x7FFFFFFF).to(tl.int64)
        chosen = valid & (magnitude <= key)
        packed = packed | (chosen.to(tl.int32) << lane)
    tl.store(out + tl.load(bases + t) + byte, packed.to(tl.uint8), mask=byte * 8 < numel)


def magnitude_mask(pset: ParamSet, thresholds: list[float]) -> torch.Tensor:
    """uint8 [sum_t ceil(numel_t / 8)] on the parameters' device; ``thresholds`` are not NaN."""
    sizes = R.mask_sizes(pset.numels)
    out = torch.zeros(sum(sizes), dtype=torch.uint8, device=pset.device)
    bases = [sum(sizes[:i]) for i in range(len(sizes))]
    for dtype, code in _DTYPE_CODES.items():
        members = [i for i, x in enumerate(pset.tensors) if x.dtype == dtype and x.numel() > 0]
        if not members:
            continue
        tiles = [-(-sizes[i] // BYTES) for i in members]
        counts = torch.tensor(tiles, dtype=torch.int64)
        tile_tensor = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int32), counts)
        before = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile_byte = (torch.arange(int(counts.sum()), dtype=torch.int64) - before) * BYTES

        def dev(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(pset.device)

        _mask_kernel[(int(counts.sum()),)](
            dev([pset.tensors[i].data_ptr() for i in members]),
            dev([pset.numels[i] for i in members]),
            dev([R.threshold_key(thresholds[i]) for i in members]),
            dev([bases[i] for i in members]),
            tile_tensor.to(pset.device),
            tile_byte.to(pset.device),
            out,
            DTYPE=code,
            BYTES=BYTES,
            num_warps=4,
        )
    return out
