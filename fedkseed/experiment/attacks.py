"""Attack simulation: turn an honest upload into a Byzantine one, reproducibly.

Attacks are simulation, not protocol: no party of ``fed/`` knows about them. An engine picks
``byzantine_clients`` among each round's sampled clients and has them send
``attacked_upload(client, download, kind)``: the client computes its honest upload
(``Client.local_update``), this module rewrites its values, and the result goes through the
client's real encoder (``Client.encode``) and the real server path. Everything derives from
(run seed, round, client id) (``seeds.derive_seed``, domain ``attack``), so a run with
attackers is as reproducible as one without.

    scale            every value times SCALE (1e6): the classic "boost" of model replacement
    sign-flip        every value negated: an ascent step of honest size, invisible to any bound
    sign-flip-bound  every value negated and times SCALE: the server scales it to exactly its
                     bound, so it is an ascent step of the largest size the server lets through.
                     The strongest attacker that knows the rule and the public history could
                     not do more: it would size its upload to the bound, and with
                     ``clip="auto"`` its own per-step RMS sits at the top rank of the median
                     either way, so overshooting lands on the very bound it would compute
                     (``robust.rms_bound``)
    random           values drawn afresh, uniform in (-1, 1) times SCALE times the upload's
                     largest |value| (1 when all are 0): noise of huge magnitude
    vanish           every value VANISH (1e-30) with the honest value's sign: an upload that
                     drags down any statistic of upload sizes (it froze training when the bound
                     was a median of every upload so far)

``rounds`` (``parse_rounds``, ``--attack-rounds``) limits the attack to some rounds, e.g. a
one-round poisoning followed by honest rounds.

Values are capped at +-FLOAT32_CAP so the attacked upload stays encodable: an attacker is
limited by the format, not by its own arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from ..checks import check_int
from ..fed import Client
from ..fed.wire import StepUpload, Upload
from ..seeds import derive_seed, unit_interval

ATTACKS = ("scale", "sign-flip", "sign-flip-bound", "random", "vanish")
SCALE = 1e6
VANISH = 1e-30
ALL_ROUNDS = "all"
FLOAT32_CAP = 2.0**127  # the largest power of two below float32's maximum

U = TypeVar("U", Upload, StepUpload)


def byzantine_clients(seed: int, round_: int, sampled: Sequence[int], n: int) -> list[int]:
    """The ``n`` clients among ``sampled`` that attack in ``round_`` (sorted ids; all of them
    when ``n`` >= len(sampled))."""
    check_int("the number of Byzantine clients", n, 0)
    ranked = sorted(sampled, key=lambda c: derive_seed("attack", seed, round_, c, 0))
    return sorted(ranked[:n])


def parse_rounds(value: object) -> tuple[int, ...] | None:
    """The rounds an attack runs in: None for every round (``"all"``), else the sorted distinct
    round numbers (>= 1) of a comma-separated list such as ``"1"`` or ``"1,3"``."""
    text = "" if isinstance(value, bool) else str(value).strip().lower()
    if text == ALL_ROUNDS:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"attack rounds must be 'all' or comma-separated round numbers >= 1, got {value!r}")
    return tuple(sorted({int(part) for part in parts}))


def attack(upload: U, kind: str, seed: int) -> U:
    """``upload`` with its values replaced as ``kind`` says (indices, steps and loss kept)."""
    values = np.asarray(upload.values, dtype=np.float64)
    if kind == "scale":
        attacked = values * SCALE
    elif kind == "sign-flip":
        attacked = -values
    elif kind == "sign-flip-bound":
        attacked = -values * SCALE
    elif kind == "vanish":
        attacked = np.copysign(np.full_like(values, VANISH), values)
    elif kind == "random":
        peak = float(np.abs(values).max()) if values.size else 0.0
        words = [derive_seed("attack", seed, upload.round, upload.client_id, 1, j) for j in range(values.size)]
        uniform = np.array([2.0 * unit_interval(w) - 1.0 for w in words], dtype=np.float64)
        attacked = uniform * SCALE * (peak or 1.0)
    else:
        raise ValueError(f"attack must be one of {ATTACKS}, got {kind!r}")
    if isinstance(upload, StepUpload):
        attacked[upload.skipped] = 0.0  # the format's rule: a skipped step carries 0
    return dataclasses.replace(upload, values=np.clip(attacked, -FLOAT32_CAP, FLOAT32_CAP))


def attacked_upload(client: Client, download: bytes, kind: str) -> bytes:
    """What ``client`` sends as a Byzantine client attacking with ``kind``: its honest upload for
    ``download`` with the values rewritten (``attack``), encoded as an honest one would be."""
    return client.encode(attack(client.local_update(download), kind, client.spec.seed))
