"""Seeds: the uint64 values that name perturbation directions, and how the project derives them.

Every seed is an unsigned 64-bit integer. Derived seeds (per-step seeds, the candidate pool,
client sampling, schedules, batches, stochastic-rounding seeds) come from BLAKE2b over
little-endian 64-bit words, personalised with a *domain* name, so they are reproducible on every
machine and independent of torch's and NumPy's global RNGs. The domains below are part of the
reproducibility contract (docs/seed-derivation.md): renaming one changes every run that uses it.

This module is the bottom layer with ``stream``: it imports nothing from the package.
"""

from __future__ import annotations

import bisect
import hashlib
import numbers
from collections.abc import Sequence

import numpy as np

U64 = 1 << 64
INT64_MIN = -(1 << 63)

# domain name -> what it derives. One place for all of them (docs/seed-derivation.md).
DOMAINS: dict[str, bytes] = {
    "step-seed": b"fks-step-seed",  # ZOSGD: seed of step t from (seed, t)
    "round-key": b"fks-round-key",  # ZOSGD: stochastic-rounding key of a run from (seed,)
    "round-step": b"fks-round-step",  # rounding base of entry i from (rounding key, i)
    "round-pass": b"fks-round-pass",  # rounding seed of one pass from (base, pass number)
    "pool": b"fks-pool",  # FedKSeed: candidate seed i from (pool seed, K, i)
    "clients": b"fks-clients",  # FedKSeed: client sampling keys from (seed, round, client)
    "schedule": b"fks-schedule",  # FedKSeed: seed index of a local step (seed, round, client, t)
    "shared-schedule": b"fks-shared-sched",  # FedKSeed shared seeds: step t of every client (seed, round, t)
    "batch": b"fks-batch",  # FedKSeed: row j of a local batch (seed, round, client, step, j)
    "epoch": b"fks-epoch",  # FedKSeed: the row order of epoch e of a client (seed, client, e, row)
    "attack": b"fks-attack",  # attack simulation: Byzantine picks and random values (seed, round, client, ...)
    "dp-sample": b"fks-dp-sample",  # DP with --dp-noise-seed (unsafe): Poisson sampling (noise seed, round, client)
    "dp-noise": b"fks-dp-noise",  # DP with --dp-noise-seed (unsafe): Gaussian noise (noise seed, round, entry, half)
}


def derive_seed(domain: str, *words: int) -> int:
    """A uint64 from 64-bit words (taken modulo 2^64) by BLAKE2b personalised with ``domain``,
    one of :data:`DOMAINS`."""
    person = DOMAINS[domain]
    data = b"".join((int(w) % U64).to_bytes(8, "little") for w in words)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "little")


def as_int(value: object, name: str = "seed") -> int:
    """``value`` as a Python int if it is an integral scalar (int, NumPy integer, 0-d integer
    tensor); bools and everything else raise TypeError naming ``name``."""
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, numbers.Integral):
        return int(value)
    if type(value).__module__.startswith("torch") and getattr(value, "ndim", None) == 0:
        import torch  # only when a tensor was passed: this layer does not need torch

        if not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool:  # type: ignore[attr-defined]
            return int(value.item())  # type: ignore[attr-defined]
    raise TypeError(f"{name} must be an integer, got {type(value).__name__}")


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2^64); a clear error otherwise."""
    value = as_int(seed, name)
    if not 0 <= value < U64:
        raise ValueError(f"{name} must be in [0, 2^64), got {value}")
    return value


def to_int64(value: int) -> int:
    """The two's-complement int64 of a uint64 (how seeds and offsets travel in int64 tensors)."""
    return value - U64 if value >= 1 << 63 else value


def to_uint64(value: int) -> int:
    """The uint64 whose two's complement is the int64 ``value``."""
    return value & (U64 - 1)


def unit_interval(word: int) -> float:
    """A float64 in [0, 1) from the top 53 bits of a uint64 word."""
    return (word >> 11) * 2.0**-53


def draw_index(word: int, cumulative: Sequence[float]) -> int:
    """Inverse-CDF draw: the index i with cumulative[i-1] <= u < cumulative[i], u uniform in
    [0, cumulative[-1]) from ``word``; clamped to the last index against rounding."""
    u = unit_interval(word) * cumulative[-1]
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


def draw_indices(words: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """:func:`draw_index` over a uint64 array of words (same values, vectorised)."""
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53 * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1).astype(np.int64)
