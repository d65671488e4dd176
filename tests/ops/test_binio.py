"""fedkseed.binio, the codec under the History file and the wire messages: its fields against
independent known answers (the CRC-32 check value, LEB128 examples, struct layouts), its bounds and
one-line errors, and the byte-for-byte examples of docs/formats.md written by both formats."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from fedkseed import binio
from fedkseed.fed import wire
from fedkseed.zo.history import History
from fedkseed.zo.passes import Entry

FORMATS = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()


class CodecError(ValueError):
    """A caller's own error class: every problem the reader finds must come out as one."""


# LEB128 examples: the DWARF/Wikipedia ones and the edges of a u64.
VARINTS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (300, "ac02"),
    (624485, "e58e26"),
    (2**63, "80808080808080808001"),
    (2**64 - 1, "ffffffffffffffffff01"),
]


def test_crc_is_the_standard_crc32():
    """The check value of CRC-32 (reflected 0xEDB88320, init and final XOR 0xFFFFFFFF) over
    "123456789" is 0xCBF43926, as docs/formats.md#wire specifies."""
    assert binio.seal(b"123456789") == b"123456789" + bytes.fromhex("2639f4cb")
    assert binio.Writer(b"1234", b"56789").sealed() == binio.seal(b"123456789")


@pytest.mark.parametrize("value, encoded", VARINTS)
def test_varint_known_answers_round_trip(value, encoded):
    assert binio.varint(value) == bytes.fromhex(encoded)
    r = binio.Reader(bytes.fromhex(encoded) + b"\x00", CodecError, "v")
    assert r.varint() == value and r.remaining() == 1


def test_varint_reader_takes_any_form_up_to_ten_bytes_and_no_more():
    assert binio.Reader(bytes.fromhex("8000"), CodecError).varint() == 0  # not the shortest form
    assert binio.Reader(bytes.fromhex("ff" * 9 + "7f"), CodecError).varint() == 2**70 - 1  # 10 bytes
    with pytest.raises(CodecError, match=r"^v: varint too long$"):
        binio.Reader(bytes.fromhex("ff" * 10 + "01"), CodecError, "v").varint()
    with pytest.raises(ValueError, match=">= 0"):
        binio.varint(-1)


def test_writer_fields_are_little_endian_without_padding():
    w = binio.Writer(b"MAG")
    w.pack("BHIQ", 1, 0x0203, 0x04050607, 0x08090A0B0C0D0E0F)
    w.pack("fbd", -0.5, -2, 1.0)
    w.varint(300)
    w.raw(b"xy")
    expected = (
        b"MAG\x01\x03\x02\x07\x06\x05\x04\x0f\x0e\x0d\x0c\x0b\x0a\x09\x08"
        + bytes.fromhex("000000bf")  # float32 -0.5
        + b"\xfe"
        + bytes.fromhex("000000000000f03f")  # float64 1.0
        + b"\xac\x02xy"
    )
    assert w.getvalue() == expected and binio.size("BHIQfbd") == 1 + 2 + 4 + 8 + 4 + 1 + 8


def test_reader_reads_back_what_the_writer_wrote():
    w = binio.Writer(b"TEST")
    w.pack("HH", 7, 1)
    w.varint(2**40)
    w.pack("3f", 1.5, -2.0, 0.25)
    w.raw(b"tail")
    data = w.sealed()
    r = binio.Reader(data, CodecError, "record")
    r.open(b"TEST", 8, "a test record")
    assert r.unpack("HH") == (7, 1)
    r.unseal()
    assert r.varint() == 2**40 and r.unpack("3f") == (1.5, -2.0, 0.25)
    tail = r.take(4)
    assert bytes(tail) == b"tail" and tail.obj is data  # a view into the data, not a copy
    r.done()


def _sealed_record() -> bytes:
    return binio.Writer(b"TEST", b"\x01\x02\x03").sealed()


@pytest.mark.parametrize(
    "read, message",
    [
        (lambda r: None, "expected bytes, got str"),
        (lambda r: r.open(b"TEST", 64, "a test record"), "11 bytes is shorter than a test record"),
        (lambda r: r.open(b"BEST", 8, "a test record"), r"bad magic b'TEST': not a test record"),
        (lambda r: r.take(12), r"truncated \(needs 12 more bytes at offset 0\)"),
        (lambda r: r.take(-1), "truncated"),
        (lambda r: r.need(2**62), "truncated"),  # refused before anything is built for it
        (lambda r: r.unpack("3Q"), r"truncated \(needs 24 more bytes"),
        (lambda r: (r.unseal(), r.take(7), r.u8()), r"truncated \(needs 1 more bytes at offset 7\)"),
        (lambda r: (r.unseal(), r.take(3), r.done("the last field")), "4 unexpected bytes after the last field"),
    ],
)
def test_every_problem_is_one_line_of_the_callers_error(read, message):
    data = "not bytes" if message.startswith("expected bytes") else _sealed_record()
    with pytest.raises(CodecError) as caught:
        read(binio.Reader(data, CodecError, "record"))
    text = str(caught.value)
    assert re.match(f"record: {message}", text) and "\n" not in text


@pytest.mark.parametrize("at", range(11))
def test_unseal_detects_any_changed_byte(at):
    data = bytearray(_sealed_record())
    data[at] ^= 0x40
    r = binio.Reader(bytes(data), CodecError, "record")
    with pytest.raises(CodecError, match=r"^record: checksum mismatch \(CRC-32\): truncated or corrupted$"):
        r.unseal()


def _documented_bytes(start: str) -> bytes:
    """The hex bytes of the docs/formats.md example that follows ``start``: on each line of its
    code block, the two-digit hex tokens before the description."""
    block = FORMATS[FORMATS.index(start) :].split("```")[1]
    out = bytearray()
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch("[0-9a-f]{2}", token):
                break
            out.append(int(token, 16))
    return bytes(out)


def test_the_documented_upload_is_written_byte_for_byte():
    expected = _documented_bytes("Example (client 3, round 1, K = 16")
    upload = wire.Upload(3, 1, 16, 4, 2.5, np.array([1, 5, 9]), np.array([0.5, -1.25, 3.0], np.float32))
    assert wire.encode_upload(upload, "fp16") == expected and len(expected) == 28
    decoded = wire.decode_upload(expected, 16)
    assert (decoded.client_id, decoded.round, decoded.steps, decoded.loss) == (3, 1, 4, 2.5)
    assert np.array_equal(decoded.indices, upload.indices) and np.array_equal(decoded.values, upload.values)


def test_the_documented_history_is_written_byte_for_byte():
    expected = _documented_bytes('Example (Gaussian, eps 1e-3, one float32 tensor "w"')
    h = History(layout=[("w", (2, 3), "float32")], classes=[1], eps=1e-3)
    h.add(Entry((123,), (123,), ((-0.5,),), (1.0,)))
    assert h.to_bytes() == expected and len(expected) == 90
    assert History.from_bytes(expected) == h
    assert binio.seal(expected[:-4]) == expected
