"""The array message of the first-order methods (FedIT, FedAvg): named float32 tensors plus a
small header, as compact checked bytes (normative description: docs/formats.md#arrays).

    "FKA" | kind (1 B: "G" global weights, server -> client; "L" local weights, client ->
    server) | u8 version | u32 round | u32 client id | u32 local steps | f32 mean train loss
    | u32 count | count x (u16 name length | name, UTF-8 | u32 data length | data) | u32 CRC-32
    of everything before it

Each ``data`` is the tensor in NumPy's ``.npy`` format (``numpy.save``, ``allow_pickle=False``,
little-endian float32, C order): byte for byte what Flower's ``Array.from_numpy_ndarray`` puts
in an ``ArrayRecord``, so the Flower engine carries the arrays of this message verbatim and both
engines count the same bytes. The decoder checks magic, kind, version, CRC, every length, the
names against the layout the reader expects (names, order, shapes) and that every value is a
finite float32, before any of it is used (``WireError``). Fields and framing (magic, version,
CRC) go through :mod:`fedkseed.binio`, the codec of the wire messages and the History file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import binio
from .wire import WireError

MAGIC = b"FKA"
VERSION = 1
KIND_GLOBAL, KIND_LOCAL = b"G", b"L"
_FIELDS = "IIIfI"  # after magic, kind and version: round, client, steps, loss, count
_MIN_SIZE = len(MAGIC) + 2 + binio.size(_FIELDS) + binio.CRC.size
DTYPE = np.dtype("<f4")

Layout = Mapping[str, tuple[int, ...]]  # name -> shape, in message order


@dataclass
class ArrayMessage:
    kind: bytes
    round: int
    client_id: int
    steps: int = 0
    loss: float = math.nan
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as little-endian float32 in ``.npy`` format (what ``numpy.save`` writes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=DTYPE), allow_pickle=False)
    return buffer.getvalue()


def encode_parts(header: ArrayMessage, parts: Mapping[str, bytes]) -> bytes:
    """The message of ``header`` (its arrays ignored) whose arrays are the ready ``.npy`` blobs
    ``parts`` (the Flower engine re-frames the blobs it received, unchanged)."""
    if header.kind not in (KIND_GLOBAL, KIND_LOCAL):
        raise ValueError(f"unknown array message kind {header.kind!r}")
    w = binio.Writer(MAGIC, header.kind)
    w.pack("B" + _FIELDS, VERSION, header.round, header.client_id, header.steps, header.loss, len(parts))
    for name, data in parts.items():
        encoded = name.encode()
        w.pack("H", len(encoded))
        w.raw(encoded)
        w.pack("I", len(data))
        w.raw(data)
    return w.sealed()


def encode(message: ArrayMessage) -> bytes:
    return encode_parts(message, {name: npy_bytes(a) for name, a in message.arrays.items()})


def split(data: bytes, kind: bytes) -> tuple[ArrayMessage, dict[str, bytes]]:
    """(the header, name -> ``.npy`` blob) of a message of ``kind``: magic, kind, version, CRC
    and every length checked, arrays not yet parsed (``decode`` parses them)."""
    r = binio.Reader(data, WireError, "array message")
    r.open(MAGIC, _MIN_SIZE, "a fedkseed array message")
    got_kind = bytes(r.take(1))
    if got_kind != kind:
        raise r.error(f"kind {got_kind!r}, expected {kind!r}")
    version = r.u8()
    if version != VERSION:
        raise r.error(f"version {version}; this reader reads version {VERSION}")
    r.unseal()
    round_, client, steps, loss, count = r.unpack(_FIELDS)
    parts: dict[str, bytes] = {}
    for _ in range(count):
        (name_length,) = r.unpack("H")
        try:
            name = bytes(r.take(name_length)).decode()
        except UnicodeDecodeError:
            raise r.error("array name is not UTF-8") from None
        if name in parts:
            raise r.error(f"array name {name!r} is repeated")
        (size,) = r.unpack("I")
        parts[name] = bytes(r.take(size))
    r.done("its last array")
    return ArrayMessage(got_kind, round_, client, steps, loss), parts


def decode(data: bytes, kind: bytes, layout: Layout) -> ArrayMessage:
    """A checked message of ``kind`` holding exactly the arrays of ``layout`` (same names, same
    order, same shapes), every value a finite float32."""
    message, parts = split(data, kind)
    if list(parts) != list(layout):
        missing = [n for n in layout if n not in parts]
        extra = [n for n in parts if n not in layout]
        raise WireError(
            f"array message holds other tensors than expected (missing {missing[:3]}, unexpected {extra[:3]}, "
            "or another order)"
        )
    for name, blob in parts.items():
        array = _parse(name, blob)
        if array.shape != tuple(layout[name]):
            raise WireError(f"array {name!r} has shape {array.shape}, expected {tuple(layout[name])}")
        if not np.isfinite(array).all():
            raise WireError(f"array {name!r} holds NaN or infinite values")
        message.arrays[name] = array
    return message


def npy_shape(blob: bytes) -> tuple[int, ...]:
    """The shape a ``.npy`` blob of this format declares (its header only is read)."""
    return _header("array", io.BytesIO(blob))[0]


def _header(name: str, buffer: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(buffer)
        if version != (1, 0):  # what numpy.save writes for these arrays
            raise ValueError(f".npy version {version}, expected (1, 0)")
        return np.lib.format.read_array_header_1_0(buffer)
    except Exception as error:  # numpy raises ValueError/EOFError/SyntaxError on bad headers
        raise WireError(f"array {name!r} is not a .npy array ({error})") from None


def _parse(name: str, blob: bytes) -> np.ndarray:
    buffer = io.BytesIO(blob)
    shape, fortran, dtype = _header(name, buffer)
    if dtype != DTYPE or fortran:
        raise WireError(f"array {name!r} is {dtype} ({'Fortran' if fortran else 'C'} order), expected <f4 C order")
    count = math.prod(shape)
    payload = blob[buffer.tell() :]
    if len(payload) != count * DTYPE.itemsize:
        raise WireError(f"array {name!r} carries {len(payload)} bytes for shape {shape}")
    return np.frombuffer(payload, dtype=DTYPE).reshape(shape).copy()
