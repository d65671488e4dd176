"""Every random draw of a run but the pool: which clients take part in a round, each client's
seed schedule, and the rows of each local step's batch (drawn, or walked in shuffled epochs).

Each is a BLAKE2b derivation of the run's seed and the draw's coordinates (``seeds.derive_seed``,
domains in docs/seed-derivation.md#domains), so it is the same on every machine and independent
of torch's and numpy's global RNGs. The pool itself is :class:`fedkseed.fed.seedpool.SeedPool`.
"""

from __future__ import annotations

import numpy as np

from ..seeds import derive_seed, draw_indices


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
