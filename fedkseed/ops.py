"""The public ops: ``perturb_``, ``replay_``, ``noise``, ``project`` and the magnitude mask
(``magnitude_thresholds``, ``magnitude_mask``), validated once and dispatched to a backend
("reference", "cpu", "triton", "cuda"; "auto" picks by device and what is installed).

Which backend runs is decided here and nowhere above: by the tensors' device, as torch
dispatches. Tests and benchmarks override it in two ways only: an op's own ``backend=``, or the
one setting, ``use_backend(name)`` for a block of code (its default: the ``FEDKSEED_BACKEND``
environment variable, else "auto"), which every op called without ``backend=`` follows, so it
reaches ZOSGD, ``zo_step``, ``History.apply_`` and a FedKSeed run without their taking an argument.

Validation happens before anything is written: a call either updates every tensor or none.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from . import reference
from . import stream as S
from .checks import check_int
from .paramset import ParamSet
from .seeds import U64 as _U64
from .seeds import check_seed, to_int64, to_uint64

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
BACKEND_VARIABLE = "FEDKSEED_BACKEND"  # the setting's default, for whole processes (the CLI, benchmarks)

ParamsLike = ParamSet | torch.nn.Module | Iterable[Any]
SeedsLike = int | Sequence[int] | torch.Tensor
AlphasLike = float | Sequence[float] | torch.Tensor


# --------------------------------------------------------------------------------- availability
def _load_extension() -> bool:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fedkseed.*)
    except ImportError:
        return False
    return True


_HAS_EXTENSION = _load_extension()


def has_kernel(key: str) -> bool:
    """Whether the compiled extension serves ``key`` ("CPU" or "CUDA")."""
    return _HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("fedkseed::replay_", key)


def has_triton() -> bool:
    try:
        from .kernels import triton_available
    except ImportError:
        return False
    return triton_available()


# ------------------------------------------------------------------------------------ the setting
_setting: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedkseed_backend", default=None)


def backend_setting() -> str:
    """The backend ops use when called without ``backend=``: the innermost ``use_backend`` of this
    thread, else ``FEDKSEED_BACKEND``, else "auto"."""
    chosen = _setting.get()
    if chosen is not None:
        return chosen
    return _known(os.environ.get(BACKEND_VARIABLE, "auto"), BACKEND_VARIABLE)


def _known(backend: str, source: str = "backend") -> str:
    """``backend`` if it names one; else the error, naming where the value came from."""
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, every op called without ``backend=`` (in this thread) runs on
    ``backend``: the override for tests and benchmarks, like ``torch.nn.attention.sdpa_kernel``.
    A backend that cannot serve the tensors raises at the first op, not silently falls back."""
    token = _setting.set(_known(backend))
    try:
        yield
    finally:
        _setting.reset(token)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on ``device`` (``backend`` None: the setting); a clear error
    if it cannot serve them."""
    backend = backend_setting() if backend is None else _known(backend)
    if backend == "auto":
        if device.type == "cuda":
            if has_kernel("CUDA"):
                return "cuda"
            return "triton" if has_triton() else "reference"
        return "cpu" if device.type == "cpu" and has_kernel("CPU") else "reference"
    if backend == "cpu" and (device.type != "cpu" or not has_kernel("CPU")):
        why = "the compiled extension is not built" if device.type == "cpu" else f"tensors are on {device}"
        raise RuntimeError(f"backend='cpu' cannot serve these tensors: {why}")
    if backend == "cuda" and (device.type != "cuda" or not has_kernel("CUDA")):
        why = f"tensors are on {device}" if device.type != "cuda" else "the extension was built without CUDA"
        raise RuntimeError(f"backend='cuda' cannot serve these tensors: {why}")
    if backend == "triton" and not has_triton():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if backend == "triton" and device.type == "cpu":
        from .kernels import interpreting

        if not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


# ----------------------------------------------------------------------------------- validation
def _is_scalar(value: Any) -> bool:
    """A Python/NumPy scalar or a 0-d array or tensor: one seed or alpha, not a sequence."""
    return getattr(value, "ndim", None) == 0 or isinstance(value, (numbers.Number, str, bytes))


def _seed_tensor(seeds: SeedsLike, device: torch.device) -> tuple[torch.Tensor, list[int] | None]:
    """int64 seeds on ``device`` (two's complement of uint64) and, for host seeds, their values."""
    if isinstance(seeds, torch.Tensor) and seeds.dtype == torch.int64:
        flat = seeds.reshape(-1)
        values = None if flat.device.type != "cpu" else [to_uint64(int(s)) for s in flat.tolist()]
        return flat.to(device), values
    if isinstance(seeds, torch.Tensor) and (seeds.ndim > 0 or seeds.device.type != "cpu"):
        raise TypeError(f"seeds tensor must be int64 (two's complement of uint64), got {seeds.dtype}")
    values = [check_seed(s) for s in ([seeds] if _is_scalar(seeds) else list(seeds))]
    return torch.tensor([to_int64(s) for s in values], dtype=torch.int64, device=device), values


def _alpha_value(a: Any) -> float:
    if isinstance(a, torch.Tensor) and a.ndim == 0:
        a = a.item()
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"alphas must be real numbers, got {type(a).__name__}")
    value = float(a)
    if not math.isfinite(value):
        raise ValueError(f"alphas contain a non-finite value: {value}")
    return value


