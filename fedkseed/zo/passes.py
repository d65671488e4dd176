"""What a ZO step applies, pass by pass: defined once, used by the step to train and by
``History`` to replay, so a recorded run rebuilds bit for bit.

An :class:`Entry` is one recorded step. It has q >= 0 *probe* seeds p_1..p_q (directions
perturbed by +-eps), K update *terms* (seed s_k, float32 coefficient a[g][k] per param group g)
and a float32 decay d[g] per group. Each tensor belongs to a group g and is decayed or not; its
*coefficient class* is (g, decayed), and a tensor's decay is d[g] if decayed, else 1. Every pass
is rounded into the parameter dtype (docs/stream-spec.md#accumulation,
docs/stream-spec.md#conversion):

    probe phase (one closure evaluation after each pass)
        pass 1            theta <- theta + eps z(p_1)            (omitted when ``perturbed``)
        pass 2            theta <- theta - 2 eps z(p_1)
        for i = 2..q:     theta <- theta + eps z(p_{i-1}) + eps z(p_i)   (restore and next probe)
                          theta <- theta - 2 eps z(p_i)
    update (one pass, however many seeds: n-SPSA, momentum)
        pass 3            theta <- theta * d + eps d z(p_q) + sum_k a[g][k] z(s_k) [+ eps z(n)]

The restore coefficient eps*d of p_q merges into p_q's term when p_q is among the terms
(``eps * d + a``, rounded once by the op). With ``next_seed`` n the update pass also applies the
next step's +eps (its pass 1 is then omitted: it starts ``perturbed``). So non-decayed tensors end
at theta + (eps + a) z and decayed ones at theta d + (eps d + a) z after the -2 eps pass: each
class gets its own coefficients, applied as one op call per distinct coefficient set on disjoint
tensor subsets (still one pass over memory).

A *one-sided* entry (``one_sided``; the FZOO-style estimator, :mod:`fedkseed.zo.estimators`)
has N >= 2 probes evaluated on one side only, after an evaluation at theta itself:

    probe phase (one closure evaluation before the first pass, L_0 at theta, and one after each)
        pass 1024         theta <- theta + eps z(p_1)
        for i = 2..N:     theta <- theta - eps z(p_{i-1}) + eps z(p_i)   (pass 1023 + i)
    update (one pass)
        pass 3            theta <- theta * d - eps d z(p_N) + sum_k a[g][k] z(s_k)

N + 1 passes and N + 1 evaluations per step. A one-sided entry never starts ``perturbed`` and
never fuses a ``next_seed``: L_0 of the next step needs the unperturbed weights.

An *aborted* entry is a step whose closure raised after ``aborted`` of its probe passes: the
weights carried +-eps z(p_i), and one recovery pass (number 4) took it back. ``settle()`` (taking
back a pending +eps of the next step) is recorded the same way, as an aborted entry with
``perturbed`` and no pass made. An entry with q = 0 is a logical update: its update pass only
(FedKSeed's merged per-seed sums).

A *masked* run (Sparse-MeZO: perturb only the small-magnitude weights) applies every pass
through the current magnitude mask (docs/stream-spec.md#magnitude-mask): selected elements are
updated as above, the others are not written at all (no decay either). An entry with ``remask``
= rho starts a mask epoch: before its first pass the mask is rebuilt from the weights at that
point (per-tensor thresholds for density rho; rho = 1 means no mask), and it holds for every
pass of this and the following entries (probes, update, recovery, settle) until the next entry
with ``remask``. Such an entry never starts ``perturbed``: the weights it builds the mask from
carry no pending perturbation, so that every +eps and its restore go through the same mask.

Stochastic rounding (docs/stream-spec.md#stochastic-rounding): pass ``number`` of entry j uses
the rounding seed ``rounding_seed(step_rounding_base(key, j), number)``
(docs/seed-derivation.md#domains).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

from ..seeds import derive_seed

# Pass numbers (the rounding seed of each pass derives from its number). Probes after the first
# take 2i+3 (restore and next probe) and 2i+4 (minus) for i = 1.. (0-based), after these four.
PASS_PLUS, PASS_MINUS, PASS_UPDATE, PASS_RECOVER = 1, 2, 3, 4
# One-sided probe i (0-based) is pass PASS_ONE_SIDED + i: above every two-sided number (at most
# 2 * 254 + 4 for 255 probes), so the two patterns never share a rounding seed.
PASS_ONE_SIDED = 1024


class Entry(NamedTuple):
    """One recorded step (see the module docstring)."""

    probes: tuple[int, ...]
    seeds: tuple[int, ...]
    alphas: tuple[tuple[float, ...], ...]  # [group][term], float32 values
    decays: tuple[float, ...]  # [group], float32 values; 1.0: no decay
    perturbed: bool = False  # the weights already carried +eps z(probes[0]) (a fused pass)
    next_seed: int | None = None  # the update pass also applied +eps z(next_seed)
    aborted: int | None = None  # probe passes made before the closure raised; None: completed
    one_sided: bool = False  # the one-sided probe pattern (FZOO-style): L_0 at theta, then +eps each
    remask: float | None = None  # density rho: a new mask epoch starts here (see the module docstring)


class Pass(NamedTuple):
    """One pass over the weights. ``coefficients`` holds (alphas, decay) per coefficient class
    (class 2g: group g's non-decayed tensors, 2g+1: its decayed ones), or a single item that
    applies to every tensor."""

    number: int
    seeds: tuple[int, ...]
    coefficients: tuple[tuple[tuple[float, ...], float], ...]


def float32(x: float) -> float:
    """x rounded to the nearest float32 (inf when it overflows): the value the ops apply."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def update_alpha(eps: float, alpha: float, decay: float) -> float:
    """The coefficient of z(p_q) in the update pass when p_q is a term: eps * d + alpha."""
    return eps * decay + alpha


def _shared(number: int, seeds: tuple[int, ...], alphas: tuple[float, ...]) -> Pass:
    return Pass(number, seeds, ((alphas, 1.0),))


def probe_passes(probes: tuple[int, ...], eps: float, perturbed: bool, one_sided: bool = False) -> list[Pass]:
    """The probe phase: a closure evaluation follows each of these passes (and precedes the
    first one when ``perturbed`` or ``one_sided``)."""
    if one_sided:
        return [
            _shared(PASS_ONE_SIDED + i, (p,) if i == 0 else (probes[i - 1], p), (eps,) if i == 0 else (-eps, eps))
            for i, p in enumerate(probes)
        ]
    out: list[Pass] = []
    for i, p in enumerate(probes):
        if i == 0:
            if not perturbed:
                out.append(_shared(PASS_PLUS, (p,), (eps,)))
            out.append(_shared(PASS_MINUS, (p,), (-2.0 * eps,)))
        else:
            out.append(_shared(2 * i + 3, (probes[i - 1], p), (eps, eps)))
            out.append(_shared(2 * i + 4, (p,), (-2.0 * eps,)))
    return out


def carried(probes: tuple[int, ...], perturbed: bool, done: int, one_sided: bool = False) -> tuple[int, float] | None:
    """(seed, multiple of eps) of the perturbation the weights carry after ``done`` probe
    passes, or None when they carry none."""
    state = (probes[0], 1.0) if perturbed and probes else None
    for p in probe_passes(probes, 1.0, perturbed, one_sided)[:done]:
        state = (p.seeds[-1], 1.0 if p.coefficients[0][0][-1] > 0 else -1.0)
    return state


def recovery_pass(
    probes: tuple[int, ...], eps: float, perturbed: bool, done: int, one_sided: bool = False
) -> Pass | None:
    """The pass that takes back what an aborted step left (None when nothing is left)."""
    state = carried(probes, perturbed, done, one_sided)
    if state is None:
        return None
    seed, shift = state
    return _shared(PASS_RECOVER, (seed,), (-shift * eps,))


def update_pass(entry: Entry, eps: float | None, *, legacy: bool = False) -> Pass:
    """The update pass of a completed entry, per coefficient class (see the module docstring).

    ``legacy``: format-1 histories restored every tensor with eps * d (the decay of the
    decayed tensors), which is how they were trained; replayed as such. A one-sided entry's
    weights carry +eps z(p_N), so its restore coefficient is -eps d.
    """
    seeds = list(entry.seeds)
    restore = entry.probes[-1] if entry.probes else None
    at = None  # index of the restore's coefficient
    if restore is not None:
        at = seeds.index(restore) if restore in seeds else len(seeds)
        if at == len(seeds):
            seeds.append(restore)
    if entry.next_seed is not None:
        seeds.append(entry.next_seed)
    coefficients = []
    for group_alphas, group_decay in zip(entry.alphas, entry.decays):
        for decayed in (False, True):
            d = group_decay if decayed else 1.0
            alphas = [*group_alphas, *([0.0] * (len(seeds) - len(group_alphas)))]
            if at is not None:
                restore_eps = -eps if entry.one_sided else eps
                alphas[at] = update_alpha(restore_eps, alphas[at], group_decay if legacy else d)
            if entry.next_seed is not None:
                alphas[-1] = eps
            coefficients.append((tuple(alphas), d))
    return Pass(PASS_UPDATE, tuple(seeds), tuple(coefficients))


def entry_passes(entry: Entry, eps: float | None, *, legacy: bool = False) -> list[Pass]:
    """Every pass an entry made, in order."""
    if entry.probes and eps is None:
        raise ValueError("an entry with probes needs eps")
    out = probe_passes(entry.probes, eps, entry.perturbed, entry.one_sided) if entry.probes else []
    if entry.aborted is not None:
        recovery = recovery_pass(entry.probes, eps, entry.perturbed, entry.aborted, entry.one_sided)
        return out[: entry.aborted] + ([recovery] if recovery is not None else [])
    return [*out, update_pass(entry, eps, legacy=legacy)]


def step_rounding_base(rounding_key: int, index: int) -> int:
    """The rounding base of entry ``index`` of a run: fresh per entry even when seeds repeat."""
    return derive_seed("round-step", rounding_key, index)


def rounding_seed(base: int, pass_number: int) -> int:
    """The stochastic-rounding seed of one pass of an entry: fresh bits for every pass."""
    return derive_seed("round-pass", base, pass_number)
