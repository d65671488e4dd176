"""Data-parallel and sharded (FSDP2) zeroth-order training on torch.distributed.

A ZO step needs only three things to agree across ranks: the seed (derived from the run's
configuration, so every rank already has it), the two losses, and therefore the update. Each
rank evaluates the closure on its own micro-batch; :class:`DistributedLoss` all-reduces
(loss * weight, weight) in float64, 16 bytes per evaluation and 32 per step, so every rank gets
the same weighted mean loss bit for bit and ``zo_step`` / ``ZOSGD`` apply the same update on
every rank with no change to them::

    dloss = DistributedLoss(module=model)           # model: replicated, or FSDP2's root
    params = fedkseed.ParamSet(model)               # FSDP2: each rank's shards, global offsets
    opt = fedkseed.ZOSGD(params, lr=1e-6, eps=1e-3, seed=0)   # the same seed on every rank
    for batch in loader:                            # each rank its own micro-batch
        n = int((batch["labels"][:, 1:] != -100).sum())      # tokens this rank's loss averages
        opt.step(dloss.wrap(lambda: model(**batch).loss, weight=n))

Under FSDP2 the ParamSet holds each rank's local shards with their global element offsets
(:mod:`fedkseed.paramset`), so each rank perturbs and updates exactly its share of the elements
the unsharded step would, and a History recorded on any rank replays on one device to the
gathered weights bit for bit. The forward's parameter all-gathers are FSDP2's own; the ZO step
adds only the loss all-reduce. Works with gloo (CPU tensors) and NCCL (CUDA) alike.

A closure that is not a DistributedLoss one (``opt.step(lambda: model(**batch).loss)``, the
idiom of an FSDP loop) would give each rank its own loss and so its own update: the ranks'
shards or replicas would silently drift apart. ZOSGD therefore reduces such a closure's loss
itself whenever it runs in a process group of more than one rank (``loss_reduction="mean"``,
the default: the plain mean over the ranks, 16 bytes per evaluation through a DistributedLoss
of weight 1), and never reduces a DistributedLoss closure a second time. Use DistributedLoss
for token weighting, and ``loss_reduction="none"`` only for independent runs that happen to
share a process group (sharded parameters refuse it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from .paramset import reshard_fsdp

Weight = Any  # int, float, or a tensor with one element


class DistributedLoss:
    """The weighted mean of a closure's loss over the ranks of ``group`` (None: the default).

    ``wrap(closure, weight)`` returns a closure for ``zo_step`` / ``ZOSGD.step``: it evaluates
    ``closure()`` on this rank and returns sum_r(loss_r * w_r) / sum_r(w_r) as a float, the same
    bits on every rank. ``weight`` is what this rank's loss averages over (examples or tokens);
    a rank with weight 0 contributes nothing. A NaN/inf loss on any rank makes the mean NaN on
    every rank, so every rank skips that step alike. ``module``: an FSDP2-sharded model is
    resharded around every evaluation, so a forward always all-gathers the shards the ZO passes
    just wrote (FSDP2 keeps the root unsharded after a no-grad forward otherwise).

    ``reductions`` and ``bytes`` count the all-reduces this object made and their payload.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, module: torch.nn.Module | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedLoss needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.module = module
        self.reductions = 0
        self.bytes = 0

    def wrap(self, closure: Callable[[], Any], weight: Weight = 1.0) -> Callable[[], float]:
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")

        def evaluate() -> float:
            self._reshard()
            try:
                loss = closure()
            finally:
                self._reshard()
            return self.reduce(loss, weight)

        evaluate.distributed_loss = self  # type: ignore[attr-defined]  # ZOSGD reduces it no further
        return evaluate

    def reduce(self, loss: Any, weight: Weight = 1.0) -> float:
        """All-reduce (loss * weight, weight) and return the weighted mean loss.

        Every rank must call it (a collective). A bad weight is not raised before the
        collective, which would leave the other ranks waiting: it travels as NaN and every
        rank raises.
        """
        device = self._device(loss)
        value = _scalar(loss, "loss", device)
        given = _scalar(weight, "weight", device)
        w = torch.where(torch.isfinite(given) & (given >= 0), given, torch.full_like(given, math.nan))
        contribution = torch.where(w == 0, torch.zeros_like(value), value * w)
        buffer = torch.stack([contribution, w])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        self.reductions += 1
        self.bytes += buffer.numel() * buffer.element_size()
        total, count = buffer.tolist()
        if not (math.isfinite(count) and count > 0):
            raise ValueError(
                f"weights must be finite, >= 0 and not all 0 across ranks: their sum is {count} "
                f"(this rank's weight: {float(given)})"
            )
        return total / count

    def _device(self, loss: Any) -> torch.device:
        if isinstance(loss, torch.Tensor) and loss.device.type != "cpu":
            return loss.device  # NCCL, or gloo (which reduces CUDA tensors too)
        if dist.get_backend(self.group) == "nccl":  # NCCL reduces CUDA tensors only
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _reshard(self) -> None:
        if self.module is not None:
            reshard_fsdp(self.module)


def is_reduced(closure: Callable[[], Any]) -> bool:
    """Whether ``closure`` came from :meth:`DistributedLoss.wrap` (its loss is already the same
    on every rank)."""
    return isinstance(getattr(closure, "distributed_loss", None), DistributedLoss)


def is_multi_rank(group: dist.ProcessGroup | None = None) -> bool:
    """Whether torch.distributed is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _scalar(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A float64 0-d tensor on ``device`` (no host sync for a device tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def check_same(value: Any, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank unless every rank of ``group`` passed an equal ``value`` (a
    picklable object: a seed, a step count, ``ParamSet.fingerprint(values=True)``)."""
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        raise ValueError(f"ranks disagree on {what}: {values}")


class CommMeter(TorchDispatchMode):
    """Counts the collectives this rank issues while active, and their payload in bytes.

    The payload of a collective is its largest buffer: the reduced tensor of an all-reduce,
    the gathered tensor of an all-gather, the input of a reduce-scatter. ``calls`` and
    ``bytes`` map an op name ("allreduce_", "_allgather_base_", ...) to totals. What travels on
    the wire follows from the algorithm: a ring all-reduce of B bytes sends 2(n-1)/n * B per
    rank, an all-gather receives (n-1)/n of its output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional") and "wait" not in func.__name__:
            name = func._schema.name.split("::")[-1]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.bytes[name] = self.bytes.get(name, 0) + _payload(list(args) + list(kwargs.values()))
        return func(*args, **kwargs)

    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _payload(args: list[Any]) -> int:
    sizes = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes.append(a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            sizes.append(sum(t.numel() * t.element_size() for t in a))
    return max(sizes, default=0)
