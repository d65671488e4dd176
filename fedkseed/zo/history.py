"""History: the record of a zeroth-order run, and its bit-exact replay.

What an entry means
-------------------
An entry (:class:`~fedkseed.zo.passes.Entry`) is one step as trained: its probe seeds, its update
terms (seed, float32 coefficient per param group: -lr * w), the float32 decay d = 1 - lr * wd
per group, whether it started perturbed by the previous step's fused pass, the next step's seed
it fused, and, for a step whose closure raised, how many probe passes it made before its
recovery pass, and whether it made FZOO's one-sided probes. ``apply_`` repeats exactly the
passes of :mod:`fedkseed.zo.passes` that the step made, each rounded as it was, so a run
rebuilds bit for bit from the base weights: skipped steps, failed-and-retried steps and
``settle()`` included. An entry without probes is a logical
update theta <- theta * d + sum_k a_k z(s_k), one pass (FedKSeed's merged per-seed sums).
``apply_(params, fused=True)`` instead replays the logical updates only, runs of undecayed
entries as ONE multi-seed pass each (the FedKSeed way): equal up to rounding.

A masked run (``ZOSGD(density=rho)``) records ``remask`` = rho on each entry that started a mask
epoch; ``apply_`` rebuilds the mask from the replayed weights at that entry, before its first
pass. Those weights are bit-identical to the run's, so the mask is too, and every pass goes
through it as it did in the run. Merging and fused replay sum entries of different epochs into
one pass, which no single mask can replay, so they refuse a masked history.

Which tensors a history applies to
----------------------------------
The *layout*: order, global shapes and dtypes (``ParamSet.layout()``; names are kept for
messages only, so ``model``, ``model.parameters()`` and ``torch.compile(model)`` share it), and
each tensor's coefficient class (param group, decayed or not). ``apply_`` checks the layout
before touching anything and names the first differing tensor. Format-1 files carry only the
layout fingerprint; their classes come from the ParamSet's decay mask, as they were trained.

Stochastic rounding: pass ``n`` of entry ``j`` uses the rounding seed
``rounding_seed(step_rounding_base(rounding_key, j), n)``, exactly as ``ZOSGD`` trained.

Binary format (little-endian, not pickle, fields and CRC through :mod:`fedkseed.binio`):
docs/formats.md#history. Version 2 carries the layout, the classes, general entries and a
CRC-32; version 3 is version 2 plus one-sided (FZOO) entries and mask-epoch records, written
only by a history that holds one (so a reader of version 2 still reads every other run); version 1 (16-byte (seed,
alpha, decay) records, no checksum) is still read.
``save`` writes a temporary file in the same folder and renames it over the target, so no
reader sees half a file.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

from .. import binio
from .. import stream as S
from ..atomic import save_atomically
from ..checks import check_bool, check_int
from ..ops import ParamsLike, resolve_backend
from ..paramset import Layout, ParamSet, layout_digest, trainable
from ..seeds import check_seed
from .passes import (
    PASS_UPDATE,
    Entry,
    Pass,
    entry_passes,
    float32,
    probe_passes,
    rounding_seed,
    step_rounding_base,
)
from .runner import Runner
from .step import check_maskable

MAGIC = b"FKSH"
FORMAT_VERSION = 3  # the newest written; a history without one-sided entries is written as 2
READABLE_VERSIONS = (1, 2, 3)
# binio formats (little-endian): the versions after the magic, then each version's header fields
_VERSIONS = "HH"  # format version, stream version
_HEADER_V1 = "BB32sdQQ"  # dist tag, flags, fingerprint, eps, rounding key, records
_RECORD_V1 = "Qff"  # seed, alpha, decay
_HEADER = "BBdQIHQ"  # dist tag, flags, eps, rounding key, tensors, groups, entries
# header flags (v1 uses the first three)
_HAS_FINGERPRINT, _HAS_EPS, _HAS_ROUNDING, _INEXACT, _LEGACY, _HAS_LAYOUT = 1, 2, 4, 8, 16, 32
_KNOWN_FLAGS = {1: 7, 2: 63, 3: 63}
# entry flags (_ONE_SIDED and _REMASK from version 3)
_PERTURBED, _HAS_NEXT, _ABORTED, _TERMS_ARE_PROBES, _ONE_SIDED, _REMASK = 1, 2, 4, 8, 16, 32
_ENTRY_FLAGS = {2: 15, 3: 63}
_DTYPES = ("float32", "bfloat16", "float16")
_MAX_PROBES = 255


# ---------------------------------------------------------------------------------- History
class History:
    """The entries of a run in applied order, with what replay needs.

    ``layout``: ``ParamSet.layout()`` of the parameters it was recorded on, with ``classes``
    (each tensor's coefficient class 2g + decayed) over ``groups`` param groups. Without a
    layout, ``fingerprint`` (a layout digest) may identify them and the classes come from the
    ParamSet at replay (one group). ``exact`` is False when a pass could not be recorded
    (``apply_`` then refuses unless told otherwise). ``legacy``: format-1 restore arithmetic.
    """

    def __init__(
        self,
        dist: str = "gaussian",
        layout: Sequence[tuple[str, Sequence[int], str]] | None = None,
        *,
        classes: Sequence[int] | None = None,
        groups: int = 1,
        eps: float | None = None,
        rounding_key: int | None = None,
        fingerprint: str | None = None,
        entries: Sequence[Entry] = (),
        exact: bool = True,
        legacy: bool = False,
    ) -> None:
        S.dist_tag(dist)
        check_int("groups", groups, 1, 65535)
        if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite float or None, got {eps!r}")
        if rounding_key is not None:
            check_seed(rounding_key, "rounding_key")
        self.dist = dist
        self.layout: Layout | None = None if layout is None else _check_layout(layout)
        self.classes: list[int] | None = None if classes is None else [int(c) for c in classes]
        self.groups = groups
        if self.classes is not None:
            if self.layout is None or len(self.classes) != len(self.layout):
                raise ValueError("classes need a layout with one class per tensor")
            if any(not 0 <= c < 2 * groups for c in self.classes):
                raise ValueError(f"classes must be in [0, {2 * groups}) for {groups} groups")
        elif self.layout is not None or groups != 1:
            raise ValueError("a history with a layout or several groups needs classes")
        if fingerprint is not None:
            if not _is_sha256_hex(fingerprint):
                raise ValueError(f"fingerprint must be a sha256 hex string, got {fingerprint!r}")
            if self.layout is not None and fingerprint != layout_digest(self.layout):
                raise ValueError("fingerprint does not match the layout")
        self._fingerprint = fingerprint
        self.eps = None if eps is None else float(eps)
        self.rounding_key = rounding_key
        self.exact = bool(exact)
        self.legacy = bool(legacy)
        self.entries: list[Entry] = []
        for entry in entries:
            self.add(entry)

    @classmethod
    def for_params(cls, params: ParamSet, classes: Sequence[int] | None = None, **kwargs: Any) -> History:
        """An empty history for ``params``: their layout, and ``classes`` (default: one group,
        decayed as ``params.decay_mask``)."""
        if classes is None:
            classes = [int(flag) for flag in params.decay_mask]
        return cls(layout=params.layout(), classes=classes, **kwargs)

    @property
    def fingerprint(self) -> str | None:
        """The layout digest (docs/formats.md#fingerprint), or None when unknown."""
        return layout_digest(self.layout) if self.layout is not None else self._fingerprint

    # ------------------------------------------------------------------------------ recording
    def add(self, entry: Entry) -> None:
        """Append one entry, validated (and against the previous one's fused seed)."""
        entry = _check_entry(Entry(*entry), self.groups, self.eps, len(self.entries))
        _check_link(self.entries[-1] if self.entries else None, entry, len(self.entries))
        self.entries.append(entry)

    def record(self, seed: int, alpha: float, decay: float = 1.0) -> None:
        """Append a one-direction step (with eps) or a logical update (without), one group."""
        if self.groups != 1:
            raise ValueError(f"record() is for one group; this history has {self.groups}: use add()")
        seed = check_seed(seed)
        a, d = float32(float(alpha)), float32(float(decay))
        probes = (seed,) if self.eps is not None else ()
        self.add(Entry(probes, (seed,), ((a,),), (d,)))

    def mark_inexact(self) -> None:
        self.exact = False

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        fp = self.fingerprint
        return (
            f"History({len(self)} entries, dist={self.dist!r}, eps={self.eps}, groups={self.groups}, "
            f"fingerprint={fp and fp[:12]!r}{'' if self.exact else ', INEXACT'})"
        )

    @property
    def masked(self) -> bool:
        """Some entry starts a mask epoch of density < 1 (a Sparse-MeZO run)."""
        return any(e.remask is not None and e.remask < 1.0 for e in self.entries)

    def _refuse_masked(self, what: str) -> None:
        if self.masked:
            raise ValueError(
                f"cannot {what} a masked history (density < 1): its entries' passes go through per-epoch "
                "magnitude masks, which one summed pass cannot apply; replay it entry by entry (fused=False)"
            )

    def validate(self) -> None:
        """Check every entry and every fused link: what ``apply_`` does before any write."""
        previous = None
        for j, entry in enumerate(self.entries):
            _check_entry(entry, self.groups, self.eps, j)
            _check_link(previous, entry, j)
            previous = entry

    # ------------------------------------------------------------------------------- merging
    def merged(self) -> History:
        """One logical update per seed, coefficients summed per group (FedKSeed's
        accumulators), in first-seen order; replayed as single passes. Decay does not commute
        with summing, so a history with any decay != 1 is refused."""
        decayed = sum(1 for e in self.entries if any(d != 1.0 for d in e.decays))
        if decayed:
            raise ValueError(
                f"cannot merge a history with weight decay: {decayed} of {len(self)} entries "
                "have decay != 1 (theta*d does not commute with summing per seed)"
            )
        self._refuse_masked("merge")
        sums: dict[int, list[float]] = {}
        for entry in self.entries:
            for k, seed in enumerate(entry.seeds):
                acc = sums.setdefault(seed, [0.0] * self.groups)
                for g in range(self.groups):
                    acc[g] += entry.alphas[g][k]
        seeds = list(sums)
        return History(
            self.dist,
            self.layout,
            classes=self.classes,
            groups=self.groups,
            rounding_key=self.rounding_key,
            fingerprint=None if self.layout is not None else self._fingerprint,
            entries=[
                Entry((), (s,), tuple((float32(sums[s][g]),) for g in range(self.groups)), (1.0,) * self.groups)
                for s in seeds
            ],
        )

    # ------------------------------------------------------------------------------- replay
    def passes(self, fused: bool = False) -> list[Pass]:
        """The passes ``apply_`` makes, in order (of a masked history: each through the mask
        of its entry's epoch, which ``apply_`` builds as it goes)."""
        return [p for _, p in self._indexed_passes(fused)]

    def _indexed_passes(self, fused: bool) -> list[tuple[int, Pass]]:
        """(entry index, pass): the entry index names the pass's rounding base."""
        if not fused:
            return [(j, p) for j, e in enumerate(self.entries) for p in entry_passes(e, self.eps, legacy=self.legacy)]
        out: list[tuple[int, Pass]] = []
        run: list[tuple[int, Entry]] = []

        def flush() -> None:
            if run:
                out.append((run[0][0], _logical_pass([e for _, e in run], self.groups)))
                run.clear()

        for j, entry in enumerate(self.entries):
            if entry.aborted is not None or not entry.seeds:
                continue
            if any(d != 1.0 for d in entry.decays):
                flush()
                out.append((j, _logical_pass([entry], self.groups)))
            else:
                run.append((j, entry))
        flush()
        return out

    def apply_(self, params: ParamsLike, *, fused: bool = False, allow_inexact: bool = False) -> ParamSet:
        """Replay the history onto ``params``, the base weights it was recorded from: a module
        (its trainable tensors), an iterable of tensors or (name, tensor) pairs (those with
        requires_grad), param groups, or a ParamSet as is.

        Every entry and the layout are checked before any weight is touched. ``fused=False``
        (default) repeats every pass as made: bit-identical to the run. ``fused=True`` applies
        the logical updates only, each run of undecayed entries as ONE multi-seed pass: equal up
        to rounding (and without a pending perturbation of the next step); a masked history
        refuses it. A history marked inexact is refused unless ``allow_inexact``.
        """
        self.validate()
        if fused:
            self._refuse_masked("fuse")
        if not self.exact and not allow_inexact:
            raise ValueError(
                "history is marked inexact (a pass of the run could not be recorded: a recovery "
                "failed or a pass stopped half-way), so replay would not rebuild the weights bit "
                "for bit; pass allow_inexact=True to replay anyway"
            )
        pset = trainable(params, "History.apply_")
        self.check_params(pset)
        if self.classes is not None:
            classes = self.classes
        else:
            classes = [int(flag) for flag in pset.decay_mask]
        if self.masked:
            check_maskable(pset)
        resolve_backend(None, pset.device)  # the backend setting must serve the tensors: before any pass
        runner = Runner(pset, classes, self.dist)
        # (entry index, the density of a mask epoch it starts, its passes): a mask epoch starts
        # before the entry's first pass, even at an entry that made none (a failed first closure)
        if fused:
            plan = [(index, None, [p]) for index, p in self._indexed_passes(True)]
        else:
            plan = [(j, e.remask, entry_passes(e, self.eps, legacy=self.legacy)) for j, e in enumerate(self.entries)]
        for index, remask, entry_passes_ in plan:
            if remask is not None:
                runner.remask(remask)
            for p in entry_passes_:
                rseed = None
                if self.rounding_key is not None:
                    rseed = rounding_seed(step_rounding_base(self.rounding_key, index), p.number)
                runner.apply(p, rseed)
        return pset

    def check_params(self, pset: ParamSet) -> None:
        """Raise one ValueError naming the first tensor where ``pset`` differs from the layout
        this history was recorded on."""
        if self.layout is not None:
            pset.check_layout(self.layout, what="history")
        elif self._fingerprint is not None and pset.fingerprint() != self._fingerprint:
            raise ValueError(
                "history was recorded on a different parameter layout (this file carries only its "
                f"fingerprint): {self._fingerprint} (history) != {pset.fingerprint()} (params)"
            )

    # ------------------------------------------------------------------------ serialisation
    def to_bytes(self) -> bytes:
        flags = (
            (_HAS_FINGERPRINT if self.layout is None and self._fingerprint is not None else 0)
            | (_HAS_EPS if self.eps is not None else 0)
            | (_HAS_ROUNDING if self.rounding_key is not None else 0)
            | (0 if self.exact else _INEXACT)
            | (_LEGACY if self.legacy else 0)
            | (_HAS_LAYOUT if self.layout is not None else 0)
        )
        w = binio.Writer(MAGIC)
        version = FORMAT_VERSION if any(e.one_sided or e.remask is not None for e in self.entries) else 2
        w.pack(_VERSIONS, version, S.STREAM_VERSION)
        w.pack(
            _HEADER,
            S.dist_tag(self.dist),
            flags,
            self.eps if self.eps is not None else 0.0,
            self.rounding_key if self.rounding_key is not None else 0,
            len(self.layout) if self.layout is not None else 0,
            self.groups,
            len(self.entries),
        )
        if flags & _HAS_FINGERPRINT:
            w.raw(bytes.fromhex(self._fingerprint))
        if self.layout is not None:
            for (name, shape, dtype), c in zip(self.layout, self.classes):
                raw = name.encode()
                w.pack(
                    f"H{len(raw)}sB{len(shape)}QBHB",
                    len(raw),
                    raw,
                    len(shape),
                    *shape,
                    _DTYPES.index(dtype),
                    c // 2,
                    c % 2,
                )
        for e in self.entries:
            _write_entry(w, e)
        return w.sealed()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "data") -> History:
        """Parse and validate (checksum, every field, every entry) a history file's bytes."""
        r = binio.Reader(data, ValueError, source)
        r.open(MAGIC, len(MAGIC) + binio.size(_VERSIONS), "a fedkseed history")
        version, stream_version = r.unpack(_VERSIONS)
        if version not in READABLE_VERSIONS:
            raise r.error(f"history format version {version}, this reads {READABLE_VERSIONS}")
        if stream_version != S.STREAM_VERSION:
            raise r.error(
                f"recorded with perturbation stream v{stream_version}, this build implements v{S.STREAM_VERSION}"
            )
        try:
            history = _read_v1(r) if version == 1 else _read_v2(r, version)
            history.validate()
        except ValueError as error:
            message = str(error)
            raise ValueError(message if message.startswith(source) else f"{source}: {message}") from None
        return history

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file renamed over ``path``): never half a file."""
        data = self.to_bytes()
        save_atomically(path, lambda p: p.write_bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        return cls.from_bytes(pathlib.Path(path).read_bytes(), source=str(path))


# ----------------------------------------------------------------------------------- entries
def _check_entry(entry: Entry, groups: int, eps: float | None, j: int) -> Entry:
    """The entry, every field checked; a ValueError naming entry ``j`` and the field."""
    probes, seeds, alphas, decays, perturbed, next_seed, aborted, one_sided, remask = entry
    where = f"entry {j}"
    try:
        probes = tuple(check_seed(s, "probe seed") for s in probes)
        seeds = tuple(check_seed(s, "seed") for s in seeds)
        if next_seed is not None:
            next_seed = check_seed(next_seed, "next seed")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    if len(probes) > _MAX_PROBES:
        raise ValueError(f"{where}: {len(probes)} probes, at most {_MAX_PROBES}")
    if probes and eps is None:
        raise ValueError(f"{where} has probe seeds but the history has no eps")
    if len(alphas) != groups or len(decays) != groups:
        raise ValueError(
            f"{where}: coefficients for {len(alphas)} groups and decays for {len(decays)}, expected {groups}"
        )
    alphas = tuple(tuple(alphas[g]) for g in range(groups))
    for g, (group_alphas, d) in enumerate(zip(alphas, decays)):
        if len(group_alphas) != len(seeds):
            raise ValueError(f"{where}: group {g} has {len(group_alphas)} coefficients for {len(seeds)} seeds")
        for value in (*group_alphas, d):
            if (
                isinstance(value, bool)
                or not isinstance(value, float)
                or not math.isfinite(value)
                or float32(value) != value
            ):
                raise ValueError(f"{where}: coefficient or decay {value!r} of group {g} is not a finite float32 value")
    if not isinstance(perturbed, bool) or (perturbed and not probes):
        raise ValueError(f"{where}: perturbed must be a bool, and True only with probes")
    if next_seed is not None and (not probes or aborted is not None):
        raise ValueError(f"{where}: a fused next seed needs a completed step with probes")
    check_bool(f"{where}: one_sided", one_sided, error=ValueError)
    if one_sided and (len(probes) < 2 or perturbed or next_seed is not None):
        raise ValueError(f"{where}: a one-sided step has at least 2 probes, never starts perturbed nor fuses a seed")
    if remask is not None:
        if isinstance(remask, bool) or not isinstance(remask, float) or not 0.0 < remask <= 1.0:
            raise ValueError(f"{where}: mask density {remask!r} is not a float in (0, 1]")
        if perturbed:
            raise ValueError(f"{where}: a mask epoch starts from unperturbed weights, but the entry starts perturbed")
    if aborted is not None:
        limit = len(probe_passes(probes, 1.0, perturbed, one_sided))
        if isinstance(aborted, bool) or not isinstance(aborted, int) or not 0 <= aborted <= limit:
            raise ValueError(f"{where}: aborted after {aborted!r} probe passes, expected 0..{limit}")
        if seeds or any(d != 1.0 for d in decays):
            raise ValueError(f"{where}: an aborted step has no update")
    return Entry(probes, seeds, alphas, tuple(decays), perturbed, next_seed, aborted, one_sided, remask)


def _check_link(previous: Entry | None, entry: Entry, j: int) -> None:
    """A step starts perturbed exactly when the previous one fused its first probe."""
    fused = previous.next_seed if previous is not None else None
    if entry.perturbed and (fused is None or fused != entry.probes[0]):
        before = f"entry {j - 1} did not fuse it" if j else "nothing before it applied it"
        raise ValueError(f"entry {j} starts perturbed by z({entry.probes[0]}) but {before}")
    if fused is not None and not (entry.perturbed and entry.probes[0] == fused):
        raise ValueError(f"entry {j - 1} fused seed {fused} but entry {j} does not start perturbed by it")


def _logical_pass(entries: list[Entry], groups: int) -> Pass:
    """The logical updates of ``entries`` (all undecayed, or a single entry) as one pass."""
    seeds = tuple(s for e in entries for s in e.seeds)
    coefficients = []
    for g in range(groups):
        alphas = tuple(a for e in entries for a in e.alphas[g])
        d = entries[0].decays[g] if len(entries) == 1 else 1.0
        coefficients += [(alphas, 1.0), (alphas, d)]
    return Pass(PASS_UPDATE, seeds, tuple(coefficients))


def _write_entry(w: binio.Writer, e: Entry) -> None:
    terms_are_probes = e.seeds == e.probes and bool(e.seeds)
    flags = (
        (_PERTURBED if e.perturbed else 0)
        | (_HAS_NEXT if e.next_seed is not None else 0)
        | (_ABORTED if e.aborted is not None else 0)
        | (_TERMS_ARE_PROBES if terms_are_probes else 0)
        | (_ONE_SIDED if e.one_sided else 0)
        | (_REMASK if e.remask is not None else 0)
    )
    w.pack("BBI", flags, len(e.probes), len(e.seeds))
    if e.aborted is not None:
        w.pack("H", e.aborted)
    w.pack(f"{len(e.probes)}Q", *e.probes)
    if e.next_seed is not None:
        w.pack("Q", e.next_seed)
    if not terms_are_probes:
        w.pack(f"{len(e.seeds)}Q", *e.seeds)
    for group_alphas in e.alphas:
        w.pack(f"{len(group_alphas)}f", *group_alphas)
    w.pack(f"{len(e.decays)}f", *e.decays)
    if e.remask is not None:
        w.pack("d", e.remask)


# ------------------------------------------------------------------------------------ reading
def _dist_name(tag: int) -> str:
    names = {t: n for n, t in S.DISTRIBUTIONS.items()}
    if tag not in names:
        raise ValueError(f"unknown dist tag {tag}")
    return names[tag]


def _read_v2(r: binio.Reader, version: int) -> History:
    """Formats 2 and 3, from just after the versions: header, fingerprint or layout, entries,
    CRC-32 (3 adds the one-sided and mask-epoch entry flags)."""
    if r.remaining() < binio.size(_HEADER) + binio.CRC.size:
        raise r.error(f"{len(r.data)} bytes is shorter than a history header")
    r.unseal()
    tag, flags, eps, key, tensors, groups, count = r.unpack(_HEADER)
    if flags & ~_KNOWN_FLAGS[version] or (flags & _HAS_LAYOUT and flags & _HAS_FINGERPRINT):
        raise r.error(f"corrupt header (flags {flags:#x})")
    if not flags & _HAS_LAYOUT and tensors:
        raise r.error(f"corrupt header ({tensors} tensors without a layout)")
    if not flags & _HAS_EPS and eps != 0.0:
        raise r.error("corrupt header (eps without its flag)")
    fingerprint = bytes(r.take(32)).hex() if flags & _HAS_FINGERPRINT else None
    layout, classes = None, None
    if flags & _HAS_LAYOUT:
        layout, classes = [], []
        for _ in range(tensors):
            (length,) = r.unpack("H")
            raw = bytes(r.take(length))
            ndim = r.u8()
            shape = r.unpack(f"{ndim}Q")
            dtype, group, decayed = r.unpack("BHB")
            if dtype >= len(_DTYPES) or decayed > 1:
                raise r.error(f"corrupt layout entry for tensor {len(layout)}")
            layout.append((raw.decode("utf-8", errors="replace"), tuple(shape), _DTYPES[dtype]))
            classes.append(2 * group + decayed)
    entries = []
    for _ in range(count):
        e_flags, q, k = r.unpack("BBI")
        if e_flags & ~_ENTRY_FLAGS[version]:
            raise r.error(f"corrupt entry {len(entries)} (flags {e_flags:#x})")
        aborted = r.unpack("H")[0] if e_flags & _ABORTED else None
        probes = r.unpack(f"{q}Q")
        next_seed = r.unpack("Q")[0] if e_flags & _HAS_NEXT else None
        if e_flags & _TERMS_ARE_PROBES:
            if k != q:
                raise r.error(f"corrupt entry {len(entries)} ({k} terms said to be its {q} probes)")
            seeds = probes
        else:
            seeds = r.unpack(f"{k}Q")
        alphas = tuple(r.unpack(f"{k}f") for _ in range(groups))
        decays = r.unpack(f"{groups}f")
        remask = r.unpack("d")[0] if e_flags & _REMASK else None
        perturbed, one_sided = bool(e_flags & _PERTURBED), bool(e_flags & _ONE_SIDED)
        entries.append(Entry(probes, seeds, alphas, decays, perturbed, next_seed, aborted, one_sided, remask))
    r.done("the last entry")
    history = History(
        _dist_name(tag),
        layout,
        classes=classes,
        groups=groups,
        eps=eps if flags & _HAS_EPS else None,
        rounding_key=key if flags & _HAS_ROUNDING else None,
        fingerprint=fingerprint,
        exact=not flags & _INEXACT,
        legacy=bool(flags & _LEGACY),
    )
    history.entries = entries  # validated by the caller, all at once
    return history


def _read_v1(r: binio.Reader) -> History:
    """Format 1, from just after the versions: 16-byte (seed, alpha, decay) records, one group,
    classes from the ParamSet, no checksum."""
    if r.remaining() < binio.size(_HEADER_V1):
        raise r.error(f"{len(r.data)} bytes is shorter than a history header")
    tag, flags, fp, eps, key, count = r.unpack(_HEADER_V1)
    if flags & ~_KNOWN_FLAGS[1]:
        raise r.error(f"corrupt header (flags {flags:#x})")
    expected = r.pos + count * binio.size(_RECORD_V1)
    if len(r.data) != expected:
        raise r.error(f"{len(r.data)} bytes, expected {expected} for {count} entries")
    has_eps = bool(flags & _HAS_EPS)
    if has_eps and not (math.isfinite(eps) and eps > 0):
        raise r.error(f"corrupt header (eps {eps!r})")
    entries = []
    for _ in range(count):
        seed, alpha, decay = r.unpack(_RECORD_V1)
        entries.append(Entry((seed,) if has_eps else (), (seed,), ((alpha,),), (decay,)))
    history = History(
        _dist_name(tag),
        fingerprint=fp.hex() if flags & _HAS_FINGERPRINT else None,
        eps=eps if has_eps else None,
        rounding_key=key if flags & _HAS_ROUNDING else None,
        legacy=True,
    )
    history.entries = entries
    return history


def _check_layout(layout: Sequence[tuple[str, Sequence[int], str]]) -> Layout:
    out: Layout = []
    for i, item in enumerate(layout):
        name, shape, dtype = item
        shape = tuple(int(s) for s in shape)
        if dtype not in _DTYPES or any(s < 0 for s in shape) or len(shape) > 255:
            raise ValueError(f"layout entry {i} ({name!r} {shape} {dtype}) is not a supported tensor")
        out.append((str(name), shape, str(dtype)))
    return out


def _is_sha256_hex(text: object) -> bool:
    if not isinstance(text, str) or len(text) != 64:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
