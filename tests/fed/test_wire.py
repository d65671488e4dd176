"""The FedKSeed wire format: exact round trips, every malformation rejected, real byte counts."""

import dataclasses
import struct
import zlib

import numpy as np
import pytest

from fedkseed.fed import FedSpec, Server, draw_schedule, wire


def _reframe(body: bytes) -> bytes:
    """A message body (without CRC) with a valid CRC: corruptions that pass the checksum."""
    return body + struct.pack("<I", zlib.crc32(body))


def _upload(k=64, indices=(1, 5, 63), values=(0.5, -2.0, 3.25), client=3, round_=2):
    return wire.Upload(client, round_, k, 4, 1.5, np.array(indices, dtype=np.int64), np.array(values))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("indices", [[], [0], [3, 4, 9, 1000], list(range(0, 4096, 3)), list(range(4096))])
def test_upload_round_trip(precision, indices):
    rng = np.random.default_rng(len(indices))
    values = rng.normal(0, 50, len(indices))
    message = wire.encode_upload(_upload(4096, indices, values), precision)
    u = wire.decode_upload(message, 4096)
    assert (u.client_id, u.round, u.k, u.steps, u.loss) == (3, 2, 4096, 4, 1.5)
    assert np.array_equal(u.indices, indices)
    exponent = wire.fp16_exponent(float(np.abs(values).max())) if len(values) and precision == "fp16" else 0
    expected = wire.quantize(values, precision, exponent)
    assert u.values.dtype == np.float32 and np.array_equal(u.values.view(np.uint32), expected.view(np.uint32))
    if precision == "fp16" and len(values):
        assert np.allclose(u.values, values, rtol=2**-11, atol=0)


def test_schedule_form_costs_one_byte_and_needs_the_schedule():
    schedule = np.array([7, 3, 7, 12], dtype=np.int64)
    implied = np.unique(schedule)
    explicit = wire.encode_upload(_upload(16, implied, [1.0, 2.0, 3.0]), "fp32")
    short = wire.encode_upload(_upload(16, implied, [1.0, 2.0, 3.0]), "fp32", implied=implied)
    assert len(short) < len(explicit)
    assert np.array_equal(wire.decode_upload(short, 16, {3: schedule}).indices, implied)
    with pytest.raises(wire.WireError, match="schedule"):
        wire.decode_upload(short, 16)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_download_and_table_round_trip(precision):
    k = 1000
    rng = np.random.default_rng(1)
    exponent = -5
    values = wire.quantize(rng.normal(0, 100, 300), precision, exponent)
    indices = np.sort(rng.choice(k, 300, replace=False))
    schedule = rng.integers(0, k, 37)
    d = wire.decode_download(
        wire.encode_download(wire.Download(4, 1, k, indices, values, schedule), precision, exponent), k
    )
    assert (d.round, d.since, d.k) == (4, 1, k)
    assert (
        np.array_equal(d.indices, indices) and np.array_equal(d.values, values) and np.array_equal(d.schedule, schedule)
    )
    fp = "ab" * 32
    t = wire.decode_table(
        wire.encode_table(wire.Table(k, 2**64 - 1, 3e-7, "rademacher", 9, fp, indices, values), precision, exponent)
    )
    assert (t.k, t.pool_seed, t.dist, t.round, t.fingerprint) == (k, 2**64 - 1, "rademacher", 9, fp)
    assert t.lr == np.float32(3e-7) and np.array_equal(t.values, values)


def test_encoder_refuses_values_off_the_grid():
    with pytest.raises(ValueError, match="grid"):
        wire.encode_download(
            wire.Download(2, 0, 8, np.array([1]), np.array([1.0001], np.float32), np.array([])), "fp16", 0
        )


def test_malformed_messages_are_rejected():
    good = wire.encode_upload(_upload(), "fp32")
    body = good[:-4]
    cases = {
        "bad magic": _reframe(b"XKS" + body[3:]),
        "kind": _reframe(body[:3] + b"D" + body[4:]),
        "version": _reframe(body[:4] + bytes([99]) + body[5:]),
        "CRC": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        "truncated": good[:-1],
        "unexpected bytes": _reframe(body + b"\0"),
        "shorter": b"FKS",
    }
    for reason, data in cases.items():
        with pytest.raises(wire.WireError, match=reason):
            wire.decode_upload(data, 64)
    # K field lowered from 64 to 8: seed index 63 is now out of range.
    assert body[7] == 64
    with pytest.raises(wire.WireError, match=">= K"):
        wire.decode_upload(_reframe(body[:7] + bytes([8]) + body[8:]), 8)
    # A NaN gradient smuggled in place of the last float32 value.
    with pytest.raises(wire.WireError, match="non-finite"):
        wire.decode_upload(_reframe(body[:-4] + struct.pack("<f", float("nan"))), 64)
    with pytest.raises(wire.WireError):
        wire.decode_upload(b"not bytes at all but a str".decode(), 64)


