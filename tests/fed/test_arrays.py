"""The array message (fed/arrays.py) against its definition in docs/formats.md#arrays, built here
byte by byte with struct, zlib and numpy's own .npy writer, independently of fedkseed.binio."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest

from fedkseed.fed import WireError
from fedkseed.fed import arrays as A


def _by_hand(kind: bytes, round_: int, client: int, steps: int, loss: float, tensors: dict[str, np.ndarray]) -> bytes:
    body = b"FKA" + kind + struct.pack("<BIIIfI", 1, round_, client, steps, loss, len(tensors))
    for name, tensor in tensors.items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.astype("<f4"), allow_pickle=False)
        encoded, data = name.encode(), buffer.getvalue()
        body += struct.pack("<H", len(encoded)) + encoded + struct.pack("<I", len(data)) + data
    return body + struct.pack("<I", zlib.crc32(body))


MESSAGES = [
    (A.KIND_GLOBAL, 3, 1, 0, math.nan, {}),
    (A.KIND_GLOBAL, 1, 0, 0, math.nan, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
    (A.KIND_LOCAL, 7, 5, 20, 0.25, {"lora_A.wéight": np.full((1, 4), -1.5, np.float32), "b": np.ones(3, np.float32)}),
]


@pytest.mark.parametrize("fields", MESSAGES)
def test_message_is_its_definition_byte_for_byte(fields):
    kind, round_, client, steps, loss, tensors = fields
    expected = _by_hand(kind, round_, client, steps, loss, tensors)
    assert A.encode(A.ArrayMessage(kind, round_, client, steps, loss, dict(tensors))) == expected
    decoded = A.decode(expected, kind, {name: t.shape for name, t in tensors.items()})
    assert (decoded.round, decoded.client_id, decoded.steps) == (round_, client, steps)
    assert decoded.loss == pytest.approx(loss, nan_ok=True)
    assert all(np.array_equal(decoded.arrays[name], t) for name, t in tensors.items())


def test_every_truncation_and_a_body_fault_behind_a_valid_crc_are_one_line_wire_errors():
    kind, round_, client, steps, loss, tensors = MESSAGES[2]
    message = _by_hand(kind, round_, client, steps, loss, tensors)
    layout = {name: t.shape for name, t in tensors.items()}
    for n in range(len(message)):
        with pytest.raises(WireError, match=r"^array message: "):
            A.decode(message[:n], kind, layout)
    body = bytearray(message[:-4])
    body[21:25] = struct.pack("<I", 3)  # count 3, but two arrays follow
    with pytest.raises(WireError, match=r"^array message: truncated"):
        A.decode(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))), kind, layout)
