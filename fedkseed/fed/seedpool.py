"""The K candidate seeds and FedKSeed-Pro's seed probabilities.

The pool is a BLAKE2b derivation of the pool seed (``seeds.derive_seed``, domain ``pool``), like
every other draw of a run (those are in :mod:`fedkseed.fed.draws`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..checks import check_int, check_u64
from ..seeds import derive_seed, to_int64
from .wire import MAX_K

# FedKSeed-Pro's history clip: each scalar gradient recorded in a seed's history is clipped to
# +-this before averaging |g| (official code). Not the ZO step's clip of g, nor the upload bound.
PRO_HISTORY_CLIP = 1000.0


class SeedPool:
    """K candidate 64-bit seeds derived from ``pool_seed``, and the Pro importance statistics.

    FedKSeed-Pro keeps, for every seed, the history of its scalar gradients starting with one
    0.0; importance = mean(|clip(history, +-1000)|) and p = softmax(min_max_norm(importance)),
    min_max_norm(v) = (v - min) / (max - min + 1e-10). Only the sums and counts of the history
    are needed, so that is what is kept (the history itself would grow every round).
    """

    def __init__(self, pool_seed: int, k: int) -> None:
        self.pool_seed = check_u64("pool_seed", pool_seed)
        self.k = check_int("k", k, 1, MAX_K)
        self.seeds = [derive_seed("pool", pool_seed, k, i) for i in range(k)]
        self.seed_tensor = torch.tensor([to_int64(s) for s in self.seeds], dtype=torch.int64)
        self.abs_sum = np.zeros(k, dtype=np.float64)  # the initial 0.0 adds nothing ...
        self.count = np.ones(k, dtype=np.int64)  # ... but counts once

    def record(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Append ``values[j]`` to the history of seed ``indices[j]`` (repeats allowed)."""
        clipped = np.abs(np.clip(np.asarray(values, dtype=np.float64), -PRO_HISTORY_CLIP, PRO_HISTORY_CLIP))
        np.add.at(self.abs_sum, indices, clipped)
        np.add.at(self.count, indices, 1)

    def importance(self) -> np.ndarray:
        return self.abs_sum / self.count

    def probabilities(self) -> np.ndarray:
        """FedKSeed-Pro's sampling probabilities (float64); uniform while no history exists."""
        v = self.importance()
        u = (v - v.min()) / (v.max() - v.min() + 1e-10)
        e = np.exp(u - u.max())
        return e / e.sum()

    def state_dict(self) -> dict:
        return {"abs_sum": self.abs_sum.copy(), "count": self.count.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restore saved statistics; ValueError (one line) for any that a run cannot produce."""
        abs_sum = np.asarray(state["abs_sum"], dtype=np.float64)
        count = np.asarray(state["count"], dtype=np.float64)
        if abs_sum.shape != (self.k,) or count.shape != (self.k,):
            raise ValueError(f"seed-pool state does not hold K = {self.k} entries")
        if not (np.isfinite(count).all() and (count == np.round(count)).all() and (count >= 1).all()):
            raise ValueError("seed-pool count holds a value that is not an integer >= 1")
        # each recorded |g| is clipped to PRO_HISTORY_CLIP, and the history's first entry (0.0) adds nothing
        if not (
            np.isfinite(abs_sum).all() and (abs_sum >= 0).all() and (abs_sum <= PRO_HISTORY_CLIP * (count - 1)).all()
        ):
            raise ValueError(f"seed-pool abs_sum holds a value outside [0, {PRO_HISTORY_CLIP:g} * (count - 1)]")
        self.abs_sum, self.count = abs_sum.copy(), count.astype(np.int64)