def _alpha_tensor(alphas: AlphasLike, device: torch.device) -> torch.Tensor:
    if isinstance(alphas, torch.Tensor) and (alphas.ndim > 0 or alphas.device.type != "cpu"):
        flat = alphas.reshape(-1)
        if not flat.dtype.is_floating_point:
            raise TypeError(f"alphas tensor must be floating point, got {flat.dtype}")
        # Host alphas are checked here; device alphas are not, since reading the check's result
        # would synchronise with the device (and break CUDA-graph capture). A non-finite device
        # alpha gives the NaN/inf results docs/stream-spec.md#conversion defines.
        if flat.device.type == "cpu" and not bool(torch.isfinite(flat).all()):
            raise ValueError("alphas contain NaN or infinite values")
        return flat.to(device=device, dtype=torch.float32)
    values = [_alpha_value(a) for a in ([alphas] if _is_scalar(alphas) else list(alphas))]
    flat = torch.tensor(values, dtype=torch.float32)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("alphas overflow float32")
    return flat.to(device)


def _decay_factors(pset: ParamSet, decay: float | None) -> list[float] | None:
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
        raise ValueError(f"decay must be a finite float, got {decay!r}")
    return pset.decay_factors(float(decay))


def _rounding_tensor(rounding_seed: int | torch.Tensor | None, device: torch.device):
    if rounding_seed is None:
        return None, None
    tensor, values = _seed_tensor(rounding_seed if isinstance(rounding_seed, torch.Tensor) else [rounding_seed], device)
    if tensor.numel() != 1:
        raise ValueError(f"rounding_seed must hold one seed, got {tensor.numel()}")
    return tensor, (values[0] if values else None)


def _refuse_sharded(pset: ParamSet) -> None:
    if pset.sharded:
        raise ValueError(
            "a magnitude mask needs whole tensors: this parameter set is sharded (docs/stream-spec.md#magnitude-mask)"
        )


def mask_bytes(params: ParamsLike) -> int:
    """The size of a magnitude mask over ``params``: sum_t ceil(numel_t / 8) bytes."""
    return sum(reference.mask_sizes(ParamSet.of(params).numels))


