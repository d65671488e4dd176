"""Bounded influence: how far one client's upload can move the seed table.

Three guards, applied by ``Server.end_round`` to the accepted uploads of a round:

1. **Upload bound** (the setting ``FedSpec.clip``, ``--clip``; neither the ZO step's clip of g
   nor FedKSeed-Pro's history clip, ``seedpool.PRO_HISTORY_CLIP``). Each upload's values
   (per-seed sums, or under FedKSeed-Pro per-step scalars) are scaled down, direction kept, so
   that their L2 norm is at most ``bound * sqrt(steps)``: ``bound`` limits the per-step RMS of
   g, the same measure whatever tau is. It is fixed (``FedSpec.clip`` a number) or derived
   (``clip="auto"``) as ``BOUND_FACTOR`` times the lower median over clients of one value each:
   the per-step RMS of the client's latest accepted upload, before any bound (this round's
   upload when it sent one, else its last earlier one; clients never heard from do not count).
   The norm, not each value, is what matters for a ZO update: the seeds' directions z are
   independent, so the model moves by |sum_s a_s z_s|^2 ~ d * sum_s a_s^2, and the second-order
   loss increase grows with that sum wherever it is spent (one seed or many).
   Why this statistic (the adversary knows the rule and sizes or poisons its uploads):
   - one value per client: however large or small a client's uploads are, in one round or in
     every round, it moves the median by one rank at most. A per-upload history ("the median
     so far") let one round of 1e-30 uploads hold the reference near 1e-29 for ever, since every
     later honest upload entered it already scaled down; here honest values enter unscaled;
   - this round's values replace older ones, so nothing stale outvotes a recovering round: one
     client's tiny upload can drag the bound down only in a round where it is one of two known
     values (round 1 with two clients per round); with three or more, the lower median lies
     between honest values;
   - no limit on growth or shrink per round: it would let a one-round poisoning persist (a bound
     allowed to grow 2x a round stays near 1e-30 for a hundred rounds);
   - the lower median: with two values the smaller one, so a single client cannot raise the
     bound either; an upload far above it (``scale``, ``sign-flip-bound``) sits at the top rank
     whatever its size, so an attacker that overshoots lands exactly where one that computed the
     bound would.
   An attacker at the bound carries at most ``BOUND_FACTOR`` times the median client's per-step
   RMS, weighted like any client: under "mean" with distinct seeds a negated upload at the bound
   undoes BOUND_FACTOR honest clients' progress (at 2 and 1 of 4, a quarter of the round's
   first-order descent is left), which is why shared seeds with "median" are the robust mode.
   Honest per-step RMS values differ by their data's gradient scale and, over few steps, by
   chance (g^2 ~ |grad|^2 chi^2_1 per step): a factor of 2 leaves them untouched in runs of tens
   of steps (SmolLM2, 30 steps: four clients within 1.7x), and an honest upload is scaled below
   half its value only when it is more than 2 * BOUND_FACTOR times the median's.
2. **Per-seed aggregate** (``FedSpec.aggregate``): over the round's clients that used each
   seed, scaled by those clients' share of the weight, so that "mean" is FedKSeed's own
   sum_c w_c g_c[s] (the same float64 operations in the same order as before) and "median" /
   "trimmed-mean" replace the users' weighted mean by a robust centre. They act only where
   clients share a seed: with ``FedSpec.shared_seeds`` every client of a round uses the same
   seeds, so with 3 or more clients a sign-flipper is outvoted per seed; otherwise clients
   rarely share one, and the upload bound is what limits a client.
3. **Range.** The accumulated table is clamped to +-``table_limit(lr)`` (2^64 / max(1, lr)),
   so every published entry is finite, encodes in either precision, and its replay
   coefficient |lr * G| <= 2^64: a build sums at most 2^24 such terms times |z| < 8, below
   float32's range, so no build, download or delta can fail on what a client sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..checks import check_real

AGGREGATES = ("mean", "median", "trimmed-mean")
BOUND_MODES = ("auto", "off")  # or a number > 0: a fixed bound on the per-step RMS
BOUND_FACTOR = 2.0
TRIM_FRACTION = 0.25  # trimmed mean: floor(n / 4) values dropped at each end
TABLE_LIMIT = 2.0**64


def parse_upload_bound(value: object) -> str | float:
    """The upload bound's setting (``FedSpec.clip``): ``"auto"``, ``"off"`` or a finite number > 0
    (a str as given on a command line)."""
    if isinstance(value, str) and value in BOUND_MODES:
        return value
    try:
        return check_real("clip", float(value) if isinstance(value, str) else value, positive=True)
    except ValueError:
        raise ValueError(f"clip must be auto, off or a number > 0, got {value!r}") from None


def rms_bound(current: Mapping[int, float], latest: np.ndarray, setting: str | float) -> float:
    """The round's bound on an upload's per-step RMS (inf: none) under ``setting`` (``FedSpec.clip``).
    ``current``: client id -> the per-step RMS of its upload this round (before any bound);
    ``latest``: float64[clients], each client's value from its latest earlier upload (0: none)."""
    if setting == "off":
        return math.inf
    if setting != "auto":
        return float(setting)
    values = np.array(latest, dtype=np.float64)
    for client, rms in current.items():
        values[client] = rms
    positive = np.sort(values[values > 0])
    if not positive.size:
        return math.inf  # nothing to scale: every upload is zero
    return BOUND_FACTOR * float(positive[(positive.size - 1) // 2])


def per_step_rms(values: np.ndarray, steps: int) -> float:
    """An upload's L2 norm over sqrt(steps): the RMS of its per-step g when seeds are distinct."""
    return l2(values) / math.sqrt(max(steps, 1))


def bounded(values: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``values`` (float64) scaled to L2 norm <= ``bound``, and the factor applied (1.0 when
    already within it: the values are then returned unchanged, bit for bit)."""
    values = np.asarray(values, dtype=np.float64)
    norm = l2(values)
    if norm <= bound:
        return values, 1.0
    factor = bound / norm
    return values * factor, factor


def l2(values: np.ndarray) -> float:
    """The L2 norm, computed without overflow for any finite float32 values."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak == 0:
        return 0.0
    return peak * float(np.sqrt(np.sum((values / peak) ** 2)))


def accumulate(
    accumulated: np.ndarray,
    parts: Sequence[tuple[np.ndarray, np.ndarray, float]],
    how: str,
) -> None:
    """Add one round to ``accumulated`` (float64[K], in place). ``parts``: per accepted client
    in id order, (distinct seed indices, float64 per-seed values, weight); weights sum to 1."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if how == "mean":
        for indices, values, weight in parts:  # FedKSeed's own order of operations
            accumulated[indices] += weight * values
        return
    if not parts:
        return
    seeds = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    weights = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
    order = np.lexsort((values, seeds))  # by seed, then by value
    seeds, values, weights = seeds[order], values[order], weights[order]
    starts = np.flatnonzero(np.r_[True, seeds[1:] != seeds[:-1]])
    for begin, end in zip(starts, np.r_[starts[1:], len(seeds)]):
        v, w = values[begin:end], weights[begin:end]
        centre = weighted_median(v, w) if how == "median" else trimmed_mean(v, w)
        accumulated[seeds[begin]] += w.sum() * centre


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted median of sorted ``values``: the value where the cumulative weight reaches
    half, the midpoint of two values when it lands exactly between them."""
    cumulative = np.cumsum(weights)
    half = 0.5 * cumulative[-1]
    i = int(np.searchsorted(cumulative, half, side="left"))
    if math.isclose(cumulative[i], half, rel_tol=1e-12) and i + 1 < len(values):
        return 0.5 * (values[i] + values[i + 1])
    return float(values[i])


def trimmed_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted mean of sorted ``values`` after dropping floor(n * TRIM_FRACTION) values at
    each end."""
    cut = int(len(values) * TRIM_FRACTION)
    v, w = values[cut : len(values) - cut], weights[cut : len(values) - cut]
    return float(np.sum(w * v) / np.sum(w))


def table_limit(lr32: float) -> float:
    """The largest |entry| a published table may hold (see the module docstring)."""
    return TABLE_LIMIT / max(1.0, lr32)


def clamp_table(accumulated: np.ndarray, lr32: float) -> int:
    """Clamp ``accumulated`` to the table's range in place; returns how many entries moved."""
    limit = table_limit(lr32)
    outside = int(np.count_nonzero(np.abs(accumulated) > limit))
    np.clip(accumulated, -limit, limit, out=accumulated)
    if not np.isfinite(accumulated).all():  # cannot happen: the values come in finite
        raise RuntimeError("seed table holds a non-finite value")
    return outside
