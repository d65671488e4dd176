"""How each method's messages ride in Flower records (both directions, both sides).

The parties (``fed.Server``/``Client``, ``fed.firstorder``) speak bytes; here those bytes become
a ``RecordDict`` and back, unchanged, so both engines count the same bytes and the parties check
what they receive exactly as in the local engine:

- FedKSeed (``SeedPayloads``): the wire message as bytes in the ``ConfigRecord``; the
  ``ArrayRecord`` stays empty (weights never travel).
- First-order methods (``ArrayPayloads``): the array message (docs/formats.md#arrays) split
  into an ``ArrayRecord`` (one ``Array`` per tensor, whose ``data`` is the message's ``.npy``
  blob as it is) and its header fields in the ``ConfigRecord``; the receiver frames them
  again into the very bytes the sender encoded. (The frame's CRC-32 is recomputed on the
  receiving side: over Flower the transport's own integrity checks stand in for it.)

Beside the payload, a reply's ``ConfigRecord`` carries the model digest the client trained
from, what its local work cost (``usage_record`` / ``usage_of``) and how long its ClientApp
spent preparing model and data for the message (``prepare_seconds_of``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..fed import arrays, wire
from . import protocol as P

# Header fields of an array message in the ConfigRecord.
KIND, ROUND, STEPS, LOSS = "kind", "round", "steps", "loss"
USAGE_KEYS = {"seconds": "client-seconds", "cpu_seconds": "client-cpu-seconds", "peak_mib": "client-peak-mib"}


class SeedPayloads:
    """FedKSeed: wire-format bytes in the ConfigRecord, no arrays."""

    description = "wire-format bytes in a ConfigRecord (no arrays)"

    def download_content(self, data: bytes) -> RecordDict:
        return RecordDict({P.ARRAYS: ArrayRecord(), P.CONFIG: ConfigRecord({P.DOWNLOAD: data})})

    def download_bytes(self, content: RecordDict) -> bytes:
        return content[P.CONFIG][P.DOWNLOAD]

    def upload_content(self, data: bytes, config: Mapping[str, object]) -> RecordDict:
        return RecordDict({P.ARRAYS: ArrayRecord(), P.CONFIG: ConfigRecord({P.UPLOAD: data, **config})})

    def upload_bytes(self, content: RecordDict) -> bytes | None:
        upload = content[P.CONFIG].get(P.UPLOAD)
        return upload if isinstance(upload, bytes) else None

    def sender(self, upload: bytes, k: int, schedules: Mapping[int, np.ndarray]) -> int:
        """The client id an upload names (``wire.WireError`` when unreadable)."""
        return wire.decode_upload(upload, k, schedules).client_id


class ArrayPayloads:
    """First-order methods: the array message as an ArrayRecord plus its header."""

    description = "tensors as .npy arrays in an ArrayRecord, header in a ConfigRecord"

    def download_content(self, data: bytes) -> RecordDict:
        return _content(data, arrays.KIND_GLOBAL, {})

    def download_bytes(self, content: RecordDict) -> bytes:
        return _frame(content, arrays.KIND_GLOBAL)

    def upload_content(self, data: bytes, config: Mapping[str, object]) -> RecordDict:
        return _content(data, arrays.KIND_LOCAL, config)

    def upload_bytes(self, content: RecordDict) -> bytes | None:
        try:
            return _frame(content, arrays.KIND_LOCAL)
        except (KeyError, TypeError, ValueError):  # fields missing or of the wrong type
            return None

    def sender(self, upload: bytes, k: int, schedules: Mapping[int, np.ndarray]) -> int:
        return arrays.split(upload, arrays.KIND_LOCAL)[0].client_id


def payloads_for(method: str) -> SeedPayloads | ArrayPayloads:
    return SeedPayloads() if method in ("fedkseed", "ferret") else ArrayPayloads()  # Ferret: FedKSeed's wire


def _content(data: bytes, kind: bytes, config: Mapping[str, object]) -> RecordDict:
    header, parts = arrays.split(data, kind)
    record = ArrayRecord()
    for name, blob in parts.items():
        record[name] = Array(dtype="float32", shape=arrays.npy_shape(blob), stype="numpy.ndarray", data=blob)
    fields = {KIND: kind.decode(), ROUND: header.round, P.CLIENT_ID: header.client_id, STEPS: header.steps}
    fields[LOSS] = header.loss
    return RecordDict({P.ARRAYS: record, P.CONFIG: ConfigRecord({**fields, **config})})


def _frame(content: RecordDict, kind: bytes) -> bytes:
    config = content[P.CONFIG]
    if str(config[KIND]).encode() != kind:
        raise ValueError(f"array message of kind {config[KIND]!r}, expected {kind!r}")
    header = arrays.ArrayMessage(
        kind, int(config[ROUND]), int(config[P.CLIENT_ID]), int(config[STEPS]), float(config[LOSS])
    )
    parts = {name: bytes(array.data) for name, array in content[P.ARRAYS].items()}
    return arrays.encode_parts(header, parts)


def usage_record(usage: object) -> dict[str, float]:
    """A ``usage.Usage`` as ConfigRecord fields."""
    return {key: float(getattr(usage, name)) for name, key in USAGE_KEYS.items()}


def usage_of(content: RecordDict) -> dict[str, float] | None:
    """The usage fields of a reply (``Usage`` keyword arguments), None when absent or not finite."""
    try:
        values = {name: float(content[P.CONFIG][key]) for name, key in USAGE_KEYS.items()}
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values.values()) else None


def prepare_seconds_of(content: RecordDict) -> float | None:
    """A reply's preparation seconds, None when absent, not a number, negative or not finite."""
    try:
        seconds = float(content[P.CONFIG][P.PREPARE_SECONDS])
    except (KeyError, TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