def _mask_tensor(pset: ParamSet, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` checked against the parameter set (docs/stream-spec.md#magnitude-mask)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a uint8 tensor from magnitude_mask, got {type(mask).__name__}")
    if mask.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8, got {mask.dtype}")
    _refuse_sharded(pset)
    want = sum(reference.mask_sizes(pset.numels))
    if mask.dim() != 1 or mask.numel() != want:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the parameters need [{want}] bytes (one bit each)")
    if mask.device != pset.device:
        raise ValueError(f"mask is on {mask.device}, the parameters on {pset.device}")
    return mask.contiguous()


def _threshold_values(pset: ParamSet, thresholds: Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.reshape(-1).tolist()
    if _is_scalar(thresholds):
        raise TypeError("thresholds must be a sequence with one threshold per tensor")
    values = []
    for tau in thresholds:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise TypeError(f"thresholds must be real numbers, got {type(tau).__name__}")
        if math.isnan(float(tau)):
            raise ValueError("thresholds contain NaN")
        values.append(float(tau))
    if len(values) != len(pset):
        raise ValueError(f"thresholds has {len(values)} entries for {len(pset)} tensors")
    return values


# ------------------------------------------------------------------------------------- the ops
@torch.no_grad()
def replay_(
    params: ParamsLike,
    seeds: SeedsLike,
    alphas: AlphasLike,
    dist: str = "gaussian",
    decay: float | None = None,
    *,
    rounding_seed: int | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> ParamSet:
    """theta <- theta * d + sum_k alphas[k] * z(seeds[k]) over all parameters in ONE pass.

    ``decay`` is the factor d applied to decayed tensors (``ParamSet.decay_mask``); None or 1.0
    applies none. ``rounding_seed`` turns on stochastic rounding for bfloat16/float16 tensors
    (tag-2 bits of that seed). ``mask`` (from ``magnitude_mask``) restricts the update to the
    elements whose bit is 1: the same bits there as without it, the others are not written
    (docs/stream-spec.md#magnitude-mask). Seeds and alphas may be device tensors: then nothing
    waits for the device (CUDA-graph capturable) and device alphas are not checked for NaN/inf.
    Returns the ParamSet, so callers can keep it for the next call.
    """
    pset = ParamSet.of(params)
    tag = S.dist_tag(dist)
    device = pset.device
    which = resolve_backend(backend, device)
    seed_t, seed_values = _seed_tensor(seeds, device)
    alpha_t = _alpha_tensor(alphas, device)
    if seed_t.numel() != alpha_t.numel():
        raise ValueError(f"seeds and alphas differ in length: {seed_t.numel()} vs {alpha_t.numel()}")
    factors = _decay_factors(pset, decay)
    round_t, round_value = _rounding_tensor(rounding_seed, device)
    mask_t = _mask_tensor(pset, mask)
    if len(pset) == 0 or (seed_t.numel() == 0 and factors is None):
        return pset
    if which == "reference":
        if seed_values is None:
            seed_values = [to_uint64(int(s)) for s in seed_t.cpu().tolist()]
        if round_t is not None and round_value is None:
            round_value = to_uint64(int(round_t.item()))
        reference.replay_(pset.tensors, pset.offsets, seed_values, alpha_t.cpu(), dist, factors, round_value, mask_t)
    elif which == "triton":
        from .kernels import replay_ as triton_replay_

        triton_replay_(pset, seed_t, alpha_t, tag, factors, round_t, mask_t)
    else:
        offsets = [to_int64(o) for o in pset.offsets]
        torch.ops.fedkseed.replay_(pset.tensors, offsets, factors or [], seed_t, alpha_t, tag, round_t, mask_t)
    return pset


def perturb_(
    params: ParamsLike,
    seed: int | torch.Tensor,
    alpha: float | torch.Tensor,
    dist: str = "gaussian",
    *,
    rounding_seed: int | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> ParamSet:
    """theta += alpha * z(seed) over all parameters in one pass (``replay_`` with K = 1)."""
    return replay_(params, seed, alpha, dist, rounding_seed=rounding_seed, mask=mask, backend=backend)


def noise(
    seed: int | torch.Tensor,
    count: int,
    offset: int = 0,
    dist: str = "gaussian",
    device: str | torch.device = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """float32 z(seed, i) for i = offset .. offset + count - 1, computed on ``device``."""
    tag = S.dist_tag(dist)
    device = torch.device(device)
    check_int("count", count, 0)
    check_int("offset", offset, 0)
    if offset + count > _U64:
        raise ValueError(f"indices offset={offset}, count={count} leave [0, 2^64)")
    which = resolve_backend(backend, device)
    seed_t, seed_values = _seed_tensor(seed if isinstance(seed, torch.Tensor) else [seed], device)
    if seed_t.numel() != 1:
        raise ValueError(f"noise takes one seed, got {seed_t.numel()}")
    if which == "reference":
        value = seed_values[0] if seed_values else to_uint64(int(seed_t.item()))
        return reference.noise(value, count, offset, dist).to(device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count == 0:
        return out
    if which == "triton":
        from .kernels import noise_ as triton_noise_

        triton_noise_(out, seed_t, offset, tag)
    else:
        torch.ops.fedkseed.noise_(out, seed_t, to_int64(offset), tag)
    return out


@torch.no_grad()
def project(
    params: ParamsLike, seeds: SeedsLike, *, dist: str = "gaussian", backend: str | None = None
) -> torch.Tensor:
    """p_k = sum_i x_i z(seeds[k], i) over every element of the parameters (or of any tensors laid
    out as a ParamSet, e.g. a model update): the transpose of ``replay_``, for all K seeds in one
    pass and without a noise tensor. Returns float64 [K] on the CPU, the same bits on every backend
    (docs/stream-spec.md#projection).

    A sharded ParamSet (DTensor/FSDP2 shards) projects its local elements and all-reduces the exact
    accumulator over the default process group, so every rank returns the same bits; they equal
    the unsharded result when every shard boundary is a multiple of 4096 in global index (else a
    chunk split between ranks is rounded per rank). A tensor replicated over a mesh dimension is
    counted once, by coordinate 0 of that dimension.
    """
    pset = ParamSet.of(params)
    S.dist_tag(dist)
    device = pset.device
    which = resolve_backend(backend, device)
    seed_t, seed_values = _seed_tensor(seeds, device)
    tensors, offsets = pset.tensors, pset.offsets
    if pset.sharded:
        counted = [i for i, source in enumerate(pset.sources) if _counted_here(source)]
        tensors, offsets = [tensors[i] for i in counted], [offsets[i] for i in counted]
    acc = _project_accumulator(which, pset, tensors, offsets, seed_t, seed_values, dist)
    if pset.sharded:
        import torch.distributed as dist_

        dist_.all_reduce(acc)  # integer sums: exact, any order
    return reference.finish_projection(acc)


def magnitude_thresholds(params: ParamsLike, density: float) -> list[float]:
    """One threshold per tensor: the ceil(density * numel)-th smallest float32 |x| (NaN as +inf),
    an exact order statistic, so every party holding the same weights gets the same values
    (docs/stream-spec.md#magnitude-mask). ``density`` is in (0, 1)."""
    pset = ParamSet.of(params)
    _refuse_sharded(pset)
    return reference.magnitude_thresholds(pset.tensors, density)


@torch.no_grad()
def magnitude_mask(
    params: ParamsLike, thresholds: Sequence[float] | torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """The uint8 mask (on the parameters' device) of the elements with |float32(x)| <=
    float32(thresholds[t]): bit j & 7 of byte B_t + (j >> 3), each tensor from a byte boundary
    (docs/stream-spec.md#magnitude-mask). Pass it as ``replay_(..., mask=)``; it stays valid
    for the tensors' shapes and order, whatever their values become."""
    pset = ParamSet.of(params)
    which = resolve_backend(backend, pset.device)
    values = _threshold_values(pset, thresholds)
    _refuse_sharded(pset)
    if sum(pset.numels) == 0:
        return torch.zeros(0, dtype=torch.uint8, device=pset.device)
    if which == "reference":
        return reference.magnitude_mask(pset.tensors, values)
    if which == "triton":
        from .kernels import magnitude_mask as triton_magnitude_mask

        return triton_magnitude_mask(pset, values)
    return torch.ops.fedkseed.magnitude_mask(list(pset.tensors), values)


def _project_accumulator(which, pset, tensors, offsets, seed_t, seed_values, dist) -> torch.Tensor:
    """int64 [K, PROJECT_WIDTH]: the exact sum of this process's chunk partials."""
    if which == "reference":
        if seed_values is None:
            seed_values = [to_uint64(int(s)) for s in seed_t.cpu().tolist()]
        _, partials = reference.project_partials(tensors, offsets, seed_values, dist)
        return reference.project_accumulator(partials).to(pset.device)
    if which == "triton":
        from .kernels import project as triton_project

        return triton_project(tensors, offsets, seed_t, S.dist_tag(dist))
    return torch.ops.fedkseed.project(list(tensors), [to_int64(o) for o in offsets], seed_t, S.dist_tag(dist))


def _counted_here(source: torch.Tensor) -> bool:
    """Whether this rank adds ``source``'s local elements to a sum over ranks: each element once.
    A DTensor replicated along a mesh dimension counts at coordinate 0 of it; a plain tensor in
    a sharded set (every rank holds all of it) counts on rank 0."""
    import torch.distributed as dist_

    if not hasattr(source, "placements"):
        return dist_.get_rank() == 0
    from torch.distributed.tensor import Replicate

    coordinate = source.device_mesh.get_coordinate()
    return all(coordinate[d] == 0 for d, p in enumerate(source.placements) if isinstance(p, Replicate))


# torch.compile and opcheck trace the in-place ops through these shape-only implementations.
if _HAS_EXTENSION:

    @torch.library.register_fake("fedkseed::replay_")
    def _replay_fake(params, offsets, decay, seeds, alphas, dist, rounding_seed, mask=None) -> None:
        return None

    @torch.library.register_fake("fedkseed::noise_")
    def _noise_fake(out, seed, offset, dist) -> None:
        return None

    @torch.library.register_fake("fedkseed::magnitude_mask")
    def _magnitude_mask_fake(params, thresholds) -> torch.Tensor:
        size = sum((p.numel() + 7) // 8 for p in params)
        return params[0].new_empty((size,), dtype=torch.uint8)

    @torch.library.register_fake("fedkseed::project")
    def _project_fake(params, offsets, seeds, dist) -> torch.Tensor:
        return seeds.new_empty((seeds.numel(), reference.PROJECT_WIDTH), dtype=torch.int64)
