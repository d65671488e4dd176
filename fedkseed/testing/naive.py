"""ZOSGD written out naively: materialised reference noise, one tensor and one pass at a time.

The fused passes of :mod:`fedkseed.zo.passes` must match this bit for bit (the accumulation rule
of docs/stream-spec.md#accumulation). Its momentum is the same truncated sum as ZOSGD's, so it
checks the passes, not the estimator: tests/zo/test_estimators.py checks the momentum itself against
``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import reference
from ..zo.passes import float32


def naive_pass(
    x: torch.Tensor, offset: int, seeds: Sequence[int], alphas: Sequence[float], dist: str, decay: float = 1.0
) -> None:
    """x <- cast(float32(x) * d + sum_k float32(a_k) z_k), z from the reference stream."""
    acc = torch.zeros(x.numel(), dtype=torch.float32)
    for s, a in zip(seeds, alphas):
        acc = acc + torch.tensor(a, dtype=torch.float32) * reference.noise(s, x.numel(), offset, dist)
    y = x.detach().reshape(-1).float()
    if decay != 1.0:
        y = y * torch.tensor(decay, dtype=torch.float32)
    with torch.no_grad():
        x.copy_((y + acc).to(x.dtype).reshape(x.shape))


class NaiveZO:
    """ZOSGD's semantics written out tensor by tensor: probes chained by +-eps passes, then one
    update pass with per-tensor coefficients (group lr, decayed or not), momentum as replayed
    past terms. ``tensors``: (tensor, global offset, group, decayed). The number of directions is
    the number of probe seeds each step is given."""

    def __init__(
        self,
        tensors: Sequence[tuple[torch.Tensor, int, int, bool]],
        eps: float,
        dist: str = "gaussian",
        sign: bool = False,
        momentum: float = 0.0,
        window: int = 1,
    ) -> None:
        self.tensors, self.eps, self.dist = tensors, eps, dist
        self.sign, self.beta, self.window = sign, momentum, window
        self.past: list[list[tuple[int, float]]] = []
        self.pending = False

    def everywhere(self, seeds: Sequence[int], alphas: Sequence[float]) -> None:
        for x, off, _, _ in self.tensors:
            naive_pass(x, off, seeds, alphas, self.dist)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor],
        probes: Sequence[int],
        lrs: Sequence[float],
        wds: Sequence[float],
        next_seed: int | None = None,
    ) -> list[float]:
        """One step with probe seeds ``probes`` and per-group lr / weight decay; ``next_seed``
        fuses the next step's +eps into the update pass. Returns the projected gradients."""
        eps, losses = self.eps, []
        for i, p in enumerate(probes):
            if i == 0 and not self.pending:
                self.everywhere([p], [eps])
            elif i > 0:
                self.everywhere([probes[i - 1], p], [eps, eps])
            losses.append(float(closure()))
            self.everywhere([p], [-2 * eps])
            losses.append(float(closure()))
        grads = [(losses[2 * i] - losses[2 * i + 1]) / (2 * eps) for i in range(len(probes))]
        own = [(p, (math.copysign(1.0, g) if self.sign and g else g) / len(probes)) for p, g in zip(probes, grads)]
        terms = list(own)
        for j, past in enumerate(reversed(self.past[-(self.window - 1) :] if self.window > 1 else []), start=1):
            terms += [(s, self.beta**j * w) for s, w in past]
        self.past.append(own)
        for x, off, g, decayed in self.tensors:
            d = float32(1 - lrs[g] * wds[g]) if decayed else 1.0
            seeds = [s for s, _ in terms]
            alphas = [float32(-lrs[g] * w) for _, w in terms]
            if probes[-1] in seeds:
                k = seeds.index(probes[-1])
                alphas[k] = eps * d + alphas[k]
            else:
                seeds.append(probes[-1])
                alphas.append(eps * d)
            if next_seed is not None:
                seeds.append(next_seed)
                alphas.append(eps)
            naive_pass(x, off, seeds, alphas, self.dist, d)
        self.pending = next_seed is not None
        return grads