def _round_trip_bytes(pro: bool, rounds: int) -> tuple[int, float]:
    """Worst and mean download + upload bytes per client and round for FedKSeed's official
    shape (K = 4096, tau = 200, 200 clients, 5% per round), real encoder, synthetic gradients."""
    spec = FedSpec(num_clients=200, clients_per_round=10, k=4096, local_steps=200, pro=pro)
    rng = np.random.default_rng(0)
    server = Server(spec, rng.integers(1, 20, 200).tolist())
    totals = []
    for _ in range(rounds):
        for c in server.begin_round():
            d = wire.decode_download(server.download(c), spec.k)
            if pro:  # FedKSeed-Pro: one g per step, in the order of the schedule
                values = rng.normal(0, 5, 200)
                upload = wire.StepUpload(c, d.round, spec.k, 200, 2.0, np.zeros(0, np.int64), values)
                assert server.receive(wire.encode_step_upload(upload, spec.precision))
                continue
            used = np.unique(draw_schedule(spec.seed, d.round, c, 200, spec.k))
            upload = wire.Upload(c, d.round, spec.k, 200, 2.0, used, rng.normal(0, 5, used.size))
            assert server.receive(wire.encode_upload(upload, spec.precision, implied=used))
        s = server.end_round()
        totals += [s.bytes_up[c] + s.bytes_down[c] for c in s.accepted]
    return max(totals), float(np.mean(totals))


@pytest.mark.parametrize("pro", [False, True])
def test_round_trip_is_at_most_9_kb_at_k4096_tau200(pro):
    worst, mean = _round_trip_bytes(pro, rounds=12)
    assert worst <= 9000, (worst, mean)  # the paper: 16,384 B down + 1,600 B up


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -3e-7, 0.0])
def test_delta_refuses_an_lr_that_is_not_finite_and_positive(lr):
    t = wire.Table(8, 1, lr, "gaussian", 1, "00" * 32, np.array([2]), np.ones(1, np.float32))
    with pytest.raises(wire.WireError, match=r"lr = .* must be finite and > 0"):
        wire.decode_table(wire.encode_table(t, "fp32", 0))
    assert wire.decode_table(wire.encode_table(dataclasses.replace(t, lr=1e-3), "fp32", 0), 8).k == 8
    with pytest.raises(wire.WireError, match="K = 8, the run has K = 16"):
        wire.decode_table(wire.encode_table(dataclasses.replace(t, lr=1e-3), "fp32", 0), 16)


def test_wire_version_names_the_stream_version():
    """A delta replays under the stream its wire version names: a reader of another stream refuses it."""
    from fedkseed import stream

    assert wire.WIRE_VERSION_OF_STREAM[stream.STREAM_VERSION] == wire.VERSION
    t = wire.Table(4, 7, 0.5, "gaussian", 1, "00" * 32, np.array([1], dtype=np.int64), np.array([0.25]))
    data = bytearray(wire.encode_table(t, "fp32", 0))
    assert data[:5] == b"FKST" + bytes([wire.VERSION])
    data[4] = wire.VERSION + 1  # what a later stream's writer would stamp
    with pytest.raises(wire.WireError, match="version"):
        wire.decode_table(bytes(data))


@pytest.mark.parametrize("k", [1, 2, 1000, 1 << 24])
def test_schedule_packing_matches_the_documented_bit_layout_across_chunks(k):
    """The chunked packer and unpacker against the layout of docs/formats.md#download, built
    independently (entry j's bit b at stream bit j * width + b, LSB first), over more entries
    than one chunk holds."""
    width = max(1, (k - 1).bit_length())
    schedule = np.random.default_rng(k).integers(0, k, 3 * wire._CHUNK + 5)
    stream = "".join(format(int(i), f"0{width}b")[::-1] for i in schedule)  # bit order LSB first
    stream += "0" * (-len(stream) % 8)
    expected = bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))
    message = wire.encode_download(wire.Download(2, 1, k, np.arange(0), np.zeros(0, np.float32), schedule), "fp32", 0)
    assert expected in message and message.index(expected) + len(expected) == len(message) - 4
    assert np.array_equal(wire.decode_download(message, k).schedule, schedule)
