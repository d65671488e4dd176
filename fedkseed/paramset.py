"""ParamSet: the canonical order, global offsets and decay flags of a set of parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_decays(name: str, tensor: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases or norm weights (the usual LLM rule)."""
    lowered = name.lower()
    return tensor.dim() >= 2 and not lowered.endswith("bias") and "norm" not in lowered


class ParamSet:
    """The tensors a ZO step perturbs, laid end to end (spec section 1).

    Built from an ``nn.Module`` (its ``named_parameters()`` with ``requires_grad``, each shared
    tensor once), from an iterable of tensors or of (name, tensor) pairs, or from another
    ParamSet (returned as is). Kernel backends keep what they precompute (pointer tables, block
    maps) in ``cache``, keyed so that a moved or reallocated tensor invalidates it.
    """

    def __init__(
        self,
        params: Union[torch.nn.Module, Iterable[Any]],
        *,
        decays: Callable[[str, torch.Tensor], bool] = default_decays,
    ) -> None:
        named = _named_tensors(params)
        seen: set[int] = set()
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        for name, tensor in named:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            self.names.append(name)
            self.tensors.append(tensor)
        _validate(self.names, self.tensors)
        self.numels = [t.numel() for t in self.tensors]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total
        self.decay_mask = [bool(decays(n, t)) for n, t in zip(self.names, self.tensors)]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.cache: dict[Any, Any] = {}

    @classmethod
    def of(cls, params: Union["ParamSet", torch.nn.Module, Iterable[Any]]) -> "ParamSet":
        return params if isinstance(params, ParamSet) else cls(params)

    def __len__(self) -> int:
        return len(self.tensors)

    def decay_factors(self, decay: float | None) -> list[float] | None:
        """One factor per tensor: ``decay`` on decayed tensors, 1.0 elsewhere; None for none."""
        if decay is None or decay == 1.0:
            return None
        return [decay if flag else 1.0 for flag in self.decay_mask]

    def fingerprint(self, *, values: bool = False) -> str:
        """sha256 of names, shapes, dtypes and order: what a history must match. With
        ``values`` the weights' bytes are hashed too: what a delta must match, since it only
        rebuilds a model from the very base weights it was trained from."""
        h = hashlib.sha256(b"fedkseed-paramset-v1\n")
        for name, t in zip(self.names, self.tensors):
            h.update(f"{name}\t{tuple(t.shape)}\t{str(t.dtype).removeprefix('torch.')}\n".encode())
        if values:
            for t in self.tensors:
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def state(self) -> list[torch.Tensor]:
        """A detached copy of every tensor (for tests and rollbacks)."""
        return [t.detach().clone() for t in self.tensors]


def _named_tensors(params: Union[torch.nn.Module, Iterable[Any]]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        return [("0", params)]
    named = []
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            named.append((str(item[0]), item[1]))
        elif isinstance(item, torch.Tensor):
            named.append((str(i), item))
        else:
            raise TypeError(
                f"params[{i}] must be a tensor or a (name, tensor) pair, got {type(item).__name__}"
            )
    return named


def _validate(names: list[str], tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"params must all be on one device, got {sorted(map(str, devices))}")
    for name, t in zip(names, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"param {name!r} has dtype {t.dtype}; supported: float32, bfloat16, float16"
            )
        if not t.is_contiguous():
            raise ValueError(f"param {name!r} is not contiguous; call .contiguous() first")
