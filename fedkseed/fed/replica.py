"""Replica: a party's copy of the model, and the ONE canonical construction of a global model.

The global model for a seed table G (K float32 entries) is, on every party:

    theta = base weights (fresh copy);  replay_(theta, seeds[k], alphas[k] = float32(-lr) * G[k]
    for every k with G[k] != 0, in index order)  -- one fused multi-seed pass

Floating point makes "the same coefficients applied in another grouping" differ in the last
bits, so the server, every client and ``fedkseed apply`` all build the model this way from the
same table, and hold bit-identical weights. Leaving out zero entries changes no bit: the stream
contract sums a*z into an accumulator that starts at +0, and adding a zero product to it is
exact (docs/stream-spec.md#accumulation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ops import replay_, resolve_backend
from ..paramset import ParamSet
from .seedpool import SeedPool


def canonical_alphas(table: np.ndarray, lr32: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float32 alphas) of the canonical replay of ``table``."""
    table = np.asarray(table, dtype=np.float32)
    indices = np.flatnonzero(table)
    return indices, np.float32(-lr32) * table[indices]


class Replica:
    """The base weights plus working parameters of one party. ``build(table)`` makes the
    working parameters the global model of ``table`` (a copy of the last build when the table
    is unchanged, since local training moves the weights away from it)."""

    def __init__(self, model: Any, pool: SeedPool, lr32: float, dist: str) -> None:
        self.model = model
        self.params = ParamSet.of(model)
        self.base = self.params.state()
        self.pool, self.lr32, self.dist = pool, lr32, dist
        self._built: bytes | None = None
        self._snapshot: list[torch.Tensor] | None = None

    @torch.no_grad()
    def build(self, table: np.ndarray) -> ParamSet:
        table = np.asarray(table, dtype=np.float32)
        if table.shape != (self.pool.k,):
            raise ValueError(f"table must hold K = {self.pool.k} entries, got shape {table.shape}")
        resolve_backend(None, self.params.device)  # refused before the base is copied in: the weights stay
        key = table.tobytes()
        if key == self._built and self._snapshot is not None:
            for t, s in zip(self.params.tensors, self._snapshot):
                t.copy_(s)
            return self.params
        self._built = None
        for t, b in zip(self.params.tensors, self.base):
            t.copy_(b)
        indices, alphas = canonical_alphas(table, self.lr32)
        if indices.size:
            replay_(
                self.params,
                self.pool.seed_tensor[torch.from_numpy(indices)],
                torch.from_numpy(alphas),
                self.dist,
            )
        if self._snapshot is None:
            self._snapshot = self.params.state()
        else:
            for s, t in zip(self._snapshot, self.params.tensors):
                s.copy_(t)
        self._built = key
        return self.params
