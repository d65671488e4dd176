"""Fuzz every wire decoder: random bytes, truncations, bit flips, field edits. The only outcome
besides a decoded message is a one-line WireError, and no input makes a decoder allocate more
than a small multiple of its own length."""

import functools
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from fedkseed.fed import wire

K = 64
SCHEDULE = np.array([3, 9, 3, 60, 17], dtype=np.int64)


def _reframe(message: bytes) -> bytes:
    """``message`` with its CRC recomputed, so a corruption reaches the body parser."""
    body = message[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _valid_messages() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for precision in ("fp16", "fp32"):
        for indices in ([], [5], [0, 1, 2, 40], list(range(0, K, 2)), list(range(K))):
            upload = wire.Upload(2, 3, K, 5, 1.5, np.array(indices, np.int64), rng.normal(0, 9, len(indices)))
            out.append(("upload", wire.encode_upload(upload, precision)))
        used = np.unique(SCHEDULE)
        upload = wire.Upload(2, 3, K, 5, 1.5, used, rng.normal(0, 9, used.size))
        out.append(("upload", wire.encode_upload(upload, precision, implied=used)))
        steps = wire.StepUpload(2, 3, K, 5, 0.5, np.array([1], np.int64), np.array([1.0, 0.0, -2.0, 3.0, 4.0]))
        out.append(("upload", wire.encode_step_upload(steps, precision)))
        values = wire.quantize(rng.normal(0, 9, 10), precision, -4)
        d = wire.Download(4, 1, K, np.arange(10) * 3, values, SCHEDULE)
        out.append(("download", wire.encode_download(d, precision, -4)))
        t = wire.Table(K, 7, 1e-3, "gaussian", 4, "cd" * 32, np.arange(10) * 5, values)
        out.append(("table", wire.encode_table(t, precision, -4)))
    return out


def _decode(kind: str, data: bytes):
    if kind == "upload":
        return wire.decode_upload(data, K, {2: SCHEDULE})
    if kind == "download":
        return wire.decode_download(data, K)
    return wire.decode_table(data, None)


def _mutations(data: bytes, rng: np.random.Generator) -> list[bytes]:
    out = [data[:n] for n in sorted(set(rng.integers(0, len(data), 6).tolist()))]  # truncations
    for _ in range(12):  # bit flips, with the CRC kept (caught by it) and recomputed (parser)
        flipped = bytearray(data)
        for position in rng.integers(0, len(data) - 4, rng.integers(1, 4)):
            flipped[position] ^= 1 << int(rng.integers(0, 8))
        out += [bytes(flipped), _reframe(bytes(flipped))]
    for _ in range(6):  # bytes inserted, deleted or overwritten inside the body, CRC recomputed
        body = bytearray(data[:-4])
        at = int(rng.integers(5, len(body) + 1))
        choice = rng.integers(0, 3)
        if choice == 0:
            body[at:at] = rng.integers(0, 256, rng.integers(1, 5), dtype=np.uint8).tobytes()
        elif choice == 1:
            del body[at : at + int(rng.integers(1, 5))]
        else:
            body[at : at + 1] = bytes([0xFF, 0xFF, 0xFF, 0x7F])  # a large varint
        out.append(_reframe(bytes(body) + b"\0\0\0\0"))
    return out


def _check(kind: str, data: bytes) -> None:
    tracemalloc.start()
    try:
        _decode(kind, data)
    except wire.WireError as error:
        assert "\n" not in str(error) and str(error)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 64 * 1024 + 80 * len(data), (kind, len(data), peak)


def test_fuzz_every_decoder():
    rng = np.random.default_rng(2026)
    valid = _valid_messages()
    cases = 0
    for kind, message in valid:
        _decode(kind, message)  # the originals decode
        for data in _mutations(message, rng):
            _check(kind, data)
            cases += 1
    for _ in range(1000):  # random bytes, half of them behind a valid frame
        kind = ("upload", "download", "table")[int(rng.integers(0, 3))]
        noise = rng.integers(0, 256, rng.integers(0, 48), dtype=np.uint8).tobytes()
        framed = _reframe(b"FKS" + bytes([b"UPDT"[int(rng.integers(0, 4))]]) + b"\x01" + noise + b"\0\0\0\0")
        _check(kind, noise)
        _check(kind, framed)
        cases += 2
    assert cases > 2500


def _header(kind: bytes, *varints: int) -> bytes:
    w = wire._Writer(kind)
    for value in varints:
        w.varint(value)
    return b"".join(w.parts)


@pytest.mark.parametrize(
    "kind, data",
    [
        # K = 2^24 and index form "all" in a 21-byte upload: refused before any allocation
        ("upload", _reframe(_header(b"U", 0, 1, 1 << 24, 1) + struct.pack("<f", 0.0) + bytes([2, 1]) + b"\0" * 4)),
        # a list of 2^24 indices promised, none given
        (
            "upload",
            _reframe(
                _header(b"U", 0, 1, 1 << 24, 1) + struct.pack("<f", 0.0) + bytes([0, 0x80, 0x80, 0x80, 8]) + b"\0" * 4
            ),
        ),
        # 2^62 steps promised by a per-step upload
        ("upload", _reframe(_header(b"P", 0, 1, 1 << 24, 1 << 62) + struct.pack("<f", 0.0) + bytes([2]) + b"\0" * 4)),
        # a download of all 2^24 entries and a 2^24-step schedule, none given
        ("download", _reframe(_header(b"D", 2, 1, 1 << 24) + bytes([2, 1, 0]) + b"\0" * 4)),
        (
            "table",
            _reframe(
                _header(b"T", 1 << 24)
                + struct.pack("<QfB", 7, 1e-3, 0)
                + bytes([1])
                + bytes(32)
                + bytes([2, 0, 0, 0, 0])
            ),
        ),
    ],
    ids=["upload-all", "upload-list", "per-step-upload", "download", "table"],
)
def test_huge_claims_in_tiny_messages_allocate_nothing(kind, data):
    tracemalloc.start()
    with pytest.raises(wire.WireError, match=r"truncated|MAX_STEPS"):
        if kind == "table":
            wire.decode_table(data)
        elif kind == "upload":
            wire.decode_upload(data, 1 << 24)
        else:
            wire.decode_download(data, 1 << 24)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(data) < 64 and peak < 64 * 1024, peak


def test_expected_k_is_checked_before_the_body():
    message = wire.encode_upload(wire.Upload(0, 1, 1 << 24, 1, 0.0, np.arange(1), np.ones(1)), "fp32")
    with pytest.raises(wire.WireError, match="K = 16777216, the run has K = 4096"):
        wire.decode_upload(message, 4096)
    download = wire.encode_download(
        wire.Download(2, 1, 8, np.arange(1), np.ones(1, np.float32), SCHEDULE[:0]), "fp32", 0
    )
    with pytest.raises(wire.WireError, match="K = 8, the run has K = 9"):
        wire.decode_download(download, 9)


# ------------------------------------------------------------- memory of large messages (issue 18, #6)
PEAK_FACTOR = 8  # a decoder's peak memory is at most this many times its message, plus 64 KiB


def _peak(decode) -> int:
    """Peak memory (tracemalloc) while ``decode()`` runs; a WireError is an allowed outcome."""
    tracemalloc.start()
    try:
        try:
            decode()
        except wire.WireError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _table_prefix(k: int) -> bytes:
    return _header(b"T", k) + struct.pack("<QfB", 7, 1e-3, 0) + bytes([1]) + bytes(32)


@functools.cache
def _large_messages() -> dict[str, tuple[bytes, object]]:
    """name -> (message, its decoder): valid ones at the largest sizes the spec allows, and the
    issue's crafted ones (a 2 MiB full bitmap without values; a 48 MiB download schedule)."""
    rng = np.random.default_rng(6)
    big = 1 << 24
    out: dict[str, tuple[bytes, object]] = {}
    full_bitmap = _reframe(_table_prefix(big) + bytes([1]) + b"\xff" * (big // 8) + b"\0\0\0\0")
    out["2 MiB full bitmap, no values"] = (full_bitmap, lambda m: wire.decode_table(m))
    k = 1 << 20
    values = wire.quantize(rng.normal(0, 1, k), "fp16", -10)
    table = wire.Table(k, 7, 1e-3, "gaussian", 4, "cd" * 32, np.arange(k), values)
    out["all 2^20 entries, fp16"] = (wire.encode_table(table, "fp16", -10), lambda m: wire.decode_table(m))
    half = np.arange(0, 1 << 21, 2)
    table = wire.Table(1 << 21, 7, 1e-3, "gaussian", 4, "cd" * 32, half, values)
    out["bitmap of 2^20 of 2^21, fp16"] = (wire.encode_table(table, "fp16", -10), lambda m: wire.decode_table(m))
    sparse = np.sort(rng.choice(big, 1 << 18, replace=False))
    table = wire.Table(big, 7, 1e-3, "gaussian", 4, "cd" * 32, sparse, values[: sparse.size])
    out["list of 2^18, fp16"] = (wire.encode_table(table, "fp16", -10), lambda m: wire.decode_table(m))
    schedule = rng.integers(0, big, wire.MAX_STEPS)
    download = wire.Download(2, 1, big, np.arange(0), np.zeros(0, np.float32), schedule)
    out["schedule of MAX_STEPS at K = 2^24"] = (
        wire.encode_download(download, "fp32", 0),
        lambda m: wire.decode_download(m, big),
    )
    claimed = _header(b"D", 2, 1, big) + bytes([0, 0, 0]) + _varint(big) + bytes(3 * big)  # 48 MiB
    out["48 MiB schedule of 2^24 steps"] = (_reframe(claimed + b"\0\0\0\0"), lambda m: wire.decode_download(m, big))
    return out


def _varint(value: int) -> bytes:
    w = wire._Writer(b"")
    w.parts = []
    w.varint(value)
    return b"".join(w.parts)


@pytest.mark.parametrize("name", list(_large_messages()))
def test_a_decoders_memory_is_a_small_multiple_of_its_message(name):
    message, decode = _large_messages()[name]
    peak = _peak(lambda: decode(message))
    assert peak <= PEAK_FACTOR * len(message) + 64 * 1024, (name, len(message), peak)


def test_a_schedule_past_max_steps_is_refused_before_allocating():
    big = 1 << 24
    claimed = (
        _header(b"D", 2, 1, big) + bytes([0, 0, 0]) + _varint(wire.MAX_STEPS + 1) + bytes(3 * (wire.MAX_STEPS + 1))
    )
    message = _reframe(claimed + b"\0\0\0\0")
    with pytest.raises(wire.WireError, match="MAX_STEPS"):
        wire.decode_download(message, big)
    assert _peak(lambda: wire.decode_download(message, big)) < 64 * 1024
    schedule = np.zeros(wire.MAX_STEPS + 1, np.int64)
    with pytest.raises(ValueError, match="MAX_STEPS"):
        wire.encode_download(wire.Download(2, 1, big, np.arange(0), np.zeros(0, np.float32), schedule), "fp32", 0)
