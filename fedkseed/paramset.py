"""ParamSet: the canonical order, global offsets and decay flags of a set of parameters.

A ParamSet is what the ops write to: ``tensors`` (plain, contiguous, one device) and, for each,
``offsets``, the global element index of its first element in the stream
(docs/stream-spec.md#element-index). The *layout* (order, global shapes, dtypes) is what ties a
recorded run to parameters; names are kept for messages only.

Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them) are supported when each
rank's shard is a contiguous range of the flattened global tensor: every placement is
``Replicate()`` or ``Shard(0)``, uneven and empty shards included. The ParamSet then holds the
local shards, each with the global index of its first element, so ``perturb_``/``replay_`` on
every rank write exactly the elements the unsharded op would, and the layout is the global one.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPILE_PREFIX = "_orig_mod"  # the attribute torch.compile's OptimizedModule keeps the model in

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, global shape, dtype name) in order


def default_decays(name: str, tensor: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases or norm weights (the usual LLM rule)."""
    lowered = name.lower()
    return tensor.dim() >= 2 and not lowered.endswith("bias") and "norm" not in lowered


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_digest(layout: Sequence[tuple[str, Sequence[int], str]]) -> str:
    """sha256 of a layout's shapes, dtypes and order (never its names): ``fingerprint()``."""
    h = hashlib.sha256(b"fedkseed-layout-v2\n")
    for _, shape, dtype in layout:
        h.update(f"{tuple(int(s) for s in shape)}\t{dtype}\n".encode())
    return h.hexdigest()


