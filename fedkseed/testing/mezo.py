"""The MeZO-style step, the baseline the benchmarks measure ZOSGD against (bench_zo.py for one
step's cost, convergence.py for training curves): one copy, written as princeton-nlp/MeZO writes it.

MeZO (``zo_perturb_parameters``, ``zo_step``, ``zo_update`` of its trainer) and FedKSeed's
official code reseed torch's global RNG with the step's seed, then, parameter by parameter, draw
``z = torch.normal(0, 1, size=p.shape)`` and replace ``p.data``: +eps z, L+, -2 eps z, L-, +eps z,
then the update pass ``p.data = p.data - lr * (g * z)`` with z drawn again from the same seed, where
g = (L+ - L-) / (2 eps). Four passes over the weights and two forwards per direction. With q
directions (MeZO's ``zero_order_sample``) each direction runs its own three passes and its own
update pass with g / q: 4q passes, 2q forwards. No weight decay (FedKSeed's official setting;
MeZO's default of 0). ZOSGD follows the same convention (theta -= lr * g * z, the same g), so one
lr and eps mean the same thing to both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def mezo_perturb(params: Sequence[torch.Tensor], seed: int, scale: float, eps: float) -> None:
    """``zo_perturb_parameters``: reseed, then per parameter ``p.data = p.data + scale * z * eps``."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data + scale * z * eps


def mezo_update(params: Sequence[torch.Tensor], seed: int, lr: float, grad: float) -> None:
    """``zo_update`` without weight decay: reseed, then per parameter ``p.data = p.data - lr * (g * z)``."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data - lr * (grad * z)


def mezo_step(
    params: Sequence[torch.Tensor], closure: Callable[[], object], seed: int, *, lr: float, eps: float, q: int = 1
) -> float:
    """One MeZO step with ``q`` directions (seeds ``seed`` .. ``seed + q - 1``): per direction +eps,
    L+, -2eps, L-, +eps; then one update pass per direction with its g / q. Returns the first L+
    (MeZO's ``zo_step`` returns loss1)."""
    if q < 1:
        raise ValueError(f"mezo_step: q must be >= 1, got {q}")
    grads, first = [], None
    for i in range(q):
        mezo_perturb(params, seed + i, 1, eps)
        plus = float(closure())
        mezo_perturb(params, seed + i, -2, eps)
        minus = float(closure())
        mezo_perturb(params, seed + i, 1, eps)
        grads.append((plus - minus) / (2 * eps))
        first = plus if first is None else first
    for i, g in enumerate(grads):
        mezo_update(params, seed + i, lr, g / q)
    return first
