"""The K candidate seeds, FedKSeed-Pro's seed probabilities, and every random draw of a run.

All draws (the pool, which clients take part in a round, each client's seeds and batches) are
BLAKE2b derivations of the run's seed and the draw's coordinates (``seeds.derive_seed``, domains
in docs/seed-derivation.md#domains), so they are the same on every machine and independent of torch's
and numpy's global RNGs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checks import check_int, check_u64
from ..seeds import derive_seed, draw_indices, to_int64
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


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The ``per_round`` clients taking part in ``round_`` (sorted ids), without replacement."""
    keys = [derive_seed("clients", seed, round_, c) for c in range(num_clients)]
    return sorted(sorted(range(num_clients), key=keys.__getitem__)[:per_round])


def draw_schedule(
    seed: int,
    round_: int,
    client_id: int,
    steps: int,
    k: int,
    probabilities: np.ndarray | None = None,
    *,
    shared: bool = False,
) -> np.ndarray:
    """The seed index of each local step of ``client_id`` in ``round_`` (int64, length ``steps``):
    uniform over K, or by inverse CDF over ``probabilities`` (FedKSeed-Pro). ``shared``
    (``FedSpec.shared_seeds``): one schedule for every client of the round, so the client id
    does not enter the draw."""
    if shared:
        words = np.array([derive_seed("shared-schedule", seed, round_, t) for t in range(steps)], dtype=np.uint64)
    else:
        words = np.array([derive_seed("schedule", seed, round_, client_id, t) for t in range(steps)], dtype=np.uint64)
    if probabilities is None:
        return (words % np.uint64(k)).astype(np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (k,):
        raise ValueError(f"probabilities must hold K = {k} values, got shape {probabilities.shape}")
    return draw_indices(words, np.cumsum(probabilities))


def draw_rows(seed: int, round_: int, client_id: int, step: int, batch_size: int, n: int) -> list[int]:
    """The rows (of ``n`` examples) forming the batch of one local step."""
    return [derive_seed("batch", seed, round_, client_id, step, j) % n for j in range(batch_size)]


def epoch_rows(seed: int, client_id: int, batch_index: int, batch_size: int, n: int) -> list[int]:
    """The rows (of ``n`` examples) of a client's batch ``batch_index`` when batches walk shuffled
    epochs without replacement, as the official client's DataLoader(shuffle=True) does: epoch e
    is the permutation of the rows sorted by derive_seed("epoch", seed, client, e, row), cut into
    ceil(n / batch_size) batches, the last one short. ``batch_index`` counts the client's batches
    over the whole run (the official iterator carries on across rounds)."""
    if n < 1 or batch_size < 1 or batch_index < 0:
        raise ValueError(
            f"epoch_rows: need n >= 1, batch_size >= 1, batch_index >= 0; got {n}, {batch_size}, {batch_index}"
        )
    per_epoch = -(-n // batch_size)
    epoch, position = divmod(batch_index, per_epoch)
    keys = [derive_seed("epoch", seed, client_id, epoch, row) for row in range(n)]
    order = sorted(range(n), key=keys.__getitem__)
    return order[position * batch_size : (position + 1) * batch_size]


def rounds_taken(seed: int, round_: int, client_id: int, num_clients: int, per_round: int) -> int:
    """How many rounds before ``round_`` (rounds count from 1) sampled ``client_id``: a pure
    function of the run, so a client needs no state to continue its epoch walk."""
    return sum(client_id in sample_clients(seed, r, num_clients, per_round) for r in range(1, round_))