class ParamSet:
    """The tensors a ZO step perturbs, laid end to end (docs/stream-spec.md#element-index).

    ``params`` may be an ``nn.Module`` (its ``named_parameters()``), a tensor, an iterable of
    tensors or of (name, tensor) pairs, torch.optim-style param groups (dicts with "params"),
    or another ParamSet (``ParamSet.of`` returns it as is). A tensor passed twice (tied
    weights) is kept once; distinct tensors that share memory are refused. An FSDP2 module is
    resharded first, so its parameters are the DTensors whose shards persist.

    ``trainable_only``: keep only tensors with ``requires_grad``. The default (None) does so
    for a module, whose frozen parameters are never trained, and keeps every tensor of the
    other forms, since plain tensors (``torch.randn``) do not require grad; an optimizer over
    ``model.parameters()`` passes True.

    Attributes: ``names`` (for messages; torch.compile's ``_orig_mod.`` removed), ``tensors``
    (the local tensors the ops write), ``shapes`` (global shapes), ``numels`` (local element
    counts), ``offsets`` (global index of each local tensor's first element), ``numel`` (local
    elements in all), ``decay_mask``, ``group_index`` (the param group of each tensor, 0 when
    no groups were given), ``sharded``. Kernel backends keep what they precompute in ``cache``,
    keyed so that a moved or reallocated tensor invalidates it.
    """

    def __init__(
        self,
        params: torch.nn.Module | Iterable[Any],
        *,
        decays: Callable[[str, torch.Tensor], bool] = default_decays,
        trainable_only: bool | None = None,
    ) -> None:
        if trainable_only is None:
            trainable_only = isinstance(params, torch.nn.Module)
        seen: set[int] = set()
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.tensors: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.group_index: list[int] = []
        self.sources: list[torch.Tensor] = []  # what was passed per tensor: the DTensor of a shard, else the tensor
        start = 0  # global index of the current tensor's first element
        for group, name, source in _named_tensors(params):
            if id(source) in seen or (trainable_only and not source.requires_grad):
                continue
            seen.add(id(source))
            local, shard_start = _local_shard(name, source)
            self.names.append(_strip_compile_prefix(name))
            self.shapes.append(tuple(source.shape))
            self.tensors.append(local)
            self.offsets.append(start + shard_start)
            self.group_index.append(group)
            self.sources.append(source)
            start += source.numel()
        _validate(self.names, self.tensors)
        _refuse_overlaps(self.names, self.tensors)
        self.numels = [t.numel() for t in self.tensors]
        self.numel = sum(self.numels)
        self.sharded = any(_is_dtensor(s) for s in self.sources)
        self.decay_mask = [bool(decays(n, s)) for n, s in zip(self.names, self.sources)]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.cache: dict[Any, Any] = {}

    @classmethod
    def of(cls, params: ParamSet | torch.nn.Module | Iterable[Any], **kwargs: Any) -> ParamSet:
        return params if isinstance(params, ParamSet) else cls(params, **kwargs)

    def __len__(self) -> int:
        return len(self.tensors)

    def subset(self, indices: Sequence[int], *, decayed: bool | None = None) -> ParamSet:
        """The tensors ``indices`` as a ParamSet that keeps their global offsets, shapes and groups
        (docs/stream-spec.md#element-index), so an op on it writes exactly the elements it would
        write on the whole set. ``decayed``: every tensor takes the decay factor (True), none does
        (False), or each keeps its own flag (None)."""
        sub = ParamSet([(self.names[i], self.tensors[i]) for i in indices], trainable_only=False)
        # The constructor lays local tensors end to end; the subset's elements keep their place.
        sub.decay_mask = [self.decay_mask[i] if decayed is None else decayed for i in indices]
        sub.offsets = [self.offsets[i] for i in indices]
        sub.shapes = [self.shapes[i] for i in indices]
        sub.group_index = [self.group_index[i] for i in indices]
        return sub

    def decay_factors(self, decay: float | None) -> list[float] | None:
        """One factor per tensor: ``decay`` on decayed tensors, 1.0 elsewhere; None for none."""
        if decay is None or decay == 1.0:
            return None
        return [decay if flag else 1.0 for flag in self.decay_mask]

    # --------------------------------------------------------------------------------- layout
    def layout(self) -> Layout:
        """(name, global shape, dtype name) of every tensor in canonical order: what a recorded
        run is tied to. Only shapes, dtypes and order count; names serve messages."""
        return [(n, shape, dtype_name(t.dtype)) for n, shape, t in zip(self.names, self.shapes, self.tensors)]

    def check_layout(self, layout: Sequence[tuple[str, Sequence[int], Any]], what: str = "history") -> None:
        """Raise one ValueError naming the first tensor (index, name, shape, dtype on both
        sides) where these parameters differ from ``layout`` (as ``layout()`` returns it; a
        JSON round trip's lists and torch dtypes are accepted). Names never differ."""
        theirs = [
            (str(n), tuple(int(s) for s in shape), dtype_name(d) if isinstance(d, torch.dtype) else str(d))
            for n, shape, d in layout
        ]
        ours = self.layout()
        for i in range(max(len(theirs), len(ours))):
            a = theirs[i] if i < len(theirs) else None
            b = ours[i] if i < len(ours) else None
            if a is not None and b is not None and a[1:] == b[1:]:
                continue
            raise ValueError(
                f"{what} was recorded on a different parameter layout ({len(theirs)} tensors "
                f"in the {what}, {len(ours)} in the params): tensor {i} is {_describe(a)} in the "
                f"{what} but {_describe(b)} in the params"
            )

    def fingerprint(self, *, values: bool = False) -> str:
        """sha256 of the layout (order, global shapes, dtypes; never names): what a history
        must match. With ``values`` the weights' bytes are hashed too: what a delta must match,
        since it only rebuilds a model from the very base weights it was trained from. On a
        sharded set, ``values=True`` gathers every tensor: all ranks must call it."""
        digest = layout_digest(self.layout())
        if not values:
            return digest
        h = hashlib.sha256(b"fedkseed-weights-v2\n" + digest.encode())
        with torch.no_grad():
            for source, local in zip(self.sources, self.tensors):
                full = source.full_tensor() if _is_dtensor(source) else local
                h.update(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def state(self) -> list[torch.Tensor]:
        """A detached copy of every (local) tensor (for tests and rollbacks)."""
        return [t.detach().clone() for t in self.tensors]


def trainable(params: ParamSet | torch.nn.Module | Iterable[Any], who: str) -> ParamSet:
    """A ParamSet as given, or the tensors with ``requires_grad`` of any other form: a frozen
    tensor is never touched, whatever form the parameters come in. ``who`` names the caller in
    the error. (It lives here, not in fedkseed.checks, because it builds a ParamSet.)"""
    if isinstance(params, ParamSet):
        return params
    if not isinstance(params, (torch.nn.Module, torch.Tensor)):
        params = list(params)  # an iterator (model.parameters()) is read once
    pset = ParamSet(params, trainable_only=True)
    if not len(pset):
        raise ValueError(
            f"{who} got no tensor with requires_grad=True: frozen tensors are never trained "
            "(call .requires_grad_() on the ones to train, or pass a ParamSet)"
        )
    return pset


# ------------------------------------------------------------------------------------- inputs
def _named_tensors(
    params: torch.nn.Module | Iterable[Any],
) -> list[tuple[int, str, torch.Tensor]]:
    """(group, name, tensor) for every tensor given, in order."""
    if isinstance(params, torch.nn.Module):
        reshard_fsdp(params)
        return [(0, n, p) for n, p in params.named_parameters()]
    if isinstance(params, torch.Tensor):
        return [(0, "0", params)]
    items = list(params)
    if items and all(isinstance(item, dict) for item in items):
        out: list[tuple[int, str, torch.Tensor]] = []
        for g, group in enumerate(items):
            if "params" not in group:
                raise TypeError(f"param group {g} has no 'params' entry")
            members = group["params"]
            members = [members] if isinstance(members, torch.Tensor) else list(members)
            names = group.get("param_names")
            if names is not None:
                members = list(zip(names, members))
            for name, tensor in _named_items(members, f"params[{g}]['params']", len(out)):
                out.append((g, name, tensor))
        return out
    return [(0, n, t) for n, t in _named_items(items, "params", 0)]


def _named_items(items: list[Any], where: str, first: int) -> list[tuple[str, torch.Tensor]]:
    named = []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            named.append((str(item[0]), item[1]))
        elif isinstance(item, torch.Tensor):
            named.append((str(first + i), item))
        else:
            raise TypeError(f"{where}[{i}] must be a tensor or a (name, tensor) pair, got {type(item).__name__}")
    return named


def _strip_compile_prefix(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != COMPILE_PREFIX)


def _describe(entry: tuple[str, tuple[int, ...], str] | None) -> str:
    if entry is None:
        return "absent"
    name, shape, dtype = entry
    return f"{name!r} {shape} {dtype}"


# ---------------------------------------------------------------------------------- sharding
def _is_dtensor(t: torch.Tensor) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported: skip importing it here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def reshard_fsdp(module: torch.nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded (plain tensors) after a no-grad forward;
    reshard so ``named_parameters()`` yields the sharded DTensors, whose storage persists, and
    the next forward all-gathers what the ops wrote to the shards."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP2 module exists
    if fsdp is None:
        return
    for m in module.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def _local_shard(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor the ops write, index of its first element within the global tensor)."""
    if not _is_dtensor(t):
        return t, 0
    from torch.distributed.tensor import Replicate, Shard

    rows = t.shape[0] if t.dim() else 1
    row_start = 0
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"param {name!r}: this rank is not in the tensor's device mesh")
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim != 0:
            raise ValueError(
                f"param {name!r} is sharded as {tuple(t.placements)}: fedkseed needs each shard "
                "to be a contiguous range of the flattened tensor (Replicate() or Shard(0) only)"
            )
        # DTensor's Shard(0) follows torch.chunk: ceil-sized chunks, the last ones short or empty.
        n = mesh.size(mesh_dim)
        chunk = -(-rows // n)
        lo = min(coordinate[mesh_dim] * chunk, rows)
        hi = min(lo + chunk, rows)
        row_start += lo
        rows = hi - lo
    with torch.no_grad():  # the shard itself, not an autograd view of it
        local = t.to_local()
    expected = (rows, *t.shape[1:]) if t.dim() else ()
    if tuple(local.shape) != tuple(expected):
        raise ValueError(
            f"param {name!r}: local shard has shape {tuple(local.shape)}, expected {expected} "
            f"for {tuple(t.placements)} of global shape {tuple(t.shape)}"
        )
    return local, row_start * math.prod(t.shape[1:])


# -------------------------------------------------------------------------------- validation
def _validate(names: list[str], tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
    for name, t in zip(names, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"param {name!r} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if not t.is_contiguous():
            raise ValueError(f"param {name!r} is not contiguous; call .contiguous() first")


def _refuse_overlaps(names: list[str], tensors: list[torch.Tensor]) -> None:
    """Distinct tensors sharing memory would be updated twice per pass: refuse them. Tensors
    are contiguous here, so each occupies [data_ptr, data_ptr + nbytes)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
        for i, t in enumerate(tensors)
        if t.numel() and t.device.type != "meta"
    )
    for (_, end, i), (begin, _, j) in itertools.pairwise(spans):
        if begin < end:
            a, b = sorted((i, j))
            raise ValueError(
                f"params {names[a]!r} and {names[b]!r} share memory (views of one storage); "
                "each element may be passed once"
            )
