"""ZOSGD written out naively: materialised reference noise, one tensor and one pass at a time.

The fused passes of :mod:`fedkseed.zo.passes` must match this bit for bit (the accumulation rule
of docs/stream-spec.md#accumulation). Its momentum is the same truncated sum as ZOSGD's, so it
checks the passes, not the estimator: tests/zo/test_estimators.py checks the momentum itself against
``torch.optim.SGD``. With ``one_sided`` it is FZOO's step (L_0, then one +eps probe at a time,
normalised by the standard deviation of the perturbed losses), written from the formula.
``remask`` (Sparse-MeZO) selects each tensor's elements with |x| <= its threshold (from
``reference.magnitude_thresholds``), compared here in float64 element by element (not through
the mask bytes), and every pass after it writes only those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import reference
from ..zo.passes import float32


def naive_pass(
    x: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    alphas: Sequence[float],
    dist: str,
    decay: float = 1.0,
    selected: torch.Tensor | None = None,
) -> None:
    """x <- cast(float32(x) * d + sum_k float32(a_k) z_k), z from the reference stream; with
    ``selected`` (bool, x's shape) only there, the other elements keep their bits."""
    acc = torch.zeros(x.numel(), dtype=torch.float32)
    for s, a in zip(seeds, alphas):
        acc = acc + torch.tensor(a, dtype=torch.float32) * reference.noise(s, x.numel(), offset, dist)
    y = x.detach().reshape(-1).float()
    if decay != 1.0:
        y = y * torch.tensor(decay, dtype=torch.float32)
    with torch.no_grad():
        new = (y + acc).to(x.dtype).reshape(x.shape)
        x.copy_(new if selected is None else torch.where(selected, new, x))


def naive_selection(tensors: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Each tensor's elements with |x| <= float32(tau_t) (NaN never), compared in float64."""
    out = []
    for x, tau in zip(tensors, reference.magnitude_thresholds(list(tensors), density)):
        out.append(x.detach().double().abs() <= float32(tau))
    return out


class NaiveZO:
    """ZOSGD's semantics written out tensor by tensor: probes chained by +-eps passes, then one
    update pass with per-tensor coefficients (group lr, decayed or not), momentum as replayed
    past terms. ``tensors``: (tensor, global offset, group, decayed). The number of directions is
    the number of probe seeds each step is given. ``one_sided``: FZOO's probes and update."""

    def __init__(
        self,
        tensors: Sequence[tuple[torch.Tensor, int, int, bool]],
        eps: float,
        dist: str = "gaussian",
        sign: bool = False,
        momentum: float = 0.0,
        window: int = 1,
        one_sided: bool = False,
    ) -> None:
        self.tensors, self.eps, self.dist, self.one_sided = tensors, eps, dist, one_sided
        self.sign, self.beta, self.window = sign, momentum, window
        self.past: list[list[tuple[int, float]]] = []
        self.pending = False
        self.selected: list[torch.Tensor] | None = None  # the mask epoch's selection; None: dense

    def remask(self, density: float) -> None:
        """Start a mask epoch of ``density`` from the weights now (1.0: dense)."""
        self.selected = None if density == 1.0 else naive_selection([x for x, *_ in self.tensors], density)

    def _selected(self, t: int) -> torch.Tensor | None:
        return None if self.selected is None else self.selected[t]

    def everywhere(self, seeds: Sequence[int], alphas: Sequence[float]) -> None:
        for t, (x, off, _, _) in enumerate(self.tensors):
            naive_pass(x, off, seeds, alphas, self.dist, selected=self._selected(t))

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor],
        probes: Sequence[int],
        lrs: Sequence[float],
        wds: Sequence[float],
        next_seed: int | None = None,
        remask: float | None = None,
    ) -> list[float]:
        """One step with probe seeds ``probes`` and per-group lr / weight decay; ``next_seed``
        fuses the next step's +eps into the update pass; ``remask`` starts a mask epoch first.
        Returns the projected gradients (an empty list when the step was skipped: only
        one-sided steps skip here)."""
        if remask is not None:
            self.remask(remask)
        if self.one_sided:
            return self._one_sided_step(closure, probes, lrs, wds)
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
        self._update(own, probes[-1], eps, lrs, wds, next_seed)
        return grads

    def _one_sided_step(
        self, closure: Callable[[], torch.Tensor], probes: Sequence[int], lrs: Sequence[float], wds: Sequence[float]
    ) -> list[float]:
        """L_0 = L(theta); theta + eps u_1, then -eps u_{i-1} + eps u_i per probe; one update
        pass restoring -eps u_N. w_i = ((L_i - L_0) / (eps sigma)) / N, sigma the N - 1 sample
        standard deviation of L_1..L_N (fsum). A skipped step (sigma 0, a NaN/inf loss) only
        restores and adds no momentum terms."""
        eps, n = self.eps, len(probes)
        base = float(closure())
        losses = []
        for i, p in enumerate(probes):
            self.everywhere([p] if i == 0 else [probes[i - 1], p], [eps] if i == 0 else [-eps, eps])
            losses.append(float(closure()))
        mean = math.fsum(losses) / n
        sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in losses) / (n - 1))
        finite = all(math.isfinite(x) for x in (base, *losses))
        if not (finite and sigma > 0):  # skipped: restore only, no terms, the window still ages
            self.past.append([])
            self.everywhere([probes[-1]], [-eps])
            return []
        grads = [(x - base) / (eps * sigma) for x in losses]
        self._update([(p, g / n) for p, g in zip(probes, grads)], probes[-1], -eps, lrs, wds, None)
        return grads

    def _update(
        self,
        own: list[tuple[int, float]],
        last: int,
        restore: float,
        lrs: Sequence[float],
        wds: Sequence[float],
        next_seed: int | None,
    ) -> None:
        """The update pass per tensor: this step's and the window's terms, the restore
        ``restore`` * d of the last probe merged into its term, the next step's +eps."""
        eps = self.eps
        terms = list(own)
        for j, past in enumerate(reversed(self.past[-(self.window - 1) :] if self.window > 1 else []), start=1):
            terms += [(s, self.beta**j * w) for s, w in past]
        self.past.append(own)
        for t, (x, off, g, decayed) in enumerate(self.tensors):
            d = float32(1 - lrs[g] * wds[g]) if decayed else 1.0
            seeds = [s for s, _ in terms]
            alphas = [float32(-lrs[g] * w) for _, w in terms]
            if last in seeds:
                k = seeds.index(last)
                alphas[k] = restore * d + alphas[k]
            else:
                seeds.append(last)
                alphas.append(restore * d)
            if next_seed is not None:
                seeds.append(next_seed)
                alphas.append(eps)
            naive_pass(x, off, seeds, alphas, self.dist, d, self._selected(t))
        self.pending = next_seed is not None
