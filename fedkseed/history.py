"""History: the (seed, alpha, decay) record of a zeroth-order run, and its bit-exact replay.

What a recorded step means
--------------------------
An entry is a *logical* update theta <- theta * d + alpha * z(seed), with alpha = -lr * g and
d = 1 - lr * weight_decay (1 for a skipped step, whose alpha is 0). Alpha and d are stored as
the float32 values the ops apply, so a record is 16 bytes and nothing is rounded twice.

A ZO step as trained is not that single pass: it is three passes over the weights (spec
section 7 rounds each one into the parameter dtype):

    pass 1   theta <- theta + eps * z
    pass 2   theta <- theta - 2 eps * z
    pass 3   theta <- theta * d + (eps * d + alpha) * z      (restore and update, fused)

In float32 the net effect differs from ``theta * d + alpha * z`` by the roundings of passes 1
and 2, so replaying the logical update alone cannot rebuild the trained weights bit for bit.
A History built with ``eps`` therefore replays each entry as exactly those three passes
(:func:`step_passes`, which :func:`fedkseed.zo.zo_step` uses too: one definition of what a step
applies); a History without ``eps`` (FedKSeed's merged per-seed scalars, a server's aggregate)
replays each entry as one pass. Either way ``apply_(params)`` in recorded order reproduces the
weights bit for bit from the base weights. ``apply_(params, fused=True)`` instead replays runs of
undecayed entries as one multi-seed pass each (the FedKSeed way): equal up to rounding, and
K times fewer passes. Skipped steps are recorded (alpha 0, d 1) because their restore passes
change the bits too.

Stochastic rounding: a History with ``rounding_key`` replays every pass with stochastic rounding
whose seed is :func:`rounding_seed` of (step base, pass number), the step base being
:func:`step_rounding_base` of (rounding_key, entry index), exactly as ``ZOSGD`` trained.

Binary format (little-endian, not pickle)::

    magic "FKSH" | u16 format version | u16 stream version | u8 dist tag | u8 flags
    | 32 B fingerprint (sha256) | f64 eps | u64 rounding key | u64 count
    | count x (u64 seed, f32 alpha, f32 decay)

flags: bit 0 fingerprint present, bit 1 eps present, bit 2 rounding key present. ``load``
checks the magic, both versions, the flags and the exact length; ``save`` writes a temporary
file in the same folder and renames it over the target, so no reader sees half a file.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import struct
from collections.abc import Iterator, Sequence
from typing import Union

from . import stream as S
from .atomic import save_atomically
from .ops import replay_
from .paramset import ParamSet
from .reference import check_seed

MAGIC = b"FKSH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHBB32sdQQ")
_RECORD = struct.Struct("<Qff")
_HAS_FINGERPRINT, _HAS_EPS, _HAS_ROUNDING = 1, 2, 4
_U64 = 1 << 64

# Pass numbers of a step (the rounding seed of each pass derives from its number).
PASS_PLUS, PASS_MINUS, PASS_UPDATE, PASS_RECOVER = 1, 2, 3, 4

Pass = tuple[list[int], list[float], Union[float, None], int]  # seeds, alphas, decay, pass number


# ------------------------------------------------------------------------------ derived seeds
def derive_seed(domain: bytes, *words: int) -> int:
    """A uint64 from unsigned 64-bit words, by BLAKE2b keyed with a domain name: reproducible
    on every machine and independent of torch's global RNG."""
    data = b"".join((w % _U64).to_bytes(8, "little") for w in words)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=domain).digest(), "little")


def step_rounding_base(rounding_key: int, step: int) -> int:
    """The rounding base of step ``step`` of a run: fresh per step even when seeds repeat."""
    return derive_seed(b"fks-round-step", rounding_key, step)


def rounding_seed(base: int, pass_number: int) -> int:
    """The stochastic-rounding seed of one pass of a step: fresh bits for every pass."""
    return derive_seed(b"fks-round-pass", base, pass_number)


