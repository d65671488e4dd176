"""Applying a :class:`~fedkseed.zo.passes.Pass` to parameters whose tensors fall into
coefficient classes: one op call per distinct (coefficients, decay) on disjoint tensor subsets.

Each subset keeps its tensors' global offsets (docs/stream-spec.md#element-index), so every
element gets exactly the stream values and arithmetic it would get in one call over the whole
set, and the pass is still one pass over memory. When every class has the same coefficients
(no weight decay, one lr: the usual case) the pass is a single call on the whole set.

The runner also holds the current magnitude mask of a masked run (``remask``): every pass goes
through it until the next ``remask``. A subset's mask is its tensors' byte ranges of the whole
mask, since each tensor's bits start on a byte boundary (docs/stream-spec.md#magnitude-mask).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..ops import magnitude_mask, magnitude_thresholds, replay_
from ..paramset import ParamSet
from ..reference import mask_sizes
from .passes import Pass

_CACHE_KEY = "zo-subsets"  # ParamSet.cache entry: the subsets built so far, by (indices, decayed)


class Runner:
    """Applies passes to ``pset``; ``classes[i]`` is tensor i's coefficient class (2g + decayed)."""

    def __init__(self, pset: ParamSet, classes: Sequence[int], dist: str) -> None:
        if len(classes) != len(pset):
            raise ValueError(f"{len(classes)} coefficient classes for {len(pset)} tensors")
        self.pset = pset
        self.classes = list(classes)
        self.dist = dist
        self.mask: torch.Tensor | None = None  # the current mask epoch's bits; None: dense
        self._subset_masks: dict[tuple[int, ...], torch.Tensor] = {}

    def remask(self, density: float) -> None:
        """Start a mask epoch: the mask of density ``density`` built from the weights now
        (no mask for 1.0)."""
        self.set_mask(None if density == 1.0 else magnitude_mask(self.pset, magnitude_thresholds(self.pset, density)))

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (``magnitude_mask``'s layout over the whole set, or None) from now on."""
        self.mask = mask
        self._subset_masks = {}

    def apply(self, p: Pass, rounding_seed: int | None = None) -> None:
        if len(p.coefficients) == 1:
            by_coefficients = {p.coefficients[0]: list(range(len(self.pset)))}
        else:
            by_coefficients: dict[tuple[tuple[float, ...], float], list[int]] = {}
            for i, c in enumerate(self.classes):
                by_coefficients.setdefault(p.coefficients[c], []).append(i)
        for (alphas, decay), indices in by_coefficients.items():
            target = self._subset(tuple(indices), decay != 1.0)
            replay_(
                target,
                list(p.seeds),
                list(alphas),
                self.dist,
                decay if decay != 1.0 else None,
                rounding_seed=rounding_seed,
                mask=self._mask_of(tuple(indices)),
            )

    def _mask_of(self, indices: tuple[int, ...]) -> torch.Tensor | None:
        """The current mask's bytes of the tensors ``indices``, in that order."""
        if self.mask is None or len(indices) == len(self.pset):
            return self.mask
        if indices not in self._subset_masks:
            sizes = mask_sizes(self.pset.numels)
            starts = [0, *itertools.accumulate(sizes)]
            self._subset_masks[indices] = torch.cat([self.mask[starts[i] : starts[i] + sizes[i]] for i in indices])
        return self._subset_masks[indices]

    def _subset(self, indices: tuple[int, ...], decayed: bool) -> ParamSet:
        """The tensors ``indices`` as a ParamSet with their global offsets; ``decayed``: every
        one takes the decay factor (the class decides, not the name rule)."""
        if not decayed and len(indices) == len(self.pset):
            return self.pset
        cache = self.pset.cache.setdefault(_CACHE_KEY, {})
        key = (indices, decayed)
        if key not in cache:
            cache[key] = self.pset.subset(indices, decayed=decayed)
        return cache[key]
