"""Little-endian binary fields and CRC-32 framing: the one codec under fedkseed's formats.

A framed record (a History file, a wire message; docs/formats.md) is::

    magic | version | body | u32 CRC-32 (zlib's) of every byte before it

This module knows no format's fields. ``Writer`` appends little-endian fields and seals a record
with its CRC. ``Reader`` reads them back within bounds and turns every problem (data too short, a
bad magic, a CRC mismatch, a field running past the end, bytes left over, an over-long varint)
into ONE error of the class its caller chose (``WireError`` for messages, ``ValueError`` for
files), a single line that starts with what is being read. Fields are views into the data, never
copies, and a length is checked against the bytes left before anything is built for it.
"""

from __future__ import annotations

import struct
import zlib

CRC = struct.Struct("<I")
MAX_VARINT_BYTES = 10  # a u64 in LEB128; a longer varint is refused


def size(fmt: str) -> int:
    """The size in bytes of little-endian struct format ``fmt`` (written without a byte order)."""
    return struct.calcsize("<" + fmt)


def seal(body: bytes) -> bytes:
    """``body`` followed by its CRC-32."""
    return body + CRC.pack(zlib.crc32(body))


def varint(value: int) -> bytes:
    """``value`` >= 0 as an unsigned LEB128 varint, shortest form: 7 bits a byte, low group first."""
    if value < 0:
        raise ValueError(f"varint must be >= 0, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Writer:
    """A record under construction: its byte strings in ``parts``, in order."""

    def __init__(self, *parts: bytes) -> None:
        self.parts: list[bytes] = list(parts)

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def pack(self, fmt: str, *values: object) -> None:
        """``values`` as little-endian struct format ``fmt`` (written without a byte order)."""
        self.parts.append(struct.pack("<" + fmt, *values))

    def varint(self, value: int) -> None:
        self.parts.append(varint(value))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)

    def sealed(self) -> bytes:
        """The record with its CRC-32 appended."""
        return seal(self.getvalue())


class Reader:
    """A bounded little-endian reader over ``data``; every error is one ``error(f"{what}: ...")``.

    ``open`` checks the size and the magic, ``unseal`` the trailing CRC (which then is no longer
    readable as a field); ``done`` refuses bytes left after the last field.
    """

    def __init__(self, data: object, error: type[Exception] = ValueError, what: str = "data") -> None:
        self.error_class, self.what = error, what
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self.error(f"expected bytes, got {type(data).__name__}")
        self.data = memoryview(bytes(data))  # bytes(data) copies nothing when data already is bytes
        self.pos = 0

    def error(self, message: str) -> Exception:
        """The caller's error class for ``message``, prefixed with what is being read."""
        return self.error_class(f"{self.what}: {message}")

    def open(self, magic: bytes, min_size: int, noun: str) -> None:
        """Check that the data holds at least ``min_size`` bytes and starts with ``magic`` (the
        errors call it ``noun``, e.g. "a fedkseed history"), and read past the magic."""
        if len(self.data) < min_size:
            raise self.error(f"{len(self.data)} bytes is shorter than {noun}")
        head = bytes(self.data[: len(magic)])
        if head != magic:
            raise self.error(f"bad magic {head!r}: not {noun}")
        self.pos = len(magic)

    def unseal(self) -> None:
        """Check the trailing CRC-32 against every byte before it, and end the data there."""
        self.need(CRC.size)
        body = self.data[: -CRC.size]
        (crc,) = CRC.unpack(self.data[-CRC.size :])
        if zlib.crc32(body) != crc:
            raise self.error("checksum mismatch (CRC-32): truncated or corrupted")
        self.data = body

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int) -> None:
        """Refuse, before anything is allocated for them, ``n`` bytes that the data does not hold."""
        if n < 0 or n > self.remaining():
            raise self.error(f"truncated (needs {n} more bytes at offset {self.pos})")

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes, as a view."""
        self.need(n)
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        self.need(1)
        self.pos += 1
        return self.data[self.pos - 1]

    def unpack(self, fmt: str) -> tuple:
        """The next fields of little-endian struct format ``fmt`` (written without a byte order)."""
        return struct.unpack("<" + fmt, self.take(size(fmt)))

    def varint(self) -> int:
        """An unsigned LEB128 varint of at most ``MAX_VARINT_BYTES`` bytes (any, not only the
        shortest, form)."""
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift >= 7 * MAX_VARINT_BYTES:
                raise self.error("varint too long")

    def done(self, last: str = "the body") -> None:
        """Refuse bytes left after ``last``, the final field."""
        if self.remaining():
            raise self.error(f"{self.remaining()} unexpected bytes after {last}")