def float32(x: float) -> float:
    """x rounded to the nearest float32 (inf when it overflows)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def update_alpha(eps: float, alpha: float, decay: float) -> float:
    """The coefficient of z in the restore-and-update pass: eps * d + alpha."""
    return eps * decay + alpha


def step_passes(seed: int, alpha: float, decay: float, eps: float) -> list[Pass]:
    """The three passes a ZO step applies (see the module docstring)."""
    return [
        ([seed], [eps], None, PASS_PLUS),
        ([seed], [-2.0 * eps], None, PASS_MINUS),
        ([seed], [update_alpha(eps, alpha, decay)], decay, PASS_UPDATE),
    ]


# ---------------------------------------------------------------------------------- History
class History:
    """The (seed, alpha, decay) entries of a run in applied order, with what replay needs."""

    def __init__(
        self,
        dist: str = "gaussian",
        fingerprint: str | None = None,
        *,
        eps: float | None = None,
        rounding_key: int | None = None,
        entries: Sequence[tuple[int, float, float]] = (),
    ) -> None:
        S.dist_tag(dist)
        if fingerprint is not None and not _is_sha256_hex(fingerprint):
            raise ValueError(f"fingerprint must be a sha256 hex string, got {fingerprint!r}")
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite float or None, got {eps!r}")
        if rounding_key is not None:
            check_seed(rounding_key)
        self.dist = dist
        self.fingerprint = fingerprint
        self.eps = None if eps is None else float(eps)
        self.rounding_key = rounding_key
        self.entries: list[tuple[int, float, float]] = []
        for entry in entries:
            self.record(*entry)

    def record(self, seed: int, alpha: float, decay: float = 1.0) -> None:
        """Append one entry; alpha and decay are kept as the float32 values the ops apply."""
        check_seed(seed)
        a, d = float32(float(alpha)), float32(float(decay))
        if not (math.isfinite(a) and math.isfinite(d)):
            raise ValueError(f"alpha and decay must be finite in float32, got {alpha!r}, {decay!r}")
        self.entries.append((seed, a, d))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[int, float, float]]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return (
            f"History({len(self)} entries, dist={self.dist!r}, eps={self.eps}, "
            f"fingerprint={self.fingerprint and self.fingerprint[:12]!r})"
        )

    # ------------------------------------------------------------------------------- merging
    def merged(self) -> "History":
        """One entry per seed, alphas summed (FedKSeed's accumulators), in first-seen order.

        The result is a set of logical updates (no eps): replayed as single passes. Decay does
        not commute with summing, so a history with any decay != 1 is refused.
        """
        decayed = sum(1 for _, _, d in self.entries if d != 1.0)
        if decayed:
            raise ValueError(
                f"cannot merge a history with weight decay: {decayed} of {len(self)} entries "
                "have decay != 1 (theta*d does not commute with summing per seed)"
            )
        sums: dict[int, float] = {}
        for seed, alpha, _ in self.entries:
            sums[seed] = sums.get(seed, 0.0) + alpha
        return History(
            self.dist,
            self.fingerprint,
            rounding_key=self.rounding_key,
            entries=[(s, a, 1.0) for s, a in sums.items()],
        )

    # ------------------------------------------------------------------------------- replay
    def passes(self, fused: bool = False) -> list[Pass]:
        """The passes ``apply_`` makes, in order (seeds, alphas, decay, pass number)."""
        out: list[Pass] = []
        if fused:
            run: list[tuple[int, float]] = []
            for seed, alpha, decay in self.entries:
                if decay == 1.0:
                    run.append((seed, alpha))
                    continue
                if run:
                    out.append(([s for s, _ in run], [a for _, a in run], None, PASS_UPDATE))
                    run = []
                out.append(([seed], [alpha], decay, PASS_UPDATE))
            if run:
                out.append(([s for s, _ in run], [a for _, a in run], None, PASS_UPDATE))
            return out
        for seed, alpha, decay in self.entries:
            if self.eps is None:
                out.append(([seed], [alpha], None if decay == 1.0 else decay, PASS_UPDATE))
            else:
                out.extend(step_passes(seed, alpha, decay, self.eps))
        return out

    def apply_(self, params, backend: str = "auto", *, fused: bool = False) -> ParamSet:
        """Replay the history onto ``params`` (the base weights it was recorded from).

        Checks the ParamSet fingerprint before touching anything. ``fused=False`` (default)
        repeats every pass as recorded: bit-identical to the run. ``fused=True`` applies each
        run of undecayed entries as ONE multi-seed pass: equal up to rounding.
        """
        pset = ParamSet.of(params)
        if self.fingerprint is not None:
            actual = pset.fingerprint()
            if actual != self.fingerprint:
                raise ValueError(
                    "history was recorded on different parameters: fingerprint "
                    f"{self.fingerprint} (history) != {actual} (params)"
                )
        index = 0  # entry whose passes are being applied, for the rounding seeds
        for seeds, alphas, decay, pass_number in self.passes(fused):
            rseed = None
            if self.rounding_key is not None:
                rseed = rounding_seed(step_rounding_base(self.rounding_key, index), pass_number)
            replay_(pset, seeds, alphas, self.dist, decay, rounding_seed=rseed, backend=backend)
            if pass_number == PASS_UPDATE:  # the last pass of an entry (or of a fused run)
                index += len(seeds)
        return pset

    # ------------------------------------------------------------------------ serialisation
    def to_bytes(self) -> bytes:
        flags = (
            (_HAS_FINGERPRINT if self.fingerprint is not None else 0)
            | (_HAS_EPS if self.eps is not None else 0)
            | (_HAS_ROUNDING if self.rounding_key is not None else 0)
        )
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            S.STREAM_VERSION,
            S.dist_tag(self.dist),
            flags,
            bytes.fromhex(self.fingerprint) if self.fingerprint is not None else bytes(32),
            self.eps if self.eps is not None else 0.0,
            self.rounding_key if self.rounding_key is not None else 0,
            len(self.entries),
        )
        return header + b"".join(_RECORD.pack(*e) for e in self.entries)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "data") -> "History":
        if len(data) < _HEADER.size:
            raise ValueError(f"{source}: {len(data)} bytes is shorter than a history header")
        magic, version, stream_version, tag, flags, fp, eps, key, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"{source}: not a fedkseed history (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: history format version {version}, this reads {FORMAT_VERSION}")
        if stream_version != S.STREAM_VERSION:
            raise ValueError(
                f"{source}: recorded with perturbation stream v{stream_version}, "
                f"this build implements v{S.STREAM_VERSION}"
            )
        names = {t: n for n, t in S.DISTRIBUTIONS.items()}
        if tag not in names or flags & ~(_HAS_FINGERPRINT | _HAS_EPS | _HAS_ROUNDING):
            raise ValueError(f"{source}: corrupt header (dist tag {tag}, flags {flags:#x})")
        expected = _HEADER.size + count * _RECORD.size
        if len(data) != expected:
            raise ValueError(f"{source}: {len(data)} bytes, expected {expected} for {count} entries")
        history = cls(
            names[tag],
            fp.hex() if flags & _HAS_FINGERPRINT else None,
            eps=eps if flags & _HAS_EPS else None,
            rounding_key=key if flags & _HAS_ROUNDING else None,
        )
        history.entries = list(_RECORD.iter_unpack(data[_HEADER.size :]))
        return history

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (a temporary file renamed over ``path``): never half a file."""
        data = self.to_bytes()
        save_atomically(path, lambda p: p.write_bytes(data))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "History":
        return cls.from_bytes(pathlib.Path(path).read_bytes(), source=str(path))


def _is_sha256_hex(text: object) -> bool:
    if not isinstance(text, str) or len(text) != 64:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
